"""TimeLimit (functional) and VecEnv (stateful, auto-reset) on numpy, jax and torch."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pytest
import torch

import gradgym
from gradgym.envs import Env, TimeLimit, VecEnv, get_backend, to_numpy
from gradgym.envs.classic import Pendulum

torch.set_num_threads(1)

BACKENDS = ["numpy", "jax", "torch"]


def actions(env, batch, steps, seed=0):
    """``steps`` random float64 actions ``[batch, act_dim]`` in [-1, 1] of the env's backend."""
    rng = np.random.default_rng(seed)
    shape = (batch, env.spec.act_dim)
    return [env.backend.asarray(rng.uniform(-1, 1, shape)) for _ in range(steps)]


@dataclass(frozen=True)
class TippingPendulum(Pendulum):
    """A pendulum whose episode ends once it leans more than 0.5 rad (to test termination)."""

    def terminated(self, backend, state):
        return backend.xp.abs(state.angle) > 0.5


# ----------------------------------------------------------------------------- TimeLimit


@pytest.mark.parametrize("backend", BACKENDS)
def test_time_limit_ends_the_episode_at_the_limit(backend):
    env = gradgym.make("Reacher", backend=backend, dtype="float64", num_joints=3)
    limited = TimeLimit(env, max_steps=4)
    assert limited.spec.horizon == 4 and limited.spec.obs_dim == env.spec.obs_dim
    state = limited.reset(0, batch=5)
    plain_state = env.reset(0, batch=5)
    for t, action in enumerate(actions(env, 5, 6), start=1):
        state, obs, reward, done = limited.step(state, action)
        plain_state, plain_obs, plain_reward, _ = env.step(plain_state, action)
        # the wrapper changes nothing but the counter and done
        np.testing.assert_allclose(to_numpy(reward), to_numpy(plain_reward), rtol=0, atol=0)
        np.testing.assert_allclose(to_numpy(obs), to_numpy(plain_obs), rtol=0, atol=0)
        np.testing.assert_array_equal(to_numpy(state.steps), np.full(5, t))
        np.testing.assert_array_equal(to_numpy(done), np.full(5, t >= 4))
    np.testing.assert_allclose(to_numpy(limited.observe(state)), to_numpy(env.observe(plain_state)))
    np.testing.assert_allclose(to_numpy(limited.reward(state)), to_numpy(env.reward(plain_state)))
    assert limited.render(state, 4).shape == env.render(plain_state, 4).shape


def test_time_limit_defaults_to_the_horizon():
    env = gradgym.make("Pendulum")
    assert TimeLimit(env).max_steps == env.spec.horizon == 100


@pytest.mark.parametrize("backend", BACKENDS)
def test_time_limit_separates_termination_from_truncation(backend):
    env = Env(TippingPendulum(), get_backend(backend, "float64"))
    limited = TimeLimit(env, max_steps=2)
    state = limited.reset(0, batch=2)
    start = env.State(env.backend.asarray([0.0, 0.6]), env.backend.asarray([0.0, 0.0]))
    state = state._replace(env_state=start)
    zero = env.backend.asarray(np.zeros((2, 1)))
    state, _, _, terminated, truncated = limited.transition(state, zero)
    np.testing.assert_array_equal(to_numpy(terminated), [False, True])
    np.testing.assert_array_equal(to_numpy(truncated), [False, False])
    state, _, _, terminated, truncated = limited.transition(state, zero)
    # at the limit: the upright one is truncated, the fallen one terminated (not both)
    np.testing.assert_array_equal(to_numpy(terminated), [False, True])
    np.testing.assert_array_equal(to_numpy(truncated), [True, False])


def test_time_limit_under_jit_and_scan():
    import jax
    import jax.numpy as jnp

    env = gradgym.make("CartPole", backend="jax", dtype="float64")
    limited = TimeLimit(env, max_steps=7)

    @jax.jit
    def run(state, acts):
        def body(state, action):
            state, _, reward, done = limited.step(state, action)
            return state, (reward, done)

        return jax.lax.scan(body, state, acts)

    state = limited.reset(0, batch=3)
    acts = jnp.asarray(np.random.default_rng(0).uniform(-1, 1, (10, 3, 1)))
    final, (rewards, dones) = run(state, acts)
    np.testing.assert_array_equal(np.asarray(dones[:, 0]), np.arange(1, 11) >= 7)
    np.testing.assert_array_equal(np.asarray(final.steps), [10, 10, 10])
    # the same rewards as stepping the plain env eagerly
    plain = env.reset(0, batch=3)
    for t in range(10):
        plain, _, reward, _ = env.step(plain, acts[t])
        np.testing.assert_allclose(np.asarray(rewards[t]), np.asarray(reward), rtol=1e-12)


def test_time_limit_passes_torch_gradients():
    env = gradgym.make("Swimmer", backend="torch", dtype="float64", num_urchins=2)
    limited = TimeLimit(env, max_steps=3)
    acts = torch.tensor(np.random.default_rng(1).uniform(-1, 1, (5, 2, 2)), requires_grad=True)

    def total(step, state):
        ret = 0.0
        for action in acts:
            state, _, reward, _ = step(state, action)
            ret = ret + reward.sum()
        return ret

    (wrapped,) = torch.autograd.grad(total(limited.step, limited.reset(0, batch=2)), acts)
    (plain,) = torch.autograd.grad(total(env.step, env.reset(0, batch=2)), acts)
    assert torch.count_nonzero(plain) > 0
    torch.testing.assert_close(wrapped, plain, rtol=0, atol=0)


