"""Lean logging at scale: many trackers in one process share one MLflow sender thread, SQL
stores get every run's points in one bulk transaction, and what MLflow reads back is what
its own ``log_batch`` would have stored (NaN and +-inf included, resends not doubled)."""

from __future__ import annotations

import json
import math
import shutil
import sys
import threading
import time
import urllib.parse
from pathlib import Path

import pytest
import sqlalchemy
from mlflow import MlflowClient
from test_docker import postgres  # noqa: F401 - a throwaway PostgreSQL cluster (fixture)

from gradgym.platform.config import compose_run_config
from gradgym.platform.mlflow_tracking import (
    THREAD_NAME,
    MlflowTracker,
    bulk_schema_problem,
    sql_bulk_writer,
    tracking_client,
)
from gradgym.platform.records import METRICS_FILE, TRACKING_FILE
from gradgym.platform.tracking import RunIdentity, TrackingError

KEYS = [f"m{i}" for i in range(10)]  # a pipeline reports about ten metrics per iteration


def _cfg(uri: str, experiment: str, **extra):
    items = [f"tracking.uri={uri}", f"tracking.experiment={experiment}", "tracking.flush_every_s=0.2"]
    items += [f"tracking.{k}={v}" for k, v in extra.items()]
    return compose_run_config(items).tracking


def _tracker(run_dir: Path, cfg, index: int = 0) -> MlflowTracker:
    identity = RunIdentity(f"run{index}", tags={"env": "Pendulum"}, params={"seed": str(index), "lr": "0.1"})
    return MlflowTracker(run_dir, cfg, identity)


def _value(run: int, step: int, key: int) -> float:
    return run * 1000.0 + step + key / 10


def _sender_threads() -> set[threading.Thread]:
    return {t for t in threading.enumerate() if t.name == THREAD_NAME}


def _one_new_sender(before: set[threading.Thread]) -> threading.Thread:
    """The one sender thread started since ``before`` (other tests' trackers of this process
    may still have theirs, on their own stores)."""
    new = _sender_threads() - before
    assert len(new) == 1, f"{len(new)} sender threads for one store"
    return new.pop()


def _history(client: MlflowClient, run_id: str, key: str) -> list[tuple]:
    """A metric's history as MLflow reads it back: (step, timestamp, value), NaN as a string
    (NaN != NaN would hide a difference)."""
    points = client.get_metric_history(run_id, key)
    return sorted((m.step, m.timestamp, "nan" if math.isnan(m.value) else m.value) for m in points)


@pytest.fixture(scope="module")
def sqlite_uri(tmp_path_factory) -> str:
    """One embedded store for this module; an experiment per test."""
    return f"sqlite:///{tmp_path_factory.mktemp('store') / 'mlflow.db'}"


def test_64_trackers_share_one_sender_and_deliver_complete_histories(tmp_path, sqlite_uri):
    before = _sender_threads()
    cfg = _cfg(sqlite_uri, "packed")
    trackers = [_tracker(tmp_path / f"run{i}", cfg, i).start() for i in range(64)]
    steps = 30
    for step in range(steps):  # the members of a pack report in lockstep
        for i, tracker in enumerate(trackers):
            tracker.log_iteration({key: _value(i, step, k) for k, key in enumerate(KEYS)}, step)
        sender = _one_new_sender(before)
        time.sleep(0.02)
    for i, tracker in enumerate(trackers):
        tracker.log_final({"best_return": float(i)}, steps)
    for tracker in trackers:
        tracker.finish()
    sender.join(timeout=10)
    assert not sender.is_alive(), "the sender thread outlived its trackers"

    client = MlflowClient(sqlite_uri)
    writer = sql_bulk_writer(trackers[0].uri)
    assert writer is not None, "a sqlite store takes the bulk path"
    for i, tracker in enumerate(trackers):
        run = client.get_run(tracker.run_id)
        assert run.info.status == "FINISHED"
        assert run.data.params == {"seed": str(i), "lr": "0.1"}
        assert run.data.metrics["best_return"] == float(i)
        assert run.data.metrics["m3"] == _value(i, steps - 1, 3)  # latest_metrics: the last step
        for k, key in enumerate(KEYS):
            points = sorted((m.step, m.value) for m in client.get_metric_history(tracker.run_id, key))
            assert points == [(step, _value(i, step, k)) for step in range(steps)], (i, key)
    # Batching across runs: far fewer transactions than per-run batches.
    batches = sum(tracker.batches_sent for tracker in trackers)
    assert batches >= 64 and writer.transactions < batches / 2, (writer.transactions, batches)


