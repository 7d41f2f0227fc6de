"""The functional core: known values, cross-backend agreement, gradients, bad input."""

from __future__ import annotations

import math

import numpy as np
import pytest
from env_cases import CASE_IDS
from env_cases import CLASSIC_CASES as ENV_CASES

import gradgym
from gradgym.envs import to_numpy

GRAD_BACKENDS = ["jax", "torch"]


def rollout_return(env, state, actions):
    """Sum of rewards of ``actions [T, B, act_dim]`` from ``state`` (plain Python loop)."""
    total = 0.0
    for action in actions:
        state, _, reward, _ = env.step(state, action)
        total = total + reward
    return total


def numpy_start(name, kwargs, batch, seed=0):
    """A float64 start state drawn on numpy, used as the common input of every backend."""
    return gradgym.make(name, backend="numpy", dtype="float64", **kwargs).reset(seed, batch=batch)


# ----------------------------------------------------------------------------- known values


def test_cartpole_single_step_by_hand():
    env = gradgym.make("CartPole", dtype="float64")
    state = env.State(*(np.zeros(1) for _ in range(4)))
    state, obs, reward, done = env.step(state, np.ones((1, 1)))
    # force 10: temp = 10/1.1; angle_acc = -temp / (0.5 (4/3 - 0.1/1.1)); x_acc = temp - 0.05 angle_acc / 1.1
    temp = 10 / 1.1
    angle_acc = -temp / (0.5 * (4 / 3 - 0.1 / 1.1))
    x_acc = temp - 0.05 * angle_acc / 1.1
    assert angle_acc == pytest.approx(-14.634146, rel=1e-6)
    assert x_acc == pytest.approx(9.756098, rel=1e-6)
    np.testing.assert_allclose(state.x_vel, [0.02 * x_acc], rtol=1e-12)
    np.testing.assert_allclose(state.x, [0.02 * 0.02 * x_acc], rtol=1e-12)
    np.testing.assert_allclose(state.angle, [0.02 * 0.02 * angle_acc], rtol=1e-12)
    np.testing.assert_allclose(
        obs, [[state.x[0], state.x_vel[0], math.cos(state.angle[0]), math.sin(state.angle[0]), state.angle_vel[0]]]
    )
    np.testing.assert_allclose(reward, [math.exp(-state.x[0] ** 2) * (math.cos(state.angle[0]) + 1) / 2])
    assert done.dtype == bool and not done.any()


def test_cartpole_tilted_step_by_hand():
    env = gradgym.make("CartPole", dtype="float64")
    x, v, th, w, a = 0.3, -0.2, 0.5, 1.5, -0.4
    state = env.State(np.array([x]), np.array([v]), np.array([th]), np.array([w]))
    state, _, _, _ = env.step(state, np.array([[a]]))
    temp = (10 * a + 0.1 * 0.5 * w * w * math.sin(th)) / 1.1
    th_acc = (9.8 * math.sin(th) - math.cos(th) * temp) / (0.5 * (4 / 3 - 0.1 * math.cos(th) ** 2 / 1.1))
    x_acc = temp - 0.1 * 0.5 * th_acc * math.cos(th) / 1.1
    np.testing.assert_allclose(state.angle_vel, [w + 0.02 * th_acc], rtol=1e-12)
    np.testing.assert_allclose(state.angle, [th + 0.02 * (w + 0.02 * th_acc)], rtol=1e-12)
    np.testing.assert_allclose(state.x, [x + 0.02 * (v + 0.02 * x_acc)], rtol=1e-12)


def test_pendulum_single_steps_by_hand():
    env = gradgym.make("Pendulum", dtype="float64")
    # Hanging down at rest with full torque: acc = -3*9.8/2 sin(2 pi) + 3 = 3.
    state = env.State(np.array([math.pi, 0.5]), np.array([0.0, -1.0]))
    state, obs, reward, _ = env.step(state, np.array([[1.0], [0.0]]))
    acc0 = 3.0
    acc1 = -14.7 * math.sin(0.5 + math.pi)
    np.testing.assert_allclose(state.angle_vel, [0.05 * acc0, -1.0 + 0.05 * acc1], rtol=1e-12)
    np.testing.assert_allclose(state.angle, [math.pi + 0.05 * 0.15, 0.5 + 0.05 * (-1.0 + 0.05 * acc1)], rtol=1e-12)
    np.testing.assert_allclose(reward, (np.cos(state.angle) + 1) / 2)
    np.testing.assert_allclose(obs[:, 2], state.angle_vel)


