"""Sweeps end to end: real Ray (local, and a multi-node cluster on 127.0.0.1), real MLflow
(a tracking server and the embedded store), retries, resume after the driver dies."""

from __future__ import annotations

import csv
import ipaddress
import json
import os
import pickle
import signal
import time
from pathlib import Path

import imageio.v3 as iio
import psutil
import pytest
import yaml
from conftest import free_port, run_gradgym, start_gradgym, stop_process_group
from mlflow import MlflowClient

from gradgym.platform.faults import FAULTS_VARIABLE

ITERS = 6
TINY = {
    "pipeline": "trajectory",
    "pipeline.iters": ITERS,
    "pipeline.horizon": 10,
    "pipeline.batch": 2,
    "pipeline.grad_hist_every": 3,
    "tracking.flush_every_s": 0.5,
}
GRID = {"env": ["Pendulum", "CartPole"], "backend": ["jax", "torch"], "seed": [0, 1]}
# Orchestration tests (retries, resume, nodes): CEM on numpy, the cheapest trial to start.
TINY_CEM = {
    "pipeline": "cem",
    "backend": "numpy",
    "pipeline.iters": ITERS,
    "pipeline.horizon": 10,
    "pipeline.batch": 2,
    "pipeline.population": 8,
    "pipeline.elites": 2,
    "tracking.flush_every_s": 0.5,
}


def _sweep_file(folder: Path, name: str, grid: dict, base: dict = TINY, **extra) -> Path:
    overrides = dict(base, **extra.pop("overrides", {}))
    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump({"name": name, "overrides": overrides, "grid": grid, **extra},
                                   sort_keys=False))
    return path


def _delay(seconds: float) -> dict[str, str]:
    """The environment of a sweep whose trials sleep ``seconds`` after every iteration."""
    return {FAULTS_VARIABLE: json.dumps([{"iteration_delay_s": seconds}])}


def _runs(client: MlflowClient, experiment: str) -> tuple:
    """(parent run, child runs) of the one sweep logged to ``experiment``."""
    found = client.get_experiment_by_name(experiment)
    assert found is not None, f"no MLflow experiment {experiment!r}"
    runs = client.search_runs([found.experiment_id], max_results=1000)
    parents = [r for r in runs if r.data.tags.get("gradgym.kind") == "sweep"]
    assert len(parents) == 1, [r.info.run_name for r in runs]
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parents[0].info.run_id]
    assert len(runs) == 1 + len(children), "every run other than the parent is its child"
    return parents[0], children


def _steps(client: MlflowClient, run_id: str, key: str = "return_mean") -> list[int]:
    return sorted(m.step for m in client.get_metric_history(run_id, key))


