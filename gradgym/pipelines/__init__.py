"""Optimization methods over the differentiable environments.

Every pipeline is ``optimize(env, cfg, seed=0, report=None) -> PipelineResult``; it reports
progress through the plain ``report`` callback and never imports the platform layer. Each
pipeline registers a :class:`~gradgym.pipelines.registry.PipelineSpec` (see ``registry``).

Every pipeline also runs *packs*: ``optimize_pack(env, cfgs, seeds, reports)`` optimizes
configs that differ only in seed and in the pipeline's packable fields as one vectorized
computation (members folded into the env batch), each member reporting to its own callback
exactly what its lone run reports. A lone run is a pack of one.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from gradgym.pipelines._loop import MemberOutcome
from gradgym.pipelines.base import PipelineResult, Report
from gradgym.pipelines.config import (
    CEMConfig,
    PolicyConfig,
    PPOConfig,
    SHACConfig,
    TrajectoryConfig,
)
from gradgym.pipelines.registry import PipelineSpec, get_pipeline, pack_key, pipelines

__all__ = [
    "CEMConfig",
    "MemberOutcome",
    "PPOConfig",
    "PipelineSpec",
    "PolicyConfig",
    "SHACConfig",
    "TrajectoryConfig",
    "can_pack",
    "get_pipeline",
    "pack_key",
    "pipelines",
    "run_pack",
    "run_pipeline",
]


def run_pipeline(name: str, env: Any, cfg: Any, seed: int = 0, report: Any = None) -> PipelineResult:
    """Run the registered pipeline ``name`` on ``env`` (``ValueError`` if there is none)."""
    return get_pipeline(name).optimize(env, cfg, seed=seed, report=report)


def run_pack(
    name: str,
    env: Any,
    cfgs: Sequence[Any],
    seeds: Sequence[int],
    reports: Sequence[Report | None] | None = None,
) -> list[MemberOutcome]:
    """Run a pack of configs of pipeline ``name`` on ``env`` as one vectorized computation.

    Member ``i`` computes, reports to ``reports[i]`` and returns what
    ``run_pipeline(name, env, cfgs[i], seeds[i], reports[i])`` would (to float tolerance).

    Args:
        name: a registered pipeline.
        env: the env every member runs on (its backend and dtype are the pack's).
        cfgs: configs with equal :func:`pack_key` (they differ only in packable fields).
        seeds: one seed per config.
        reports: one callback (or ``Reporter``) per config; ``None``: report nothing.

    Returns:
        One outcome per member, in order: its :class:`PipelineResult`, or the
        ``NonFiniteReturnError`` that stopped it. A member whose return becomes non-finite
        makes its final report call at that iteration (as its lone run would before
        raising) and stops reporting; the other members go on. Nothing is raised for it.

    Raises:
        ValueError: an unknown pipeline, an invalid config, configs that may not share a
            pack, or mismatched lengths, before any work.
    """
    spec = get_pipeline(name)
    if spec.optimize_pack is None:
        raise ValueError(f"the {name} pipeline does not run packs; run its configs one by one")
    reports = list(reports) if reports is not None else [None] * len(cfgs)
    return spec.optimize_pack(env, list(cfgs), list(seeds), reports)


def can_pack(name: str, env: Any) -> bool:
    """Whether configs of pipeline ``name`` on ``env`` may run in packs of more than one.

    Packs fold their members into the env's batch axis, which every env supports (classic
    tasks on every backend, MuJoCo tasks through their host bridge); so this is whether the
    pipeline runs packs at all and runs on the env's backend.
    """
    spec = get_pipeline(name)
    return spec.optimize_pack is not None and getattr(env.spec, "backend", None) in spec.backends
