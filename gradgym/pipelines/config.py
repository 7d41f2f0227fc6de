"""Pipeline configurations: plain dataclasses, one per pipeline, each able to validate itself.

The platform layer turns these into omegaconf structured configs (``pipeline.iters=...``
on the command line); pipelines only read them. Field names are public interface. A bad
value raises :class:`PipelineConfigError`, which names the field, the value and what is
allowed, so that every caller can word the message its own way.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable

LR_SCHEDULES = ("constant", "cosine", "linear")
OPTIMIZERS = ("adam", "adamw", "sgd")
ADAMW_WEIGHT_DECAY = 1e-4  # the same on optax and torch.optim (their defaults differ)


class PipelineConfigError(ValueError):
    """A pipeline config field holds a value the pipeline does not accept."""

    def __init__(self, pipeline: str, field_name: str, value: Any, allowed: str):
        self.pipeline, self.field, self.value, self.allowed = pipeline, field_name, value, allowed
        super().__init__(f"{pipeline}.{field_name}={value!r} is invalid; allowed: {allowed}")


@dataclass
class _Common:
    """Fields every pipeline has: iterations, rollout length, start states per iteration."""

    def validate(self) -> None:
        """Raise :class:`PipelineConfigError` for the first invalid field."""
        _check(self, "iters", _positive_int, "an int >= 1")
        _check(self, "horizon", _positive_int, "an int >= 1")
        _check(self, "batch", _positive_int, "an int >= 1")


@dataclass
class _GradientCommon(_Common):
    """Checks of the optimizer fields of the gradient pipelines."""

    def validate(self) -> None:
        super().validate()
        _check(self, "lr", lambda v: _number(v) and v > 0, "a number > 0")
        _check(self, "lr_schedule", lambda v: v in LR_SCHEDULES, f"one of {', '.join(LR_SCHEDULES)}")
        _check(self, "optimizer", lambda v: v in OPTIMIZERS, f"one of {', '.join(OPTIMIZERS)}")
        _check(self, "grad_clip", lambda v: _number(v) and v >= 0, "a number >= 0 (0 disables)")
        _check(self, "grad_hist_every", _non_negative_int, "an int >= 0 (0 disables)")
        _check(self, "torch_compile_chunk", _positive_int, "an int >= 1 (env steps per chunk)")


@dataclass
class TrajectoryConfig(_GradientCommon):
    """Open-loop trajectory optimization by gradient descent through the env.

    Logits ``[batch, horizon, act_dim]`` ~ U(-init_scale, init_scale), actions = tanh(logits),
    loss = -sum of rewards, from ``batch`` fixed start states drawn with the run's seed.
    """

    name: str = "trajectory"
    iters: int = 200
    horizon: int = 100
    batch: int = 32
    lr: float = 0.1
    lr_schedule: str = "constant"  # one of LR_SCHEDULES
    optimizer: str = "adam"  # one of OPTIMIZERS (optax / torch.optim)
    grad_clip: float = 0.0  # clip by global norm; 0 disables
    init_scale: float = 2.0
    grad_hist_every: int = 50  # report raw gradients for a histogram; 0 disables
    render: bool = True  # report frames of the initial and best trajectory
    torch_compile: bool = False  # torch: compile chunks of the rollout (see _torch.py)
    torch_compile_chunk: int = 10  # env steps per compiled chunk (a divisor of the horizon)

    def validate(self) -> None:
        super().validate()
        _check(self, "init_scale", lambda v: _number(v) and v >= 0, "a number >= 0")


@dataclass
class PolicyConfig(_GradientCommon):
    """Policy optimization by back-propagation through time (MLP obs -> 64 -> 64 -> act, tanh)."""

    name: str = "policy"
    iters: int = 2000
    horizon: int = 100
    batch: int = 64
    lr: float = 1e-3
    lr_schedule: str = "constant"
    optimizer: str = "adam"  # one of OPTIMIZERS
    grad_clip: float = 1.0  # clip by global norm; 0 disables
    grad_horizon: int = 0  # truncated BPTT window; 0 = the whole horizon
    hidden: list[int] = field(default_factory=lambda: [64, 64])
    eval_every: int = 100
    eval_batch: int = 64
    grad_hist_every: int = 200
    render: bool = True
    torch_compile: bool = False  # torch: compile chunks of the rollout (see _torch.py)
    torch_compile_chunk: int = 10  # env steps per compiled chunk (a divisor of the horizon)

    def validate(self) -> None:
        super().validate()
        _check(self, "grad_horizon", _non_negative_int, "an int >= 0 (0 = the whole horizon)")
        _check(self, "hidden", lambda v: all(_positive_int(h) for h in v), "a list of ints >= 1")
        _check(self, "eval_every", _positive_int, "an int >= 1")
        _check(self, "eval_batch", _positive_int, "an int >= 1")


@dataclass
class CEMConfig(_Common):
    """Cross-entropy method over open-loop actions: zeroth order, runs on every backend."""

    name: str = "cem"
    iters: int = 30
    horizon: int = 100
    batch: int = 32  # start states optimized independently
    population: int = 64  # samples per start state per iteration
    elites: int = 8
    init_std: float = 1.0
    min_std: float = 0.05
    smoothing: float = 0.0  # weight of the previous mean/std in the update
    lr: float = 1.0  # step toward the elite mean (1 = plain CEM)
    render: bool = True

    def validate(self) -> None:
        super().validate()
        _check(self, "population", _positive_int, "an int >= 1")
        _check(self, "elites", lambda v: _positive_int(v) and v <= self.population,
               f"an int in [1, population={self.population}]")
        _check(self, "init_std", lambda v: _number(v) and v > 0, "a number > 0")
        _check(self, "min_std", lambda v: _number(v) and v >= 0, "a number >= 0")
        _check(self, "smoothing", lambda v: _number(v) and 0 <= v < 1, "a number in [0, 1)")
        _check(self, "lr", lambda v: _number(v) and 0 < v <= 1, "a number in (0, 1]")


def validate_config(cfg: Any, pipeline: str | None = None) -> None:
    """Raise ``ValueError`` naming the field, the bad value and what is allowed.

    ``cfg`` is a pipeline's config dataclass; pipelines call this before any expensive
    work. With ``pipeline``, ``cfg`` must be that pipeline's config.
    """
    name = getattr(cfg, "name", None)
    if pipeline is not None and name != pipeline:
        raise ValueError(f"the {pipeline} pipeline needs its own config, got {cfg!r}")
    if not callable(getattr(cfg, "validate", None)):
        raise ValueError(f"expected a pipeline config dataclass, got {type(cfg).__name__}")
    cfg.validate()


def _check(cfg: Any, field_name: str, ok: Callable[[Any], bool], allowed: str) -> None:
    value = getattr(cfg, field_name)
    try:
        valid = ok(value)
    except TypeError:
        valid = False
    if not valid:
        raise PipelineConfigError(cfg.name, field_name, value, allowed)


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _positive_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


def _non_negative_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0
