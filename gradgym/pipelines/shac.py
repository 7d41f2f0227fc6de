"""Short-Horizon Actor-Critic (SHAC; Xu et al., ICLR 2022).

The actor is trained on analytic gradients of short windows (``num_steps`` steps) of the
env, which continue from one iteration to the next along long episodes; each window's
return is completed by the discounted value of its last state from a target critic, so the
gradient sees past the window without back-propagating through the whole episode. The
critic is fitted to the window's TD(lambda) returns; the target critic follows it by
Polyak averaging. Actor: a tanh MLP of the normalized observation (deterministic); with
``layer_norm`` both networks normalize each hidden layer (as the paper's); actor gradients are
clipped by global norm and their norms reported. MuJoCo tasks differentiate through the
transition-Jacobian bridge. For float64, make the env with ``dtype="float64"`` (``gradgym
run ... dtype=float64``).
"""

from __future__ import annotations

from gradgym.envs.backends import AUTODIFF_BACKENDS
from gradgym.envs.core import Env
from gradgym.pipelines import _rl_run
from gradgym.pipelines._rl import shac_policy
from gradgym.pipelines._rollout import host_rng
from gradgym.pipelines.base import EVAL_METRIC, GRADIENT_STEP_METRICS, PipelineResult, Report
from gradgym.pipelines.config import SHACConfig, iterations
from gradgym.pipelines.policy import init_mlp
from gradgym.pipelines.registry import PipelineSpec, register

SHAC_METRICS = GRADIENT_STEP_METRICS + ("critic_loss",)

# Where SHAC's defaults differ by env; README, "Methods", gives the runs behind each.
_UNSATURATED = {"layer_norm": True, "actor_output_scale": 0.1}  # tanh stays off its flat ends
ENV_DEFAULTS = {
    "CartPole": _UNSATURATED,
    "MountainCar": {**_UNSATURATED, "num_envs": 2},  # twice the actor updates per env step
    "Reacher": _UNSATURATED,
    "Swimmer": {"normalize_obs": False, "critic_iters": 32},
    # Adam's steps of 1e-2 throw a walking policy around through contact; smaller ones climb
    "HalfCheetah-v5": {"lr": 3e-4},
    "Hopper-v5": {"lr": 1e-3},
    "Ant-v5": {"lr": 3e-4},  # keeps it standing; 1e-2 throws it over
    "InvertedPendulum-v5": {"lr": 1e-3},  # balances on every seed within 4k env steps
}


def initial_networks(env: Env, cfg: SHACConfig, seed: int) -> tuple[list, list]:
    """``(actor layers, critic layers)`` drawn from the seed; the actor's output layer is
    scaled by ``cfg.actor_output_scale``, so that its first actions are small and far from
    the saturated ends of its ``tanh``."""
    rng = host_rng(seed, _rl_run.WEIGHTS_STREAM)
    obs, act = env.spec.obs_dim, env.spec.act_dim
    actor = init_mlp(env, rng, [obs, *[int(h) for h in cfg.hidden], act])
    critic = init_mlp(env, rng, [obs, *[int(h) for h in cfg.critic_hidden], 1])
    weight, bias = actor[-1]
    actor[-1] = (weight * cfg.actor_output_scale, bias * cfg.actor_output_scale)
    return actor, critic


def optimize(
    env: Env, cfg: SHACConfig | None = None, seed: int = 0, report: Report | None = None
) -> PipelineResult:
    """Train an actor (and critic) on ``env`` with SHAC for ``cfg.env_steps`` env steps.

    Args:
        env: an env made with backend ``"jax"`` or ``"torch"`` (float32 or float64).
        cfg: the pipeline config (``None``: the defaults for this env, ``ENV_DEFAULTS``
            over ``SHACConfig``'s: 4 envs, windows of 16 steps; otherwise the paper's).
        seed: selects the weights and the start states.
        report: called with each iteration's metrics and once at the end (see ``base``).

    Returns:
        A :class:`PipelineResult` whose ``params`` are ``(actor layers, obs statistics)``;
        ``final_return`` and ``best_return`` are held-out mean returns.

    Raises:
        ValueError: an invalid config or a backend without gradients, before any work.
        NonFiniteReturnError: a return became NaN/inf (everything so far is reported).
    """
    cfg = cfg if cfg is not None else PIPELINE.default_config(env.spec.name)
    ops, trainers, iters, time_limit = _rl_run.prepare("shac", env, cfg)
    actor, critic = initial_networks(env, cfg, seed)
    trainer = trainers.SHACTrainer(env, cfg, actor, critic, seed, time_limit, iters)
    act = shac_policy(env.xp, cfg)
    return _rl_run.run("shac", env, cfg, seed, report, ops, trainer, act, iters, time_limit,
                       SHAC_METRICS)


PIPELINE = register(PipelineSpec(
    name="shac",
    config=SHACConfig,
    optimize=optimize,
    backends=AUTODIFF_BACKENDS,
    needs_gradients=True,
    step_metrics=SHAC_METRICS,
    eval_metric=EVAL_METRIC,
    iterations=iterations,
    summary="short-horizon actor-critic: analytic gradients of short windows + a critic",
    env_defaults=ENV_DEFAULTS,
))
