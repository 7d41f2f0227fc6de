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
import math
from typing import Any, Optional

import numpy as np

from gradgym.envs.backends import AUTODIFF_BACKENDS
from gradgym.envs.core import Env
from gradgym.pipelines._loop import GRADIENT_STEP_METRICS, LoopSpec, run_loop
from gradgym.pipelines._rollout import (
    backend_ops,
    host_rng,
    initial_carry,
    record_frames,
    rollout_returns,
    start_states,
    transition,
)
from gradgym.pipelines.base import EVAL_METRIC, PipelineResult, Report
from gradgym.pipelines.config import PolicyConfig, validate_config
from gradgym.pipelines.registry import PipelineSpec, register

WEIGHTS_STREAM, TRAIN_STREAM, EVAL_STREAM = 1, 2, 3  # host_rng streams of a run's seed


def init_mlp(env: Env, rng: np.random.Generator, sizes: list[int]) -> list[tuple[Any, Any]]:
    """``[(weight [in, out], bias [out]), ...]``, each ~ U(-1/sqrt(in), 1/sqrt(in)).

    Drawn on the host from ``rng`` and moved to ``env``'s backend and dtype.
    """
    layers = []
    for fan_in, fan_out in zip(sizes[:-1], sizes[1:]):
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


def optimize(
    env: Env, cfg: Optional[PolicyConfig] = None, seed: int = 0, report: Optional[Report] = None
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
    cfg = cfg if cfg is not None else PolicyConfig()
    validate_config(cfg, "policy")
    ops = backend_ops(env, "policy", gradient=True)

    sizes = [env.spec.obs_dim, *[int(h) for h in cfg.hidden], env.spec.act_dim]
    params = init_mlp(env, host_rng(seed, WEIGHTS_STREAM), sizes)
    train_rng = host_rng(seed, TRAIN_STREAM)
    eval_start = start_states(env, host_rng(seed, EVAL_STREAM), cfg.eval_batch)
    act = functools.partial(mlp_action, env.xp)
    step = ops.compile_step(functools.partial(transition, env, act), cfg)
    loss = functools.partial(policy_loss, env, ops, step, cfg.horizon, cfg.grad_horizon)
    trainer = ops.Trainer(loss, params, cfg)

    def render(weights: Any) -> list:
        return record_frames(ops, env, act, weights, eval_start, None, cfg.horizon)

    spec = LoopSpec(
        name=f"policy on {env.spec.name} ({env.spec.backend})",
        iters=cfg.iters,
        steps_per_iter=cfg.batch * cfg.horizon,
        step_metrics=GRADIENT_STEP_METRICS,
        next_inputs=lambda iteration: start_states(env, train_rng, cfg.batch),
        eval_inputs=eval_start,
        eval_every=cfg.eval_every,
        render=render if cfg.render else None,
        grad_hist_every=cfg.grad_hist_every,
    )
    return run_loop(trainer, spec, report)


PIPELINE = register(PipelineSpec(
    name="policy",
    config=PolicyConfig,
    optimize=optimize,
    backends=AUTODIFF_BACKENDS,
    needs_gradients=True,
    step_metrics=GRADIENT_STEP_METRICS,
    eval_metric=EVAL_METRIC,
    summary="an MLP policy trained by back-propagation through time",
))
