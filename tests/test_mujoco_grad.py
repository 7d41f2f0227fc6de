"""Gradients through the MuJoCo tasks and optimization with them.

Gradients of a 20-step return with respect to the actions, on torch and jax, are checked
against central finite differences of the same rollout on numpy (float64 throughout).

Tolerances, from the finite-difference step sizes:

- the reference perturbs each action by ``H = 1e-5``: its truncation error is
  ``H^2 / 6 |R'''| ~ 2e-11 |R'''|`` and its rounding error ``eps_mach |R| / H ~ 2e-11 |R|``;
- our gradient chains per-step Jacobians that MuJoCo's step is differentiated into by
  central differences with ``eps = 1e-6`` (``Physics.fd_eps``): each entry carries a
  rounding error of ``eps_mach / eps ~ 2e-10`` relative and a truncation error of
  ``eps^2 ~ 1e-12``; 20 chained steps add those errors up, amplified by the Jacobians
  (the pendulum is unstable), to ~1e-8 relative at worst.

So a smooth task (InvertedPendulum with its smooth reward, Swimmer: no contacts) must agree
to ``1e-6`` of the gradient's largest entry, two orders above those estimates. HalfCheetah
touches the ground: MuJoCo's constraint solver stops once its improvement falls below
``tolerance = 1e-8``, so the step is smooth only to ~1e-8 relative, and a difference
quotient over ``eps = 1e-6`` can carry ~1e-8 / 1e-6 = 1e-2 of noise on contact entries
in the worst case; measured, the agreement is ~1e-7, and the bound is ``1e-5``. torch and
jax run the same host code on the same inputs and must agree to rounding (``1e-10``).
"""

from __future__ import annotations

import functools

import numpy as np
import pytest

import gradgym
from gradgym.pipelines import CEMConfig, TrajectoryConfig, run_pipeline

torch = pytest.importorskip("torch")
jax = pytest.importorskip("jax")

HORIZON = 20
REFERENCE_STEP = 1e-5
GRADIENT_CASES = [
    ("InvertedPendulum-v5", {"smooth_reward": True}, 1e-6),
    ("Swimmer-v5", {}, 1e-6),
    ("HalfCheetah-v5", {}, 1e-5),
]
CASE_IDS = [case[0] for case in GRADIENT_CASES]


@pytest.fixture(autouse=True)
def _one_torch_thread():
    torch.set_num_threads(1)


def problem(name: str, kwargs: dict):
    """A fixed float64 start state and ``[T, 1, act_dim]`` actions in (-0.5, 0.5)."""
    env = gradgym.make(name, dtype="float64", **kwargs)
    start = env.reset(0, batch=1)
    actions = np.random.default_rng(1).uniform(-0.5, 0.5, (HORIZON, 1, env.spec.act_dim))
    return env, start, actions


@functools.cache
def reference_gradient(name: str, kwargs_items: tuple) -> np.ndarray:
    """Central differences of the return, every perturbed rollout in one numpy batch."""
    env, start, actions = problem(name, dict(kwargs_items))
    count = actions.size
    plans = np.repeat(actions.reshape(1, -1), 2 * count, axis=0)
    plans[np.arange(count), np.arange(count)] += REFERENCE_STEP
    plans[count + np.arange(count), np.arange(count)] -= REFERENCE_STEP
    plans = plans.reshape(2 * count, HORIZON, -1)
    state = env.State(*(np.repeat(np.asarray(leaf), 2 * count, axis=0) for leaf in start))
    returns = np.zeros(2 * count)
    for t in range(HORIZON):
        state, _, reward, _ = env.step(state, np.ascontiguousarray(plans[:, t]))
        returns += reward
    return ((returns[:count] - returns[count:]) / (2 * REFERENCE_STEP)).reshape(actions.shape)


def torch_gradient(name: str, kwargs: dict) -> np.ndarray:
    _, start, actions = problem(name, kwargs)
    env = gradgym.make(name, backend="torch", dtype="float64", **kwargs)
    plan = torch.tensor(actions, requires_grad=True)
    state, total = env.as_state(start), 0.0
    for t in range(HORIZON):
        state, _, reward, _ = env.step(state, plan[t])
        total = total + reward.sum()
    total.backward()
    return plan.grad.numpy()


def jax_gradient(name: str, kwargs: dict) -> np.ndarray:
    _, start, actions = problem(name, kwargs)
    env = gradgym.make(name, backend="jax", dtype="float64", **kwargs)

    def total_return(plan):
        def body(state, action):
            state, _, reward, _ = env.step(state, action)
            return state, reward.sum()

        _, rewards = jax.lax.scan(body, env.as_state(start), plan)
        return rewards.sum()

    return np.asarray(jax.jit(jax.grad(total_return))(jax.numpy.asarray(actions)))


GRADIENTS = {"torch": torch_gradient, "jax": jax_gradient}


@pytest.mark.parametrize("backend", ["torch", "jax"])
@pytest.mark.parametrize("name, kwargs, tolerance", GRADIENT_CASES, ids=CASE_IDS)
def test_return_gradient_matches_central_differences(name, kwargs, tolerance, backend):
    expected = reference_gradient(name, tuple(sorted(kwargs.items())))
    scale = np.abs(expected).max()
    assert scale > 1e-3, "the return barely depends on the actions: the check proves nothing"
    got = GRADIENTS[backend](name, kwargs)
    np.testing.assert_allclose(got, expected, rtol=0, atol=tolerance * scale)


