"""The ``gradgym`` command: run folders, MLflow logging of a single run, errors before any
work, the env table and the dashboard bound to loopback."""

from __future__ import annotations

import ipaddress
import json
import shutil
import signal
import subprocess
import threading
import time

import imageio.v3 as iio
import psutil
import pytest
from conftest import clean_env, free_port, run_gradgym, stop_process_group
from mlflow import MlflowClient
from omegaconf import OmegaConf

from gradgym.envs import registered
from gradgym.pipelines.base import ITERATION_METRICS
from gradgym.platform.cli import main

TINY_TRAJECTORY = [
    "pipeline=trajectory", "backend=torch", "env=Reacher", "env_kwargs.num_joints=3",
    "pipeline.iters=6", "pipeline.horizon=12", "pipeline.batch=3", "pipeline.grad_hist_every=3",
]


@pytest.mark.slow
def test_run_writes_the_run_folder_and_logs_to_the_embedded_store(tmp_path):
    result = run_gradgym(["run", *TINY_TRAJECTORY, "run_dir=out"], cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "final_return" in result.stdout and "FINISHED" in result.stdout
    run_dir = tmp_path / "out"

    config = OmegaConf.load(run_dir / "config.yaml")
    assert (config.env, config.backend, config.pipeline.name) == ("Reacher", "torch", "trajectory")
    assert config.env_kwargs.num_joints == 3 and config.pipeline.iters == 6

    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [line["iteration"] for line in lines] == list(range(6))
    assert all(set(ITERATION_METRICS) <= set(line) for line in lines)

    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "FINISHED" and summary["iterations"] == 6
    assert summary["best_return"] >= max(line["return_mean"] for line in lines) - 1e-6
    for key in ("final_return", "compile_time_s", "wall_time_s"):
        assert isinstance(summary[key], float)
    assert summary["malloc"] == "libjemalloc.so"  # `gradgym run` executed itself on jemalloc
    for name in ("video_initial.gif", "video_best.gif"):
        frames = iio.imread(run_dir / name, index=None)
        assert frames.ndim == 4 and frames.shape[0] > 1, name  # horizon 12: several frames
    assert sorted(p.name for p in (run_dir / "gradients").iterdir()) == [
        "step_000000.png", "step_000003.png",
    ]

    # The same run in MLflow, in the default embedded store of the working directory.
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    (run,) = client.search_runs([client.get_experiment_by_name("gradgym").experiment_id])
    assert run.info.run_id == summary["mlflow_run_id"] and run.info.status == "FINISHED"
    assert {k: run.data.tags[k] for k in ("backend", "env", "pipeline", "seed")} == {
        "backend": "torch", "env": "Reacher", "pipeline": "trajectory", "seed": "0",
    }
    assert run.data.params["env_kwargs.num_joints"] == "3"
    assert run.data.params["pipeline.torch_compile"] == "False"  # auto, decided: a short run
    assert [m.step for m in client.get_metric_history(run.info.run_id, "return_mean")] == list(range(6))
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"config.yaml", "video_initial.gif", "video_best.gif", "summary.json", "gradients"} <= artifacts


@pytest.mark.parametrize(
    "overrides, expected",
    [
        (["env=Pendulm"], ["'Pendulm'", "'env'", "CartPole"]),
        (["pipeline=trajectory", "backend=numpy"], ["'numpy'", "needs gradients", "jax, torch"]),
        (["pipeline.iters=many"], ["'many'", "'pipeline.iters'", "int"]),
        (["env=Reacher", "env_kwargs.arms=2"], ["env_kwargs", "arms", "num_joints"]),
        (["colour=red"], ["'colour'", "allowed keys"]),
    ],
)
def test_run_rejects_bad_config_before_any_work(tmp_path, monkeypatch, capsys, overrides, expected):
    monkeypatch.chdir(tmp_path)
    assert main(["run", *overrides]) == 2
    err = capsys.readouterr().err
    for fragment in expected:
        assert fragment in err, f"{fragment!r} not in {err!r}"
    assert list(tmp_path.iterdir()) == []  # no run folder, no MLflow store


def test_run_refuses_a_folder_that_holds_a_run(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / "metrics.jsonl").write_text('{"iteration": 0}\n')
    code = main(["run", "pipeline=cem", "backend=numpy", "tracking.enabled=false", "run_dir=old"])
    assert code == 2
    assert "already holds a run" in capsys.readouterr().err
    assert (tmp_path / "old" / "metrics.jsonl").read_text() == '{"iteration": 0}\n'


