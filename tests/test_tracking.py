"""MLflow tracking: batched sends, the durable local buffer, retries without duplicates,
and a real tracking server that goes away in the middle of a run."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
from conftest import free_port, run_gradgym, start_gradgym, stop_process_group
from mlflow import MlflowClient

from gradgym.platform.config import compose_run_config
from gradgym.platform.faults import FAULTS_VARIABLE
from gradgym.platform.mlflow_tracking import MlflowTracker, resolve_tracking_uri
from gradgym.platform.records import METRICS_FILE, TRACKING_FILE, MetricLog
from gradgym.platform.runner import execute_run, settle_run
from gradgym.platform.tracking import RunIdentity, TrackingError


def _delay(seconds: float) -> dict[str, str]:
    """The environment of a run that sleeps ``seconds`` after every iteration."""
    return {FAULTS_VARIABLE: json.dumps([{"iteration_delay_s": seconds}])}


def _tracking_cfg(uri: str, experiment: str, **extra):
    items = [f"tracking.uri={uri}", f"tracking.experiment={experiment}", "tracking.flush_every_s=0.2"]
    items += [f"tracking.{k}={v}" for k, v in extra.items()]
    return compose_run_config(items).tracking


def _tracker(run_dir: Path, cfg) -> MlflowTracker:
    identity = RunIdentity("unit", tags={"env": "Pendulum"}, params={"seed": "0"})
    return MlflowTracker(run_dir, cfg, identity).start()


def _metrics(step: int) -> dict[str, float]:
    return {"return_mean": float(step), "loss": -float(step)}


def _history(client: MlflowClient, run_id: str, key: str = "return_mean") -> list[int]:
    return sorted(m.step for m in client.get_metric_history(run_id, key))


@pytest.fixture(scope="module")
def sqlite_uri(tmp_path_factory) -> str:
    """One embedded store for this module (creating one takes seconds); an experiment per test."""
    return f"sqlite:///{tmp_path_factory.mktemp('store') / 'mlflow.db'}"


def test_default_store_is_sqlite_in_the_working_directory(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(tmp_path)
    assert resolve_tracking_uri() == f"sqlite:///{tmp_path.resolve() / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5999")
    assert resolve_tracking_uri() == "http://127.0.0.1:5999"


def test_iterations_go_to_disk_and_mlflow_in_batches(tmp_path, sqlite_uri):
    tracker = _tracker(tmp_path / "run", _tracking_cfg(sqlite_uri, "batches"))
    for step in range(50):
        assert tracker.log_iteration(_metrics(step), step)
    tracker.log_final({"best_return": 49.0}, 50)
    tracker.finish()

    client = MlflowClient(sqlite_uri)
    run = client.get_run(tracker.run_id)
    assert run.info.status == "FINISHED"
    assert run.data.tags["env"] == "Pendulum" and run.data.params["seed"] == "0"
    assert _history(client, tracker.run_id) == list(range(50))
    assert _history(client, tracker.run_id, "loss") == list(range(50))
    assert [m.step for m in client.get_metric_history(tracker.run_id, "best_return")] == [50]
    # 50 iterations logged in a tight loop: a handful of log_batch calls, not one per value.
    assert 1 <= tracker.batches_sent <= 5
    lines = (tmp_path / "run" / METRICS_FILE).read_text().splitlines()
    assert [json.loads(line)["iteration"] for line in lines] == list(range(50))


def test_params_iterations_and_final_metrics_share_requests_within_mlflow_limits(tmp_path, sqlite_uri):
    # 250 params (MLflow takes 100 per request) and 300 iterations x 4 values (1000 entries
    # per request): every value arrives once, in a few requests.
    params = {f"p{i:03d}": str(i) for i in range(250)}
    tracker = MlflowTracker(tmp_path / "run", _tracking_cfg(sqlite_uri, "limits"),
                            RunIdentity("limits", tags={"env": "Pendulum"}, params=params))
    for step in range(300):
        tracker.log_iteration({**_metrics(step), "a": 1.0, "b": 2.0}, step)
    tracker.log_final({"best_return": 299.0, "final_return": 299.0}, 300)
    tracker.start().finish()

    client = MlflowClient(sqlite_uri)
    run = client.get_run(tracker.run_id)
    assert run.data.params == params
    for key in ("return_mean", "loss", "a", "b"):
        assert _history(client, tracker.run_id, key) == list(range(300))
    assert run.data.metrics["best_return"] == 299.0 and run.data.metrics["final_return"] == 299.0
    assert 2 <= tracker.batches_sent <= 3  # 1200 values over 1000-entry requests


def test_retried_attempt_continues_the_run_without_duplicates(tmp_path, sqlite_uri):
    cfg = _tracking_cfg(sqlite_uri, "retried")
    first = _tracker(tmp_path / "run", cfg)
    for step in range(20):
        first.log_iteration(_metrics(step), step)
    first.close()  # the attempt dies: no finish

    second = _tracker(tmp_path / "run", cfg)
    logged = [second.log_iteration(_metrics(step), step) for step in range(40)]
    second.finish()

    assert logged == [False] * 20 + [True] * 20
    assert second.run_id == first.run_id
    client = MlflowClient(sqlite_uri)
    assert _history(client, second.run_id) == list(range(40))
    experiment = client.get_experiment_by_name("retried")
    assert len(client.search_runs([experiment.experiment_id])) == 1
    assert len(MetricLog(tmp_path / "run" / METRICS_FILE).entries) == 40


def test_resending_after_a_lost_acknowledgement_adds_no_duplicate(tmp_path, sqlite_uri):
    cfg = _tracking_cfg(sqlite_uri, "lost-ack")
    first = _tracker(tmp_path / "run", cfg)
    for step in range(10):
        first.log_iteration(_metrics(step), step)
    deadline = time.monotonic() + 30
    while _state(tmp_path / "run").get("acked") != 10:
        assert time.monotonic() < deadline, "the sender never acknowledged the 10 iterations"
        time.sleep(0.1)
    first.close()
    # The store has the points, but the acknowledgement "got lost": everything is resent.
    state = json.loads((tmp_path / "run" / TRACKING_FILE).read_text())
    (tmp_path / "run" / TRACKING_FILE).write_text(json.dumps(dict(state, acked=0)))

    second = _tracker(tmp_path / "run", cfg)
    second.finish()
    assert _history(MlflowClient(sqlite_uri), second.run_id) == list(range(10))


def test_a_torn_last_line_is_dropped_and_appends_continue(tmp_path):
    path = tmp_path / METRICS_FILE
    path.write_text('{"iteration": 0, "timestamp_ms": 1, "loss": 1.0}\n{"iteration": 1, "times')
    log = MetricLog(path)
    assert [e["iteration"] for e in log.entries] == [0]
    assert log.append(1, {"loss": 2.0}, 2) and not log.append(0, {"loss": 9.0}, 3)
    assert [json.loads(line)["iteration"] for line in path.read_text().splitlines()] == [0, 1]


def test_a_store_that_refuses_data_fails_the_run_with_a_clear_message(tmp_path, sqlite_uri):
    tracker = _tracker(tmp_path / "run", _tracking_cfg(sqlite_uri, "refused"))
    tracker.log_iteration(_metrics(0), 0)
    tracker.finish()
    MlflowClient(sqlite_uri).delete_run(tracker.run_id)  # a 4xx from now on: not transient
    again = _tracker(tmp_path / "run", _tracking_cfg(sqlite_uri, "refused"))
    with pytest.raises(TrackingError, match="refused the run's data.*Nothing is lost"):
        for step in range(1, 200):
            again.log_iteration(_metrics(step), step)
            time.sleep(0.05)
    again.close()


CEM_RUN = [
    "pipeline=cem", "backend=numpy", "env=Pendulum", "pipeline.horizon=10", "pipeline.batch=2",
    "pipeline.population=8", "pipeline.elites=2", "pipeline.render=false",
]


def test_server_that_stays_away_fails_the_run_and_keeps_the_local_copy(tmp_path):
    dead = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    result = run_gradgym(["run", *CEM_RUN, "pipeline.iters=60",
                          f"tracking.uri={dead}", "tracking.outage_limit_s=2",
                          f"run_dir={tmp_path / 'run'}"], cwd=tmp_path, timeout=120, **_delay(0.1))
    assert result.returncode == 1, result.stderr
    assert "TrackingError" in result.stderr
    assert "unreachable for" in result.stderr and "tracking.outage_limit_s=2" in result.stderr
    assert "Nothing is lost" in result.stderr
    steps = [json.loads(line)["iteration"] for line in (tmp_path / "run" / METRICS_FILE).read_text().splitlines()]
    assert steps == list(range(len(steps))) and 10 <= len(steps) < 60
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["status"] == "FAILED" and "TrackingError" in summary["error"]


def test_a_run_folder_is_delivered_later_when_the_store_is_back(tmp_path, sqlite_uri, monkeypatch):
    """The store stayed away past the limit: the run failed, its folder holds everything,
    and settle_run delivers it once a store answers (and has nothing to do a second time)."""
    dead = f"http://127.0.0.1:{free_port()}"
    monkeypatch.setenv(FAULTS_VARIABLE, _delay(0.3)[FAULTS_VARIABLE])
    cfg = compose_run_config([*CEM_RUN, "pipeline.iters=20", "pipeline.render=true",
                              f"tracking.uri={dead}",
                              "tracking.outage_limit_s=2", f"run_dir={tmp_path / 'run'}",
                              "progress=false"])
    with pytest.raises(TrackingError):
        execute_run(cfg)
    steps = _local_steps(tmp_path / "run")
    assert 1 <= len(steps) < 20

    tracking = _tracking_cfg(sqlite_uri, "later")
    assert settle_run(tmp_path / "run", tracking, status="FAILED", error="store away")
    client = MlflowClient(sqlite_uri)
    (run,) = client.search_runs([client.get_experiment_by_name("later").experiment_id])
    assert run.info.status == "FAILED" and run.data.tags["error"] == "store away"
    assert run.data.tags["env"] == "Pendulum" and run.data.params["pipeline.iters"] == "20"
    assert _history(client, run.info.run_id) == steps
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"config.yaml", "metrics.jsonl", "summary.json", "video_initial.gif"} <= artifacts
    assert not settle_run(tmp_path / "run", tracking, status="FAILED")  # nothing left to do


@pytest.mark.slow
def test_server_restart_mid_run_loses_and_duplicates_nothing(tmp_path, mlflow_server):
    """Stop the tracking server in the middle of a run, start it again on the same port and
    store: the run finishes and its MLflow history is complete, without gap or duplicate."""
    iters = 70
    process = start_gradgym(
        ["run", *CEM_RUN, f"pipeline.iters={iters}",
         f"tracking.uri={mlflow_server.uri}", "tracking.experiment=outage",
         "tracking.flush_every_s=0.5", f"run_dir={tmp_path / 'run'}"],
        cwd=tmp_path, log_path=tmp_path / "run.log", **_delay(0.5),
    )
    client = MlflowClient(mlflow_server.uri)
    try:
        run_id = _wait_for_points(client, "outage", minimum=5, timeout=120)
        mlflow_server.stop()
        stopped_at = len(_local_steps(tmp_path / "run"))
        time.sleep(3)
        mlflow_server.start()
        assert process.wait(timeout=180) == 0, (tmp_path / "run.log").read_text()[-3000:]
    finally:
        stop_process_group(process)
        if not mlflow_server.healthy():
            mlflow_server.start()
    log = (tmp_path / "run.log").read_text()
    assert "unreachable" in log and "is back" in log, log[-3000:]
    assert stopped_at < iters - 10, "the outage must fall in the middle of the run"
    first_line = json.loads((tmp_path / "run" / METRICS_FILE).read_text().splitlines()[0])
    keys = set(first_line) - {"iteration", "timestamp_ms"}
    assert {"return_mean", "return_min", "return_max", "iter_time_s"} <= keys
    for key in keys:
        assert _history(client, run_id, key) == list(range(iters)), key
    assert client.get_run(run_id).info.status == "FINISHED"
    assert _local_steps(tmp_path / "run") == list(range(iters))


def _wait_for_points(client: MlflowClient, experiment: str, minimum: int, timeout: float) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = client.get_experiment_by_name(experiment)
        runs = client.search_runs([found.experiment_id]) if found else []
        if runs and len(client.get_metric_history(runs[0].info.run_id, "return_mean")) >= minimum:
            return runs[0].info.run_id
        time.sleep(0.5)
    raise TimeoutError(f"no run with {minimum} points in experiment {experiment!r}")


def _state(run_dir: Path) -> dict:
    path = run_dir / TRACKING_FILE
    return json.loads(path.read_text()) if path.exists() else {}


def _local_steps(run_dir: Path) -> list[int]:
    return [json.loads(line)["iteration"] for line in (run_dir / METRICS_FILE).read_text().splitlines()]
