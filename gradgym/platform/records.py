"""Run records: the one module that knows a run folder's layout.

A run folder (``gradgym run``'s ``runs/<name>/``, or a sweep trial's ``trials/<id>/``)::

    config.yaml          the resolved run config
    metrics.jsonl        one JSON object per iteration: iteration, timestamp_ms, metrics
                         (append-only; also the durable buffer of what a tracker has not sent)
    summary.json         status, final and best return, compile and wall time, tracker run id
    video_initial.gif    the first start state's trajectory before optimization
    video_best.gif       the best trajectory found
    gradients/*.png      gradient histograms
    tracking.json        the tracker's own state (e.g. the MLflow run id, what it acknowledged)
    attempts             how many times this run has started (retries of a trial)
    .gradgym-run         the folder's owner lock: held (``flock``) by the live process that
                         runs in the folder; its presence marks a gradgym run folder

Ownership: one live process per folder. :meth:`RunRecord.claim` creates the folder
atomically or accepts an empty one or an earlier gradgym run folder, never a folder of other
files; it then takes the lock, which the kernel releases when the holder ends, however it
ends (so a retry on another process can take over a dead holder's folder, and a folder
whose lock is free while its summary says nothing is a run whose process died).
    replay.json          what ``gradgym view`` needs to replay the best result: env, seed,
    replay.npz           kind ("plan": actions [B, T, act_dim]; "mlp": tanh MLP layers) + arrays
    replay_live.json     the same for the best result so far, written while a viewer follows
    replay_live.npz
    following            touched by each viewer following the run (a heartbeat); the run
                         writes replay_live.* only while it is fresh

Everything else reads and writes these files through :class:`RunRecord`.
"""

from __future__ import annotations

import errno
import fcntl
import json
import logging
import os
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

CONFIG_FILE = "config.yaml"
METRICS_FILE = "metrics.jsonl"
SUMMARY_FILE = "summary.json"
TRACKING_FILE = "tracking.json"
ATTEMPTS_FILE = "attempts"
GRADIENTS_DIR = "gradients"
LOCK_FILE = ".gradgym-run"
REPLAY_STEM = "replay"  # replay.json + replay.npz (final), replay_live.json + .npz (so far)
LIVE_REPLAY_STEM = "replay_live"
FOLLOW_MARKER = "following"
FOLLOW_FRESH_S = 10.0  # a follow marker older than this is a viewer that went away
VIDEO_KEYS = ("video_initial", "video_best")  # a pipeline's video artifacts, saved as <key>.gif
# Every name a run folder may hold (besides ``*.tmp`` files of atomic writes).
LAYOUT_NAMES = frozenset({CONFIG_FILE, METRICS_FILE, SUMMARY_FILE, TRACKING_FILE, ATTEMPTS_FILE,
                          GRADIENTS_DIR, LOCK_FILE} | {f"{key}.gif" for key in VIDEO_KEYS})
# How long a resumed run waits for the folder's previous holder to end (a retried trial
# may start before the killed process it replaces is gone).
TAKEOVER_WAIT_S = 30.0
_NO_LOCKS = (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS)  # flock unsupported where the folder is


class RunDirExistsError(FileExistsError):
    """A new run was pointed at a folder that already holds a run."""


class RunDirBusyError(RunDirExistsError):
    """The run folder is held by another live process."""


class NotARunDirError(RunDirExistsError):
    """The folder exists, is not empty and is not a gradgym run folder."""