def test_mountain_car_single_step_by_hand():
    env = gradgym.make("MountainCar", dtype="float64")
    state = env.State(np.array([-0.5, 0.45]), np.array([0.0, 0.1]))
    state, obs, reward, _ = env.step(state, np.array([[1.0], [-0.5]]))
    acc = np.array([3.0 - 9.8 * math.cos(-1.5), -1.5 - 9.8 * math.cos(1.35)])
    vel = np.array([0.0, 0.1]) + 0.02 * acc
    np.testing.assert_allclose(state.x_vel, vel, rtol=1e-12)
    np.testing.assert_allclose(state.x, np.array([-0.5, 0.45]) + 0.02 * vel, rtol=1e-12)
    np.testing.assert_allclose(reward, np.exp(-5 * (state.x - 0.45) ** 2), rtol=1e-12)
    np.testing.assert_allclose(obs, np.stack([state.x, state.x_vel], -1))


def test_reacher_single_step_by_hand():
    env = gradgym.make("Reacher", dtype="float64", num_joints=2)
    # Arm stretched along +x with zero velocity; the goal is the tip: reward 1 before moving.
    state = env.State(np.zeros((1, 2)), np.zeros((1, 2)), np.array([[2.0, 0.0]]))
    assert env.reward(state)[0] == pytest.approx(1.0)
    state, obs, reward, _ = env.step(state, np.array([[1.0, -1.0]]))
    np.testing.assert_allclose(state.angle_vels, [[0.05, -0.05]])
    np.testing.assert_allclose(state.angles, [[0.0025, -0.0025]])
    tip = np.array([2 * math.cos(0.0025), 0.0])
    np.testing.assert_allclose(reward, [math.exp(-((tip[0] - 2.0) ** 2))], rtol=1e-12)
    assert obs.shape == (1, 8)
    np.testing.assert_allclose(obs[0, 6:], [2.0, 0.0])


def test_swimmer_single_step_by_hand():
    env = gradgym.make("Swimmer", dtype="float64", num_urchins=1)
    state = env.State(
        urchins=np.array([[[0.5, 0.0]]]), xy=np.zeros((1, 2)), xy_vel=np.array([[1.0, 0.0]]), goal=np.array([[1.0, 1.0]])
    )
    state, obs, reward, _ = env.step(state, np.array([[1.0, 1.0]]))
    np.testing.assert_allclose(state.xy_vel, [[1.05, 0.05]])
    np.testing.assert_allclose(state.xy, [[0.0525, 0.0025]])
    x, y = 0.0525, 0.0025
    expected = math.exp(-0.5 * ((x - 1) ** 2 + (y - 1) ** 2)) * (1 - math.exp(-30 * ((x - 0.5) ** 2 + y**2)))
    np.testing.assert_allclose(reward, [expected], rtol=1e-12)
    np.testing.assert_allclose(obs, [[0.5, 0.0, x, y, 1.05, 0.05, 1.0, 1.0]])


@pytest.mark.parametrize("name,kwargs", ENV_CASES, ids=CASE_IDS)
def test_dimensions_and_reset_ranges(name, kwargs):
    env = gradgym.make(name, **kwargs)
    state = env.reset(0, batch=4096)
    obs = env.observe(state)
    assert obs.shape == (4096, env.spec.obs_dim) and obs.dtype == np.float32
    assert env.reward(state).shape == (4096,)
    if name == "CartPole":
        assert np.all(np.abs(state.x) <= 1) and np.all(np.abs(state.angle) <= math.pi)
        assert np.all(np.abs(state.x_vel) <= 0.3) and state.x.std() > 0.5
    if name == "MountainCar":
        assert state.x.min() >= -0.9 and state.x.max() <= -0.2 and not state.x_vel.any()
    if name == "Reacher":
        n = kwargs.get("num_joints", 2)
        assert env.spec.obs_dim == 3 * n + 2 and env.spec.act_dim == n
        assert np.abs(state.goal).max() <= n and np.abs(state.goal).max() > n - 0.1
    if name == "Swimmer":
        k = kwargs.get("num_urchins", 5)
        assert env.spec.obs_dim == 2 * k + 6 and state.urchins.shape == (4096, k, 2)
        assert not state.xy_vel.any()


