"""Cross-entropy method (CEM) over open-loop action sequences: zeroth order, every backend.

For each of ``B`` start states a diagonal Gaussian over the plan ``[T, act_dim]`` (actions
clipped to [-1, 1]) is refined: sample ``population`` plans, roll them all out in one
batch of ``B * population`` envs, and move the mean and standard deviation toward the
``elites`` best. Written once against the env's array namespace; the iteration is one
``jax.jit`` function on jax and runs eagerly on numpy and torch.

Reported per iteration: ``return_mean/min/max`` and ``loss`` of the current mean plan (before
the update), ``elite_return_mean``, ``action_std_mean``, ``iter_time_s``, ``env_steps_per_s``.
There is no gradient, so no ``grad_*`` metrics.
"""

from __future__ import annotations

import functools
from typing import Any, Optional

import numpy as np

from gradgym.envs.backends import ARRAY_BACKENDS, to_numpy
from gradgym.envs.core import Env
from gradgym.pipelines._loop import LoopSpec, run_loop
from gradgym.pipelines._rollout import (
    backend_ops,
    host_rng,
    initial_carry,
    record_frames,
    rollout_returns,
    start_states,
    transition,
    tree_map,
)
from gradgym.pipelines.base import PipelineResult, Report
from gradgym.pipelines.config import CEMConfig, validate_config
from gradgym.pipelines.registry import PipelineSpec, register

CEM_STEP_METRICS = (
    "return_mean",
    "return_min",
    "return_max",
    "loss",
    "elite_return_mean",
    "action_std_mean",
)
NOISE_STREAM = 1  # host_rng stream that seeds the backend's sampling generator


def plan_action(params: Any, obs: Any, action_t: Any) -> Any:
    """The action of one step of a plan: the planned action itself."""
    return action_t


def plan_returns(env: Env, ops: Any, step: Any, horizon: int, plans: Any, start: Any) -> Any:
    """The return ``[N]`` of ``N`` plans ``[N, T, act_dim]`` from ``N`` start states."""
    time_major = ops.xp.moveaxis(plans, 1, 0)
    return rollout_returns(ops, step, None, initial_carry(env, start), time_major, horizon)


def repeat_states(xp: Any, state: Any, times: int) -> Any:
    """Each start state ``times`` times in a row: ``[B, ...]`` -> ``[B * times, ...]``."""

    def repeat(leaf: Any) -> Any:
        batch, rest = leaf.shape[0], tuple(leaf.shape[1:])
        tiled = xp.broadcast_to(leaf[:, None], (batch, times) + rest)
        return xp.reshape(tiled, (batch * times,) + rest)

    return tree_map(repeat, state)


