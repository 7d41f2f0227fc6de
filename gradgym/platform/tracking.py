"""MLflow tracking with a durable local buffer.

Every metric point of a run goes to the run folder first (``metrics.jsonl``: one JSON
object per iteration, with the time it was measured), and a background thread sends what
the tracking store has not acknowledged yet in ``log_batch`` calls with the run's explicit
id. ``tracking.json`` records the run id and how many lines the store has acknowledged,
so a retried or resumed run continues the same MLflow run and sends only the rest.

Sending a point twice (the store committed it but the reply was lost) is harmless: each
point keeps its original timestamp, and MLflow's SQL stores treat a point with the same
key, step, timestamp and value as the same point.

While the store is unreachable the points wait in the run folder and every flush retries.
If it stays away longer than ``tracking.outage_limit_s`` the run fails with
:class:`TrackingError`; the local copy stays complete.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import threading
import time
import traceback
import uuid
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

log = logging.getLogger(__name__)

METRICS_FILE = "metrics.jsonl"
STATE_FILE = "tracking.json"
DEFAULT_STORE_FILE = "mlflow.db"
RUN_UID_TAG = "gradgym.run_uid"  # finds a run whose creation reply was lost
# MLflow's limits per log_batch request: 100 params, 1000 entries in all.
MAX_PARAMS_PER_BATCH = 100
MAX_ENTRIES_PER_BATCH = 1000


class TrackingError(RuntimeError):
    """The tracking store refused the run's data or stayed unreachable past the limit."""


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
    """The id of experiment ``name``, created if it does not exist yet."""
    from mlflow.exceptions import MlflowException

    experiment = client.get_experiment_by_name(name)
    if experiment is not None:
        return experiment.experiment_id
    try:
        return client.create_experiment(name)
    except MlflowException:  # created meanwhile by another trial
        experiment = client.get_experiment_by_name(name)
        if experiment is None:
            raise
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


# ---------------------------------------------------------------------- local log

class MetricLog:
    """A run folder's ``metrics.jsonl``: append-only, one JSON object per iteration.

    Each line holds ``iteration``, ``timestamp_ms`` and the metrics. A line torn by a killed
    process is dropped when the file is read back.
    """

    def __init__(self, path: Path):
        self.path = path
        self.entries: list[dict[str, Any]] = []
        if path.exists():
            self.entries = read_jsonl(path)
            # Rewrite without a torn last line, so that appends start on a fresh line.
            _write_jsonl(path, self.entries)
        self.steps = {entry["iteration"] for entry in self.entries}

    def append(self, step: int, metrics: Mapping[str, float], timestamp_ms: int) -> bool:
        """Append one iteration; ``False`` (nothing written) if ``step`` is already logged."""
        if step in self.steps:
            return False
        entry = {"iteration": int(step), "timestamp_ms": int(timestamp_ms)}
        entry.update({key: float(value) for key, value in metrics.items()})
        with self.path.open("a") as file:
            file.write(json.dumps(entry) + "\n")
        self.entries.append(entry)
        self.steps.add(step)
        return True


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """The objects of a JSON-lines file, up to a torn last line (if any)."""
    entries = []
    for line in path.read_text().splitlines():
        try:
            entries.append(json.loads(line))
        except json.JSONDecodeError:
            break  # a torn last line
    return entries


def _write_jsonl(path: Path, entries: Iterable[Mapping[str, Any]]) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(json.dumps(entry) + "\n" for entry in entries))
    os.replace(tmp, path)


def read_json(path: Path) -> dict[str, Any]:
    """A JSON file's object, or ``{}`` if it is missing or half written."""
    try:
        return json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError):
        return {}


def write_json(path: Path, content: Mapping[str, Any]) -> None:
    """Write ``content`` as JSON atomically (a reader never sees half a file)."""
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(content, indent=2, default=str) + "\n")
    os.replace(tmp, path)


# ---------------------------------------------------------------------- tracker