@pytest.mark.parametrize("bad", [0, -3, 2.5, True, "10"])
def test_time_limit_rejects_bad_limits(bad):
    with pytest.raises(ValueError, match="max_steps must be a positive int"):
        TimeLimit(gradgym.make("Pendulum"), max_steps=bad)


def test_time_limit_needs_a_functional_env():
    with pytest.raises(TypeError, match="functional env"):
        TimeLimit(object(), max_steps=3)


# ----------------------------------------------------------------------------- VecEnv


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(("name", "kwargs"), [("Reacher", {"num_joints": 3}), ("Swimmer", {})])
def test_vec_env_restarts_finished_entries_only(backend, name, kwargs):
    """Entries at different step counts: only the one reaching the limit restarts."""
    env = gradgym.make(name, backend=backend, dtype="float64", **kwargs)
    envs = VecEnv(env, num_envs=4, max_steps=3)
    obs = envs.reset(seed=0)
    assert tuple(obs.shape) == (4, env.spec.obs_dim)
    before = envs.state
    envs.state = before._replace(steps=env.backend.xp.asarray(np.array([0, 2, 1, 2], np.int32)))
    action = actions(env, 4, 1)[0]
    expected_state, expected_obs, expected_reward, _ = env.step(before.env_state, action)

    obs, reward, terminated, truncated, info = envs.step(action)

    np.testing.assert_array_equal(to_numpy(truncated), [False, True, False, True])
    np.testing.assert_array_equal(to_numpy(terminated), [False] * 4)
    np.testing.assert_array_equal(to_numpy(envs.state.steps), [1, 0, 2, 0])
    np.testing.assert_allclose(to_numpy(reward), to_numpy(expected_reward), rtol=1e-12)
    np.testing.assert_allclose(to_numpy(info["final_obs"]), to_numpy(expected_obs), rtol=1e-12)
    obs, final_obs = to_numpy(obs), to_numpy(info["final_obs"])
    np.testing.assert_allclose(obs, to_numpy(envs.time_limit.observe(envs.state)))
    continuing, restarted = [0, 2], [1, 3]
    np.testing.assert_allclose(obs[continuing], final_obs[continuing], rtol=1e-12)
    assert np.all(np.any(obs[restarted] != final_obs[restarted], axis=-1))
    # every leaf (including [B, n] and [B, k, 2] ones) kept or replaced per entry
    for kept, stepped in zip(envs.state.env_state, expected_state, strict=True):
        np.testing.assert_allclose(to_numpy(kept)[continuing], to_numpy(stepped)[continuing])


@pytest.mark.parametrize("backend", BACKENDS)
def test_vec_env_full_episodes_and_seeding(backend):
    env = gradgym.make("MountainCar", backend=backend, dtype="float64")
    first = VecEnv(env, num_envs=8, max_steps=5)
    second = VecEnv(env, num_envs=8, max_steps=5)
    np.testing.assert_array_equal(to_numpy(first.reset(seed=3)), to_numpy(second.reset(seed=3)))
    ends = []
    for action in actions(env, 8, 12):
        out_first = first.step(action)
        out_second = second.step(action)
        np.testing.assert_array_equal(to_numpy(out_first[0]), to_numpy(out_second[0]))
        ends.append(bool(to_numpy(out_first[3]).all()))
    assert ends == [(t + 1) % 5 == 0 for t in range(12)]
    # a restart draws new start states (not the first ones again)
    assert np.any(to_numpy(first.reset(seed=4)) != to_numpy(second.reset(seed=3)))
    assert first.render(7).shape == (256, 256, 3)


@pytest.mark.parametrize("backend", BACKENDS)
def test_vec_env_restarts_terminated_entries(backend):
    env = Env(TippingPendulum(), get_backend(backend, "float64"))
    envs = VecEnv(env, num_envs=2, max_steps=50)
    envs.reset(seed=0)
    upright = env.State(env.backend.asarray([0.0, 0.7]), env.backend.asarray([0.0, 0.0]))
    envs.state = envs.state._replace(env_state=upright)
    obs, _, terminated, truncated, info = envs.step(env.backend.asarray(np.zeros((2, 1))))
    np.testing.assert_array_equal(to_numpy(terminated), [False, True])
    np.testing.assert_array_equal(to_numpy(truncated), [False, False])
    np.testing.assert_array_equal(to_numpy(envs.state.steps), [1, 0])
    assert np.any(to_numpy(obs)[1] != to_numpy(info["final_obs"])[1])


def test_vec_env_on_jax_keeps_arrays_on_jax():
    import jax

    env = gradgym.make("Pendulum", backend="jax")
    envs = VecEnv(env, num_envs=4)
    obs = envs.reset(seed=1)
    out = envs.step(actions(env, 4, 1)[0].astype("float32"))
    for array in (obs, *out[:4], out[4]["final_obs"]):
        assert isinstance(array, jax.Array)


def test_vec_env_errors():
    env = gradgym.make("Pendulum")
    with pytest.raises(ValueError, match="num_envs must be a positive int"):
        VecEnv(env, num_envs=0)
    envs = VecEnv(env, num_envs=2)
    with pytest.raises(RuntimeError, match="before reset"):
        envs.step(np.zeros((2, 1), np.float32))
    envs.reset(seed=0)
    with pytest.raises(ValueError, match="expected"):
        envs.step(np.zeros((3, 1), np.float32))
