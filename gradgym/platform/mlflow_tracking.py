"""MLflow: the one module that talks to an MLflow tracking store.

It owns MLflow's limits, the retry policy, experiment creation, run statuses, the sweep's
parent run and :class:`MlflowTracker`, the tracker of a run (see ``tracking``).

How a run is delivered: every metric point goes to the run folder first (``metrics.jsonl``,
with the time it was measured), and a background thread sends what the store has not
acknowledged yet in ``log_batch`` calls with the run's explicit id. ``tracking.json``
records the run id and how many lines the store has acknowledged, so a retried or resumed
run continues the same MLflow run and sends only the rest. Sending a point twice (the store
committed it but the reply was lost) is harmless: each point keeps its original timestamp,
and MLflow's SQL stores treat a point with the same key, step, timestamp and value as the
same point. While the store is unreachable the points wait in the run folder and every
flush retries; if it stays away longer than ``tracking.outage_limit_s`` the run fails with
:class:`~gradgym.platform.tracking.TrackingError`, and the local copy stays complete.
"""

from __future__ import annotations

import functools
import logging
import os
import threading
import time
import uuid
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, TypeVar

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
        self._state = self.record.read_tracking_state()
        self._tags = {str(k): str(v) for k, v in identity.tags.items()}
        if identity.parent_run_id:
            self._tags["mlflow.parentRunId"] = identity.parent_run_id
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._run_started = False  # this attempt has (re)marked the run RUNNING
        self._created_here = False  # this tracker created the MLflow run (it is RUNNING)
        self._pending_artifacts: list[tuple[Path, str | None]] = []
        self._pending_final: list[Any] = []
        self._unsent_params: list[Any] = []
        self._failing_since: float | None = None
        self._last_error: BaseException | None = None
        self._fatal: BaseException | None = None
        self.batches_sent = 0  # log_batch requests that carried metrics

    # ------------------------------------------------------------------ public
    @property
    def run_id(self) -> str | None:
        """The MLflow run id, once the run exists in the store."""
        return self._state.get("run_id")

    def start(self) -> MlflowTracker:
        """Start sending in the background (first send: now)."""
        configure_http(self.cfg.request_timeout_s)
        # The sender imports MLflow (seconds, once per process) while the run builds its
        # env and compiles, much of which runs outside the GIL.
        self._thread = threading.Thread(target=self._send_loop, name="gradgym-tracking", daemon=True)
        self._thread.start()
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
        """Stop the background sender and deliver everything queued so far (the run then
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
        """Stop the sender without waiting for the store (what is unsent stays on disk)."""
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join()

    def is_delivered(self) -> bool:
        """Whether every logged iteration is acknowledged and the MLflow run has ended."""
        if not self.run_id or self._state.get("acked", 0) < len(self.metrics.entries):
            return False
        configure_http(self.cfg.request_timeout_s)
        run = with_retries(lambda: tracking_client(self.uri).get_run(self.run_id), self.cfg.outage_limit_s)
        return run.info.status != "RUNNING"

    # ------------------------------------------------------------------ sending
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

    def _send_loop(self) -> None:
        backoff = self.cfg.flush_every_s
        while not self._stop.is_set():
            try:
                self._flush()
                backoff = self.cfg.flush_every_s
            except Exception as err:  # noqa: BLE001 - classified right below
                if not is_transient(err):
                    self._fatal = err
                    return
                self._note_failure(err)
                backoff = min(backoff * 2, 10.0)
            self._wake.wait(backoff)
            self._wake.clear()

    def _note_failure(self, err: BaseException) -> None:
        if self._failing_since is None:
            self._failing_since = time.monotonic()
            log.warning("tracking store %s unreachable (%s); buffering in %s", self.uri, err,
                        self.record.folder)
        self._last_error = err

    def _flush(self) -> None:
        """One round: make sure the run exists, then send pending metrics and artifacts."""
        client = tracking_client(self.uri)
        self._ensure_run(client)
        self._send_metrics(client)
        self._send_artifacts(client)
        if self._failing_since is not None:
            log.warning("tracking store %s is back; buffered metrics sent", self.uri)
        self._failing_since = None

    def _ensure_run(self, client: Any) -> None:
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

    def _send_metrics(self, client: Any) -> None:
        """Send unsent params, iterations and final metrics, as few requests as MLflow allows
        (each costs about the same, whatever its size)."""
        from mlflow.entities import Metric

        while True:
            with self._lock:
                acked = self._state.get("acked", 0)
                pending = self.metrics.entries[acked:]
                final = self._pending_final
            params = self._unsent_params[:MAX_PARAMS_PER_BATCH]
            room = MAX_ENTRIES_PER_BATCH - len(params)
            batch: list[Metric] = []
            lines = 0
            for entry in pending:
                points = [Metric(k, v, entry["timestamp_ms"], entry["iteration"])
                          for k, v in entry.items() if k not in ("iteration", "timestamp_ms")]
                if batch and len(batch) + len(points) > room:
                    break
                batch.extend(points)
                lines += 1
            with_final = bool(final) and lines == len(pending) and len(batch) + len(final) <= room
            if with_final:
                batch.extend(final)
            if not batch and not params:
                return
            client.log_batch(self.run_id, metrics=batch, params=params)
            self._unsent_params = self._unsent_params[len(params):]
            if with_final:
                with self._lock:
                    if self._pending_final is final:  # not replaced meanwhile
                        self._pending_final = []
            if lines:
                self.batches_sent += 1
                self._state["acked"] = acked + lines
                self.record.write_tracking_state(self._state)

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


def _short(err: BaseException | None) -> str:
    text = str(err) if err is not None else "none"
    return text if len(text) < 300 else text[:300] + "..."