class RunTracker:
    """Logs one run to its folder and, unless disabled, to an MLflow run.

    Args:
        run_dir: the run folder (holds ``metrics.jsonl`` and ``tracking.json``).
        cfg: the run's ``tracking`` config (:class:`~gradgym.platform.config.TrackingConfig`).
        run_name: the MLflow run name.
        tags: MLflow tags of the run (backend, env, pipeline, seed, sweep).
        params: MLflow params (the resolved config, flattened).
        parent_run_id: the sweep's parent run, for a trial.
    """

    def __init__(self, run_dir: Path, cfg: DictConfig, *, run_name: str,
                 tags: Mapping[str, str], params: Mapping[str, str],
                 parent_run_id: str | None = None):
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.cfg = cfg
        self.enabled = bool(cfg.enabled)
        self.uri = resolve_tracking_uri(cfg.uri) if self.enabled else None
        self.metrics = MetricLog(self.run_dir / METRICS_FILE)
        self._state_path = self.run_dir / STATE_FILE
        self._state = read_json(self._state_path)
        self._run_name = run_name
        self._tags = {str(k): str(v) for k, v in tags.items()}
        if parent_run_id:
            self._tags["mlflow.parentRunId"] = parent_run_id
        self._params = dict(params)
        self._lock = threading.Lock()
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

    def start(self) -> RunTracker:
        """Start sending in the background (first send: now)."""
        if self.enabled:
            configure_http(self.cfg.request_timeout_s)
            # The sender imports MLflow (seconds, once per process) while the run builds its
            # env and compiles, much of which runs outside the GIL.
            self._thread = threading.Thread(target=self._send_loop, name="gradgym-tracking", daemon=True)
            self._thread.start()
        return self

    def log_iteration(self, metrics: Mapping[str, float], step: int) -> bool:
        """Record one iteration's metrics; ``False`` if an earlier attempt already did.

        Raises:
            TrackingError: the store refused data or stayed unreachable past the limit.
        """
        with self._lock:
            added = self.metrics.append(step, metrics, _now_ms())
        self.raise_if_broken()
        return added

    def log_final(self, metrics: Mapping[str, float], step: int) -> None:
        """Metrics of the finished run (sent with the last iterations)."""
        from mlflow.entities import Metric

        stamp = _now_ms()
        final = [Metric(k, float(v), stamp, int(step)) for k, v in metrics.items()]
        with self._lock:  # replaced, never changed in place: the sender compares identity
            self._pending_final = final

    def log_artifact(self, path: Path, artifact_dir: str | None = None) -> None:
        """Queue a file of the run folder for upload (retried like metrics)."""
        if self.enabled:
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

    def finish(self, status: str = "FINISHED", error: str | None = None,
               tags: Mapping[str, str] | None = None) -> None:
        """Deliver everything left and end the MLflow run with ``status``; like :meth:`drain`.

        ``error`` (a traceback) becomes the run's ``error`` tag; ``tags`` are set too.
        """
        self._deliver(lambda: self._send_final(status, error, tags or {}))

    def _deliver(self, last_step: Any) -> None:
        if not self.enabled:
            return
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

    def close(self) -> None:
        """Stop the sender without waiting for the store (what is unsent stays on disk)."""
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join()

    # ------------------------------------------------------------------ sending
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
            log.warning("tracking store %s unreachable (%s); buffering in %s", self.uri, err, self.run_dir)
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
            self._unsent_params = [Param(k, v[:6000]) for k, v in self._params.items()]
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
                write_json(self._state_path, self._state)  # before the create: see above
            tags = dict(self._tags, **{RUN_UID_TAG: uid})
            run_id = client.create_run(experiment_id, tags=tags, run_name=self._run_name).info.run_id
            self._created_here = True
        self._state.update(run_id=run_id, experiment_id=experiment_id, acked=0)
        write_json(self._state_path, self._state)

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
                write_json(self._state_path, self._state)

    def _send_artifacts(self, client: Any) -> None:
        while True:
            with self._lock:
                if not self._pending_artifacts:
                    return
                path, artifact_dir = self._pending_artifacts[0]
            client.log_artifact(self.run_id, str(path), artifact_dir)
            with self._lock:
                self._pending_artifacts.pop(0)

    def _send_final(self, status: str, error: str | None, tags: Mapping[str, str]) -> None:
        from mlflow.entities import RunTag

        client = tracking_client(self.uri)
        tags = dict(tags, **({"error": error[-5000:]} if error else {}))
        if tags:
            client.log_batch(self.run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])
        client.set_terminated(self.run_id, status=status)

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


def _now_ms() -> int:
    return int(time.time() * 1000)


def _short(err: BaseException | None) -> str:
    text = str(err) if err is not None else "none"
    return text if len(text) < 300 else text[:300] + "..."


def format_error(err: BaseException) -> str:
    """The last lines of an exception's traceback, for an MLflow tag."""
    return "".join(traceback.format_exception(type(err), err, err.__traceback__))[-5000:]
