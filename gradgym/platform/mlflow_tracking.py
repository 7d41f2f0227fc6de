"""MLflow: the one module that talks to an MLflow tracking store.

It owns MLflow's limits, the retry policy, experiment creation, run statuses, the sweep's
parent run and :class:`MlflowTracker`, the tracker of a run (see ``tracking``).

How a run is delivered: every metric point goes to the run folder first (``metrics.jsonl``,
with the time it was measured). One background thread per process and store (shared by all
the trackers of that process: a packed trial runs many) sends, every ``flush_every_s``, what
the store has not acknowledged yet for every registered run: to a SQL store (sqlite,
PostgreSQL) all runs' points in one transaction written with SQLAlchemy Core into MLflow's
own tables (:class:`SqlBulkWriter`; ``tracking.bulk_sql=false`` or an unknown schema: MLflow's
``log_batch``), to a tracking server ``log_batch`` requests per run, with the run's explicit
id. ``tracking.json`` records the run id and how many lines the store has acknowledged, so a
retried or resumed run continues the same MLflow run and sends only the rest. Sending a point
twice (the store committed it but the reply was lost) is harmless: each point keeps its
original timestamp, and MLflow's SQL stores treat a point with the same key, step, timestamp
and value as the same point. While the store is unreachable the points wait in the run
folder and every flush retries; if it stays away longer than ``tracking.outage_limit_s`` the
run fails with :class:`~gradgym.platform.tracking.TrackingError`, and the local copy stays
complete. One run's refused data fails that run only; the others sharing the thread go on.
"""

from __future__ import annotations

import functools
import logging
import os
import threading
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, TypeVar

from omegaconf import DictConfig

from gradgym.platform.records import RunRecord
from gradgym.platform.tracking import LocalTracker, RunIdentity, TrackingError, now_ms

log = logging.getLogger(__name__)

DEFAULT_STORE_FILE = "mlflow.db"
RUN_UID_TAG = "gradgym.run_uid"  # finds a run whose creation reply was lost
# MLflow's limits: per log_batch request 100 params and 1000 entries in all; value lengths.
MAX_PARAMS_PER_BATCH = 100
MAX_ENTRIES_PER_BATCH = 1000
MAX_PARAM_CHARS = 6000
MAX_TAG_CHARS = 5000
# MLflow 3's UI opens an experiment on its training-runs view when it carries this tag.
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
TRAINING_EXPERIMENT_KIND = "custom_model_development"
# Run status -> MLflow run status (MLflow has no "stopped early": a tag says it).
MLFLOW_STATUS = {"FINISHED": "FINISHED", "FAILED": "FAILED", "KILLED": "KILLED", "STOPPED": "KILLED",
                 "UNFINISHED": "KILLED"}  # UNFINISHED: KILLED until resumed
STOPPED_EARLY_TAG = "stopped_early"

T = TypeVar("T")


# ---------------------------------------------------------------------- store

def resolve_tracking_uri(uri: str | None = None) -> str:
    """The tracking URI to use: ``uri``, else ``$MLFLOW_TRACKING_URI``, else the embedded
    store ``sqlite:///mlflow.db`` in the working directory.

    A relative sqlite path is made absolute, so that Ray workers (whose working directory
    differs) write to the same file.
    """
    uri = uri or os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{DEFAULT_STORE_FILE}"
    prefix = "sqlite:///"
    if uri.startswith(prefix) and not uri.startswith(prefix + "/") and ":memory:" not in uri:
        uri = prefix + str(Path(uri[len(prefix):]).resolve())
    return uri


def is_server_uri(uri: str) -> bool:
    """Whether ``uri`` is a tracking server reached over HTTP."""
    return uri.startswith(("http://", "https://"))


def configure_http(request_timeout_s: float) -> None:
    """Make MLflow's HTTP client fail fast: gradgym retries and buffers itself.

    MLflow's own retries block for minutes on a refused connection; values a user set in
    the environment are kept.
    """
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", str(max(1, round(request_timeout_s))))


@functools.lru_cache(maxsize=8)
def tracking_client(uri: str) -> Any:
    """One ``MlflowClient`` per URI and process (creating a SQL store is not free)."""
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=uri)


def ensure_experiment(client: Any, name: str) -> str:
    """The id of experiment ``name``, created if needed, marked as a training experiment
    (so that MLflow's UI opens it on its runs, not on its GenAI overview)."""
    from mlflow.exceptions import MlflowException

    experiment = client.get_experiment_by_name(name)
    if experiment is None:
        try:
            return client.create_experiment(name, tags={EXPERIMENT_KIND_TAG: TRAINING_EXPERIMENT_KIND})
        except MlflowException:  # created meanwhile by another trial
            experiment = client.get_experiment_by_name(name)
            if experiment is None:
                raise
    if EXPERIMENT_KIND_TAG not in experiment.tags:  # made by an older gradgym, or by hand
        client.set_experiment_tag(experiment.experiment_id, EXPERIMENT_KIND_TAG, TRAINING_EXPERIMENT_KIND)
    return experiment.experiment_id


