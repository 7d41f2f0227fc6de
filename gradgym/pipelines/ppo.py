"""Proximal Policy Optimization (Schulman et al., 2017) for continuous actions.

The model-free baseline beside the gradient methods: it needs no env gradients, only
batched stepping, and runs on gradgym's functional envs directly (``num_envs`` as the
batch; MuJoCo tasks step on the host). The well-known form: a Gaussian policy (MLP mean,
state-independent log-std, actions clipped or tanh-squashed to [-1, 1]), a separate value
MLP, GAE, the clipped surrogate, advantage normalization per minibatch and running
observation normalization; Adam (optax on jax, ``torch.optim`` on torch).

Per iteration: ``return_mean/min/max`` over the envs of their last finished episode's
return (0 until one finishes), the mean loss and pre-clipping gradient norm over the
iteration's updates, PPO's diagnostics, ``env_steps``; every ``eval_every`` iterations the
held-out return of the mean action (``eval_return_mean``). ``final_return``: that of the
final policy.
"""

from __future__ import annotations

import functools

from gradgym.envs.backends import AUTODIFF_BACKENDS
from gradgym.envs.core import Env
from gradgym.pipelines import _rl_run
from gradgym.pipelines._rl import gaussian_mean_action
from gradgym.pipelines._rollout import host_rng
from gradgym.pipelines.base import EVAL_METRIC, GRADIENT_STEP_METRICS, PipelineResult, Report
from gradgym.pipelines.config import PPOConfig, iterations
from gradgym.pipelines.policy import init_mlp
from gradgym.pipelines.registry import PipelineSpec, register

PPO_METRICS = GRADIENT_STEP_METRICS + (
    "policy_loss", "value_loss", "entropy", "approx_kl", "clip_fraction",
)
POLICY_OUTPUT_SCALE = 0.01  # the policy's last layer starts small: mean actions near 0


def initial_weights(env: Env, cfg: PPOConfig, seed: int) -> dict:
    """``{"policy": layers, "log_std": [act_dim], "value": layers}`` drawn from the seed."""
    rng = host_rng(seed, _rl_run.WEIGHTS_STREAM)
    hidden = [int(h) for h in cfg.hidden]
    policy = init_mlp(env, rng, [env.spec.obs_dim, *hidden, env.spec.act_dim])
    weight, bias = policy[-1]
    policy[-1] = (weight * POLICY_OUTPUT_SCALE, bias * 0.0)
    value = init_mlp(env, rng, [env.spec.obs_dim, *hidden, 1])
    log_std = env.backend.zeros((env.spec.act_dim,)) + float(cfg.init_log_std)
    return {"policy": policy, "log_std": log_std, "value": value}


def optimize(
    env: Env, cfg: PPOConfig | None = None, seed: int = 0, report: Report | None = None
) -> PipelineResult:
    """Train a Gaussian policy on ``env`` with PPO for ``cfg.env_steps`` env steps.

    Args:
        env: an env made with backend ``"jax"`` or ``"torch"``.
        cfg: the pipeline config (defaults: SB3's PPO defaults, 32 envs x 64 steps).
        seed: selects the weights, the start states and the action noise.
        report: called with each iteration's metrics and once at the end (see ``base``).

    Returns:
        A :class:`PipelineResult` whose ``params`` are ``(policy layers, obs statistics)``;
        ``final_return`` and ``best_return`` are held-out mean returns of the mean action.

    Raises:
        ValueError: an invalid config or a backend without autodiff, before any work.
        NonFiniteReturnError: a return became NaN/inf (everything so far is reported).
    """
    cfg = cfg if cfg is not None else PIPELINE.default_config(env.spec.name)
    ops, trainers, iters, time_limit = _rl_run.prepare("ppo", env, cfg)
    trainer = trainers.PPOTrainer(env, cfg, initial_weights(env, cfg, seed), seed, time_limit,
                                  iters)
    act = functools.partial(gaussian_mean_action, env.xp, cfg.squash)
    return _rl_run.run("ppo", env, cfg, seed, report, ops, trainer, act, iters, time_limit,
                       PPO_METRICS)


PIPELINE = register(PipelineSpec(
    name="ppo",
    config=PPOConfig,
    optimize=optimize,
    backends=AUTODIFF_BACKENDS,
    needs_gradients=True,  # of its networks (autodiff backends); the env is only stepped
    step_metrics=PPO_METRICS,
    eval_metric=EVAL_METRIC,
    iterations=iterations,
    summary="PPO (clipped surrogate, GAE): the model-free RL baseline",
))
