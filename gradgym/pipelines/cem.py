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
from collections.abc import Sequence
from typing import Any

import numpy as np

from gradgym.envs.backends import ARRAY_BACKENDS, to_numpy
from gradgym.envs.core import Env
from gradgym.pipelines._loop import LoopSpec, MemberOutcome, run_loop
from gradgym.pipelines._pack import check_pack, lone_outcome, member_names, member_renderers
from gradgym.pipelines._rollout import (
    backend_ops,
    fold_members,
    host_rng,
    initial_carry,
    record_frames,
    rollout_returns,
    stack_trees,
    start_states,
    transition,
    tree_map,
)
from gradgym.pipelines.base import PipelineResult, Report, plan_replay
from gradgym.pipelines.config import CEMConfig
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


def member_column(xp: Any, values: list[float], dtype: Any) -> Any:
    """Per-member scalars as ``[M, 1, 1, 1]``: they broadcast over a member's plans."""
    return xp.reshape(xp.asarray(values, dtype=dtype), (-1, 1, 1, 1))


class CrossEntropyPlanner:
    """CEM over the plans of a pack of ``M`` members, with the optimizer interface of
    ``_loop.run_loop`` (a lone run is a pack of one).

    ``params`` are the mean plans ``[M, B, T, act_dim]``; ``step`` samples (member ``m``
    from its own generator), evaluates all ``M * B * population`` plans in one batch, and
    updates each member with its own ``lr``, ``smoothing`` and ``min_std``.
    """

    def __init__(self, env: Env, ops: Any, cfgs: Sequence[Any], seeds: Sequence[int], start: Any):
        self._env, self._ops, self._cfg = env, ops, cfgs[0]
        xp, dtype = env.xp, env.backend.dtype
        cfg = self._cfg
        shape = (len(cfgs), cfg.batch, cfg.horizon, env.spec.act_dim)
        self.params = xp.zeros(shape, dtype=dtype)
        self._std = xp.ones(shape, dtype=dtype) * member_column(
            xp, [c.init_std for c in cfgs], dtype
        )
        self._hyper = tuple(
            member_column(xp, [getattr(c, name) for c in cfgs], dtype)
            for name in ("lr", "smoothing", "min_std")
        )
        self._population_start = repeat_states(xp, fold_members(xp, start), cfg.population)
        noise_seeds = [int(host_rng(seed, NOISE_STREAM).integers(2**62)) for seed in seeds]
        self._rng = ops.member_generators(env.backend, noise_seeds)
        step = functools.partial(transition, env, plan_action)
        self._flat_returns = functools.partial(plan_returns, env, ops, step, cfg.horizon)
        self._returns = self._packed_returns
        self._iteration, self._evaluate = self._update, self._returns  # until compile()

    def _packed_returns(self, plans: Any, start: Any) -> Any:
        """The returns ``[M, B]`` of the members' plans ``[M, B, T, act_dim]`` from their
        start states ``[M, B, ...]``, rolled out as one batch."""
        xp = self._env.xp
        flat = self._flat_returns(fold_members(xp, plans), fold_members(xp, start))
        return xp.reshape(flat, (plans.shape[0], plans.shape[1]))

    def _update(self, mean: Any, std: Any, keys: Any, start: Any, population_start: Any,
                hyper: tuple[Any, Any, Any]):
        """One CEM iteration of every member: ``(mean, std, metrics [M, k])``."""
        env, ops, cfg = self._env, self._ops, self._cfg
        xp = env.xp
        members, batch, population = mean.shape[0], cfg.batch, cfg.population
        plan_shape = tuple(mean.shape[2:])
        noise = ops.member_normal(env.backend, keys, (batch, population) + plan_shape)
        samples = xp.clip(mean[:, :, None] + std[:, :, None] * noise, -1.0, 1.0)
        flat = xp.reshape(samples, (members * batch * population,) + plan_shape)
        sample_returns = xp.reshape(
            self._flat_returns(flat, population_start), (members, batch, population)
        )

        elite_index = ops.top_k_indices(sample_returns, cfg.elites)
        elites = ops.take_along_axis(samples, elite_index[..., None, None], axis=2)
        elite_mean = xp.mean(elites, axis=2)
        elite_std = xp.sqrt(xp.mean((elites - elite_mean[:, :, None]) ** 2, axis=2))
        elite_returns = ops.take_along_axis(sample_returns, elite_index, axis=2)

        lr, keep, min_std = hyper
        stepped_mean = mean + lr * (elite_mean - mean)
        new_mean = keep * mean + (1.0 - keep) * stepped_mean
        new_std = xp.maximum(keep * std + (1.0 - keep) * elite_std, min_std)

        returns = self._returns(mean, start)
        metrics = xp.stack(
            [
                xp.mean(returns, axis=1),
                xp.amin(returns, 1),
                xp.amax(returns, 1),
                -xp.mean(returns, axis=1),
                xp.mean(xp.reshape(elite_returns, (members, -1)), axis=1),
                xp.mean(xp.reshape(std, (members, -1)), axis=1),
            ],
            axis=1,
        )
        return new_mean, new_std, metrics

    def compile(self, inputs: Any, eval_inputs: Any | None = None) -> float:
        """Compile the iteration and the evaluation (jax); returns the seconds spent."""
        _, keys = self._ops.split_members(self._env.backend, self._rng)
        args = (self.params, self._std, keys, inputs, self._population_start, self._hyper)
        self._iteration, update_time = self._ops.compile_function(self._update, *args)
        self._evaluate, eval_time = self._ops.compile_function(self._returns, self.params, inputs)
        return update_time + eval_time

    def step(self, inputs: Any) -> list[list[float]]:
        """One CEM iteration; per member ``CEM_STEP_METRICS`` of the mean before it."""
        self._rng, keys = self._ops.split_members(self._env.backend, self._rng)
        self.params, self._std, metrics = self._iteration(
            self.params, self._std, keys, inputs, self._population_start, self._hyper
        )
        return to_numpy(metrics).tolist()  # the one host sync of the iteration

    def snapshot(self) -> Any:
        """The current mean plans (each update makes a new array: no copy needed)."""
        return self.params

    @staticmethod
    def member(plans: Any, index: int) -> Any:
        """Member ``index``'s plans ``[B, T, act_dim]``."""
        return plans[index]

    def returns(self, inputs: Any) -> np.ndarray:
        """The returns ``[M, B]`` of the current mean plans from ``inputs``, on the host."""
        return to_numpy(self._evaluate(self.params, inputs))

    def gradients(self, index: int) -> np.ndarray:
        raise NotImplementedError("CEM has no gradient")


