"""Optimization methods over the differentiable environments.

Every pipeline is ``optimize(env, cfg, seed=0, report=None) -> PipelineResult``; it reports
progress through the plain ``report`` callback and never imports the platform layer.

Every pipeline also runs *packs*: ``optimize_pack(env, cfgs, seeds, reports)`` optimizes
configs that differ only in seed and in the pipeline's ``PACKABLE_FIELDS`` as one
vectorized computation (members folded into the env batch), each member reporting to its
own callback exactly what its lone run reports. A lone run is a pack of one.
"""

from __future__ import annotations

import importlib
from typing import Any, Optional, Sequence

from gradgym.pipelines._loop import MemberOutcome
from gradgym.pipelines.base import Report, no_report
from gradgym.pipelines.config import (
    PACKABLE_FIELDS,
    PIPELINE_CONFIGS,
    CEMConfig,
    PolicyConfig,
    TrajectoryConfig,
    pack_key,
)

__all__ = [
    "PACKABLE_FIELDS",
    "PIPELINE_CONFIGS",
    "CEMConfig",
    "MemberOutcome",
    "PolicyConfig",
    "TrajectoryConfig",
    "can_pack",
    "pack_key",
    "run_pack",
    "run_pipeline",
]


def _module(name: str) -> Any:
    if name not in PIPELINE_CONFIGS:
        raise ValueError(f"unknown pipeline {name!r}; available: {', '.join(PIPELINE_CONFIGS)}")
    return importlib.import_module(f"gradgym.pipelines.{name}")


def run_pipeline(name: str, env, cfg, seed: int = 0, report=None):
    """Run pipeline ``name`` (``trajectory``, ``policy`` or ``cem``) on ``env``."""
    return _module(name).optimize(env, cfg, seed=seed, report=report)


def run_pack(
    name: str,
    env: Any,
    cfgs: Sequence[Any],
    seeds: Sequence[int],
    reports: Optional[Sequence[Optional[Report]]] = None,
) -> list[MemberOutcome]:
    """Run a pack of configs of pipeline ``name`` on ``env`` as one vectorized computation.

    Member ``i`` computes, reports to ``reports[i]`` and returns what
    ``run_pipeline(name, env, cfgs[i], seeds[i], reports[i])`` would (to float tolerance).

    Args:
        name: ``trajectory``, ``policy`` or ``cem``.
        env: the env every member runs on (its backend and dtype are the pack's).
        cfgs: configs with equal :func:`pack_key` (they differ only in ``PACKABLE_FIELDS``).
        seeds: one seed per config.
        reports: one callback per config (``None`` entries or no list: report nothing).

    Returns:
        One outcome per member, in order: its :class:`PipelineResult`, or the
        ``NonFiniteReturnError`` that stopped it. A member whose return becomes non-finite
        makes its final report call at that iteration (as its lone run would before
        raising) and stops reporting; the other members go on. Nothing is raised for it.

    Raises:
        ValueError: an invalid config, configs that may not share a pack, or mismatched
            lengths, before any work.
    """
    reports = list(reports) if reports is not None else [None] * len(cfgs)
    reports = [report or no_report for report in reports]
    return _module(name).optimize_pack(env, list(cfgs), list(seeds), reports)


def can_pack(name: str, env: Any) -> bool:
    """Whether configs of pipeline ``name`` on ``env`` may run in packs of more than one.

    Packs fold their members into the env's batch axis, which every env supports (classic
    tasks on every backend, MuJoCo tasks through their host bridge), so this is true for
    every env and backend the pipeline runs on; it is false where the pipeline does not run
    at all (e.g. a gradient pipeline on numpy), where the sweep should not pack either.
    """
    from gradgym.pipelines._rollout import backend_ops

    _module(name)
    try:
        backend_ops(env, name, gradient=name != "cem")
    except ValueError:
        return False
    return True