def _check_sweep(client: MlflowClient, name: str, sweep_dir: Path, tmp_path: Path) -> None:
    """What a finished 2 envs x 2 backends x 2 seeds sweep leaves in MLflow and on disk."""
    parent, children = _runs(client, name)
    assert parent.info.status == "FINISHED" and parent.data.tags["trials_failed"] == "0"
    assert len(children) == 8
    combos = {(c.data.tags["env"], c.data.tags["backend"], c.data.tags["seed"]) for c in children}
    assert combos == {(e, b, str(s)) for e in GRID["env"] for b in GRID["backend"] for s in GRID["seed"]}
    # The dashboard: the experiment opens on MLflow's training-runs view, and every child's
    # name says which env, backend and seed it is.
    experiment = client.get_experiment_by_name(name)
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"
    names = {c.info.run_name for c in children}
    assert names == {f"{e} {b} s{s}" for e in GRID["env"] for b in GRID["backend"] for s in GRID["seed"]}
    for child in children:
        tags, run_id = child.data.tags, child.info.run_id
        assert child.info.status == "FINISHED"
        assert tags["pipeline"] == "trajectory" and tags["sweep"] == name
        assert child.data.params["pipeline.iters"] == str(ITERS)
        assert _steps(client, run_id) == list(range(ITERS))
        assert _steps(client, run_id, "grad_norm") == list(range(ITERS))
        assert {"compile_time_s", "best_return", "final_return"} <= set(child.data.metrics)
        gif = client.download_artifacts(run_id, "video_best.gif", str(tmp_path / run_id))
        frames = iio.imread(gif, index=None)
        assert frames.ndim == 4 and frames.shape[0] > 1
        artifacts = {a.path for a in client.list_artifacts(run_id, "gradients")}
        assert artifacts == {"gradients/step_000000.png", "gradients/step_000003.png"}

    download = Path(client.download_artifacts(parent.info.run_id, "", str(tmp_path / "parent")))
    image = iio.imread(download / "comparison.png")
    assert image.ndim == 3 and image.shape[0] > 200 and image.shape[1] > 200
    with open(download / "summary.csv") as file:
        rows = list(csv.DictReader(file))
    assert len(rows) == 8 and {row["status"] for row in rows} == {"FINISHED"}
    assert {row["malloc"] for row in rows} == {"libjemalloc.so"}, "trials' workers preload jemalloc"
    assert len({row["pack"] for row in rows}) == 4, "the seeds of each env and backend share a pack"
    assert {row["mlflow_run_id"] for row in rows} == {c.info.run_id for c in children}
    for row in rows:  # the local trial folders hold the same runs
        trial = sweep_dir / "trials" / row["trial"]
        lines = (trial / "metrics.jsonl").read_text().splitlines()
        assert [json.loads(line)["iteration"] for line in lines] == list(range(ITERS))


@pytest.mark.slow
def test_sweep_against_a_tracking_server_on_local_ray_bound_to_loopback(tmp_path, mlflow_server):
    path = _sweep_file(tmp_path, "t-server", GRID)
    process = start_gradgym(["sweep", str(path)], cwd=tmp_path, log_path=tmp_path / "sweep.log",
                            MLFLOW_TRACKING_URI=mlflow_server.uri)
    addresses: set[str] = set()
    try:
        while process.poll() is None:  # watch every socket the sweep's processes listen on
            addresses |= _listening_addresses(process.pid)
            time.sleep(1.0)
    finally:
        stop_process_group(process)
    log = (tmp_path / "sweep.log").read_text()
    assert process.returncode == 0, log[-4000:]
    assert addresses, "Ray's listening sockets were never seen"
    assert all(ipaddress.ip_address(a.removeprefix("::ffff:")).is_loopback for a in addresses), addresses
    _check_sweep(MlflowClient(mlflow_server.uri), "t-server", tmp_path / "sweeps" / "t-server", tmp_path)


@pytest.mark.slow
def test_sweep_on_the_embedded_default_store(tmp_path):
    path = _sweep_file(tmp_path, "t-embedded", GRID)
    result = run_gradgym(["sweep", str(path)], cwd=tmp_path, timeout=600)
    assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]
    assert "8 finished" in result.stdout
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    _check_sweep(client, "t-embedded", tmp_path / "sweeps" / "t-embedded", tmp_path)


@pytest.mark.slow
def test_sweep_over_mujoco_tasks_like_any_other(tmp_path):
    """MuJoCo tasks in Ray workers: trajectory optimization (gradients from MuJoCo's
    Jacobians) and CEM, videos from MuJoCo's headless renderer, one MLflow run per trial."""
    grid = {"env": ["InvertedPendulum-v5", "HalfCheetah-v5"], "pipeline": ["trajectory", "cem"]}
    overrides = {"backend": "torch", "pipeline.iters": 4, "pipeline.horizon": 8,
                 "pipeline.batch": 2, "tracking.flush_every_s": 0.5}
    path = _sweep_file(tmp_path, "t-mujoco", grid, base={}, overrides=overrides)
    result = run_gradgym(["sweep", str(path)], cwd=tmp_path, timeout=900)
    assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    parent, children = _runs(client, "t-mujoco")
    assert parent.info.status == "FINISHED" and len(children) == 4
    combos = {(c.data.tags["env"], c.data.tags["pipeline"], c.data.tags["backend"]) for c in children}
    assert combos == {(e, p, "torch") for e in grid["env"] for p in grid["pipeline"]}
    for child in children:
        assert child.info.status == "FINISHED"
        assert _steps(client, child.info.run_id) == list(range(4))
        gif = client.download_artifacts(child.info.run_id, "video_best.gif", str(tmp_path / child.info.run_id))
        frames = iio.imread(gif, index=None)
        assert frames.shape[0] == 9 and frames.std() > 1.0  # start + 8 steps, not blank


