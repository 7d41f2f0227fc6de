"""Open-loop trajectory optimization by gradient descent through the environment.

Logits ``[B, T, act_dim]`` ~ U(-init_scale, init_scale) are optimized from ``B`` fixed start
states at once; actions are ``tanh(logits)`` and the loss is the batch mean of the negated
return (sum of rewards over ``T`` steps). This is Ivy Gym's trajectory-optimization demo,
batched over start states and run on jax (one jitted update around a ``lax.scan``) or torch
(autograd, optionally ``torch.compile``).

Start states: seed ``s`` gives ``make(env_name, backend="numpy").reset(s, batch=B)`` moved
to the env's backend, i.e. the same ``B`` start states on every backend. Example::

    env = gradgym.make("Pendulum", backend="jax")
    result = optimize(env, TrajectoryConfig(iters=200), seed=0, report=print_metrics)
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from gradgym.envs.backends import AUTODIFF_BACKENDS, to_numpy
from gradgym.envs.core import Env
from gradgym.pipelines._loop import LoopSpec, MemberOutcome, run_loop
from gradgym.pipelines._pack import check_pack, lone_outcome, member_names, member_renderers
from gradgym.pipelines._rollout import (
    backend_ops,
    fold_members,
    host_rng,
    host_uniform,
    initial_carry,
    member_losses,
    pack_value_and_grad,
    record_frames,
    rollout_returns,
    stack_trees,
    start_states,
    transition,
)
from gradgym.pipelines.base import GRADIENT_STEP_METRICS, PipelineResult, Report, plan_replay
from gradgym.pipelines.config import TrajectoryConfig
from gradgym.pipelines.registry import PipelineSpec, register

LOGITS_STREAM = 1  # host_rng stream of the initial logits


def open_loop_action(xp: Any, params: Any, obs: Any, logits_t: Any) -> Any:
    """The action of one step of an open-loop plan: ``tanh`` of that step's logits."""
    return xp.tanh(logits_t)


def open_loop_loss(env: Env, ops: Any, step: Any, horizon: int, logits: Any, start: Any):
    """``(loss, returns [B])`` of the logits ``[B, T, act_dim]`` from ``start``."""
    time_major = ops.xp.moveaxis(logits, 1, 0)
    returns = rollout_returns(ops, step, None, initial_carry(env, start), time_major, horizon)
    return -ops.xp.mean(returns), returns


def packed_open_loop_loss(
    env: Env, ops: Any, step: Any, horizon: int, logits: Any, start: Any
) -> tuple[Any, Any]:
    """``(losses [M], returns [M, B])`` of a pack's logits ``[M, B, T, act_dim]`` from its
    start states ``[M, B, ...]``: the members are folded into one batch of ``M * B``."""
    xp = ops.xp
    _, returns = open_loop_loss(
        env, ops, step, horizon, fold_members(xp, logits), fold_members(xp, start)
    )
    return member_losses(xp, logits.shape[0], returns)


@dataclass(frozen=True, eq=False)
class OpenLoopLoss:
    """A pack's loss as the trainers call it: ``loss(logits, start) -> (losses [M], returns
    [M, B])`` (see :func:`packed_open_loop_loss`).

    ``value_and_grad`` is set where the rollout gives its own gradient (torch's compiled
    loops): ``(losses, returns, gradient of losses.sum() w.r.t. the logits)`` in one
    compiled call, which the torch trainer uses instead of autograd.
    """

    env: Env
    ops: Any
    step: Any
    horizon: int

    def __call__(self, logits: Any, start: Any) -> tuple[Any, Any]:
        return packed_open_loop_loss(self.env, self.ops, self.step, self.horizon, logits, start)

    @property
    def value_and_grad(self) -> Callable | None:
        return self._value_and_grad if hasattr(self.step, "value_and_grad") else None

    def _value_and_grad(self, logits: Any, start: Any) -> tuple[Any, Any, Any]:
        xp = self.ops.xp
        time_major = xp.moveaxis(fold_members(xp, logits), 1, 0)
        (losses, returns), (_, _, grad) = pack_value_and_grad(
            self.env, xp, self.step, self.horizon, None, start, time_major
        )
        return losses, returns, xp.reshape(xp.moveaxis(grad, 0, 1), logits.shape)


