"""ASHA that notes the trials it stops, so a sweep can tell them from unfinished ones.

Tune may end a stopped trial's process before the trial writes its own summary (status
STOPPED); the sweep then reads the trial ids noted here. A module of its own: Tune pickles
the scheduler with the sweep's state, and ``--resume`` unpickles it by this class's name.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ray.tune.schedulers import ASHAScheduler


class RecordingASHA(ASHAScheduler):
    """:class:`ASHAScheduler` that appends the id of every trial it stops to ``stopped_file``."""

    def __init__(self, stopped_file: Path, **asha_args: Any):
        super().__init__(**asha_args)
        self.stopped_file = Path(stopped_file)

    def on_trial_result(self, tune_controller: Any, trial: Any, result: dict) -> str:
        """ASHA's decision; a stop is noted before Tune acts on it."""
        action = super().on_trial_result(tune_controller, trial, result)
        if action == self.STOP:
            with open(self.stopped_file, "a") as stopped:
                stopped.write(f"{trial.trial_id}\n")
        return action


def stopped_trial_ids(stopped_file: Path) -> set[str]:
    """The ids :class:`RecordingASHA` noted in ``stopped_file`` (none if it has none)."""
    return set(stopped_file.read_text().split()) if stopped_file.is_file() else set()
