"""Optimization methods over the differentiable environments.

Every pipeline is ``optimize(env, cfg, seed=0, report=None) -> PipelineResult``; it reports
progress through the plain ``report`` callback and never imports the platform layer. Each
pipeline registers a :class:`~gradgym.pipelines.registry.PipelineSpec` (see ``registry``).
"""

from __future__ import annotations

from typing import Any

from gradgym.pipelines.base import PipelineResult
from gradgym.pipelines.config import CEMConfig, PolicyConfig, TrajectoryConfig
from gradgym.pipelines.registry import PipelineSpec, get_pipeline, pipelines

__all__ = [
    "CEMConfig", "PipelineSpec", "PolicyConfig", "TrajectoryConfig", "get_pipeline", "pipelines",
    "run_pipeline",
]


def run_pipeline(name: str, env: Any, cfg: Any, seed: int = 0, report: Any = None) -> PipelineResult:
    """Run the registered pipeline ``name`` on ``env`` (``ValueError`` if there is none)."""
    return get_pipeline(name).optimize(env, cfg, seed=seed, report=report)
