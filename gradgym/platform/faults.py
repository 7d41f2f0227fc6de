"""Fault injection for tests: crashes and slow iterations, switched on from the environment.

Kept out of every config schema, so that no run records it. A test sets ``GRADGYM_FAULTS``
to a JSON list of rules; a run whose config matches a rule's ``match`` (dotted run-config
keys, e.g. ``{"seed": 1}``; an empty match is every run) gets the rule's faults:

- ``crash_attempts``: N: raise :class:`SimulatedCrash` halfway through each of the first
  N attempts of the run (1: crash once, then succeed when retried);
- ``iteration_delay_s``: sleep this long after every iteration (stretches a run).

Example: ``GRADGYM_FAULTS='[{"match": {"seed": 1}, "crash_attempts": 5}]'``. A sweep passes
the variable on to its Ray workers (with every other ``GRADGYM_*`` variable).
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from typing import Any

from omegaconf import DictConfig, OmegaConf

FAULTS_VARIABLE = "GRADGYM_FAULTS"


class SimulatedCrash(RuntimeError):
    """Raised by a ``crash_attempts`` fault to exercise retries."""


@dataclass(frozen=True)
class Faults:
    """The faults injected into one run (none by default)."""

    crash_attempts: int = 0
    iteration_delay_s: float = 0.0

    def after_iteration(self, step: int, attempt: int, iters: int) -> None:
        """Apply the faults after iteration ``step`` of attempt ``attempt``."""
        if attempt <= self.crash_attempts and step >= iters // 2:
            raise SimulatedCrash(
                f"{FAULTS_VARIABLE}: simulated crash of attempt {attempt} at iteration {step} "
                f"(crash_attempts={self.crash_attempts})"
            )
        if self.iteration_delay_s:
            time.sleep(self.iteration_delay_s)


def faults_for(cfg: DictConfig) -> Faults:
    """The faults ``$GRADGYM_FAULTS`` injects into the run of ``cfg`` (none if unset)."""
    text = os.environ.get(FAULTS_VARIABLE)
    if not text:
        return Faults()
    found: dict[str, Any] = {}
    for rule in json.loads(text):
        rule = dict(rule)
        match = rule.pop("match", {})
        if all(str(OmegaConf.select(cfg, key)) == str(value) for key, value in match.items()):
            found.update(rule)
    return Faults(**found)