def is_transient(err: BaseException) -> bool:
    """Whether a failed request may succeed later (unreachable, 5xx, rate limit, locked DB).

    A 4xx answer (bad value, deleted run) will not change by retrying.
    """
    from mlflow.exceptions import MlflowException

    if isinstance(err, MlflowException):
        status = err.get_http_status_code()
        return status >= 500 or status == 429
    return True


def with_retries(action: Callable[[], T], limit_s: float, pause_s: float = 1.0) -> T:
    """Run ``action`` until it succeeds, retrying transient store errors for ``limit_s``.

    Raises:
        TrackingError: the store stayed away past ``limit_s`` or refused the request.
    """
    deadline = time.monotonic() + limit_s
    while True:
        try:
            return action()
        except Exception as err:
            if not is_transient(err):
                raise TrackingError(f"the tracking store refused the request: {_short(err)}") from err
            if time.monotonic() > deadline:
                raise TrackingError(
                    f"the tracking store has been unreachable for {limit_s:g} s: {_short(err)}"
                ) from err
            time.sleep(pause_s)


def run_url(uri: str, experiment_id: str, run_id: str | None = None) -> str | None:
    """The dashboard address of an experiment's runs (or of one run) on a tracking server;
    ``None`` for an embedded store (``gradgym ui`` serves it)."""
    if not is_server_uri(uri):
        return None
    base = f"{uri.rstrip('/')}/#/experiments/{experiment_id}"
    return f"{base}/runs/{run_id}" if run_id else f"{base}/runs"


# ---------------------------------------------------------------------- a sweep's parent run

def create_parent_run(uri: str, experiment: str, name: str, params: Mapping[str, Any],
                      artifacts: list[Path], limit_s: float) -> dict[str, Any]:
    """Create a sweep's parent run with its params and artifacts; returns what
    :func:`reopen_run` and :func:`close_parent_run` need (a JSON-able mapping)."""
    from mlflow.entities import Param

    client = tracking_client(uri)

    def create() -> dict[str, Any]:
        experiment_id = ensure_experiment(client, experiment)
        run = client.create_run(experiment_id, run_name=name, tags={"sweep": name, "gradgym.kind": "sweep"})
        return {"run_id": run.info.run_id, "experiment_id": experiment_id, "uri": uri,
                "experiment": experiment}

    parent = with_retries(create, limit_s)
    items = [Param(k, str(v)[:MAX_PARAM_CHARS]) for k, v in params.items()]
    for i in range(0, len(items), MAX_PARAMS_PER_BATCH):
        with_retries(lambda batch=items[i:i + MAX_PARAMS_PER_BATCH]:
                     client.log_batch(parent["run_id"], params=batch), limit_s)
    for path in artifacts:
        with_retries(lambda path=path: client.log_artifact(parent["run_id"], str(path)), limit_s)
    return parent


def reopen_run(parent: Mapping[str, Any], limit_s: float) -> None:
    """Mark a run RUNNING again (a resumed sweep's parent)."""
    with_retries(lambda: tracking_client(parent["uri"]).update_run(parent["run_id"], status="RUNNING"),
                 limit_s)


def close_parent_run(parent: Mapping[str, Any], artifacts: list[Path], tags: Mapping[str, str],
                     status: str, limit_s: float) -> None:
    """Upload the sweep's artifacts, set its tags and end the parent run with ``status``."""
    client = tracking_client(parent["uri"])

    def close() -> None:
        for path in artifacts:
            client.log_artifact(parent["run_id"], str(path))
        for key, value in tags.items():
            client.set_tag(parent["run_id"], key, str(value)[:MAX_TAG_CHARS])
        client.set_terminated(parent["run_id"], status=MLFLOW_STATUS[status])

    with_retries(close, limit_s)


# ---------------------------------------------------------------------- tracker

