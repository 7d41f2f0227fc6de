"""Optimization methods over the differentiable environments.

Every pipeline is ``optimize(env, cfg, seed=0, report=None) -> PipelineResult``; it reports
progress through the plain ``report`` callback and never imports the platform layer.
"""

from gradgym.pipelines.config import PIPELINE_CONFIGS, CEMConfig, PolicyConfig, TrajectoryConfig

__all__ = ["PIPELINE_CONFIGS", "CEMConfig", "PolicyConfig", "TrajectoryConfig"]


def run_pipeline(name: str, env, cfg, seed: int = 0, report=None):
    """Run pipeline ``name`` (``trajectory``, ``policy`` or ``cem``) on ``env``."""
    import importlib

    if name not in PIPELINE_CONFIGS:
        raise ValueError(f"unknown pipeline {name!r}; available: {', '.join(PIPELINE_CONFIGS)}")
    module = importlib.import_module(f"gradgym.pipelines.{name}")
    return module.optimize(env, cfg, seed=seed, report=report)
