"""Pipeline configurations: plain dataclasses, one per pipeline.

The platform layer turns these into omegaconf structured configs (``pipeline.iters=...``
on the command line); pipelines only read them. Field names are public interface.
"""

from __future__ import annotations

from dataclasses import dataclass, field

LR_SCHEDULES = ("constant", "cosine", "linear")


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
    optimizer: str = "adam"  # optax / torch.optim name: adam, sgd, adamw
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
    optimizer: str = "adam"
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