class CrossEntropyPlanner:
    """CEM over plans with the optimizer interface of ``_loop.run_loop``.

    ``params`` is the mean plan ``[B, T, act_dim]``; ``step`` samples, evaluates and updates.
    """

    def __init__(self, env: Env, ops: Any, cfg: Any, seed: int, start: Any):
        self._env, self._ops, self._cfg = env, ops, cfg
        xp, dtype = env.xp, env.backend.dtype
        shape = (cfg.batch, cfg.horizon, env.spec.act_dim)
        self.params = xp.zeros(shape, dtype=dtype)
        self._std = xp.full(shape, cfg.init_std, dtype=dtype)
        self._population_start = repeat_states(xp, start, cfg.population)
        noise_seed = int(host_rng(seed, NOISE_STREAM).integers(2**62))
        self._rng = env.backend.generator(noise_seed)
        step = functools.partial(transition, env, plan_action)
        self._returns = functools.partial(plan_returns, env, ops, step, cfg.horizon)
        self._iteration, self._evaluate = self._update, self._returns  # until compile()

    def _update(self, mean: Any, std: Any, key: Any, start: Any, population_start: Any):
        """One CEM iteration: ``(mean, std, metrics vector)``."""
        env, ops, cfg = self._env, self._ops, self._cfg
        xp = env.xp
        batch, population = cfg.batch, cfg.population
        plan_shape = tuple(mean.shape[1:])
        noise = env.backend.normal(key, (batch, population) + plan_shape)
        samples = xp.clip(mean[:, None] + std[:, None] * noise, -1.0, 1.0)
        flat = xp.reshape(samples, (batch * population,) + plan_shape)
        sample_returns = xp.reshape(self._returns(flat, population_start), (batch, population))

        elite_index = ops.top_k_indices(sample_returns, cfg.elites)
        elites = ops.take_along_axis(samples, elite_index[:, :, None, None], axis=1)
        elite_mean = xp.mean(elites, axis=1)
        elite_std = xp.sqrt(xp.mean((elites - elite_mean[:, None]) ** 2, axis=1))
        elite_returns = ops.take_along_axis(sample_returns, elite_index, axis=1)

        keep = cfg.smoothing
        stepped_mean = mean + cfg.lr * (elite_mean - mean)
        new_mean = keep * mean + (1.0 - keep) * stepped_mean
        new_std = xp.clip(keep * std + (1.0 - keep) * elite_std, cfg.min_std, None)

        returns = self._returns(mean, start)
        metrics = xp.stack(
            [
                xp.mean(returns),
                xp.min(returns),
                xp.max(returns),
                -xp.mean(returns),
                xp.mean(elite_returns),
                xp.mean(std),
            ]
        )
        return new_mean, new_std, metrics

    def compile(self, inputs: Any, eval_inputs: Optional[Any] = None) -> float:
        """Compile the iteration and the evaluation (jax); returns the seconds spent."""
        key = self._env.backend.split(self._rng, 1)[0]
        args = (self.params, self._std, key, inputs, self._population_start)
        self._iteration, update_time = self._ops.compile_function(self._update, *args)
        self._evaluate, eval_time = self._ops.compile_function(self._returns, self.params, inputs)
        return update_time + eval_time

    def step(self, inputs: Any) -> list[float]:
        """One CEM iteration; the values of ``CEM_STEP_METRICS`` for the mean before it."""
        self._rng, key = self._env.backend.split(self._rng, 2)
        self.params, self._std, metrics = self._iteration(
            self.params, self._std, key, inputs, self._population_start
        )
        return to_numpy(metrics).tolist()  # the one host sync of the iteration

    def snapshot(self) -> Any:
        """The current mean plan (each update makes a new array: no copy needed)."""
        return self.params

    def returns(self, params: Any, inputs: Any) -> np.ndarray:
        """The return ``[B]`` of the plans ``params`` from ``inputs``, on the host."""
        return to_numpy(self._evaluate(params, inputs))

    def gradients(self) -> np.ndarray:
        raise NotImplementedError("CEM has no gradient")


def optimize(
    env: Env, cfg: Optional[CEMConfig] = None, seed: int = 0, report: Optional[Report] = None
) -> PipelineResult:
    """Plan open-loop actions for ``cfg.batch`` start states of ``env`` with CEM.

    Args:
        env: an env made with backend ``"numpy"``, ``"jax"`` or ``"torch"``.
        cfg: the pipeline config.
        seed: selects the start states (as in ``trajectory``) and the sampling noise.
        report: called with each iteration's metrics and once at the end (see ``base``).

    Returns:
        A :class:`PipelineResult` whose ``params`` are the final mean plans ``[B, T, act_dim]``.

    Raises:
        ValueError: an invalid config or env, before any work.
        NonFiniteReturnError: the return became NaN/inf (everything so far is reported).
    """
    cfg = cfg if cfg is not None else CEMConfig()
    validate_config(cfg, "cem")
    ops = backend_ops(env, "cem", gradient=False)
    start = start_states(env, seed, cfg.batch)
    planner = CrossEntropyPlanner(env, ops, cfg, seed, start)

    def render(plans: Any) -> list:
        time_major = ops.xp.moveaxis(plans, 1, 0)
        return record_frames(ops, env, plan_action, None, start, time_major, cfg.horizon)

    spec = LoopSpec(
        name=f"cem on {env.spec.name} ({env.spec.backend})",
        iters=cfg.iters,
        steps_per_iter=cfg.batch * (cfg.population + 1) * cfg.horizon,
        step_metrics=CEM_STEP_METRICS,
        next_inputs=lambda iteration: start,
        render=render if cfg.render else None,
    )
    return run_loop(planner, spec, report)


PIPELINE = register(PipelineSpec(
    name="cem",
    config=CEMConfig,
    optimize=optimize,
    backends=ARRAY_BACKENDS,
    needs_gradients=False,
    step_metrics=CEM_STEP_METRICS,
    summary="cross-entropy method over open-loop actions (zeroth order)",
))
