"""Policy optimization by back-propagation through time (BPTT) through the environment.

An MLP policy (obs -> 64 -> 64 -> act, ``tanh`` after every layer, so actions lie in
[-1, 1]) is trained on the batch mean of the negated ``T``-step return, from a fresh batch
of random start states every iteration, and evaluated every ``eval_every`` iterations on a
fixed held-out batch (``eval_return_mean``). ``grad_horizon`` truncates BPTT: gradients
do not flow between windows of that many steps.

Randomness: weights, training start states and held-out start states come from separate
numpy streams of the seed, so every backend trains from the same numbers.
"""

from __future__ import annotations

import functools
import itertools
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from gradgym.envs.backends import AUTODIFF_BACKENDS
from gradgym.envs.core import Env
from gradgym.pipelines._loop import LoopSpec, MemberOutcome, run_loop
from gradgym.pipelines._pack import check_pack, lone_outcome, member_names, member_renderers
from gradgym.pipelines._rollout import (
    backend_ops,
    fold_members,
    host_rng,
    initial_carry,
    member_losses,
    member_states,
    pack_value_and_grad,
    record_frames,
    rollout_returns,
    stack_trees,
    start_states,
    transition,
)
from gradgym.pipelines.base import (
    EVAL_METRIC,
    GRADIENT_STEP_METRICS,
    PipelineResult,
    Report,
    mlp_replay,
)
from gradgym.pipelines.config import PolicyConfig
from gradgym.pipelines.registry import PipelineSpec, register

WEIGHTS_STREAM, TRAIN_STREAM, EVAL_STREAM = 1, 2, 3  # host_rng streams of a run's seed


def init_mlp(env: Env, rng: np.random.Generator, sizes: list[int]) -> list[tuple[Any, Any]]:
    """``[(weight [in, out], bias [out]), ...]``, each ~ U(-1/sqrt(in), 1/sqrt(in)).

    Drawn on the host from ``rng`` and moved to ``env``'s backend and dtype.
    """
    layers = []
    for fan_in, fan_out in itertools.pairwise(sizes):
        bound = 1.0 / math.sqrt(fan_in)
        weight = rng.uniform(-bound, bound, size=(fan_in, fan_out))
        bias = rng.uniform(-bound, bound, size=(fan_out,))
        layers.append((env.backend.asarray(weight), env.backend.asarray(bias)))
    return layers


def mlp_action(xp: Any, params: list[tuple[Any, Any]], obs: Any, unused: Any = None) -> Any:
    """The policy's action ``[B, act_dim]`` in [-1, 1] for observations ``[B, obs_dim]``."""
    hidden = obs
    for weight, bias in params:
        hidden = xp.tanh(hidden @ weight + bias)
    return hidden


def policy_loss(
    env: Env, ops: Any, step: Any, horizon: int, grad_horizon: int, params: Any, start: Any
):
    """``(loss, returns [B])`` of the policy ``params`` over ``horizon`` steps from ``start``."""
    returns = rollout_returns(
        ops, step, params, initial_carry(env, start), None, horizon, grad_horizon
    )
    return -ops.xp.mean(returns), returns


def packed_mlp_action(xp: Any, params: list[tuple[Any, Any]], obs: Any, unused: Any = None) -> Any:
    """The actions ``[M * B, act_dim]`` of a pack of ``M`` policies (weights ``[M, in, out]``,
    biases ``[M, out]``) for its members' observations folded into one batch ``[M * B,
    obs_dim]`` (member-major): each member's rows go through its own weights (batched
    matmul), so the pack steps the env once per time step."""
    members = params[0][0].shape[0]
    if members == 1:  # a lone run: a plain matmul, whose gradient XLA computes faster
        return mlp_action(xp, [(weight[0], bias[0]) for weight, bias in params], obs)
    hidden = xp.reshape(obs, (members, -1, obs.shape[-1]))
    for weight, bias in params:
        hidden = xp.tanh(hidden @ weight + bias[:, None, :])
    return xp.reshape(hidden, (-1, hidden.shape[-1]))


def packed_policy_loss(
    env: Env, ops: Any, step: Any, horizon: int, grad_horizon: int, params: Any, start: Any
) -> tuple[Any, Any]:
    """``(losses [M], returns [M, B])`` of a pack's policies from its start states ``[M, B]``."""
    xp = ops.xp
    _, returns = policy_loss(
        env, ops, step, horizon, grad_horizon, params, fold_members(xp, start)
    )
    return member_losses(xp, params[0][0].shape[0], returns)