class RunRecord:
    """A run folder, read and written only through these methods."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        self._lock_fd: int | None = None

    # ------------------------------------------------------------------ paths
    @property
    def config_path(self) -> Path:
        return self.folder / CONFIG_FILE

    @property
    def metrics_path(self) -> Path:
        return self.folder / METRICS_FILE

    @property
    def summary_path(self) -> Path:
        return self.folder / SUMMARY_FILE

    @property
    def tracking_path(self) -> Path:
        return self.folder / TRACKING_FILE

    def video_path(self, key: str) -> Path:
        """Where the video artifact ``key`` (one of ``VIDEO_KEYS``) is saved."""
        return self.folder / f"{key}.gif"

    def gradient_path(self, step: int) -> Path:
        """Where the gradient histogram of iteration ``step`` is saved (folder created)."""
        folder = self.folder / GRADIENTS_DIR
        folder.mkdir(parents=True, exist_ok=True)
        return folder / f"step_{step:06d}.png"

    def replay_paths(self, live: bool = False) -> tuple[Path, Path]:
        """``(json, npz)`` of the final replay (or, with ``live``, of the best so far)."""
        stem = LIVE_REPLAY_STEM if live else REPLAY_STEM
        return self.folder / f"{stem}.json", self.folder / f"{stem}.npz"

    @property
    def follow_marker_path(self) -> Path:
        return self.folder / FOLLOW_MARKER

    # ------------------------------------------------------------------ state
    def started(self) -> bool:
        """Whether a run has started in this folder (its config is written)."""
        return self.config_path.is_file()

    def holds_run(self) -> bool:
        """Whether this folder already holds a run's iterations."""
        return self.metrics_path.exists()

    def create(self) -> RunRecord:
        """Make the folder (and its parents) if needed."""
        self.folder.mkdir(parents=True, exist_ok=True)
        return self

    # ------------------------------------------------------------------ ownership
    def is_run_folder(self) -> bool:
        """Whether the folder is a gradgym run folder: marked by its lock file or the
        ``attempts`` file (runs made before the lock existed), or holding an iteration log
        and nothing but the layout's files."""
        if (self.folder / LOCK_FILE).is_file() or (self.folder / ATTEMPTS_FILE).is_file():
            return True
        names = {path.name for path in self.folder.iterdir()} if self.folder.is_dir() else set()
        return METRICS_FILE in names and all(n in LAYOUT_NAMES or n.endswith(".tmp") for n in names)

    def claim(self, *, resume: bool = False) -> RunRecord:
        """Own the folder for a live run: create it (atomically) or accept an empty one or a
        gradgym run folder, then take its lock until :meth:`release` or this process ends.

        Args:
            resume: continue a run the folder holds (a retried or resumed trial); waits up to
                ``TAKEOVER_WAIT_S`` for a previous holder to end. Without it a folder that
                already holds iterations is refused.

        Raises:
            NotARunDirError: the folder holds other files (nothing is written into it).
            RunDirBusyError: another live process holds the folder.
            RunDirExistsError: (without ``resume``) the folder already holds a run.
        """
        self.folder.parent.mkdir(parents=True, exist_ok=True)
        try:
            self.folder.mkdir()
        except FileExistsError:
            if not self.folder.is_dir():
                raise NotARunDirError(f"run_dir {str(self.folder)!r} exists and is not a folder") from None
            if any(self.folder.iterdir()) and not self.is_run_folder():
                raise NotARunDirError(
                    f"run_dir {str(self.folder)!r} is not empty and is not a gradgym run folder; "
                    "allowed: a new path, an empty folder, or a gradgym run folder"
                ) from None
        self._lock(wait_s=TAKEOVER_WAIT_S if resume else 0.0)
        if not resume and self.holds_run():
            self.release()
            raise RunDirExistsError(
                f"run_dir {str(self.folder)!r} already holds a run; choose another run_dir (or "
                "leave it unset for a new folder)"
            )
        return self

    def _lock(self, wait_s: float) -> None:
        fd = os.open(self.folder / LOCK_FILE, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        deadline = time.monotonic() + wait_s
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except OSError as err:
                if err.errno in _NO_LOCKS:
                    # A file system without locks (some FUSE mounts): the folder is still
                    # created atomically and marked; only liveness cannot be told.
                    logging.getLogger(__name__).warning(
                        "run folder %s: the file system offers no locks (%s)", self.folder, err)
                    break
                if err.errno not in (errno.EAGAIN, errno.EACCES) or time.monotonic() >= deadline:
                    holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "?"
                    os.close(fd)
                    if err.errno not in (errno.EAGAIN, errno.EACCES):
                        raise
                    raise RunDirBusyError(
                        f"run_dir {str(self.folder)!r} is in use by a live run (process {holder}); "
                        "wait for it to end or choose another run_dir"
                    ) from None
                time.sleep(0.2)
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._lock_fd = fd

    def release(self) -> None:
        """Give up the folder's lock (the run is over)."""
        if self._lock_fd is not None:
            os.close(self._lock_fd)  # closing the descriptor releases the flock
            self._lock_fd = None

    def is_live(self) -> bool:
        """Whether a live process holds the folder (this process's own claim counts)."""
        if self._lock_fd is not None:
            return True
        try:
            fd = os.open(self.folder / LOCK_FILE, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            return False
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
            return False
        except OSError:
            return True
        finally:
            os.close(fd)  # also drops the shared lock taken just to look

    def write_config(self, cfg: DictConfig) -> Path:
        self.config_path.write_text(OmegaConf.to_yaml(cfg, resolve=True))
        return self.config_path

    def read_config(self) -> DictConfig:
        return OmegaConf.load(self.config_path)

    def count_attempt(self) -> int:
        """Record one more start of this run; returns its number (1 for the first)."""
        attempt = self.attempts() + 1
        (self.folder / ATTEMPTS_FILE).write_text(str(attempt))
        return attempt

    def attempts(self) -> int:
        """How many times this run has started."""
        marker = self.folder / ATTEMPTS_FILE
        return int(marker.read_text() or 0) if marker.exists() else 0

    def read_summary(self) -> dict[str, Any]:
        """``summary.json``, or ``{}`` if the run has not written one."""
        return read_json(self.summary_path)

    def write_summary(self, summary: Mapping[str, Any]) -> Path:
        write_json(self.summary_path, summary)
        return self.summary_path

    def finished_summary(self) -> dict[str, Any] | None:
        """The summary of a run that finished, else ``None``."""
        summary = self.read_summary()
        return summary if summary.get("status") == "FINISHED" else None

    def iterations(self) -> int:
        """How many distinct iterations ``metrics.jsonl`` holds."""
        return len({entry.get("iteration") for entry in self.read_metrics()})

    def metric_log(self) -> MetricLog:
        """The iteration log, opened for appending."""
        return MetricLog(self.metrics_path)

    def read_metrics(self) -> list[dict[str, Any]]:
        """The logged iterations (``[]`` when there are none)."""
        return read_jsonl(self.metrics_path) if self.metrics_path.is_file() else []

    def read_metrics_from(self, offset: int) -> tuple[list[dict[str, Any]], int]:
        """The iterations logged after byte ``offset`` of ``metrics.jsonl`` (complete lines
        only) and the offset to read from next time: for followers polling a running run."""
        try:
            with self.metrics_path.open("rb") as file:
                file.seek(offset)
                chunk = file.read()
        except OSError:
            return [], offset
        complete = chunk[:chunk.rfind(b"\n") + 1]
        return _parse_jsonl(complete.decode()), offset + len(complete)

    def read_tracking_state(self) -> dict[str, Any]:
        return read_json(self.tracking_path)

    def write_tracking_state(self, state: Mapping[str, Any]) -> None:
        write_json(self.tracking_path, state)

    def write_replay(self, meta: Mapping[str, Any], arrays: Mapping[str, Any],
                     live: bool = False) -> tuple[Path, Path]:
        """Write a replay (``meta`` as JSON, ``arrays`` as one npz), each file atomically;
        the npz is replaced first, so a reader that sees the new JSON sees its arrays."""
        import numpy as np

        json_path, npz_path = self.replay_paths(live)
        tmp = npz_path.with_name(npz_path.name + ".tmp.npz")
        np.savez(tmp, **{key: np.asarray(value) for key, value in arrays.items()})
        os.replace(tmp, npz_path)
        write_json(json_path, meta)
        return json_path, npz_path

    def read_replay(self, live: bool = False) -> tuple[dict[str, Any], dict[str, Any]] | None:
        """``(meta, arrays)`` of the final (or live) replay, ``None`` if there is none yet."""
        import numpy as np

        json_path, npz_path = self.replay_paths(live)
        meta = read_json(json_path)
        if not meta or not npz_path.is_file():
            return None
        try:
            with np.load(npz_path) as npz:
                arrays = {key: npz[key] for key in npz.files}
        except (OSError, ValueError, EOFError):
            return None  # replaced while being read: the next poll reads it
        return meta, arrays

    def touch_follow_marker(self) -> None:
        """A viewer's heartbeat: someone follows this run (see :meth:`followed`)."""
        self.follow_marker_path.touch()

    def followed(self, now: float | None = None) -> bool:
        """Whether a viewer touched the follow marker in the last ``FOLLOW_FRESH_S`` seconds."""
        import time

        try:
            touched = self.follow_marker_path.stat().st_mtime
        except OSError:
            return False
        return (time.time() if now is None else now) - touched < FOLLOW_FRESH_S

    def artifacts(self) -> list[tuple[Path, str | None]]:
        """Every file a tracker uploads, as ``(path, folder in the run's artifacts)``."""
        files: list[tuple[Path, str | None]] = []
        files += [(path, None) for path in sorted(self.folder.glob("*.yaml"))]
        files += [(path, None) for path in sorted(self.folder.glob("*.gif"))]
        files += [(path, GRADIENTS_DIR) for path in sorted(self.folder.glob(f"{GRADIENTS_DIR}/*.png"))]
        files += [(path, None) for path in (self.summary_path, self.metrics_path) if path.is_file()]
        files += [(path, None) for path in self.replay_paths() if path.is_file()]
        return files


# ---------------------------------------------------------------------- files

class MetricLog:
    """A run folder's ``metrics.jsonl``: append-only, one JSON object per iteration.

    Each line holds ``iteration``, ``timestamp_ms`` and the metrics. A line torn by a killed
    process is dropped when the file is read back.
    """

    def __init__(self, path: Path):
        self.path = Path(path)
        self.entries: list[dict[str, Any]] = []
        if self.path.exists():
            text = self.path.read_text()
            self.entries = _parse_jsonl(text)
            if len(self.entries) != text.count("\n") or not text.endswith("\n") and text:
                # A torn last line: rewrite without it, so that appends start on a fresh line.
                _write_jsonl(self.path, self.entries)
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
    return _parse_jsonl(Path(path).read_text())


def _parse_jsonl(text: str) -> list[dict[str, Any]]:
    entries = []
    for line in text.splitlines():
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
    path = Path(path)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(content, indent=2, default=str) + "\n")
    os.replace(tmp, path)
