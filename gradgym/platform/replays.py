"""What a run saves so that ``gradgym view`` can replay and follow it.

A run writes its final replay (``replay.json`` + ``replay.npz``, see
:mod:`gradgym.platform.records`) when it finishes. While a viewer follows it (the viewer
keeps the run folder's follow marker fresh), it also writes the best parameters so far as
``replay_live.*``, at most once a second. A run nobody follows pays one clock read per
iteration and one ``stat`` of the marker per second.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from gradgym.platform.records import RunRecord

CHECK_EVERY_S = 1.0  # how often the follow marker is looked at, and live replays written at most


def view_command(run_dir: str | Path) -> str:
    """The shell command that opens a run folder in the viewer."""
    return f"gradgym view {Path(run_dir).resolve()}"


def replay_meta(cfg: DictConfig, kind: str, iteration: int, live: bool) -> dict[str, Any]:
    """The JSON half of a replay: how to rebuild the env and its start states."""
    pipeline = cfg.pipeline
    return {
        "kind": kind,
        "env": cfg.env,
        "env_kwargs": OmegaConf.to_container(cfg.env_kwargs, resolve=True),
        "seed": int(cfg.seed),
        "pipeline": pipeline.name,
        "backend": cfg.backend,
        "batch": int(pipeline.batch),
        "horizon": int(pipeline.horizon),
        "iteration": int(iteration),
        "live": live,
        "written_at": time.time(),
    }


class ReplayRecorder:
    """The run side of the viewer: final replays always, live ones while followed.

    Args:
        cfg: the run's config.
        record: its run folder.
        replay: the pipeline's ``replay(params) -> Replay`` (``None``: nothing is saved).
        clock: seconds, monotonic (a parameter for tests).
    """

    def __init__(self, cfg: DictConfig, record: RunRecord,
                 replay: Callable[[Any], Any] | None, clock: Callable[[], float] = time.monotonic):
        self.cfg, self.record, self.replay, self.clock = cfg, record, replay, clock
        self._next_check = 0.0
        self._following = False
        self._next_write = 0.0
        self._last_params: Any = None

    def wants_best_params(self) -> bool:
        """Whether a viewer follows the run (the marker is looked at once a second at most)."""
        if self.replay is None:
            return False
        now = self.clock()
        if now >= self._next_check:
            self._next_check = now + CHECK_EVERY_S
            self._following = self.record.followed()
        return self._following

    def save_live(self, params: Any, iteration: int) -> None:
        """Write the best parameters so far, if they changed and a second has passed."""
        now = self.clock()
        if self.replay is None or params is self._last_params or now < self._next_write:
            return
        self._next_write = now + CHECK_EVERY_S
        self._last_params = params
        self._write(params, iteration, live=True)

    def save_final(self, params: Any, iterations: int) -> list[Path]:
        """Write the replay of the run's best parameters; the files written (to upload)."""
        if self.replay is None or params is None:
            return []
        return list(self._write(params, iterations, live=False))

    def _write(self, params: Any, iteration: int, live: bool) -> tuple[Path, Path]:
        replay = self.replay(params)
        meta = replay_meta(self.cfg, replay.kind, iteration, live)
        return self.record.write_replay(meta, replay.arrays, live=live)