def optimize(
    env: Env, cfg: CEMConfig | None = None, seed: int = 0, report: Report | None = None
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
    cfg = cfg if cfg is not None else PIPELINE.default_config(env.spec.name)
    return lone_outcome(optimize_pack(env, [cfg], [seed], [report]))


def optimize_pack(
    env: Env, cfgs: Sequence[CEMConfig], seeds: Sequence[int], reports: Sequence[Report]
) -> list[MemberOutcome]:
    """Plan for a pack of CEM configs at once; member ``i`` is ``optimize(env, cfgs[i],
    seeds[i], reports[i])`` (see ``gradgym.pipelines.run_pack``)."""
    check_pack("cem", cfgs, seeds, reports)
    ops = backend_ops(env, "cem", gradient=False)
    cfg = cfgs[0]  # what may not differ inside a pack comes from any member
    starts = [start_states(env, seed, cfg.batch) for seed in seeds]
    start = stack_trees(env.xp, starts)
    planner = CrossEntropyPlanner(env, ops, cfgs, seeds, start)

    def render(index: int, plans: Any) -> list:
        time_major = ops.xp.moveaxis(plans, 1, 0)
        return record_frames(ops, env, plan_action, None, starts[index], time_major, cfg.horizon)

    spec = LoopSpec(
        names=member_names(f"cem on {env.spec.name} ({env.spec.backend})", seeds),
        iters=cfg.iters,
        steps_per_iter=cfg.batch * (cfg.population + 1) * cfg.horizon,
        step_metrics=CEM_STEP_METRICS,
        next_inputs=lambda iteration: start,
        render=member_renderers(cfgs, render),
        grad_hist_every=[0] * len(cfgs),
    )
    return run_loop(planner, spec, reports)


PIPELINE = register(PipelineSpec(
    name="cem",
    config=CEMConfig,
    optimize=optimize,
    optimize_pack=optimize_pack,
    packable_fields=("lr", "init_std", "min_std", "smoothing", "render"),
    backends=ARRAY_BACKENDS,
    needs_gradients=False,
    step_metrics=CEM_STEP_METRICS,
    summary="cross-entropy method over open-loop actions (zeroth order)",
    replay=plan_replay,  # the mean plans are the actions
))
