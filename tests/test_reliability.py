"""Reliability: runs and sweeps end in a true state whatever ends them, run folders are
owned by one live run, and every resource or range problem fails before work starts.

One test per defect of the reliability issue (numbered as there), with real MLflow and Ray.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import free_port, run_gradgym, start_gradgym, stop_process_group
from mlflow import MlflowClient

from gradgym.platform.cli import main
from gradgym.platform.config import compose_run_config
from gradgym.platform.faults import FAULTS_VARIABLE
from gradgym.platform.records import METRICS_FILE, RunDirBusyError, RunRecord
from gradgym.platform.runner import default_run_dir, execute_run
from gradgym.platform.sweep import resume_sweep
from gradgym.platform.tracking import TrackingError

CEM_RUN = [
    "pipeline=cem", "backend=numpy", "env=Pendulum", "pipeline.horizon=10", "pipeline.batch=2",
    "pipeline.population=8", "pipeline.elites=2", "pipeline.render=false",
]


def _delay(seconds: float) -> dict[str, str]:
    return {FAULTS_VARIABLE: json.dumps([{"match": {}, "iteration_delay_s": seconds}])}


def _lines(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / METRICS_FILE).read_text().splitlines()]


def _only_run(client: MlflowClient, experiment: str):
    found = client.get_experiment_by_name(experiment)
    (run,) = client.search_runs([found.experiment_id])
    return run


def _wait_for(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.2)
    raise TimeoutError(what)


# ---------------------------------------------------------------------- 1: one run per folder

def test_1_unique_default_run_dirs_in_the_same_second(tmp_path):
    cfg = compose_run_config(CEM_RUN)
    first, second = default_run_dir(cfg, tmp_path), default_run_dir(cfg, tmp_path)
    assert first != second and first.is_dir() and second.is_dir()


def test_1_a_live_run_owns_its_folder(tmp_path):
    """A second run on a live run's folder is refused, also with resume (a retried trial
    waits for the holder, then gives up); once the holder is gone the folder can be taken."""
    holder = RunRecord(tmp_path / "run").claim()
    try:
        with pytest.raises(RunDirBusyError, match="in use by a live run"):
            RunRecord(tmp_path / "run").claim()
        assert RunRecord(tmp_path / "run").is_live()
    finally:
        holder.release()
    assert not RunRecord(tmp_path / "run").is_live()
    RunRecord(tmp_path / "run").claim(resume=True).release()


@pytest.mark.slow
def test_1_two_runs_on_one_run_dir_do_not_mix(tmp_path):
    iters = 20
    args = ["run", *CEM_RUN, f"pipeline.iters={iters}", "tracking.enabled=false", "run_dir=same"]
    first = start_gradgym([*args, "seed=1"], tmp_path, tmp_path / "1.log", **_delay(0.2))
    second = start_gradgym([*args, "seed=2"], tmp_path, tmp_path / "2.log", **_delay(0.2))
    try:
        codes = sorted([first.wait(timeout=240), second.wait(timeout=240)])
    finally:
        stop_process_group(first)
        stop_process_group(second)
    logs = (tmp_path / "1.log").read_text() + (tmp_path / "2.log").read_text()
    assert codes == [0, 2], logs[-3000:]
    assert "in use by a live run" in logs or "already holds a run" in logs
    summary = json.loads((tmp_path / "same" / "summary.json").read_text())
    config = (tmp_path / "same" / "config.yaml").read_text()
    assert f"seed: {summary['seed']}" in config
    assert [line["iteration"] for line in _lines(tmp_path / "same")] == list(range(iters))


# ---------------------------------------------------------------------- 2: foreign folders

def test_2_a_folder_of_other_files_is_refused_untouched(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "config.yaml").write_text("my: own\n")
    code = main(["run", *CEM_RUN, "pipeline.iters=2", "tracking.enabled=false", "run_dir=mine"])
    assert code == 2
    assert "not a gradgym run folder" in capsys.readouterr().err
    assert sorted(p.name for p in mine.iterdir()) == ["config.yaml"]
    assert (mine / "config.yaml").read_text() == "my: own\n"


# ---------------------------------------------------------------------- 3: SIGTERM, SIGKILL

@pytest.mark.slow
def test_3_sigterm_ends_a_run_killed_with_every_point_sent(tmp_path, mlflow_server):
    process = start_gradgym(
        ["run", *CEM_RUN, "pipeline.iters=200", f"tracking.uri={mlflow_server.uri}",
         "tracking.experiment=sigterm", "tracking.flush_every_s=0.2", "run_dir=run"],
        tmp_path, tmp_path / "run.log", **_delay(0.2))
    try:
        _wait_for(lambda: (tmp_path / "run" / METRICS_FILE).is_file()
                  and len(_lines(tmp_path / "run")) >= 5, 120, "no iterations")
        process.send_signal(signal.SIGTERM)
        code = process.wait(timeout=120)
    finally:
        stop_process_group(process)
    assert code == 128 + signal.SIGTERM, (tmp_path / "run.log").read_text()[-2000:]
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["status"] == "KILLED"
    assert summary["iterations"] == len(_lines(tmp_path / "run"))
    client = MlflowClient(mlflow_server.uri)
    run = _only_run(client, "sigterm")
    assert run.info.status == "KILLED"
    points = client.get_metric_history(run.info.run_id, "return_mean")
    assert sorted(p.step for p in points) == [line["iteration"] for line in _lines(tmp_path / "run")]


@pytest.mark.slow
def test_3_a_run_killed_by_sigkill_is_settled_by_gradgym_runs(tmp_path, mlflow_server):
    process = start_gradgym(
        ["run", *CEM_RUN, "pipeline.iters=200", f"tracking.uri={mlflow_server.uri}",
         "tracking.experiment=sigkill", "tracking.flush_every_s=0.2", "run_dir=runs/killed"],
        tmp_path, tmp_path / "run.log", **_delay(0.2))
    try:
        _wait_for(lambda: (tmp_path / "runs/killed" / METRICS_FILE).is_file()
                  and len(_lines(tmp_path / "runs/killed")) >= 5, 120, "no iterations")
        listed = run_gradgym(["runs"], cwd=tmp_path)
        assert "RUNNING" in listed.stdout, listed.stdout
        os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=30)
    finally:
        stop_process_group(process)
    listed = run_gradgym(["runs"], cwd=tmp_path)
    assert "DEAD" in listed.stdout and "--settle" in listed.stdout, listed.stdout
    settled = run_gradgym(["runs", "--settle"], cwd=tmp_path)
    assert settled.returncode == 0 and "KILLED" in settled.stdout, settled.stdout + settled.stderr
    folder = tmp_path / "runs/killed"
    summary = json.loads((folder / "summary.json").read_text())
    assert summary["status"] == "KILLED" and summary["iterations"] == len(_lines(folder))
    client = MlflowClient(mlflow_server.uri)
    run = _only_run(client, "sigkill")
    assert run.info.status == "KILLED"
    points = client.get_metric_history(run.info.run_id, "return_mean")
    assert sorted(p.step for p in points) == [line["iteration"] for line in _lines(folder)]


def test_3_the_next_run_on_a_dead_run_folder_settles_it(tmp_path, monkeypatch, capsys):
    """A folder whose run died (its lock is free, no summary) ends KILLED when the next
    ``gradgym run`` touches it; that run is still refused (the folder holds a run)."""
    monkeypatch.chdir(tmp_path)
    args = ["run", *CEM_RUN, "pipeline.iters=3", "tracking.enabled=false", "run_dir=dead"]
    record = RunRecord(tmp_path / "dead").claim()
    record.write_config(compose_run_config(args[1:]))
    record.metric_log().append(0, {"return_mean": 1.0}, 0)
    record.release()  # what the kernel does when the run's process is killed
    assert main(args) == 2
    assert "settled as KILLED" in capsys.readouterr().err
    summary = json.loads((tmp_path / "dead" / "summary.json").read_text())
    assert summary["status"] == "KILLED" and summary["iterations"] == 1


# ---------------------------------------------------------------------- 10: summary counts

def test_10_summary_counts_every_logged_iteration_after_a_tracking_failure(tmp_path, monkeypatch):
    dead = f"http://127.0.0.1:{free_port()}"
    monkeypatch.setenv(FAULTS_VARIABLE, _delay(0.1)[FAULTS_VARIABLE])
    cfg = compose_run_config([*CEM_RUN, "pipeline.iters=200", f"tracking.uri={dead}",
                              "tracking.outage_limit_s=1", f"run_dir={tmp_path / 'run'}",
                              "progress=false"])
    with pytest.raises(TrackingError):
        execute_run(cfg)
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["iterations"] == len(_lines(tmp_path / "run"))


# ---------------------------------------------------------------------- 8 and 12: ranges

@pytest.mark.parametrize("overrides, expected", [
    (["seed=-1"], "allowed: an int in [0,"),
    (["pipeline.batch=1000000000"], "GiB"),
])
def test_8_12_out_of_range_values_are_rejected_before_any_work(tmp_path, monkeypatch, capsys,
                                                               overrides, expected):
    monkeypatch.chdir(tmp_path)
    code = main(["run", "pipeline=cem", "backend=numpy", "tracking.enabled=false", *overrides])
    assert code == 2
    assert expected in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_8_a_sweep_name_too_long_for_a_folder_is_rejected(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    sweep = tmp_path / "s.yaml"
    sweep.write_text("name: " + "x" * 300 + "\noverrides: {pipeline: cem, backend: numpy}\n")
    assert main(["sweep", str(sweep)]) == 2
    assert "at most 200 characters" in capsys.readouterr().err
    assert not (tmp_path / "sweeps").exists()


@pytest.mark.slow
def test_8_a_sweep_that_fails_to_start_leaves_no_folder(tmp_path):
    dead = f"http://127.0.0.1:{free_port()}"
    sweep = tmp_path / "s.yaml"
    sweep.write_text("name: nostore\noverrides: {pipeline: cem, backend: numpy, pipeline.iters: 2, "
                     f"tracking.uri: '{dead}', tracking.outage_limit_s: 1}}\n")
    result = run_gradgym(["sweep", str(sweep)], cwd=tmp_path, timeout=240)
    assert result.returncode == 1 and "cannot reach the MLflow tracking store" in result.stderr
    assert not (tmp_path / "sweeps" / "nostore").exists()
    resumed = run_gradgym(["sweep", "--resume", "nostore"], cwd=tmp_path, timeout=120)
    assert "sweeps in 'sweeps': none" in resumed.stderr, resumed.stderr


# ---------------------------------------------------------------------- 4: resources

@pytest.mark.slow
def test_4_a_sweep_whose_trials_cannot_fit_fails_before_any_trial(tmp_path, mlflow_server):
    sweep = tmp_path / "s.yaml"
    sweep.write_text("name: toobig\nnum_cpus: 1\ncpus_per_trial: 4\nexperiment: toobig\n"
                     "overrides: {pipeline: cem, backend: numpy, pipeline.iters: 2, "
                     f"tracking.uri: '{mlflow_server.uri}'}}\n")
    began = time.monotonic()
    result = run_gradgym(["sweep", str(sweep)], cwd=tmp_path, timeout=300)
    assert result.returncode == 1, result.stderr[-2000:]
    assert "cpus_per_trial=4" in result.stderr and "largest node has 1 CPUs" in result.stderr
    assert time.monotonic() - began < 240
    assert not (tmp_path / "sweeps" / "toobig").exists()
    run = _only_run(MlflowClient(mlflow_server.uri), "toobig")
    assert run.info.status == "FAILED"


# ---------------------------------------------------------------------- 5 and 6: resume

def _fake_finished_sweep(tmp_path: Path, uri: str, run_id: str = "0" * 32) -> Path:
    sweep_dir = tmp_path / "sweeps" / "done"
    (sweep_dir / "tune").mkdir(parents=True)
    (sweep_dir / "sweep.yaml").write_text(
        "name: done\noverrides: {pipeline: cem, backend: numpy, tracking.outage_limit_s: 3}\n")
    (sweep_dir / "parent.json").write_text(json.dumps(
        {"uri": uri, "run_id": run_id, "experiment": "done"}))
    return sweep_dir


def test_5_resume_with_the_store_away_fails_within_the_limit(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    _fake_finished_sweep(tmp_path, f"http://127.0.0.1:{free_port()}")
    began = time.monotonic()
    assert main(["sweep", "--resume", "done"]) == 1
    assert time.monotonic() - began < 30
    err = capsys.readouterr().err
    assert "cannot reopen the sweep's MLflow parent run" in err and "outage_limit_s=3" in err


def test_5_a_failed_resume_leaves_a_finished_parent_finished(tmp_path, monkeypatch, mlflow_server):
    monkeypatch.chdir(tmp_path)
    client = MlflowClient(mlflow_server.uri)
    experiment = client.create_experiment(f"resume-{time.time_ns()}")
    run = client.create_run(experiment)
    client.set_terminated(run.info.run_id, "FINISHED")
    sweep_dir = _fake_finished_sweep(tmp_path, mlflow_server.uri, run.info.run_id)
    (sweep_dir / "tune" / "tuner.pkl").write_bytes(b"not a pickle")  # Tuner.restore fails
    with pytest.raises(Exception):  # noqa: B017 - whatever Ray raises for a broken state
        resume_sweep("done")
    assert client.get_run(run.info.run_id).info.status == "FINISHED"


def test_6_resume_refuses_tune_state_others_can_write(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    sweep_dir = _fake_finished_sweep(tmp_path, f"http://127.0.0.1:{free_port()}")
    crafted = sweep_dir / "tune" / "tuner.pkl"
    crafted.write_bytes(b"crafted")
    crafted.chmod(0o666)
    assert main(["sweep", "--resume", "done"]) == 1
    err = capsys.readouterr().err
    assert "refusing to resume" in err and "tuner.pkl" in err and "writable by every user" in err


# ---------------------------------------------------------------------- 9: gradgym ui

def test_9_ui_exits_non_zero_on_an_invalid_port(tmp_path):
    result = run_gradgym(["ui", "--port", "99999"], cwd=tmp_path, timeout=60)
    assert result.returncode != 0 and "allowed: an int in [1, 65535]" in result.stderr


def test_9_ui_exits_non_zero_when_the_port_is_taken(tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = run_gradgym(["ui", "--port", str(port)], cwd=tmp_path, timeout=60)
    assert result.returncode == 1, result.stdout + result.stderr
    assert f"cannot listen on 127.0.0.1:{port}" in result.stderr
    assert not (tmp_path / "mlflow.db").exists()  # nothing started


@pytest.mark.slow
def test_9_ui_killed_leaves_no_server(tmp_path):
    """SIGKILL to ``gradgym ui`` alone: its MLflow server stops too (parent-death signal)."""
    import psutil

    port = free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "gradgym.platform.cli", "ui", "--port", str(port)], cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT, start_new_session=True)
    try:
        _wait_for(lambda: _listening(port), 180, "the dashboard did not come up")
        children = psutil.Process(process.pid).children(recursive=True)
        process.kill()
        process.wait(timeout=10)
        _wait_for(lambda: not _listening(port), 60, "the server still listens")
        psutil.wait_procs(children, timeout=30)
        assert not [c for c in children if c.is_running() and c.status() != psutil.STATUS_ZOMBIE]
    finally:
        stop_process_group(process)


def _listening(port: int) -> bool:
    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", port)) == 0


# ---------------------------------------------------------------------- the chaos benchmark

@pytest.mark.slow
def test_chaos_benchmark_short_form_loses_nothing(tmp_path):
    """benchmarks/chaos.py in a short form: trial kills, two tracking-server outages, the
    driver killed and resumed; 0 points lost or duplicated, 0 runs left RUNNING."""
    script = Path(__file__).resolve().parents[1] / "benchmarks" / "chaos.py"
    result = subprocess.run(
        [sys.executable, str(script), "--seeds", "1", "--iters", "12", "--outage-s", "5",
         "--trial-kills", "1", "--skip-baseline"],
        cwd=tmp_path, capture_output=True, text=True, timeout=900, check=False)
    assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]
    assert "target met" in result.stdout


# ---------------------------------------------------------------------- 11: Ray dies with its driver

def _slow_sweep(tmp_path: Path, name: str, tracking: str = "tracking.enabled: false") -> Path:
    """A sweep of one slow config (its iterations delayed), on a local Ray of one CPU."""
    sweep = tmp_path / f"{name}.yaml"
    sweep.write_text(f"name: {name}\nnum_cpus: 1\nexperiment: {name}\n"
                     "overrides: {pipeline: cem, backend: numpy, env: Pendulum, pipeline.iters: 400, "
                     "pipeline.horizon: 10, pipeline.batch: 2, pipeline.population: 8, "
                     f"pipeline.elites: 2, pipeline.render: false, {tracking}}}\n")
    return sweep


def _ray_of(process: subprocess.Popen, trial: Path) -> list:
    """The processes of the local Ray a sweep driver started, once its trial runs."""
    import psutil

    _wait_for(lambda: (trial / METRICS_FILE).is_file() and len(_lines(trial)) >= 2, 240,
              "the trial did not start")
    ray = psutil.Process(process.pid).children(recursive=True)
    names = {child.name() for child in ray}
    assert {"gcs_server", "raylet"} <= names, names
    return ray


def _left_running(processes: list, timeout: float) -> list:
    """``processes`` still running (not zombies) after waiting up to ``timeout`` s; kills them."""
    import psutil

    _, alive = psutil.wait_procs(processes, timeout=timeout)
    left = []
    for proc in alive:
        try:
            if proc.status() != psutil.STATUS_ZOMBIE:
                left.append(f"{proc.pid} {proc.name()}")
                proc.kill()
        except psutil.NoSuchProcess:
            pass
    return left


def _listeners(ports: set[int] | None = None) -> dict[int, int]:
    """Listening TCP sockets: ``{port: pid}`` (only ``ports``, if given)."""
    import psutil

    return {c.laddr.port: c.pid for c in psutil.net_connections("inet")
            if c.status == psutil.CONN_LISTEN and (ports is None or c.laddr.port in ports)}


def _held_since(ports: set[int], since: float) -> dict[int, int]:
    """Which of ``ports`` a process started before ``since`` (epoch s) listens on; a process
    started later may reuse one of Ray's fixed default ports (another test's Ray)."""
    import psutil

    held = {}
    for port, pid in _listeners(ports).items():
        try:
            if pid is None or psutil.Process(pid).create_time() < since:
                held[port] = pid
        except psutil.NoSuchProcess:
            pass
    return held


@pytest.mark.slow
def test_11_a_sweep_driver_killed_alone_leaves_no_ray_process(tmp_path):
    """``kill -9`` of the driver alone (not its group): every process of the local Ray it
    started is gone within seconds, and nothing listens on their ports (Ray's agents alone
    linger for a minute)."""
    process = start_gradgym(["sweep", str(_slow_sweep(tmp_path, "orphans"))], tmp_path,
                            tmp_path / "sweep.log", **_delay(0.2))
    try:
        ray = _ray_of(process, tmp_path / "sweeps/orphans/trials/00000")
        pids = {proc.pid for proc in ray}
        ports = {port for port, pid in _listeners().items() if pid in pids}
        assert ports, "Ray listens on loopback ports"
        killed_at = time.time()
        process.kill()
        process.wait(timeout=30)
        assert not _left_running(ray, timeout=20)
        assert not _held_since(ports, killed_at)
    finally:
        stop_process_group(process)


@pytest.mark.slow
def test_11_when_rays_core_dies_the_sweep_ends_failed_at_once(tmp_path, mlflow_server):
    """Ray's GCS killed mid-sweep: the driver stops within seconds (not after Ray's 60 s
    reconnection timeout), its parent run ends FAILED, its trial's run KILLED, and no Ray
    process is left."""
    sweep = _slow_sweep(tmp_path, "raydeath", f"tracking.uri: '{mlflow_server.uri}', "
                        "tracking.flush_every_s: 0.2")
    process = start_gradgym(["sweep", str(sweep)], tmp_path, tmp_path / "sweep.log", **_delay(0.2))
    try:
        ray = _ray_of(process, tmp_path / "sweeps/raydeath/trials/00000")
        (gcs,) = [proc for proc in ray if proc.name() == "gcs_server"]
        gcs.kill()
        code = process.wait(timeout=45)
        assert not _left_running(ray, timeout=20)
    finally:
        stop_process_group(process)
    log = (tmp_path / "sweep.log").read_text()
    assert code == 1 and "gcs_server" in log and "--resume raydeath" in log, log[-3000:]
    client = MlflowClient(mlflow_server.uri)
    parent = json.loads((tmp_path / "sweeps/raydeath/parent.json").read_text())
    assert client.get_run(parent["run_id"]).info.status == "FAILED"
    trial = json.loads((tmp_path / "sweeps/raydeath/trials/00000/summary.json").read_text())
    assert trial["status"] == "KILLED"