def _special_log(path: Path, steps: int) -> None:
    """A metrics.jsonl with NaN, +-inf, huge, tiny and negative values and equal timestamps."""
    specials = [math.nan, math.inf, -math.inf, 0.0, -1.5, 1e300, -0.0, 5e-324]
    lines = []
    for step in range(steps):
        entry = {"iteration": step, "timestamp_ms": 1_700_000_000_000 + step // 3}
        entry.update({key: specials[(step + k) % len(specials)] for k, key in enumerate(KEYS[:4])})
        entry["step_value"] = float(step)
        lines.append(json.dumps(entry))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")


def _deliver(run_dir: Path, cfg, final: bool) -> MlflowTracker:
    tracker = _tracker(run_dir, cfg)
    if final:  # (stamped now: its timestamp differs between the two runs)
        tracker.log_final({"best_return": math.nan, "final_return": math.inf}, 40)
    tracker.start().finish()
    return tracker


def _forget_acknowledgement(run_dir: Path) -> None:
    """The store committed everything but the reply 'got lost': all lines are resent."""
    state = json.loads((run_dir / TRACKING_FILE).read_text())
    (run_dir / TRACKING_FILE).write_text(json.dumps(dict(state, acked=0)))


def test_bulk_writes_read_back_exactly_like_log_batch_with_nan_inf_and_resends(tmp_path, sqlite_uri):
    _check_bulk_reads_back_like_log_batch(sqlite_uri, tmp_path)


@pytest.mark.slow
def test_bulk_writes_to_postgresql_read_back_like_log_batch(tmp_path, postgres):  # noqa: F811
    """The same on a PostgreSQL store (MLflow's tables, its migrations, psycopg)."""
    password = urllib.parse.quote(postgres["POSTGRES_PASSWORD"], safe="")
    uri = (f"postgresql+psycopg://{postgres['POSTGRES_USER']}:{password}@{postgres['POSTGRES_HOST']}:"
           f"{postgres['POSTGRES_PORT']}/{postgres['POSTGRES_DB']}")
    assert sql_bulk_writer(uri) is not None, "a PostgreSQL store takes the bulk path"
    _check_bulk_reads_back_like_log_batch(uri, tmp_path)


def _check_bulk_reads_back_like_log_batch(uri: str, tmp_path: Path) -> None:
    """A run written by the bulk path and one by ``log_batch``, from the same metrics.jsonl,
    each delivered twice (the acknowledgement lost): MLflow reads back the same histories,
    latest metrics and params, every point once."""
    runs = {}
    for bulk in (True, False):
        run_dir = tmp_path / f"bulk-{bulk}"
        _special_log(run_dir / METRICS_FILE, 40)
        cfg = _cfg(uri, "readback", bulk_sql=bulk)
        first = _deliver(run_dir, cfg, final=True)
        _forget_acknowledgement(run_dir)
        second = _deliver(run_dir, cfg, final=False)  # every point sent again
        assert second.run_id == first.run_id
        runs[bulk] = first.run_id

    client = MlflowClient(uri)
    bulk_run, batch_run = (client.get_run(runs[b]) for b in (True, False))
    for key in [*KEYS[:4], "step_value"]:
        bulk_points, batch_points = _history(client, runs[True], key), _history(client, runs[False], key)
        assert bulk_points == batch_points, key
        assert len(bulk_points) == 40, f"{key}: a point stored twice, or lost"
    # MLflow's SQL stores keep +inf as the largest float64 (and read it back so).
    for key, stored in (("best_return", "nan"), ("final_return", sys.float_info.max)):
        assert ([p[::2] for p in _history(client, runs[True], key)]
                == [p[::2] for p in _history(client, runs[False], key)] == [(40, stored)])

    def latest(run) -> dict:
        return {k: "nan" if math.isnan(v) else v for k, v in run.data.metrics.items()}

    assert latest(bulk_run) == latest(batch_run)
    assert bulk_run.data.params == batch_run.data.params
    assert len(client.search_runs([bulk_run.info.experiment_id])) == 2


def test_a_crash_and_a_retried_attempt_add_no_duplicates_across_many_runs(tmp_path, sqlite_uri):
    cfg = _cfg(sqlite_uri, "crash")
    first = [_tracker(tmp_path / f"run{i}", cfg, i).start() for i in range(8)]
    for step in range(20):
        for i, tracker in enumerate(first):
            tracker.log_iteration({"loss": _value(i, step, 0)}, step)
    deadline = time.monotonic() + 60
    while any(t._state.get("acked") != 20 for t in first):
        assert time.monotonic() < deadline, "the sender never acknowledged the iterations"
        time.sleep(0.1)
    for tracker in first:  # the process dies; its acknowledgements were lost
        tracker.close()
        _forget_acknowledgement(tracker.record.folder)

    second = [_tracker(tmp_path / f"run{i}", cfg, i).start() for i in range(8)]
    for step in range(30):
        for i, tracker in enumerate(second):
            tracker.log_iteration({"loss": _value(i, step, 0)}, step)
    for tracker in second:
        tracker.finish()

    client = MlflowClient(sqlite_uri)
    for i, tracker in enumerate(second):
        assert tracker.run_id == first[i].run_id
        points = sorted((m.step, m.value) for m in client.get_metric_history(tracker.run_id, "loss"))
        assert points == [(step, _value(i, step, 0)) for step in range(30)]


def test_a_refused_run_fails_alone_and_the_others_sharing_the_sender_finish(tmp_path, sqlite_uri):
    cfg = _cfg(sqlite_uri, "refused-one")
    trackers = [_tracker(tmp_path / f"run{i}", cfg, i).start() for i in range(3)]
    for tracker in trackers:
        tracker.log_iteration({"loss": 0.0}, 0)
    deadline = time.monotonic() + 60
    while trackers[0]._state.get("acked") != 1:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    client = MlflowClient(sqlite_uri)
    client.delete_run(trackers[0].run_id)  # MLflow refuses its data from now on
    with pytest.raises(TrackingError, match="refused the run's data.*Nothing is lost"):
        for step in range(1, 200):
            for tracker in trackers:
                tracker.log_iteration({"loss": float(step)}, step)
            time.sleep(0.02)
    broken_at = len(trackers[0].metrics.entries)
    for tracker in trackers[1:]:  # (the raise came before some had their step)
        for step in range(len(tracker.metrics.entries), broken_at + 5):
            tracker.log_iteration({"loss": float(step)}, step)
    trackers[0].close()
    for tracker in trackers[1:]:
        tracker.finish()
        steps = sorted(m.step for m in client.get_metric_history(tracker.run_id, "loss"))
        assert steps == list(range(broken_at + 5))


def test_the_bulk_path_checks_the_schema_it_writes(tmp_path, sqlite_uri):
    tracking_client(sqlite_uri).search_experiments()  # the store exists, migrated by MLflow
    engine = sqlalchemy.create_engine(sqlite_uri)
    assert bulk_schema_problem(engine) is None
    copy = tmp_path / "other.db"
    shutil.copy(sqlite_uri.removeprefix("sqlite:///"), copy)
    other = sqlalchemy.create_engine(f"sqlite:///{copy}")
    with other.begin() as conn:
        conn.execute(sqlalchemy.text("UPDATE alembic_version SET version_num = 'not-mlflows'"))
    assert "schema revision not-mlflows" in bulk_schema_problem(other)
    assert sql_bulk_writer("http://127.0.0.1:5999") is None  # a server: log_batch


def test_many_trackers_share_one_sender_to_a_server(tmp_path, mlflow_server):
    before = _sender_threads()
    cfg = _cfg(mlflow_server.uri, "server-packed")
    trackers = [_tracker(tmp_path / f"run{i}", cfg, i).start() for i in range(16)]
    for step in range(20):
        for i, tracker in enumerate(trackers):
            tracker.log_iteration({key: _value(i, step, k) for k, key in enumerate(KEYS)}, step)
        _one_new_sender(before)
        time.sleep(0.02)
    for tracker in trackers:
        tracker.finish()
    client = MlflowClient(mlflow_server.uri)
    for i, tracker in enumerate(trackers):
        for k, key in enumerate(KEYS):
            points = sorted((m.step, m.value) for m in client.get_metric_history(tracker.run_id, key))
            assert points == [(step, _value(i, step, k)) for step in range(20)]


@pytest.mark.slow
def test_a_server_outage_loses_nothing_for_any_tracker(tmp_path, mlflow_server):
    """Stop the server while 8 trackers of one process log, start it again: every history
    is complete, without duplicates."""
    cfg = _cfg(mlflow_server.uri, "server-outage", outage_limit_s=120)
    trackers = [_tracker(tmp_path / f"run{i}", cfg, i).start() for i in range(8)]
    steps = 60
    try:
        for step in range(steps):
            for i, tracker in enumerate(trackers):
                tracker.log_iteration({"loss": _value(i, step, 0), "x": float(step)}, step)
            if step == 15:
                deadline = time.monotonic() + 60
                while any(t._state.get("acked", 0) < 10 for t in trackers):
                    assert time.monotonic() < deadline, "nothing reached the server before the outage"
                    time.sleep(0.1)
                mlflow_server.stop()
            if step == 40:
                assert all(t._failing_since is not None for t in trackers), "the outage went unnoticed"
                mlflow_server.start()
            time.sleep(0.1)
        for tracker in trackers:
            tracker.finish()
    finally:
        if not mlflow_server.healthy():
            mlflow_server.start()
    client = MlflowClient(mlflow_server.uri)
    for i, tracker in enumerate(trackers):
        assert client.get_run(tracker.run_id).info.status == "FINISHED"
        points = sorted((m.step, m.value) for m in client.get_metric_history(tracker.run_id, "loss"))
        assert points == [(step, _value(i, step, 0)) for step in range(steps)]
        assert len(client.get_metric_history(tracker.run_id, "x")) == steps
