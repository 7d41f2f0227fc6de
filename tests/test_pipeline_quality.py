"""Quality bars of the pipelines (issue 3), end to end on CPU. Marked slow; they run in CI.

- trajectory: T = 100, Adam lr 0.1, 32 start states (seed 0: the start states of
  ``make(env, backend="numpy").reset(0, batch=32)``, the same on jax and torch), 200
  iterations; the mean return of the final logits reaches the bar, on jax and on torch.
- policy: B = 64, T = 100, 2000 iterations (Adam lr 1e-3, grad_clip 1: the defaults); the
  held-out mean return at the end is at least twice that of the untrained policy.
- CEM (defaults: 30 iterations of 64 samples per start state) beats random actions on the
  same start states, on numpy and on jax.

Every test is its own parametrized case, so ``pytest -n 2`` spreads them over both cores.
Each prints its figures (``pytest -s`` shows them).
"""

from __future__ import annotations

import functools

import numpy as np
import pytest
import torch

import gradgym
from gradgym.envs import to_numpy
from gradgym.pipelines import (
    CEMConfig,
    PolicyConfig,
    TrajectoryConfig,
    _numpy,
    cem,
    policy,
    trajectory,
)
from gradgym.pipelines._rollout import initial_carry, rollout_returns, start_states, transition
from gradgym.pipelines.base import EVAL_METRIC

torch.set_num_threads(1)

pytestmark = pytest.mark.slow

TRAJECTORY_BARS = {
    "CartPole": 46.0,
    "Pendulum": 48.0,
    "MountainCar": 20.0,
    "Reacher": 58.0,
    "Swimmer": 80.0,
}
POLICY_ENVS = ["CartPole", "MountainCar", "Reacher", "Swimmer"]
ALL_ENVS = list(TRAJECTORY_BARS)


@pytest.mark.parametrize("backend", ["jax", "torch"])
@pytest.mark.parametrize("env_name", ALL_ENVS)
def test_trajectory_optimization_reaches_the_bar(env_name, backend):
    cfg = TrajectoryConfig(
        iters=200, horizon=100, batch=32, lr=0.1, render=False, grad_hist_every=0
    )
    result = trajectory.optimize(gradgym.make(env_name, backend=backend), cfg, seed=0)
    initial = result.history[0]["return_mean"]
    print(
        f"\ntrajectory {env_name} {backend}: initial {initial:.2f} final {result.final_return:.2f} "
        f"(bar {TRAJECTORY_BARS[env_name]}) wall {result.wall_time_s:.1f}s"
    )
    assert result.final_return >= TRAJECTORY_BARS[env_name]


@pytest.mark.parametrize("backend", ["jax", "torch"])
@pytest.mark.parametrize("env_name", POLICY_ENVS)
def test_policy_optimization_doubles_the_held_out_return(env_name, backend):
    cfg = PolicyConfig(
        iters=2000, horizon=100, batch=64, eval_every=500, render=False, grad_hist_every=0
    )
    result = policy.optimize(gradgym.make(env_name, backend=backend), cfg, seed=0)
    untrained = result.history[0][EVAL_METRIC]
    curve = [round(m[EVAL_METRIC], 2) for m in result.history if EVAL_METRIC in m]
    print(
        f"\npolicy {env_name} {backend}: held-out {curve} -> final {result.final_return:.2f} "
        f"({result.final_return / untrained:.2f}x) wall {result.wall_time_s:.1f}s"
    )
    assert result.final_return >= 2.0 * untrained
    if backend == "torch":  # the default torch_compile=auto compiles a run this long
        assert result.compile_time_s > 0


def random_action_return(
    env_name: str, start_seed: int, batch: int, horizon: int, samples: int
) -> float:
    """Mean return of uniformly random actions in [-1, 1] from the CEM run's start states."""
    env = gradgym.make(env_name, backend="numpy")
    start = start_states(env, start_seed, batch)
    step = functools.partial(transition, env, cem.plan_action)
    rng = np.random.default_rng(123)
    returns = []
    for _ in range(samples):
        actions = rng.uniform(-1, 1, size=(horizon, batch, env.spec.act_dim)).astype(np.float32)
        returns.append(
            rollout_returns(_numpy, step, None, initial_carry(env, start), actions, horizon)
        )
    return float(np.mean(returns))


@pytest.mark.parametrize("backend", ["numpy", "jax"])
@pytest.mark.parametrize("env_name", ALL_ENVS)
def test_cem_beats_random_actions(env_name, backend):
    cfg = CEMConfig(render=False)
    result = cem.optimize(gradgym.make(env_name, backend=backend), cfg, seed=0)
    random_return = random_action_return(env_name, 0, cfg.batch, cfg.horizon, samples=8)
    print(
        f"\ncem {env_name} {backend}: random actions {random_return:.2f} "
        f"final {result.final_return:.2f} wall {result.wall_time_s:.1f}s"
    )
    assert result.final_return > random_return


def test_torch_compile_takes_the_same_steps_as_eager():
    env = gradgym.make("Pendulum", backend="torch")
    cfg = {"iters": 3, "horizon": 5, "batch": 4, "render": False, "grad_hist_every": 0}
    eager = trajectory.optimize(env, TrajectoryConfig(**cfg), seed=0)
    compiled = trajectory.optimize(env, TrajectoryConfig(torch_compile=True, **cfg), seed=0)
    print(f"\ntorch.compile of the step: {compiled.compile_time_s:.1f}s")
    assert eager.compile_time_s == 0.0 and compiled.compile_time_s > 0.0
    np.testing.assert_allclose(
        [m["return_mean"] for m in compiled.history],
        [m["return_mean"] for m in eager.history],
        rtol=1e-5,
    )
    np.testing.assert_allclose(
        to_numpy(compiled.params), to_numpy(eager.params), rtol=1e-4, atol=1e-5
    )