class MlflowTracker(LocalTracker):
    """Logs one run to its folder and to an MLflow run (see the module doc).

    Args:
        record: the run folder (holds ``metrics.jsonl`` and ``tracking.json``).
        cfg: the run's ``tracking`` config (:class:`~gradgym.platform.config.TrackingConfig`).
        identity: the run's name, tags, params and parent run.
    """

    def __init__(self, record: RunRecord | str | Path, cfg: DictConfig, identity: RunIdentity):
        super().__init__(record, identity)
        self.cfg = cfg
        self.uri = resolve_tracking_uri(cfg.uri)
        self.bulk_sql = bool(cfg.get("bulk_sql", True))
        self._state = self.record.read_tracking_state()
        self._tags = {str(k): str(v) for k, v in identity.tags.items()}
        if identity.parent_run_id:
            self._tags["mlflow.parentRunId"] = identity.parent_run_id
        self._delivery: _Delivery | None = None
        self._served = threading.Event()  # a background round has included this tracker
        self._run_started = False  # this attempt has (re)marked the run RUNNING
        self._created_here = False  # this tracker created the MLflow run (it is RUNNING)
        self._pending_artifacts: list[tuple[Path, str | None]] = []
        self._pending_final: list[Any] = []
        self._unsent_params: list[Any] = []
        self._failing_since: float | None = None
        self._last_error: BaseException | None = None
        self._fatal: BaseException | None = None
        self.batches_sent = 0  # requests (or bulk transactions) that carried its metrics

    # ------------------------------------------------------------------ public
    @property
    def run_id(self) -> str | None:
        """The MLflow run id, once the run exists in the store."""
        return self._state.get("run_id")

    def start(self) -> MlflowTracker:
        """Start sending in the background (first send: now), on the process's one sender
        thread for this store."""
        configure_http(self.cfg.request_timeout_s)
        self._delivery = _Delivery.join(self)
        return self

    def log_final(self, metrics: Mapping[str, float], step: int) -> None:
        """Metrics of the finished run (sent with the last iterations)."""
        from mlflow.entities import Metric

        stamp = now_ms()
        final = [Metric(k, float(v), stamp, int(step)) for k, v in metrics.items()]
        with self._lock:  # replaced, never changed in place: the sender compares identity
            self._pending_final = final

    def log_artifact(self, path: Path, artifact_dir: str | None = None) -> None:
        """Queue a file of the run folder for upload (retried like metrics)."""
        with self._lock:  # sent with the next metrics, not now: uploads hold the GIL
            self._pending_artifacts.append((Path(path), artifact_dir))

    def raise_if_broken(self) -> None:
        """Raise :class:`TrackingError` if the store refused data or has been away too long."""
        if self._fatal is not None:
            raise TrackingError(
                f"the tracking store {self.uri} refused the run's data: {self._fatal}. "
                f"{self._kept_message()}"
            ) from self._fatal
        if self._failing_since is not None:
            away = time.monotonic() - self._failing_since
            if away > self.cfg.outage_limit_s:
                raise TrackingError(self._outage_message(away)) from self._last_error

    def drain(self) -> None:
        """Stop sending in the background and deliver everything queued so far (the run then
        exists in the store). Waits for an unreachable store up to ``tracking.outage_limit_s``.

        Raises:
            TrackingError: the data could not be delivered (it stays in the run folder).
        """
        self._deliver(lambda: None)

    def finish(self, status: str = "FINISHED", error: str | None = None) -> None:
        """Deliver everything left and end the MLflow run; like :meth:`drain`.

        ``status`` is a run status (``tracking.RUN_STATUSES``); ``error`` (a traceback)
        becomes the run's ``error`` tag. A STOPPED run ends KILLED, tagged ``stopped_early``.
        """
        tags = {STOPPED_EARLY_TAG: "true"} if status == "STOPPED" else {}
        if error and status != "STOPPED":
            tags["error"] = error[-MAX_TAG_CHARS:]
        self._deliver(lambda: self._send_end(MLFLOW_STATUS[status], tags))

    def close(self) -> None:
        """Stop sending in the background without waiting for the store (what is unsent stays
        on disk). Returns once no background round is sending this run's data; the other
        runs sharing the sender carry on."""
        if self._delivery is not None:
            self._delivery.leave(self)
            self._delivery = None

    def is_delivered(self) -> bool:
        """Whether every logged iteration is acknowledged and the MLflow run has ended."""
        if not self.run_id or self._state.get("acked", 0) < len(self.metrics.entries):
            return False
        configure_http(self.cfg.request_timeout_s)
        run = with_retries(lambda: tracking_client(self.uri).get_run(self.run_id), self.cfg.outage_limit_s)
        return run.info.status != "RUNNING"

    # ------------------------------------------------------------------ delivering (caller's thread)
    def _deliver(self, last_step: Callable[[], None]) -> None:
        configure_http(self.cfg.request_timeout_s)
        self.close()
        self.raise_if_broken()
        # The store may already have been away for a while: the limit counts from then.
        deadline = (self._failing_since or time.monotonic()) + self.cfg.outage_limit_s
        while True:
            try:
                self._flush()
                last_step()
                return
            except Exception as err:
                if not is_transient(err):
                    self._fatal = err
                    self.raise_if_broken()
                self._note_failure(err)
                if time.monotonic() > deadline:
                    raise TrackingError(self._outage_message(self.cfg.outage_limit_s)) from err
                time.sleep(min(2.0, self.cfg.flush_every_s))

    def _flush(self) -> None:
        """One round for this run alone, in the caller's thread (raises what failed)."""
        with _round_lock(self.uri):
            failures = deliver_round(self.uri, [self])
        if self in failures:
            raise failures[self]
        self._note_success()

    def _note_failure(self, err: BaseException) -> None:
        if self._failing_since is None:
            self._failing_since = time.monotonic()
            log.warning("tracking store %s unreachable (%s); buffering in %s", self.uri, err,
                        self.record.folder)
        self._last_error = err

    def _note_success(self) -> None:
        if self._failing_since is not None:
            log.warning("tracking store %s is back; buffered metrics sent", self.uri)
        self._failing_since = None

    # ------------------------------------------------------------------ a round's steps
    def _ensure_run(self, client: Any) -> None:
        """Create (or find, or reopen) the MLflow run; queue its params once per attempt."""
        from mlflow.entities import Param

        if self.run_id is None:
            self._create_run(client)  # with the run's tags
        if not self._run_started:
            if not self._created_here:
                # A retried attempt reopens the run the previous attempt may have marked FAILED.
                client.update_run(self.run_id, status="RUNNING")
            # (again on a retried attempt: MLflow accepts a param logged twice with one value)
            self._unsent_params = [Param(k, str(v)[:MAX_PARAM_CHARS])
                                   for k, v in self.identity.params.items()]
            self._run_started = True

    def _create_run(self, client: Any) -> None:
        uid = self._state.get("run_uid")
        experiment_id = ensure_experiment(client, self.cfg.experiment)
        # A create tried before (by an earlier attempt, or here with its reply lost) may have
        # succeeded: look for its run first. A fresh uid has no run yet: no query.
        found = (
            client.search_runs([experiment_id], filter_string=f"tags.`{RUN_UID_TAG}` = '{uid}'")
            if uid else []
        )
        if found:
            run_id = found[0].info.run_id
        else:
            if not uid:
                uid = self._state["run_uid"] = uuid.uuid4().hex
                self.record.write_tracking_state(self._state)  # before the create: see above
            tags = dict(self._tags, **{RUN_UID_TAG: uid})
            run_id = client.create_run(experiment_id, tags=tags, run_name=self.identity.name).info.run_id
            self._created_here = True
        self._state.update(run_id=run_id, experiment_id=experiment_id, acked=0)
        self.record.write_tracking_state(self._state)

    def _next_chunk(self, room: int) -> _Chunk:
        """The next unsent iterations that fit in ``room`` metric points (at least one), with
        the final metrics when everything else fits too."""
        with self._lock:
            acked = self._state.get("acked", 0)
            pending = self.metrics.entries[acked:]
            final = self._pending_final
        lines = points = 0
        for entry in pending:
            size = len(entry) - len(LINE_FIELDS)
            if lines and points + size > room:
                break
            points += size
            lines += 1
        with_final = bool(final) and lines == len(pending) and points + len(final) <= room
        more = lines < len(pending) or (bool(final) and not with_final)
        return _Chunk(acked, pending[:lines], final if with_final else [], more)

    def _acknowledge(self, chunk: _Chunk, params_sent: int) -> None:
        """Record that the store committed ``chunk`` and the first ``params_sent`` params."""
        self._unsent_params = self._unsent_params[params_sent:]
        if chunk.final:
            with self._lock:
                if self._pending_final is chunk.final:  # not replaced meanwhile
                    self._pending_final = []
        if chunk.entries:
            self.batches_sent += 1
            self._state["acked"] = chunk.acked + len(chunk.entries)
            self.record.write_tracking_state(self._state)

    def _send_metrics(self, client: Any) -> None:
        """Send unsent params, iterations and final metrics with ``log_batch``, as few requests
        as MLflow allows (each costs about the same, whatever its size)."""
        while True:
            params = self._unsent_params[:MAX_PARAMS_PER_BATCH]
            chunk = self._next_chunk(MAX_ENTRIES_PER_BATCH - len(params))
            if chunk.empty and not params:
                return
            client.log_batch(self.run_id, metrics=chunk.metrics(), params=params)
            self._acknowledge(chunk, len(params))

    def _send_artifacts(self, client: Any) -> None:
        while True:
            with self._lock:
                if not self._pending_artifacts:
                    return
                path, artifact_dir = self._pending_artifacts[0]
            client.log_artifact(self.run_id, str(path), artifact_dir)
            with self._lock:
                self._pending_artifacts.pop(0)

    def _send_end(self, mlflow_status: str, tags: Mapping[str, str]) -> None:
        from mlflow.entities import RunTag

        client = tracking_client(self.uri)
        if tags:
            client.log_batch(self.run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])
        client.set_terminated(self.run_id, status=mlflow_status)

    # ------------------------------------------------------------------ messages
    def _kept_message(self) -> str:
        return (f"Nothing is lost: all {len(self.metrics.entries)} iterations are in "
                f"{self.metrics.path}.")

    def _outage_message(self, away: float) -> str:
        return (
            f"the tracking store {self.uri} has been unreachable for {away:.0f} s "
            f"(limit: tracking.outage_limit_s={self.cfg.outage_limit_s:g}); last error: "
            f"{_short(self._last_error)}. {self._kept_message()}"
        )