def test_unreachable_store_at_the_start_fails_the_sweep_before_any_trial(tmp_path):
    uri = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    path = _sweep_file(tmp_path, "t-away", {"env": ["Pendulum"]}, base=TINY_CEM,
                       overrides={"tracking.outage_limit_s": 2, "tracking.request_timeout_s": 1})
    result = run_gradgym(["sweep", str(path)], cwd=tmp_path, timeout=300, MLFLOW_TRACKING_URI=uri)
    assert result.returncode != 0
    assert f"cannot reach the MLflow tracking store {uri}" in result.stderr, result.stderr[-3000:]
    assert not list((tmp_path / "sweeps" / "t-away").glob("trials/*")), "no trial may start"
    assert "Traceback" not in result.stderr


@pytest.mark.slow
def test_crashed_trial_is_retried_and_a_failing_trial_is_marked_failed(tmp_path):
    grid = {"env": ["Pendulum"], "seed": [1, 5]}
    # pack=1: each config its own trial, so the one that always crashes fails alone.
    path = _sweep_file(tmp_path, "t-faults", grid, base=TINY_CEM, max_failures=1, pack=1)
    # Seed 1 crashes on its first attempt only, seed 5 on all five it could have.
    faults = [{"match": {"seed": seed}, "crash_attempts": seed} for seed in (1, 5)]
    result = run_gradgym(["sweep", str(path)], cwd=tmp_path, timeout=600,
                         **{FAULTS_VARIABLE: json.dumps(faults)})
    assert result.returncode == 1, (result.stdout + result.stderr)[-4000:]  # one trial failed
    assert "1 finished" in result.stdout and "1 failed" in result.stdout

    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    parent, children = _runs(client, "t-faults")
    assert parent.info.status == "FINISHED" and parent.data.tags["trials_failed"] == "1"
    assert not any(key.startswith("testing") for c in children for key in c.data.params)
    by_crashes = {c.data.params["seed"]: c for c in children}
    assert set(by_crashes) == {"1", "5"}
    recovered, failing = by_crashes["1"], by_crashes["5"]
    assert recovered.info.status == "FINISHED"
    assert _steps(client, recovered.info.run_id) == list(range(ITERS))  # no duplicate after retry
    assert failing.info.status == "FAILED"
    assert "simulated crash" in failing.data.tags["error"]
    assert _steps(client, failing.info.run_id) == list(range(ITERS // 2 + 1))
    attempts = {json.loads((d / "summary.json").read_text())["status"]: int((d / "attempts").read_text())
                for d in (tmp_path / "sweeps" / "t-faults" / "trials").iterdir()}
    assert attempts == {"FINISHED": 2, "FAILED": 2}  # max_failures=1: two attempts each


@pytest.mark.slow
def test_asha_stops_a_poor_trial_early(tmp_path):
    """Trials run one at a time, so at the first rung the poor learning rate meets the good
    one's result and is stopped; a stopped trial is a normal outcome of the sweep."""
    iters = 8
    grid = {"pipeline.lr": [0.3, 1e-4], "env": ["Pendulum"], "backend": ["torch"]}
    path = _sweep_file(tmp_path, "t-asha", grid, scheduler="asha", max_concurrent=1,
                       tune_report_every_s=0.0, overrides={"pipeline.iters": iters},
                       asha={"grace_period": 2, "reduction_factor": 2})
    result = run_gradgym(["sweep", str(path)], cwd=tmp_path, timeout=600)
    assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]

    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    _, children = _runs(client, "t-asha")
    by_lr = {float(c.data.params["pipeline.lr"]): c for c in children}
    good, poor = by_lr[0.3], by_lr[1e-4]
    assert good.info.status == "FINISHED" and _steps(client, good.info.run_id) == list(range(iters))
    assert poor.info.status == "KILLED" and poor.data.tags["stopped_early"] == "true"
    assert 2 <= len(_steps(client, poor.info.run_id)) < iters
    with open(tmp_path / "sweeps" / "t-asha" / "summary.csv") as file:
        statuses = {float(row["pipeline.lr"]): row["status"] for row in csv.DictReader(file)}
    assert statuses == {0.3: "FINISHED", 1e-4: "STOPPED"}
    # ASHA's stop is noted where the sweep reads it, should Tune end the trial's process
    # before the trial writes its own summary
    assert len((tmp_path / "sweeps" / "t-asha" / "stopped_early.txt").read_text().split()) == 1


@pytest.mark.slow
def test_resume_after_the_driver_is_killed_reruns_only_unfinished_trials(tmp_path):
    # Short and long trials side by side: a short one finishes while a long one runs.
    grid = {"seed": [0, 1], "pipeline.iters": [4, 20], "env": ["Pendulum"]}
    path = _sweep_file(tmp_path, "t-resume", grid, base=TINY_CEM)
    trials = tmp_path / "sweeps" / "t-resume" / "trials"
    process = start_gradgym(["sweep", str(path)], cwd=tmp_path, log_path=tmp_path / "first.log",
                            **_delay(0.2))
    try:
        finished_before = _wait(lambda: _finished_while_others_run(trials), timeout=400)
        os.killpg(process.pid, signal.SIGKILL)  # the driver and the local Ray it started
        process.wait(timeout=30)
    finally:
        stop_process_group(process)
    finished_mtimes = {t: (trials / t / "summary.json").stat().st_mtime for t in finished_before}

    result = run_gradgym(["sweep", "--resume", "t-resume"], cwd=tmp_path, timeout=600)
    assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]
    assert "4 finished" in result.stdout

    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    _, children = _runs(client, "t-resume")
    assert len(children) == 4
    for child in children:
        assert child.info.status == "FINISHED"
        iters = int(child.data.params["pipeline.iters"])
        assert _steps(client, child.info.run_id) == list(range(iters))  # nothing twice
        assert "video_best.gif" in {a.path for a in client.list_artifacts(child.info.run_id)}
    for trial in finished_before:  # finished before the kill: not run again
        assert (trials / trial / "attempts").read_text() == "1"
        assert (trials / trial / "summary.json").stat().st_mtime == finished_mtimes[trial]
    assert len(list(trials.iterdir())) == 4