@pytest.mark.parametrize("name, kwargs, tolerance", GRADIENT_CASES, ids=CASE_IDS)
def test_torch_and_jax_gradients_agree(name, kwargs, tolerance):
    from_torch, from_jax = torch_gradient(name, kwargs), jax_gradient(name, kwargs)
    np.testing.assert_allclose(from_torch, from_jax, rtol=0, atol=1e-10 * np.abs(from_torch).max())


def test_gradient_through_readouts_matches_central_differences():
    """InvertedDoublePendulum's reward reads the tip position that MuJoCo leaves after the
    step (a readout, differentiated by central differences with the state)."""
    env, start, actions = problem("InvertedDoublePendulum-v5", {})
    actions = actions[:5] * 0.2  # stays up for 5 steps: the healthy bonus is constant
    torch_env = gradgym.make("InvertedDoublePendulum-v5", backend="torch", dtype="float64")
    plan = torch.tensor(actions, requires_grad=True)
    state, total = torch_env.as_state(start), 0.0
    for action in plan:
        state, _, reward, done = torch_env.step(state, action)
        total = total + reward.sum()
        assert not done.any()
    total.backward()

    def numpy_return(plan):
        state, total = start, 0.0
        for action in plan:
            state, _, reward, _ = env.step(state, action)
            total += reward[0]
        return total

    expected = np.zeros_like(actions)
    for index in np.ndindex(actions.shape):
        bump = np.zeros_like(actions)
        bump[index] = REFERENCE_STEP
        expected[index] = (numpy_return(actions + bump) - numpy_return(actions - bump)) / (2 * REFERENCE_STEP)
    np.testing.assert_allclose(plan.grad.numpy(), expected, rtol=0, atol=1e-6 * np.abs(expected).max())


def test_transition_fd_and_central_jacobians_agree_on_half_cheetah():
    """HalfCheetah (Euler) gets its Jacobians from mujoco.mjd_transitionFD chained over the
    frame skip; central differences over the whole env step must give the same matrix."""
    from gradgym.envs.mujoco.physics import Physics

    env = gradgym.make("HalfCheetah-v5", dtype="float64")
    assert env.task.physics.jacobian_method == "transitionFD"
    state = env.reset(1, batch=3)
    actions = np.random.default_rng(0).uniform(-1, 1, (3, env.spec.act_dim))
    for _ in range(30):  # until the feet touch the ground
        state, _, _, _ = env.step(state, actions)
    inputs = [np.asarray(x) for x in (state.qpos, state.qvel, actions, state.warmstart)]
    model = env.task.physics.model
    chained = Physics(model, 5, jacobian_method="transitionFD").jacobian(*inputs)
    central = Physics(model, 5, jacobian_method="central").jacobian(*inputs)
    assert chained.shape == (3, 18, 24)
    np.testing.assert_allclose(chained, central, rtol=0, atol=1e-6 * np.abs(central).max())


# ----------------------------------------------------------------------------- optimization
# Through gradgym's own pipelines, as `gradgym run pipeline=... env=HalfCheetah-v5` runs them.


def optimize(pipeline: str, name: str, backend: str, cfg, **kwargs):
    """``cfg``'s pipeline on task ``name``: (return of iteration 0, best return, history)."""
    env = gradgym.make(name, backend=backend, dtype="float64", **kwargs)
    result = run_pipeline(pipeline, env, cfg, seed=3)
    return result.history[0]["return_mean"], result.best_return, result.history


def test_trajectory_pipeline_improves_half_cheetah_on_torch():
    cfg = TrajectoryConfig(iters=15, horizon=15, batch=2, init_scale=0.5, render=False,
                           grad_hist_every=0)
    initial, best, _ = optimize("trajectory", "HalfCheetah-v5", "torch", cfg)
    assert best > initial + 1.0, (initial, best)


def test_trajectory_pipeline_keeps_the_pendulum_up_longer_on_torch():
    cfg = TrajectoryConfig(iters=20, horizon=20, batch=2, render=False, grad_hist_every=0)
    initial, best, _ = optimize("trajectory", "InvertedPendulum-v5", "torch", cfg, smooth_reward=True)
    assert best > initial + 2.0, (initial, best)


def test_trajectory_pipeline_keeps_hopper_up_longer_on_jax():
    """Hopper's episodes end when it falls (``done``; the pipelines count no reward after
    it, as test_pipelines.py checks on a probe env): the optimized plan stays up longer."""
    cfg = TrajectoryConfig(iters=10, horizon=30, batch=4, render=False, grad_hist_every=0)
    initial, best, history = optimize("trajectory", "Hopper-v5", "jax", cfg)
    # Unmasked, the healthy reward alone would give ~30 over 30 steps; the random plans fall
    # within a few steps and count only those.
    assert initial < 0.5 * cfg.horizon, initial
    assert best > initial + 5.0, (initial, best)
    assert all(np.isfinite(h["grad_norm"]) and h["grad_nonfinite"] == 0 for h in history)


def test_cem_pipeline_improves_half_cheetah_on_numpy():
    cfg = CEMConfig(iters=6, horizon=15, batch=2, population=64, elites=8, init_std=0.5,
                    render=False)
    initial, best, _ = optimize("cem", "HalfCheetah-v5", "numpy", cfg)
    assert best > initial + 1.0, (initial, best)