LINE_FIELDS = ("iteration", "timestamp_ms")  # the fields of a metrics.jsonl line that are no metric


@dataclass
class _Chunk:
    """Unsent iterations of one run: where they start, the lines, the final metrics riding
    with them, and whether more is pending behind them."""

    acked: int
    entries: list[dict[str, Any]]
    final: list[Any]
    more: bool

    @property
    def empty(self) -> bool:
        return not self.entries and not self.final

    def metrics(self) -> list[Any]:
        """The chunk as MLflow ``Metric`` entities (each point keeps its original timestamp)."""
        from mlflow.entities import Metric

        points = [Metric(k, v, entry["timestamp_ms"], entry["iteration"])
                  for entry in self.entries for k, v in entry.items() if k not in LINE_FIELDS]
        return points + list(self.final)


# ---------------------------------------------------------------------- delivery rounds

def deliver_round(uri: str, trackers: list[MlflowTracker]) -> dict[MlflowTracker, Exception]:
    """Send the pending data of ``trackers`` (all on store ``uri``): runs created, params,
    iterations, final metrics, artifacts. SQL stores get every run's points in one bulk
    transaction (:class:`SqlBulkWriter`); other stores (a tracking server) a ``log_batch``
    per run. Returns the trackers whose data did not go, with their error: one run's error
    is its own, and the others' data still goes. Call it under :func:`_round_lock`.
    """
    failures: dict[MlflowTracker, Exception] = {}
    client = tracking_client(uri)
    started = _each(trackers, lambda t: t._ensure_run(client), failures)
    writer = sql_bulk_writer(uri) if any(t.bulk_sql for t in started) else None
    bulk = [t for t in started if t.bulk_sql] if writer else []
    sent: list[MlflowTracker] = []
    if bulk:
        try:
            refused = writer.send(bulk)
            failures.update(refused)
            sent = [t for t in bulk if t not in refused]
        except Exception as err:  # noqa: BLE001 - classified right below
            if is_transient_db_error(err):
                failures.update({t: err for t in bulk})
            else:  # not what the bulk path expects: MLflow's own path, run by run, says why
                log.warning("bulk write to %s failed (%s); sending with log_batch", uri, _short(err))
    rest = [t for t in started if t not in sent and t not in failures]
    sent += _each(rest, lambda t: t._send_metrics(client), failures)
    _each(sent, lambda t: t._send_artifacts(client), failures)
    return failures