@pytest.mark.slow
def test_multi_node_sweep_survives_a_killed_worker_node(tmp_path, monkeypatch):
    monkeypatch.setenv("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # nodes on loopback only
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
    try:
        workers = [cluster.add_node(num_cpus=1) for _ in range(2)]
        cluster.wait_for_nodes()
        iters = 12
        grid = {"env": ["Pendulum", "CartPole"], "seed": [0, 1]}
        path = _sweep_file(tmp_path, "t-cluster", grid, base=TINY_CEM, max_failures=2,
                           overrides={"pipeline.iters": iters})
        trials = tmp_path / "sweeps" / "t-cluster" / "trials"
        process = start_gradgym(["sweep", str(path)], cwd=tmp_path, log_path=tmp_path / "sweep.log",
                                RAY_ADDRESS=cluster.address, **_delay(0.4))
        try:
            # 3 nodes with 1 CPU each: once 3 trials run, one of them runs on workers[0].
            _wait(lambda: _running(trials) >= 3, timeout=400)
            _kill_node(cluster, workers[0])
            assert process.wait(timeout=600) == 0, (tmp_path / "sweep.log").read_text()[-4000:]
        finally:
            stop_process_group(process)
    finally:
        cluster.shutdown()
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    _, children = _runs(client, "t-cluster")
    assert len(children) == 4 and {c.info.status for c in children} == {"FINISHED"}
    for child in children:
        assert _steps(client, child.info.run_id) == list(range(iters))
    attempts = [int((trial / "attempts").read_text()) for trial in trials.iterdir()]
    assert max(attempts) >= 2, "the killed node's trial must have been retried elsewhere"


def test_sweep_file_becomes_packs_and_scheduler(tmp_path):
    from ray.tune.schedulers import ASHAScheduler

    from gradgym.platform.config import load_sweep_config
    from gradgym.platform.sweep import _scheduler, make_packs

    path = _sweep_file(tmp_path, "t-space", {"env": ["Pendulum", "CartPole"], "seed": [0, 1]},
                       scheduler="asha", num_samples=3, asha={"grace_period": 2})
    cfg = load_sweep_config(path, ["search.pipeline.lr.loguniform=[0.001,0.3]",
                                   "search.pipeline.batch.randint=[2,8]",
                                   "search.pipeline.optimizer.choice=[adam,sgd]"])
    packs = make_packs(cfg)
    assert all(len(pack) == 1 for pack in packs)  # ASHA: every config its own trial
    values = [pack[0]["values"] for pack in packs]
    # The grid in the file's order (the last key varies fastest), num_samples draws each.
    assert [(v["env"], v["seed"]) for v in values] == [
        (env, seed) for env in ("Pendulum", "CartPole") for seed in (0, 1) for _ in range(3)]
    assert all(0.001 <= v["pipeline.lr"] <= 0.3 and 2 <= v["pipeline.batch"] < 8
               and v["pipeline.optimizer"] in ("adam", "sgd") for v in values)
    scheduler = _scheduler(cfg, tmp_path)
    assert isinstance(scheduler, ASHAScheduler)
    assert scheduler.metric == "return_mean" and scheduler._time_attr == "iteration"
    assert scheduler._max_t == ITERS + 1  # never cut a trial at its last iteration
    # Tune pickles the scheduler with the sweep's state; --resume unpickles it
    assert pickle.loads(pickle.dumps(scheduler)).stopped_file == scheduler.stopped_file


# ---------------------------------------------------------------------- helpers

def _wait(condition, timeout: float):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.5)
    raise TimeoutError("condition not met in time")