def test_batch_one_and_large_batch():
    for batch in (1, 16384):
        env = gradgym.make("CartPole")
        state = env.reset(1, batch=batch)
        state, obs, reward, done = env.step(state, np.zeros((batch, 1), np.float32))
        assert obs.shape == (batch, 5) and reward.shape == (batch,) and done.shape == (batch,)


def test_reset_is_reproducible_per_backend():
    for backend in ("numpy", "jax", "torch"):
        env = gradgym.make("Swimmer", backend=backend)
        a, b = env.reset(7, batch=8), env.reset(7, batch=8)
        c = env.reset(8, batch=8)
        for leaf_a, leaf_b in zip(a, b):
            np.testing.assert_array_equal(to_numpy(leaf_a), to_numpy(leaf_b))
        assert not np.array_equal(to_numpy(a.xy), to_numpy(c.xy))


# ---------------------------------------------------------------------- cross-backend agreement


@pytest.mark.parametrize("name,kwargs", ENV_CASES, ids=CASE_IDS)
def test_backends_agree_on_100_step_returns(name, kwargs):
    start = numpy_start(name, kwargs, batch=8)
    act_dim = gradgym.make(name, **kwargs).spec.act_dim
    actions = np.random.default_rng(0).uniform(-1, 1, size=(100, 8, act_dim))
    returns = {}
    for backend in ("numpy", "jax", "torch"):
        env = gradgym.make(name, backend=backend, dtype="float64", **kwargs)
        state = env.as_state(start)
        returns[backend] = to_numpy(rollout_return(env, state, [env.backend.asarray(a) for a in actions]))
    assert returns["numpy"].shape == (8,) and np.ptp(returns["numpy"]) > 0
    np.testing.assert_allclose(returns["jax"], returns["numpy"], rtol=0, atol=1e-9)
    np.testing.assert_allclose(returns["torch"], returns["numpy"], rtol=0, atol=1e-9)


# --------------------------------------------------------------------------------- gradients


def finite_difference_gradient(name, kwargs, start, actions, wrt, eps=1e-6):
    """Central differences of the 20-step return on numpy float64, all entries in one batch.

    Each perturbed copy (+eps and -eps for every entry of ``wrt``) is one batch element,
    so the whole gradient costs a single batched rollout.
    """
    env = gradgym.make(name, backend="numpy", dtype="float64", **kwargs)
    base = start if wrt == "state" else actions
    leaves = list(base) if wrt == "state" else [actions]
    sizes = [leaf.size for leaf in leaves]
    n = sum(sizes)
    flat = np.concatenate([leaf.reshape(-1) for leaf in leaves])
    perturbed = np.repeat(flat[None], 2 * n, axis=0)
    perturbed[np.arange(n), np.arange(n)] += eps
    perturbed[n + np.arange(n), np.arange(n)] -= eps

    def unflatten(rows):
        out, offset = [], 0
        for leaf, size in zip(leaves, sizes):
            out.append(rows[:, offset : offset + size].reshape((rows.shape[0],) + leaf.shape[1:]))
            offset += size
        return out

    if wrt == "state":
        state, acts = env.State(*unflatten(perturbed)), np.repeat(actions, 2 * n, axis=0).transpose(1, 0, 2)
    else:
        state = env.State(*(np.repeat(leaf, 2 * n, axis=0) for leaf in start))
        acts = unflatten(perturbed)[0].transpose(1, 0, 2)
    returns = rollout_return(env, state, acts)
    grad = (returns[:n] - returns[n:]) / (2 * eps)
    return unflatten(grad[None])


