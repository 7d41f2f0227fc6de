"""Optimization methods over the differentiable environments.

Every pipeline is ``optimize(env, cfg, seed=0, report=None) -> PipelineResult``; it reports
progress through the plain ``report`` callback and never imports the platform layer.
"""

from gradgym.pipelines.config import PIPELINE_CONFIGS, CEMConfig, PolicyConfig, TrajectoryConfig

__all__ = ["PIPELINE_CONFIGS", "CEMConfig", "PolicyConfig", "TrajectoryConfig"]
