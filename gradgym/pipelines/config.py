"""Pipeline configurations: plain dataclasses, one per pipeline, each able to validate itself.

The platform layer turns these into omegaconf structured configs (``pipeline.iters=...``
on the command line); pipelines only read them. Field names are public interface. A bad
value raises :class:`PipelineConfigError`, which names the field, the value and what is
allowed, so that every caller can word the message its own way.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

from gradgym.envs import registered

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
        _check(self, "torch_compile_chunk", _positive_int,
               "an int >= 1 (env steps per compiled loop iteration or chunk)")
        _check(self, "torch_compile", lambda v: isinstance(v, bool) or v == "auto",
               "true, false or auto")
        _check(self, "torch_compile_simd", lambda v: isinstance(v, bool), "true or false")

    def with_compile_decided(self, env_name: str) -> Any:
        """This config with ``torch_compile`` true or false for a run on ``env_name``
        (``"auto"`` decided by :func:`torch_compiles`)."""
        return replace(self, torch_compile=torch_compiles(self.torch_compile, self.iters, env_name))


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
    torch_compile: bool | str = "auto"  # torch: compile the rollout (torch_compiles)
    torch_compile_chunk: int = 2  # env steps per compiled loop iteration (a divisor of T)
    torch_compile_simd: bool = True  # vectorized CPU code (false: scalar loops)

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
    torch_compile: bool | str = "auto"  # torch: compile the rollout (torch_compiles)
    torch_compile_chunk: int = 1  # env steps per compiled loop iteration (a divisor of T)
    torch_compile_simd: bool = True  # vectorized CPU code (false: scalar loops)

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
        raise ValueError(f"expected a pipeline config dataclass, got {type(cfg).__name__}")  # noqa: TRY004  (the pipelines' one error type for bad configs)
    cfg.validate()


# torch_compile=auto compiles a run of at least this many iterations. A cold compile of a
# classic env's loops takes 14-22 s on 2 CPUs and saves 21-70 ms per iteration: it pays for
# itself after 270-680 iterations (trajectory and policy on CartPole, Pendulum and Reacher in
# the README's speed table). From a warm compile cache (about 3-5 s) it would pay after about
# 100.
AUTO_COMPILE_MIN_ITERS = 500


def torch_compiles(torch_compile: bool | str, iters: int, env_name: str) -> bool:
    """Whether a torch run compiles its rollout: ``torch_compile`` true, or ``"auto"`` on a
    classic env with at least :data:`AUTO_COMPILE_MIN_ITERS` iterations (a MuJoCo step runs
    on the host and breaks the compiled graph, so ``auto`` leaves those envs eager)."""
    if torch_compile != "auto":
        return bool(torch_compile)
    return steps_in_graph(env_name) and iters >= AUTO_COMPILE_MIN_ITERS


def steps_in_graph(env_name: str) -> bool:
    """Whether the env's torch step traces into one compiled graph: a classic env's does,
    a MuJoCo step calls the host (and an unregistered env may)."""
    entry = registered().get(env_name)
    return entry is not None and entry.family == "classic"


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


def _check_env_step_budget(cfg: Any) -> None:
    """Checks of the fields of the env-step-budgeted methods (PPO, SHAC)."""
    _check(cfg, "env_steps", _positive_int, "an int >= 1 (the env-step budget)")
    _check(cfg, "iters", _non_negative_int, "an int >= 0 (0: as many as env_steps allows)")
    _check(cfg, "num_envs", _positive_int, "an int >= 1")
    _check(cfg, "num_steps", _positive_int, "an int >= 1")
    _check(cfg, "time_limit", _non_negative_int, "an int >= 0 (0: the env's horizon)")
    _check(cfg, "lr", lambda v: _number(v) and v > 0, "a number > 0")
    _check(cfg, "lr_schedule", lambda v: v in ("constant", "linear"), "one of constant, linear")
    _check(cfg, "gamma", lambda v: _number(v) and 0 < v <= 1, "a number in (0, 1]")
    _check(cfg, "gae_lambda", lambda v: _number(v) and 0 <= v <= 1, "a number in [0, 1]")
    _check(cfg, "hidden", lambda v: all(_positive_int(h) for h in v), "a list of ints >= 1")
    _check(cfg, "eval_every", _positive_int, "an int >= 1")
    _check(cfg, "eval_batch", _positive_int, "an int >= 1")
    _check(cfg, "grad_hist_every", _non_negative_int, "an int >= 0 (0 disables)")
    per_iteration = cfg.num_envs * cfg.num_steps
    if cfg.env_steps < per_iteration:
        raise PipelineConfigError(
            cfg.name, "env_steps", cfg.env_steps,
            f"at least num_envs * num_steps = {per_iteration} (one iteration)",
        )


def iterations(cfg: Any) -> int:
    """The iterations a PPO/SHAC config runs: ``iters`` if set, else as many whole
    iterations of ``num_envs * num_steps`` env steps as ``env_steps`` allows."""
    if cfg.iters:
        return int(cfg.iters)
    return max(1, int(cfg.env_steps) // (int(cfg.num_envs) * int(cfg.num_steps)))


SQUASHES = ("clip", "tanh")


@dataclass
class PPOConfig:
    """PPO for continuous actions (clipped surrogate, GAE, value net, normalization).

    Each iteration collects ``num_steps`` steps of ``num_envs`` envs (auto-reset at
    termination or the time limit), then runs ``epochs`` passes of ``minibatches``
    minibatches of Adam on the clipped surrogate + value loss. The budget is
    ``env_steps``; ``iters`` (0) is derived from it. Defaults: SB3's PPO defaults with
    the 2048 steps of an iteration spread over 32 envs.
    """

    name: str = "ppo"
    env_steps: int = 100_000  # the budget: env steps of training rollouts
    iters: int = 0  # 0: env_steps // (num_envs * num_steps)
    num_envs: int = 32
    num_steps: int = 64  # steps per env per iteration
    time_limit: int = 0  # episode length; 0: the env's horizon
    epochs: int = 10
    minibatches: int = 32
    lr: float = 3e-4
    lr_schedule: str = "constant"  # constant or linear (to 0 over the iterations)
    gamma: float = 0.99
    gae_lambda: float = 0.95
    clip_coef: float = 0.2
    vf_coef: float = 0.5
    ent_coef: float = 0.0
    max_grad_norm: float = 0.5  # clip by global norm; 0 disables
    normalize_advantage: bool = True
    normalize_obs: bool = True
    squash: str = "clip"  # raw Gaussian action -> [-1, 1]: clip or tanh
    init_log_std: float = 0.0
    hidden: list[int] = field(default_factory=lambda: [64, 64])
    eval_every: int = 5  # iterations between held-out evaluations
    eval_batch: int = 32
    grad_hist_every: int = 0
    render: bool = True

    def validate(self) -> None:
        """Raise :class:`PipelineConfigError` for the first invalid field."""
        _check_env_step_budget(self)
        _check(self, "epochs", _positive_int, "an int >= 1")
        _check(self, "minibatches", lambda v: _positive_int(v) and v <= self.num_envs * self.num_steps,
               f"an int in [1, num_envs * num_steps = {self.num_envs * self.num_steps}]")
        for name in ("clip_coef", "vf_coef", "ent_coef", "max_grad_norm"):
            _check(self, name, lambda v: _number(v) and v >= 0, "a number >= 0")
        _check(self, "squash", lambda v: v in SQUASHES, f"one of {', '.join(SQUASHES)}")
        _check(self, "init_log_std", _number, "a finite number")


@dataclass
class SHACConfig:
    """Short-Horizon Actor-Critic (Xu et al., ICLR 2022).

    Each iteration rolls ``num_envs`` envs ``num_steps`` steps on from where the last
    window ended (auto-reset at termination or the time limit), differentiating the
    window's discounted rewards plus the target critic's value at its end through the
    env; then the critic is fitted to TD(lambda) targets of the window (``critic_iters``
    passes of ``critic_minibatches`` minibatches) and the target critic follows it
    (``target_alpha``: the weight kept of the old target). Budget: ``env_steps``. Some envs
    start from other values of some fields: ``gradgym.pipelines.shac.ENV_DEFAULTS``.
    """

    name: str = "shac"
    env_steps: int = 400_000
    iters: int = 0  # 0: env_steps // (num_envs * num_steps)
    # 4 envs x 16 steps = 64 env steps per iteration (the paper's 64 x 32 = 2048 needs 1.5-17x
    # more env steps to the same return on the classic tasks: README, "Methods")
    num_envs: int = 4
    num_steps: int = 16  # the short horizon h of the differentiable window
    time_limit: int = 0  # episode length; 0: the env's horizon
    lr: float = 1e-2  # the actor's
    critic_lr: float = 1e-3
    lr_schedule: str = "linear"
    betas: list[float] = field(default_factory=lambda: [0.7, 0.95])  # Adam's, as the paper
    gamma: float = 0.99
    gae_lambda: float = 0.95  # TD(lambda)'s lambda
    critic_iters: int = 16
    critic_minibatches: int = 4
    target_alpha: float = 0.2
    grad_clip: float = 1.0  # the actor's gradient, by global norm; 0 disables
    normalize_obs: bool = True
    hidden: list[int] = field(default_factory=lambda: [64, 64])
    critic_hidden: list[int] = field(default_factory=lambda: [64, 64])
    # layer normalization after each hidden layer of both networks (as the paper's) and the
    # scale of the actor's initial output layer: on by default on CartPole, MountainCar and
    # Reacher (shac.ENV_DEFAULTS), where they keep the actor's tanh out of saturation
    layer_norm: bool = False
    actor_output_scale: float = 1.0
    eval_every: int = 10
    eval_batch: int = 32
    grad_hist_every: int = 0
    render: bool = True

    def validate(self) -> None:
        """Raise :class:`PipelineConfigError` for the first invalid field."""
        _check_env_step_budget(self)
        _check(self, "critic_lr", lambda v: _number(v) and v > 0, "a number > 0")
        _check(self, "betas", lambda v: len(v) == 2 and all(_number(b) and 0 <= b < 1 for b in v),
               "two numbers in [0, 1)")
        _check(self, "critic_iters", _positive_int, "an int >= 1")
        _check(self, "critic_minibatches",
               lambda v: _positive_int(v) and v <= self.num_envs * self.num_steps,
               f"an int in [1, num_envs * num_steps = {self.num_envs * self.num_steps}]")
        _check(self, "target_alpha", lambda v: _number(v) and 0 <= v < 1, "a number in [0, 1)")
        _check(self, "grad_clip", lambda v: _number(v) and v >= 0, "a number >= 0 (0 disables)")
        _check(self, "critic_hidden", lambda v: all(_positive_int(h) for h in v),
               "a list of ints >= 1")
        _check(self, "layer_norm", lambda v: isinstance(v, bool), "true or false")
        _check(self, "actor_output_scale", lambda v: _number(v) and v > 0, "a number > 0")
