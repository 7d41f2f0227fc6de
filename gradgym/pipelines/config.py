"""Pipeline configurations: plain dataclasses, one per pipeline.

The platform layer turns these into omegaconf structured configs (``pipeline.iters=...``
on the command line); pipelines only read them. Field names are public interface.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields
from typing import Any, Callable

LR_SCHEDULES = ("constant", "cosine", "linear")
OPTIMIZERS = ("adam", "adamw", "sgd")
ADAMW_WEIGHT_DECAY = 1e-4  # the same on optax and torch.optim (their defaults differ)


@dataclass
class TrajectoryConfig:
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
    torch_compile: bool = False


@dataclass
class PolicyConfig:
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
    torch_compile: bool = False


@dataclass
class CEMConfig:
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


PIPELINE_CONFIGS = {"trajectory": TrajectoryConfig, "policy": PolicyConfig, "cem": CEMConfig}

# The config fields that may differ between the members of one pack (besides the seed):
# per-member hyperparameters (optimizer state, learning rate, clipping, initial scale) and
# what only decides what a member reports. Everything else shapes the one vectorized
# computation (batch, horizon, iterations, optimizer kind, schedule, ...) and must be equal.
PACKABLE_FIELDS: dict[str, tuple[str, ...]] = {
    "trajectory": ("lr", "init_scale", "grad_clip", "grad_hist_every", "render"),
    "policy": ("lr", "grad_clip", "grad_hist_every", "render"),
    "cem": ("lr", "init_std", "min_std", "smoothing", "render"),
}


def pack_key(cfg: Any, **context: Any) -> tuple:
    """A hashable key: two configs may share a pack exactly when their keys are equal.

    It holds the pipeline's name and every field that is not in ``PACKABLE_FIELDS`` (the
    seed is not a config field: members always differ in it). ``context`` adds what the
    config does not hold and a pack must share, e.g. ``pack_key(cfg, env="Pendulum",
    backend="jax", dtype="float32")``. ``cfg`` is a config dataclass or anything with the
    same attributes (an omegaconf ``DictConfig``).
    """
    name = getattr(cfg, "name", None)
    if name not in PIPELINE_CONFIGS:
        raise ValueError(f"pipeline config name {name!r} is not one of {', '.join(PIPELINE_CONFIGS)}")
    packable = PACKABLE_FIELDS[name]
    shared = tuple(
        (f.name, _hashable(getattr(cfg, f.name)))
        for f in fields(PIPELINE_CONFIGS[name])
        if f.name not in packable
    )
    return shared + tuple(sorted((key, _hashable(value)) for key, value in context.items()))


def _hashable(value: Any) -> Any:
    """Lists (``hidden``, also omegaconf ``ListConfig``) as tuples, so keys hash."""
    if isinstance(value, (str, bytes)) or not hasattr(value, "__iter__"):
        return value
    return tuple(_hashable(item) for item in value)


def validate_config(cfg: Any, pipeline: str | None = None) -> None:
    """Raise ``ValueError`` naming the field, the bad value and what is allowed.

    ``cfg`` is one of the dataclasses above or anything with the same attributes (an
    omegaconf ``DictConfig``); pipelines call this before any expensive work. With
    ``pipeline``, ``cfg`` must be that pipeline's config.
    """
    name = getattr(cfg, "name", None)
    if name not in PIPELINE_CONFIGS:
        raise ValueError(
            f"pipeline config name {name!r} is not one of {', '.join(PIPELINE_CONFIGS)}"
        )
    if pipeline is not None and name != pipeline:
        raise ValueError(
            f"the {pipeline} pipeline needs a {PIPELINE_CONFIGS[pipeline].__name__}, got a config "
            f"named {name!r}"
        )
    _check(cfg, "iters", _positive_int, "an int >= 1")
    _check(cfg, "horizon", _positive_int, "an int >= 1")
    _check(cfg, "batch", _positive_int, "an int >= 1")
    if name == "cem":
        _check_cem(cfg)
        return
    _check(cfg, "lr", lambda v: _number(v) and v > 0, "a number > 0")
    _check(cfg, "lr_schedule", lambda v: v in LR_SCHEDULES, f"one of {', '.join(LR_SCHEDULES)}")
    _check(cfg, "optimizer", lambda v: v in OPTIMIZERS, f"one of {', '.join(OPTIMIZERS)}")
    _check(cfg, "grad_clip", lambda v: _number(v) and v >= 0, "a number >= 0 (0 disables)")
    _check(cfg, "grad_hist_every", _non_negative_int, "an int >= 0 (0 disables)")
    if name == "trajectory":
        _check(cfg, "init_scale", lambda v: _number(v) and v >= 0, "a number >= 0")
        return
    _check(cfg, "grad_horizon", _non_negative_int, "an int >= 0 (0 = the whole horizon)")
    _check(cfg, "hidden", lambda v: all(_positive_int(h) for h in v), "a list of ints >= 1")
    _check(cfg, "eval_every", _positive_int, "an int >= 1")
    _check(cfg, "eval_batch", _positive_int, "an int >= 1")


def _check_cem(cfg: Any) -> None:
    _check(cfg, "population", _positive_int, "an int >= 1")
    _check(cfg, "elites", lambda v: _positive_int(v) and v <= cfg.population,
           f"an int in [1, population={cfg.population}]")
    _check(cfg, "init_std", lambda v: _number(v) and v > 0, "a number > 0")
    _check(cfg, "min_std", lambda v: _number(v) and v >= 0, "a number >= 0")
    _check(cfg, "smoothing", lambda v: _number(v) and 0 <= v < 1, "a number in [0, 1)")
    _check(cfg, "lr", lambda v: _number(v) and 0 < v <= 1, "a number in (0, 1]")


def _check(cfg: Any, field_name: str, ok: Callable[[Any], bool], allowed: str) -> None:
    value = getattr(cfg, field_name)
    try:
        valid = ok(value)
    except TypeError:
        valid = False
    if not valid:
        raise ValueError(f"{cfg.name}.{field_name}={value!r} is invalid; allowed: {allowed}")


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _positive_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


def _non_negative_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0