def _each(trackers: list[MlflowTracker], action: Callable[[MlflowTracker], None],
          failures: dict[MlflowTracker, Exception]) -> list[MlflowTracker]:
    """Apply ``action`` to each tracker; returns those it succeeded for, errors go to ``failures``.

    A refusal is one run's own. Two transient errors in a row mean the store is away: the
    remaining trackers wait for the next round (with that error) instead of each waiting out
    a request timeout.
    """
    done: list[MlflowTracker] = []
    in_a_row = 0
    for i, tracker in enumerate(trackers):
        try:
            action(tracker)
        except Exception as err:  # noqa: BLE001 - every tracker's error is reported
            failures[tracker] = err
            in_a_row = in_a_row + 1 if is_transient(err) else 0
            if in_a_row >= 2:
                failures.update({rest: err for rest in trackers[i + 1:]})
                break
        else:
            done.append(tracker)
            in_a_row = 0
    return done


_ROUND_LOCKS: dict[str, threading.Lock] = {}
_REGISTRY_LOCK = threading.Lock()  # guards _ROUND_LOCKS and _Delivery's registry
THREAD_NAME = "gradgym-tracking"


def _round_lock(uri: str) -> threading.Lock:
    """The lock that makes rounds on one store, in this process, one at a time: a run's
    closing round (``drain``) never interleaves with a background round sending its data."""
    with _REGISTRY_LOCK:
        return _ROUND_LOCKS.setdefault(uri, threading.Lock())