def autodiff_gradient(backend, name, kwargs, start, actions, wrt):
    env = gradgym.make(name, backend=backend, dtype="float64", **kwargs)
    if backend == "jax":
        import jax

        def body(state, action):
            state, _, reward, _ = env.step(state, action)
            return state, reward

        def ret(state, acts):
            return jax.lax.scan(body, state, acts)[1].sum()

        state, acts = env.as_state(start), env.backend.asarray(actions.transpose(1, 0, 2))
        grads = jax.grad(ret, argnums=0 if wrt == "state" else 1)(state, acts)
        return [np.asarray(g) for g in grads] if wrt == "state" else [np.asarray(grads).transpose(1, 0, 2)]
    import torch

    state = env.as_state(start)
    acts = torch.tensor(actions, dtype=torch.float64)
    inputs = [leaf.requires_grad_() for leaf in state] if wrt == "state" else [acts.requires_grad_()]
    total = rollout_return(env, state, acts.transpose(0, 1)).sum()
    grads = torch.autograd.grad(total, inputs, allow_unused=True)
    return [np.zeros(tuple(x.shape)) if g is None else g.numpy() for g, x in zip(grads, inputs)]


@pytest.mark.parametrize("backend", GRAD_BACKENDS)
@pytest.mark.parametrize("wrt", ["actions", "state"])
@pytest.mark.parametrize("name,kwargs", ENV_CASES, ids=CASE_IDS)
def test_gradient_of_20_step_return_matches_finite_differences(backend, wrt, name, kwargs):
    start = numpy_start(name, kwargs, batch=1, seed=3)
    act_dim = gradgym.make(name, **kwargs).spec.act_dim
    actions = np.random.default_rng(1).uniform(-1, 1, size=(1, 20, act_dim))  # [B, T, act_dim]
    expected = finite_difference_gradient(name, kwargs, start, actions, wrt)
    got = autodiff_gradient(backend, name, kwargs, start, actions, wrt)
    flat_expected = np.concatenate([g.reshape(-1) for g in expected])
    flat_got = np.concatenate([g.reshape(-1) for g in got])
    if not (name == "Swimmer" and kwargs.get("num_urchins") == 0 and wrt == "state"):
        assert np.abs(flat_expected).max() > 1e-6  # the check is not vacuous
    # Central differences at eps=1e-6 carry ~1e-10 truncation and rounding error on these
    # returns (magnitude <= 20), so agreement to 1e-6 separates a right gradient from a wrong one.
    np.testing.assert_allclose(flat_got, flat_expected, rtol=1e-5, atol=1e-6)


def test_jax_transforms_pass_through_step():
    import jax
    import jax.numpy as jnp

    env = gradgym.make("Pendulum", backend="jax")
    state = env.reset(jax.random.key(0), batch=16)
    actions = jnp.zeros((50, 16, 1), jnp.float32)

    @jax.jit
    def total(state, actions):
        def body(s, a):
            s, _, r, _ = env.step(s, a)
            return s, r

        return jax.lax.scan(body, state, actions)[1].sum()

    value = total(state, actions)
    grad = jax.grad(total, argnums=1)(state, actions)
    assert grad.shape == actions.shape and bool(jnp.isfinite(grad).all()) and float(jnp.abs(grad).max()) > 0
    # vmap over a leading axis of independent batches.
    stacked = jax.tree_util.tree_map(lambda x: jnp.stack([x, x]), state)
    _, obs, reward, _ = jax.vmap(env.step)(stacked, jnp.zeros((2, 16, 1), jnp.float32))
    assert obs.shape == (2, 16, 3) and reward.shape == (2, 16)
    assert np.isfinite(float(value))