@dataclass(frozen=True, eq=False)
class PolicyLoss:
    """A pack's loss as the trainers call it: ``loss(params, start) -> (losses [M], returns
    [M, B])`` (see :func:`packed_policy_loss`).

    ``value_and_grad`` is set where the rollout gives its own gradient (torch's compiled
    loops) and gradients run through the whole horizon: ``(losses, returns, gradients of
    losses.sum() w.r.t. the weights)`` in one compiled call, which the torch trainer uses
    instead of autograd.
    """

    env: Env
    ops: Any
    step: Any
    horizon: int
    grad_horizon: int

    def __call__(self, params: Any, start: Any) -> tuple[Any, Any]:
        return packed_policy_loss(
            self.env, self.ops, self.step, self.horizon, self.grad_horizon, params, start
        )

    @property
    def value_and_grad(self) -> Callable | None:
        truncated = 0 < self.grad_horizon < self.horizon
        fused = hasattr(self.step, "value_and_grad") and not truncated
        return self._value_and_grad if fused else None

    def _value_and_grad(self, params: Any, start: Any) -> tuple[Any, Any, Any]:
        (losses, returns), (grads, _, _) = pack_value_and_grad(
            self.env, self.ops.xp, self.step, self.horizon, params, start, None
        )
        return losses, returns, grads


def optimize(
    env: Env, cfg: PolicyConfig | None = None, seed: int = 0, report: Report | None = None
) -> PipelineResult:
    """Train an MLP policy on ``env`` by BPTT.

    Args:
        env: an env made with backend ``"jax"`` or ``"torch"`` (numpy: use ``cem``).
        cfg: the pipeline config (defaults: Adam lr 1e-3, T=100, B=64, 2000 iterations).
        seed: selects the initial weights, the training and the held-out start states.
        report: called with each iteration's metrics and once at the end (see ``base``).

    Returns:
        A :class:`PipelineResult` whose ``params`` are the trained weights; ``final_return``
        and ``best_return`` are held-out mean returns (the last one and the best seen).

    Raises:
        ValueError: an invalid config or a backend without gradients, before any work.
        NonFiniteReturnError: the return became NaN/inf (everything so far is reported).
    """
    cfg = cfg if cfg is not None else PIPELINE.default_config(env.spec.name)
    return lone_outcome(optimize_pack(env, [cfg], [seed], [report]))


def optimize_pack(
    env: Env, cfgs: Sequence[PolicyConfig], seeds: Sequence[int], reports: Sequence[Report]
) -> list[MemberOutcome]:
    """Train a pack of policies at once; member ``i`` is ``optimize(env, cfgs[i], seeds[i],
    reports[i])`` (see ``gradgym.pipelines.run_pack``).

    Each member draws its weights, training and held-out start states from its own seed;
    the members' start states are folded into one batch and each member's rows go through
    its own weights, with its own optimizer state, learning rate and clipping.
    """
    check_pack("policy", cfgs, seeds, reports)
    cfgs = [member.with_compile_decided(env.spec.name) for member in cfgs]
    ops = backend_ops(env, "policy", gradient=True)
    cfg = cfgs[0]  # what may not differ inside a pack comes from any member

    sizes = [env.spec.obs_dim, *[int(h) for h in cfg.hidden], env.spec.act_dim]
    params = [init_mlp(env, host_rng(seed, WEIGHTS_STREAM), sizes) for seed in seeds]
    train_rngs = [host_rng(seed, TRAIN_STREAM) for seed in seeds]
    eval_starts = [
        start_states(env, host_rng(seed, EVAL_STREAM), cfg.eval_batch) for seed in seeds
    ]
    act = functools.partial(mlp_action, env.xp)
    packed_act = functools.partial(packed_mlp_action, env.xp)
    step = ops.compile_step(functools.partial(transition, env, packed_act), cfg, env.spec.name)
    loss = PolicyLoss(env, ops, step, cfg.horizon, cfg.grad_horizon)
    trainer = ops.Trainer(loss, params, cfgs)

    def render(index: int, weights: Any) -> list:
        return record_frames(ops, env, act, weights, eval_starts[index], None, cfg.horizon)

    spec = LoopSpec(
        names=member_names(f"policy on {env.spec.name} ({env.spec.backend})", seeds),
        iters=cfg.iters,
        steps_per_iter=cfg.batch * cfg.horizon,
        step_metrics=GRADIENT_STEP_METRICS,
        next_inputs=lambda iteration: member_states(env, train_rngs, cfg.batch),
        eval_inputs=stack_trees(env.xp, eval_starts),
        eval_every=cfg.eval_every,
        render=member_renderers(cfgs, render),
        grad_hist_every=[member.grad_hist_every for member in cfgs],
    )
    return run_loop(trainer, spec, reports)


PIPELINE = register(PipelineSpec(
    name="policy",
    config=PolicyConfig,
    optimize=optimize,
    optimize_pack=optimize_pack,
    packable_fields=("lr", "grad_clip", "grad_hist_every", "render"),
    backends=AUTODIFF_BACKENDS,
    needs_gradients=True,
    step_metrics=GRADIENT_STEP_METRICS,
    eval_metric=EVAL_METRIC,
    summary="an MLP policy trained by back-propagation through time",
    replay=mlp_replay,
))