class _Delivery:
    """The one background sender of a process for one store, shared by all its trackers.

    Every ``flush_every_s`` (the shortest of its trackers') a round delivers what every
    registered tracker has pending. A transient failure is noted on the trackers it hit
    (their ``outage_limit_s`` counts from it) and the next round comes later (backoff up to
    10 s); a refusal ends only that tracker's background sending. The thread ends when its
    last tracker leaves; a later tracker starts a new one.
    """

    _instances: ClassVar[dict[tuple[int, str], _Delivery]] = {}  # (pid, uri): a forked child starts its own

    def __init__(self, uri: str):
        self.uri = uri
        self.key = (os.getpid(), uri)
        self.trackers: list[MlflowTracker] = []
        self.wake = threading.Event()
        self.thread = threading.Thread(target=self._loop, name=THREAD_NAME, daemon=True)

    @classmethod
    def join(cls, tracker: MlflowTracker) -> _Delivery:
        """Register ``tracker`` with its store's sender (started if needed) and wake it."""
        with _REGISTRY_LOCK:
            key = (os.getpid(), tracker.uri)
            delivery = cls._instances.get(key)
            if delivery is None:
                delivery = cls._instances[key] = cls(tracker.uri)
                # The sender imports MLflow (seconds, once per process) while the run builds
                # its env and compiles, much of which runs outside the GIL.
                delivery.thread.start()
            delivery.trackers.append(tracker)
        delivery.wake.set()
        return delivery

    def leave(self, tracker: MlflowTracker, wait: bool = True) -> None:
        """Unregister ``tracker``; with ``wait``, return once no round is sending its data.

        With ``wait``, a tracker's first round (due since it joined) is waited for, as when
        every tracker had its own thread that began sending at ``start``: a run closed right
        after starting still has its MLflow run created.
        """
        if wait and threading.current_thread() is not self.thread:
            while not tracker._served.wait(0.5) and self.thread.is_alive():
                pass
        with _REGISTRY_LOCK:
            if tracker in self.trackers:
                self.trackers.remove(tracker)
            if not self.trackers:
                self.wake.set()  # let the thread end now
        if wait and threading.current_thread() is not self.thread:
            with _round_lock(self.uri):
                pass

    def _registered(self) -> list[MlflowTracker]:
        with _REGISTRY_LOCK:
            return list(self.trackers)

    def _loop(self) -> None:
        backoff = 0.0
        while True:
            with _REGISTRY_LOCK:
                trackers = list(self.trackers)
                if not trackers:
                    del self._instances[self.key]
                    return
            interval = min(t.cfg.flush_every_s for t in trackers)
            failing = self._round()
            backoff = min(max(backoff, interval) * 2, 10.0) if failing else interval
            self.wake.wait(backoff)
            self.wake.clear()

    def _round(self) -> bool:
        """One round for every registered tracker; returns whether the store failed."""
        with _round_lock(self.uri):
            trackers = self._registered()  # not those that left while the lock was busy
            try:
                failures = deliver_round(self.uri, trackers)
            except Exception as err:  # noqa: BLE001 - e.g. importing MLflow: every tracker's
                failures = {t: err for t in trackers}
            for tracker in trackers:
                tracker._served.set()
                err = failures.get(tracker)
                if err is None:
                    tracker._note_success()
                elif is_transient(err):
                    tracker._note_failure(err)
                else:
                    tracker._fatal = err
                    self.leave(tracker, wait=False)
        return any(is_transient(err) for err in failures.values())


# ---------------------------------------------------------------------- bulk writes to SQL stores

BULK_DIALECTS = ("sqlite", "postgresql")
# What the bulk path writes, and the primary keys it relies on: a point sent twice has the same
# metrics key (so it is skipped), and latest_metrics has one row per (run, key).
BULK_COLUMNS = {
    "metrics": {"key", "value", "timestamp", "step", "is_nan", "run_uuid"},
    "latest_metrics": {"key", "value", "timestamp", "step", "is_nan", "run_uuid"},
    "params": {"key", "value", "run_uuid"},
    "runs": {"run_uuid", "lifecycle_stage"},
}
BULK_PRIMARY_KEYS = {
    "metrics": {"key", "timestamp", "step", "run_uuid", "value", "is_nan"},
    "latest_metrics": {"key", "run_uuid"},
    "params": {"key", "run_uuid"},
}


def is_transient_db_error(err: BaseException) -> bool:
    """Whether a database error may pass by retrying (locked, connection lost)."""
    import sqlalchemy.exc

    if isinstance(err, sqlalchemy.exc.OperationalError):
        return True
    return isinstance(err, sqlalchemy.exc.DBAPIError) and err.connection_invalidated


@functools.lru_cache(maxsize=8)
def sql_bulk_writer(uri: str) -> SqlBulkWriter | None:
    """The bulk writer of a SQL store, or ``None`` where ``log_batch`` must do (a server,
    another database, a schema this code does not know)."""
    if is_server_uri(uri):
        return None
    store = getattr(getattr(tracking_client(uri), "_tracking_client", None), "store", None)
    engine = getattr(store, "engine", None)
    if engine is None or engine.dialect.name not in BULK_DIALECTS:
        return None
    problem = bulk_schema_problem(engine)
    if problem:
        log.warning("tracking store %s: %s; sending with log_batch", uri, problem)
        return None
    return SqlBulkWriter(store)