def test_torch_autograd_and_vmap():
    import torch

    env = gradgym.make("Reacher", backend="torch", num_joints=3)
    state = env.reset(torch.Generator().manual_seed(0), batch=4)
    action = torch.zeros(4, 3, requires_grad=True)
    _, _, reward, _ = env.step(state, action)
    reward.sum().backward()
    assert action.grad is not None and action.grad.shape == (4, 3)
    stacked = env.State(*(torch.stack([x, x]) for x in state))
    _, obs, _, _ = torch.func.vmap(env.step)(stacked, torch.zeros(2, 4, 3))
    assert obs.shape == (2, 4, 11)


# -------------------------------------------------------------------------------- bad input


def test_unknown_env_lists_available():
    with pytest.raises(ValueError, match=r"unknown env 'Cartpole'.*did you mean 'CartPole'.*available: .*Pendulum"):
        gradgym.make("Cartpole")


def test_unknown_backend_dtype_and_argument():
    with pytest.raises(ValueError, match=r"unknown backend 'tensorflow'.*available: numpy, jax, torch"):
        gradgym.make("CartPole", backend="tensorflow")
    with pytest.raises(ValueError, match=r"unknown dtype 'float16'; available: float32, float64"):
        gradgym.make("CartPole", dtype="float16")
    with pytest.raises(ValueError, match=r"unknown argument\(s\) \['num_links'\] for Reacher; available: num_joints"):
        gradgym.make("Reacher", num_links=3)


@pytest.mark.parametrize("kwargs", [{"num_joints": 0}, {"num_joints": 2.5}, {"num_joints": True}])
def test_reacher_rejects_bad_num_joints(kwargs):
    with pytest.raises(ValueError, match="num_joints must be an int >= 1"):
        gradgym.make("Reacher", **kwargs)


def test_swimmer_rejects_negative_urchins():
    with pytest.raises(ValueError, match="num_urchins must be an int >= 0"):
        gradgym.make("Swimmer", num_urchins=-1)


@pytest.mark.parametrize("backend", ["numpy", "jax", "torch"])
def test_step_rejects_wrong_action_shape_and_dtype(backend):
    env = gradgym.make("CartPole", backend=backend)
    state = env.reset(0, batch=3)
    with pytest.raises(ValueError, match=r"action has shape \(3,\), expected \(3, 1\)"):
        env.step(state, env.backend.asarray(np.zeros(3)))
    with pytest.raises(ValueError, match=r"action has shape \(2, 1\), expected \(3, 1\)"):
        env.step(state, env.backend.asarray(np.zeros((2, 1))))
    from gradgym.envs import get_backend

    wide = get_backend(backend, "float64").asarray(np.zeros((3, 1)))
    with pytest.raises(TypeError, match="action dtype float64 does not match the env dtype float32"):
        env.step(state, wide)
    with pytest.raises(TypeError, match=r"action must be a .* array of shape \[B, 1\]"):
        env.step(state, [[0.0]] * 3)


def test_reset_rejects_bad_batch_and_rng():
    env = gradgym.make("Pendulum")
    with pytest.raises(ValueError, match="batch must be a positive int"):
        env.reset(0, batch=0)
    with pytest.raises(TypeError, match="rng must be an int seed or a native generator"):
        env.reset("seed", batch=2)


def test_as_state_converts_between_backends_and_reports_missing_fields():
    state = numpy_start("Swimmer", {}, batch=2)
    env = gradgym.make("Swimmer", backend="torch", dtype="float64")
    converted = env.as_state(state)
    assert type(converted).__name__ == "SwimmerState"
    np.testing.assert_array_equal(converted.urchins.numpy(), state.urchins)
    from collections import namedtuple

    Partial = namedtuple("Partial", ["xy"])
    with pytest.raises(ValueError, match=r"state lacks fields \['goal', 'urchins', 'xy_vel'\]"):
        env.as_state(Partial(xy=state.xy))


@pytest.mark.slow
def test_torch_compile_of_step_matches_eager():
    import torch

    env = gradgym.make("Pendulum", backend="torch")
    state, action = env.reset(0, batch=64), torch.full((64, 1), 0.3)
    compiled = torch.compile(env.step)
    for got, expected in zip(compiled(state, action)[1:3], env.step(state, action)[1:3]):
        torch.testing.assert_close(got, expected)