def optimize(
    env: Env, cfg: TrajectoryConfig | None = None, seed: int = 0, report: Report | None = None
) -> PipelineResult:
    """Optimize open-loop action sequences for ``cfg.batch`` start states of ``env``.

    Args:
        env: an env made with backend ``"jax"`` or ``"torch"`` (numpy: use ``cem``).
        cfg: the pipeline config (defaults: Ivy Gym's demo settings, Adam lr 0.1, T=100).
        seed: selects the start states and the initial logits.
        report: called with each iteration's metrics and once at the end (see ``base``).

    Returns:
        A :class:`PipelineResult` whose ``params`` are the optimized logits; ``final_return``
        is the mean return of those logits, ``best_return`` the best mean return seen.

    Raises:
        ValueError: an invalid config or a backend without gradients, before any work.
        NonFiniteReturnError: the return became NaN/inf (everything so far is reported).
    """
    cfg = cfg if cfg is not None else PIPELINE.default_config(env.spec.name)
    return lone_outcome(optimize_pack(env, [cfg], [seed], [report]))


def optimize_pack(
    env: Env, cfgs: Sequence[TrajectoryConfig], seeds: Sequence[int], reports: Sequence[Report]
) -> list[MemberOutcome]:
    """Optimize a pack of trajectory configs at once; member ``i`` is ``optimize(env,
    cfgs[i], seeds[i], reports[i])`` (see ``gradgym.pipelines.run_pack``).

    Logits ``[M, B, T, act_dim]`` (each member's drawn from its own seed and ``init_scale``)
    are rolled out as one batch of ``M * B`` start states; each member has its own optimizer
    state, learning rate and clipping.
    """
    check_pack("trajectory", cfgs, seeds, reports)
    cfgs = [member.with_compile_decided(env.spec.name) for member in cfgs]
    ops = backend_ops(env, "trajectory", gradient=True)
    cfg = cfgs[0]  # what may not differ inside a pack comes from any member

    starts = [start_states(env, seed, cfg.batch) for seed in seeds]
    shape = (cfg.batch, cfg.horizon, env.spec.act_dim)
    logits = [
        host_uniform(env, host_rng(seed, LOGITS_STREAM), shape, member.init_scale)
        for seed, member in zip(seeds, cfgs)
    ]
    act = functools.partial(open_loop_action, env.xp)
    step = ops.compile_step(functools.partial(transition, env, act), cfg, env.spec.name)
    trainer = ops.Trainer(OpenLoopLoss(env, ops, step, cfg.horizon), logits, cfgs)
    start = stack_trees(env.xp, starts)

    def render(index: int, params: Any) -> list:
        time_major = ops.xp.moveaxis(params, 1, 0)
        return record_frames(ops, env, act, None, starts[index], time_major, cfg.horizon)

    spec = LoopSpec(
        names=member_names(f"trajectory on {env.spec.name} ({env.spec.backend})", seeds),
        iters=cfg.iters,
        steps_per_iter=cfg.batch * cfg.horizon,
        step_metrics=GRADIENT_STEP_METRICS,
        next_inputs=lambda iteration: start,
        render=member_renderers(cfgs, render),
        grad_hist_every=[member.grad_hist_every for member in cfgs],
    )
    return run_loop(trainer, spec, reports)


PIPELINE = register(PipelineSpec(
    name="trajectory",
    config=TrajectoryConfig,
    optimize=optimize,
    optimize_pack=optimize_pack,
    packable_fields=("lr", "init_scale", "grad_clip", "grad_hist_every", "render"),
    backends=AUTODIFF_BACKENDS,
    needs_gradients=True,
    step_metrics=GRADIENT_STEP_METRICS,
    summary="open-loop action sequences by gradient descent through the env",
    replay=lambda logits: plan_replay(np.tanh(to_numpy(logits))),
))