def bulk_schema_problem(engine: Any) -> str | None:
    """Why the bulk path cannot write to ``engine``'s database (``None``: it can).

    The database must be at MLflow's schema revision (MLflow's store checks that too), and
    MLflow's table models and the database's tables must have the columns and primary keys
    the bulk path relies on.
    """
    import sqlalchemy
    from mlflow.store.db.utils import _get_latest_schema_revision, _get_schema_version
    from mlflow.store.tracking.dbmodels.models import Base

    found, expected = _get_schema_version(engine), _get_latest_schema_revision()
    if found != expected:
        return f"schema revision {found}, expected {expected}"
    inspector = sqlalchemy.inspect(engine)
    for table, columns in BULK_COLUMNS.items():
        model = Base.metadata.tables.get(table)
        if model is None or not columns <= set(model.columns.keys()):
            return f"MLflow's model of table {table!r} lacks some of {sorted(columns)}"
        if not columns <= {column["name"] for column in inspector.get_columns(table)}:
            return f"table {table!r} lacks some of {sorted(columns)}"
        keys = BULK_PRIMARY_KEYS.get(table)
        if keys and set(inspector.get_pk_constraint(table)["constrained_columns"]) != keys:
            return f"table {table!r} has an unexpected primary key"
    return None


class SqlBulkWriter:
    """Writes many runs' points to MLflow's SQL tables in one transaction.

    MLflow's ``log_batch`` builds an ORM object per point and queries latest_metrics per
    request (0.25-0.4 ms of CPU per point measured here); this writes the same rows, in the
    same tables, with SQLAlchemy Core ``executemany`` (about 6x less CPU,
    ``benchmarks/tracking_throughput.py``):

    - ``metrics``: one row per point, values sanitized by MLflow's own rule (NaN: 0 with
      ``is_nan``; +-inf: +-max float64); a point already there (a resend after a lost
      acknowledgement) is skipped by its primary key;
    - ``latest_metrics``: per (run, key) the newest point, by MLflow's rule (step, then
      timestamp, then value), only if newer than the stored one;
    - ``params``: skipped when present with the same value; a changed value refuses the run
      (as MLflow does);
    - runs that are deleted or missing are refused (as MLflow does); the others go.
    """

    def __init__(self, store: Any):
        import sqlalchemy as sa
        from mlflow.store.tracking.dbmodels.models import (
            SqlLatestMetric,
            SqlMetric,
            SqlParam,
            SqlRun,
        )

        self.store = store
        self.engine = store.engine
        self.runs = SqlRun.__table__
        self.params = SqlParam.__table__
        insert = _dialect_insert(self.engine.dialect.name)
        self.insert_metrics = insert(SqlMetric.__table__).on_conflict_do_nothing()
        self.insert_params = insert(self.params).on_conflict_do_nothing()
        latest = SqlLatestMetric.__table__
        upsert = insert(latest)
        new, old = upsert.excluded, latest.c
        newer = sa.or_(new.step > old.step,
                       sa.and_(new.step == old.step,
                               sa.or_(new.timestamp > old.timestamp,
                                      sa.and_(new.timestamp == old.timestamp, new.value > old.value))))
        self.upsert_latest = upsert.on_conflict_do_update(
            index_elements=["run_uuid", "key"],
            set_={c: new[c] for c in ("value", "timestamp", "step", "is_nan")}, where=newer)
        self._valid_keys: set[str] = set()  # metric names MLflow's validation accepted
        self.transactions = 0  # committed bulk transactions (for tests and benchmarks)
        self.points = 0  # metric points in them

    def send(self, trackers: list[MlflowTracker]) -> dict[MlflowTracker, Exception]:
        """Deliver everything ``trackers`` have pending, in transactions of up to
        ``MAX_ENTRIES_PER_BATCH`` points per run (a run's backlog after an outage does
        not hold back the others). Returns the refused trackers with MLflow's error."""
        refused: dict[MlflowTracker, Exception] = {}
        active = list(trackers)
        while active:
            chunks = {t: t._next_chunk(MAX_ENTRIES_PER_BATCH) for t in active}
            params = {t: list(t._unsent_params) for t in active}
            busy = [t for t in active if not chunks[t].empty or params[t]]
            if not busy:
                break
            refused.update(self._write(busy, chunks, params))
            for tracker in busy:
                if tracker not in refused:
                    tracker._acknowledge(chunks[tracker], len(params[tracker]))
            active = [t for t in busy if t not in refused and chunks[t].more]
        return refused

    def _write(self, trackers: list[MlflowTracker], chunks: Mapping[MlflowTracker, _Chunk],
               params: Mapping[MlflowTracker, list[Any]]) -> dict[MlflowTracker, Exception]:
        """One transaction; returns the refused trackers (nothing of theirs is written)."""
        refused: dict[MlflowTracker, Exception] = {}
        rows: dict[MlflowTracker, list[dict[str, Any]]] = {}
        for tracker in trackers:
            try:
                rows[tracker] = self._metric_rows(tracker.run_id, chunks[tracker])
                _validate_params(params[tracker])
            except Exception as err:  # noqa: BLE001 - MLflow's validation: the run's own error
                refused[tracker] = err
        with self.engine.begin() as conn:
            refused.update(self._refusals(conn, [t for t in trackers if t not in refused], params))
            accepted = [t for t in trackers if t not in refused]
            metric_rows = [row for t in accepted for row in rows[t]]
            param_rows = [{"run_uuid": t.run_id, "key": p.key, "value": p.value}
                          for t in accepted for p in params[t]]
            if metric_rows:
                conn.execute(self.insert_metrics, metric_rows)
                conn.execute(self.upsert_latest, _latest_rows(metric_rows))
            if param_rows:
                conn.execute(self.insert_params, param_rows)
        self.transactions += 1
        self.points += len(metric_rows)
        return refused

    def _metric_rows(self, run_id: str, chunk: _Chunk) -> list[dict[str, Any]]:
        """The ``metrics`` rows of a chunk, values sanitized by MLflow's own rule."""
        sanitize = self.store.sanitize_metric_value
        rows = []
        points = [(k, v, e["timestamp_ms"], e["iteration"])
                  for e in chunk.entries for k, v in e.items() if k not in LINE_FIELDS]
        points += [(m.key, m.value, m.timestamp, m.step) for m in chunk.final]
        for key, value, timestamp, step in points:
            if key not in self._valid_keys:
                _validate_metric_name(key)
                self._valid_keys.add(key)
            is_nan, stored = sanitize(float(value))
            rows.append({"run_uuid": run_id, "key": key, "value": stored, "timestamp": int(timestamp),
                         "step": int(step), "is_nan": is_nan})
        return rows

    def _refusals(self, conn: Any, trackers: list[MlflowTracker],
                  params: Mapping[MlflowTracker, list[Any]]) -> dict[MlflowTracker, Exception]:
        """The trackers MLflow would refuse: run missing or deleted, or a param changed."""
        import sqlalchemy as sa
        from mlflow.exceptions import MlflowException
        from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE

        ids = sorted({t.run_id for t in trackers})
        stages = dict(conn.execute(sa.select(self.runs.c.run_uuid, self.runs.c.lifecycle_stage)
                                   .where(self.runs.c.run_uuid.in_(ids))).all())
        with_params = sorted({t.run_id for t in trackers if params[t]})
        stored = {(run, key): value for run, key, value in conn.execute(
            sa.select(self.params.c.run_uuid, self.params.c.key, self.params.c.value)
            .where(self.params.c.run_uuid.in_(with_params))).all()} if with_params else {}
        refused: dict[MlflowTracker, Exception] = {}
        for tracker in trackers:
            stage = stages.get(tracker.run_id, "missing")
            changed = [p.key for p in params[tracker]
                       if stored.get((tracker.run_id, p.key), p.value) != p.value]
            if stage != "active":
                refused[tracker] = MlflowException(
                    f"The run {tracker.run_id} must be in the 'active' state. Current state is "
                    f"{stage}.", INVALID_PARAMETER_VALUE)
            elif changed:
                refused[tracker] = MlflowException(
                    f"Changing param values is not allowed: {changed} of run {tracker.run_id}.",
                    INVALID_PARAMETER_VALUE)
        return refused


def _latest_rows(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per (run, key), the newest of ``rows`` by MLflow's rule: step, then timestamp, then
    value; the first wins a tie (MLflow replaces only on strictly newer)."""
    latest: dict[tuple[str, str], dict[str, Any]] = {}
    for row in rows:
        best = latest.get((row["run_uuid"], row["key"]))
        if best is None or ((row["step"], row["timestamp"], row["value"])
                            > (best["step"], best["timestamp"], best["value"])):
            latest[(row["run_uuid"], row["key"])] = row
    return list(latest.values())


def _dialect_insert(dialect: str) -> Callable[[Any], Any]:
    """The INSERT construct with ON CONFLICT of a database dialect."""
    if dialect == "sqlite":
        from sqlalchemy.dialects.sqlite import insert
    else:
        from sqlalchemy.dialects.postgresql import insert
    return insert


def _validate_metric_name(key: str) -> None:
    from mlflow.utils.validation import _validate_metric_name as validate

    validate(key)


def _validate_params(params: list[Any]) -> None:
    from mlflow.utils.validation import _validate_param

    for param in params:
        _validate_param(param.key, param.value)


def _short(err: BaseException | None) -> str:
    text = str(err) if err is not None else "none"
    return text if len(text) < 300 else text[:300] + "..."