def test_sweep_rejects_an_invalid_file_before_ray_starts(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "bad.yaml"
    path.write_text("name: bad\ngrid:\n  env: [Pendulum]\n  seed: []\n")
    assert main(["sweep", str(path)]) == 2
    assert "grid.seed is empty" in capsys.readouterr().err
    assert not (tmp_path / "sweeps").exists()
    import ray

    assert not ray.is_initialized()


def test_envs_lists_every_registered_env(capsys):
    assert main(["envs"]) == 0
    out = capsys.readouterr().out
    for name, entry in registered().items():
        row = next(line for line in out.splitlines() if f" {name} " in line)
        task = entry.factory()
        assert entry.family in row and f" {task.obs_dim} " in row and f" {task.act_dim} " in row


def test_console_script_is_installed(tmp_path):
    script = shutil.which("gradgym")
    assert script, "the gradgym console script is not on PATH (pip install -e .)"
    result = subprocess.run([script, "run", "backend=numpy"], cwd=tmp_path, capture_output=True,
                            text=True, env=clean_env(), timeout=120, check=False)
    assert result.returncode == 2 and "needs gradients" in result.stderr


@pytest.mark.slow
def test_ui_serves_the_local_store_on_loopback_only(tmp_path):
    process, _port = _start_ui(tmp_path)
    try:
        addresses = _listening_addresses(process.pid)
        assert addresses and all(ipaddress.ip_address(a.removeprefix("::ffff:")).is_loopback
                                 for a in addresses), addresses
        assert (tmp_path / "mlflow.db").exists()  # the local store of the working directory
    finally:
        stop_process_group(process)


@pytest.mark.slow
@pytest.mark.parametrize("stop_signal", [signal.SIGTERM, signal.SIGINT])
def test_ui_stops_everything_it_started_on_a_signal(tmp_path, stop_signal):
    """A process manager's SIGTERM (or Ctrl+C) to ``gradgym ui`` alone, not to its group:
    the MLflow server and its workers go too, and nothing listens on the port after."""
    process, port = _start_ui(tmp_path)
    try:
        started = {process.pid} | {c.pid for c in psutil.Process(process.pid).children(recursive=True)}
        assert len(started) >= 2, "the server runs in processes of its own"
        process.send_signal(stop_signal)  # to the command only, as `kill PID` does
        assert process.wait(timeout=60) == 0, "".join(process.lines)[-2000:]
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and any(psutil.pid_exists(pid) for pid in started - {process.pid}):
            time.sleep(0.2)
        left = [pid for pid in started - {process.pid} if psutil.pid_exists(pid)
                and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE]
        assert not left, f"processes left running: {left}"
        listening = {c.laddr.port for c in psutil.net_connections("inet") if c.status == psutil.CONN_LISTEN}
        assert port not in listening
    finally:
        stop_process_group(process)


def _start_ui(cwd) -> tuple[subprocess.Popen, int]:
    """``gradgym ui`` on a free port, in its own process group, once it has announced its
    address (what a user waits for; the port may answer a moment before) and answers.

    A thread reads the command's output (the server's too, which shares the pipe) into
    ``process.lines``, so that a full pipe never blocks either of them.
    """
    port = free_port()
    process = subprocess.Popen(
        [shutil.which("gradgym"), "ui", "--port", str(port)], cwd=cwd, env=clean_env(),
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True, text=True,
    )
    process.lines = []

    def read() -> None:
        for line in process.stdout:
            process.lines.append(line)

    threading.Thread(target=read, daemon=True).start()
    url = f"http://127.0.0.1:{port}/#/experiments"
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline and not any(url in line for line in process.lines):
        if process.poll() is not None:
            raise AssertionError("".join(process.lines)[-2000:])
        time.sleep(0.2)
    if not (any(url in line for line in process.lines) and _answers(port)):
        stop_process_group(process)
        raise AssertionError(f"the dashboard did not come up: {''.join(process.lines)[-2000:]}")
    return process, port


def _answers(port: int) -> bool:
    import urllib.request

    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as response:
            return response.status == 200
    except OSError:
        return False


def _listening_addresses(pid: int) -> set[str]:
    root = psutil.Process(pid)
    pids = {pid} | {child.pid for child in root.children(recursive=True)}
    return {c.laddr.ip for c in psutil.net_connections("inet")
            if c.status == psutil.CONN_LISTEN and c.pid in pids}