def _status(trial: Path) -> str:
    summary = trial / "summary.json"
    if summary.exists():
        return json.loads(summary.read_text())["status"]
    return "RUNNING" if (trial / "metrics.jsonl").exists() else "PENDING"


def _finished_while_others_run(trials: Path) -> list[str]:
    if not trials.is_dir():
        return []
    statuses = {trial.name: _status(trial) for trial in trials.iterdir()}
    finished = [name for name, status in statuses.items() if status == "FINISHED"]
    return finished if finished and "RUNNING" in statuses.values() else []


def _running(trials: Path) -> int:
    return sum(_status(t) == "RUNNING" for t in trials.iterdir()) if trials.is_dir() else 0


def _kill_node(cluster, node) -> None:
    """Remove a worker node and kill every process it started (remove_node leaves workers)."""
    from ray._private import ray_constants

    raylet = node.all_processes[ray_constants.PROCESS_TYPE_RAYLET][0].process.pid
    processes = [psutil.Process(raylet), *psutil.Process(raylet).children(recursive=True)]
    cluster.remove_node(node, allow_graceful=False)
    for proc in processes:
        try:
            proc.kill()
        except psutil.NoSuchProcess:
            pass


def _listening_addresses(pid: int) -> set[str]:
    try:
        pids = {pid} | {child.pid for child in psutil.Process(pid).children(recursive=True)}
    except psutil.NoSuchProcess:
        return set()
    return {c.laddr.ip for c in psutil.net_connections("inet")
            if c.status == psutil.CONN_LISTEN and c.pid in pids}
