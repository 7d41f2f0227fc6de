"""Trackers: where a run's iterations, artifacts and ending go besides its run folder.

Every run writes its iterations to its run record first (``metrics.jsonl``, the durable
buffer); a tracker then delivers them somewhere. The protocol is small:

- ``start()``: begin delivering in the background;
- ``log_iteration(metrics, step)``, ``log_final(metrics, step)``, ``log_artifact(path)``;
- ``drain()``: deliver everything so far; ``finish(status, error)``: that, then end the run;
- ``close()``: stop without waiting; ``is_delivered()``: whether nothing is left to send.

Implementations: :class:`LocalTracker` (the run folder only: ``tracking.enabled=false``)
and :class:`~gradgym.platform.mlflow_tracking.MlflowTracker` (MLflow, with its limits and
retry policy). :func:`open_tracker` picks one from the run's ``tracking`` config.
"""

from __future__ import annotations

import threading
import time
import traceback
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from omegaconf import DictConfig

from gradgym.pipelines.base import FINAL_METRICS
from gradgym.platform.records import RunRecord

# A run's status as its summary and every tracker know it. STOPPED: ended early by a
# scheduler (ASHA), a normal outcome; UNFINISHED: interrupted, to be resumed.
RUN_STATUSES = ("FINISHED", "FAILED", "KILLED", "STOPPED", "UNFINISHED")


class TrackingError(RuntimeError):
    """The tracking store refused the run's data or stayed unreachable past the limit."""


@dataclass
class RunIdentity:
    """What a tracker shows of a run: its name, tags, params and parent (a sweep's run)."""

    name: str
    tags: Mapping[str, str] = field(default_factory=dict)
    params: Mapping[str, str] = field(default_factory=dict)
    parent_run_id: str | None = None


class Tracker(Protocol):
    """What the runner needs of a tracker (see the module doc)."""

    @property
    def run_id(self) -> str | None: ...

    def start(self) -> Tracker: ...

    def log_iteration(self, metrics: Mapping[str, float], step: int) -> bool: ...

    def log_final(self, metrics: Mapping[str, float], step: int) -> None: ...

    def log_artifact(self, path: Path, artifact_dir: str | None = None) -> None: ...

    def raise_if_broken(self) -> None: ...

    def drain(self) -> None: ...

    def finish(self, status: str = "FINISHED", error: str | None = None) -> None: ...

    def close(self) -> None: ...

    def is_delivered(self) -> bool: ...


class LocalTracker:
    """The run folder alone: iterations go to ``metrics.jsonl``, nothing is sent.

    Also the base of the trackers that send: they share its local log.
    """

    def __init__(self, record: RunRecord | str | Path, identity: RunIdentity):
        self.record = record if isinstance(record, RunRecord) else RunRecord(record)
        self.record.create()
        self.identity = identity
        self.metrics = self.record.metric_log()
        self._lock = threading.Lock()

    @property
    def run_id(self) -> str | None:
        """The id of the run in the tracker's store (none for the local tracker)."""
        return None

    def start(self) -> LocalTracker:
        return self

    def log_iteration(self, metrics: Mapping[str, float], step: int) -> bool:
        """Record one iteration; ``False`` if an earlier attempt already did.

        Raises:
            TrackingError: (sending trackers) the store refused data or stayed away too long.
        """
        with self._lock:
            added = self.metrics.append(step, metrics, now_ms())
        self.raise_if_broken()
        return added

    def log_final(self, metrics: Mapping[str, float], step: int) -> None:
        """The metrics of the finished run (the summary holds them locally)."""

    def log_artifact(self, path: Path, artifact_dir: str | None = None) -> None:
        """A file of the run folder to deliver (it is already in the folder)."""

    def raise_if_broken(self) -> None:
        """Raise :class:`TrackingError` if delivery has failed for good."""

    def drain(self) -> None:
        """Deliver everything so far."""

    def finish(self, status: str = "FINISHED", error: str | None = None) -> None:
        """Deliver everything and end the run with ``status`` (one of ``RUN_STATUSES``)."""

    def close(self) -> None:
        """Stop delivering without waiting (what is unsent stays in the run folder)."""

    def is_delivered(self) -> bool:
        """Whether the run needs nothing more from :func:`settle`."""
        return True


def open_tracker(record: RunRecord, tracking: DictConfig, identity: RunIdentity) -> Tracker:
    """The tracker that the run's ``tracking`` config asks for (not started)."""
    if not tracking.enabled:
        return LocalTracker(record, identity)
    from gradgym.platform.mlflow_tracking import MlflowTracker

    return MlflowTracker(record, tracking, identity)


def settle(record: RunRecord, tracking: DictConfig, identity: RunIdentity, *, status: str,
           error: str | None = None) -> bool:
    """Deliver a run folder that its own process could not finish delivering.

    A process killed between iterations or while closing leaves the tracker's run open,
    iterations unsent, artifacts not uploaded, or no run in the store at all. From the
    folder alone this sends what is missing (nothing twice) and ends the run with
    ``status``. Returns whether anything had to be done.
    """
    if not record.started():
        return False  # the run never started
    tracker = open_tracker(record, tracking, identity)
    if tracker.is_delivered():
        return False
    for path, folder in record.artifacts():
        tracker.log_artifact(path, folder)
    summary = record.read_summary()
    final = {k: summary[k] for k in FINAL_METRICS if isinstance(summary.get(k), (int, float))}
    tracker.log_final(final, summary.get("iterations", len(tracker.metrics.entries)))
    tracker.finish(status, error=error if status == "FAILED" else None)
    return True


def now_ms() -> int:
    """Wall-clock milliseconds (the timestamp of a metric point)."""
    return int(time.time() * 1000)


def format_error(err: BaseException) -> str:
    """The last lines of an exception's traceback, for a tracker's error field."""
    return "".join(traceback.format_exception(type(err), err, err.__traceback__))[-5000:]
