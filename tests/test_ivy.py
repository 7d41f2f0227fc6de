"""ivy interop: ``backend="ivy"`` takes and returns ivy.Arrays and computes natively."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

import gradgym
from gradgym.envs import IvyEnv, ivy_interop, to_numpy

torch.set_num_threads(1)

ENV_CASES = [
    ("CartPole", {}),
    ("Pendulum", {}),
    ("MountainCar", {}),
    ("Reacher", {"num_joints": 3}),
    ("Swimmer", {"num_urchins": 4}),
]
CASE_IDS = [name for name, _ in ENV_CASES]
NATIVE_TYPES = {"numpy": np.ndarray, "torch": torch.Tensor}


@pytest.fixture(scope="module")
def ivy(tmp_path_factory):
    # ivy's logger creates ivy_logs.txt in the working directory when ivy is imported.
    cwd = os.getcwd()
    os.chdir(tmp_path_factory.mktemp("ivy"))
    try:
        module = ivy_interop.import_ivy()
    finally:
        os.chdir(cwd)
    return module


@pytest.fixture
def ivy_backend(ivy, request):
    """Set ivy's backend for one test (``None``: no backend, i.e. numpy) and unset it after."""
    name = request.param
    if name is not None:
        ivy.set_backend(name)
    yield name or "numpy"
    if name is not None:
        ivy.unset_backend()


def reference_returns(name, kwargs, start, actions):
    env = gradgym.make(name, dtype="float64", **kwargs)
    state, total = start, 0.0
    for action in actions:
        state, _, reward, _ = env.step(state, action)
        total = total + reward
    return total, env.observe(state)


@pytest.mark.parametrize("ivy_backend", [None, "numpy", "torch", "jax"], indirect=True)
@pytest.mark.parametrize(("name", "kwargs"), ENV_CASES, ids=CASE_IDS)
def test_ivy_env_matches_the_numpy_env(ivy, ivy_backend, name, kwargs):
    env = gradgym.make(name, backend="ivy", dtype="float64", **kwargs)
    assert isinstance(env, IvyEnv)
    assert env.spec.backend == "ivy" and env.spec.dtype == "float64"
    assert env.backend.name == ivy_backend
    start = gradgym.make(name, dtype="float64", **kwargs).reset(0, batch=3)
    actions = np.random.default_rng(0).uniform(-1, 1, (12, 3, env.spec.act_dim))
    expected_return, expected_obs = reference_returns(name, kwargs, start, actions)

    state, total = env.as_state(start), 0.0
    for action in actions:
        state, obs, reward, done = env.step(state, ivy.Array(env.backend.asarray(action)))
        for value in (*state, obs, reward, done):
            assert isinstance(value, ivy.Array)
        if ivy_backend in NATIVE_TYPES:
            assert isinstance(reward.data, NATIVE_TYPES[ivy_backend])
        total = total + to_numpy(reward)
    np.testing.assert_allclose(total, expected_return, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(to_numpy(env.observe(state)), expected_obs, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(to_numpy(obs), expected_obs, rtol=1e-12, atol=1e-12)
    frame = env.render(state, 2)
    assert frame.shape == (256, 256, 3) and frame.dtype == np.uint8


@pytest.mark.parametrize("ivy_backend", [None, "torch"], indirect=True)
def test_reset_is_seeded_like_the_native_backend(ivy, ivy_backend):
    env = gradgym.make("Reacher", backend="ivy", num_joints=2)
    native = gradgym.make("Reacher", backend=ivy_backend, num_joints=2)
    for ours, theirs in zip(env.reset(7, batch=4), native.reset(7, batch=4), strict=True):
        assert isinstance(ours, ivy.Array)
        np.testing.assert_array_equal(to_numpy(ours), to_numpy(theirs))
    np.testing.assert_array_equal(to_numpy(env.reward(env.reset(7, batch=4))),
                                  to_numpy(native.reward(native.reset(7, batch=4))))


@pytest.mark.parametrize("ivy_backend", ["torch"], indirect=True)
def test_torch_gradients_flow_through_ivy_arrays(ivy, ivy_backend):
    env = gradgym.make("Swimmer", backend="ivy", dtype="float64", num_urchins=2)
    native = gradgym.make("Swimmer", backend="torch", dtype="float64", num_urchins=2)
    acts = torch.tensor(np.random.default_rng(3).uniform(-1, 1, (6, 2, 2)), requires_grad=True)

    def total(step, state, wrap):
        ret = 0.0
        for action in acts:
            state, _, reward, _ = step(state, wrap(action))
            ret = ret + to_torch(reward).sum()
        return ret

    def to_torch(value):
        return value.data if isinstance(value, ivy.Array) else value

    (through_ivy,) = torch.autograd.grad(total(env.step, env.reset(1, batch=2), ivy.Array), acts)
    (plain,) = torch.autograd.grad(total(native.step, native.reset(1, batch=2), lambda a: a), acts)
    assert torch.count_nonzero(plain) > 0
    torch.testing.assert_close(through_ivy, plain, rtol=0, atol=0)


@pytest.mark.parametrize("ivy_backend", ["torch"], indirect=True)
def test_arrays_of_another_backend_are_rejected(ivy, ivy_backend):
    env = gradgym.make("Pendulum", backend="ivy")
    state = env.reset(0, batch=2)
    with pytest.raises(TypeError, match=r"holds a numpy.ndarray, but ivy's backend is 'torch'"):
        env.step(state, np.zeros((2, 1), np.float32))
    # a native tensor of the current backend is fine, like in ivy's own functions
    _, _, reward, _ = env.step(state, torch.zeros(2, 1))
    assert isinstance(reward, ivy.Array)
    # as_state converts a state of any backend
    numpy_state = gradgym.make("Pendulum").reset(0, batch=2)
    converted = env.as_state(numpy_state)
    assert all(isinstance(leaf.data, torch.Tensor) for leaf in converted)


@pytest.mark.parametrize("ivy_backend", ["torch"], indirect=True)
def test_shape_and_dtype_errors_come_from_the_core(ivy, ivy_backend):
    env = gradgym.make("Reacher", backend="ivy", num_joints=3)
    state = env.reset(0, batch=2)
    with pytest.raises(ValueError, match=r"action has shape \(2, 2\), expected \(2, 3\)"):
        env.step(state, ivy.Array(torch.zeros(2, 2)))
    with pytest.raises(TypeError, match="does not match the env dtype float32"):
        env.step(state, ivy.Array(torch.zeros(2, 3, dtype=torch.float64)))


def test_jax_backend_warns_about_ivy_printing(ivy, monkeypatch):
    from jax.interpreters import batching

    monkeypatch.setattr(ivy_interop, "_warned_about_jax", False)
    env = gradgym.make("Pendulum", backend="ivy")
    ivy.set_backend("jax")
    try:
        if hasattr(batching, "BatchTracer"):  # an older jax that ivy 1.0.0.5 still supports
            state = env.reset(0, batch=2)
        else:
            with pytest.warns(RuntimeWarning, match="ivy.to_numpy"):
                state = env.reset(0, batch=2)
        assert to_numpy(env.reward(state)).shape == (2,)
    finally:
        ivy.unset_backend()


def test_unsupported_ivy_backend_is_named(ivy, monkeypatch):
    env = gradgym.make("Pendulum", backend="ivy")
    # paddle is one of ivy's backends that gradgym does not compute on (and is not installed)
    monkeypatch.setattr(ivy, "current_backend_str", lambda: "paddle")
    with pytest.raises(ValueError, match=r"ivy's backend is 'paddle'.*one of numpy, jax, torch"):
        env.reset(0, batch=1)


def test_bad_dtype_and_batch(ivy):
    with pytest.raises(ValueError, match="unknown dtype 'float16'; available: float32, float64"):
        gradgym.make("Pendulum", backend="ivy", dtype="float16")
    with pytest.raises(ValueError, match="batch must be a positive int"):
        gradgym.make("Pendulum", backend="ivy").reset(0, batch=0)


def test_wrappers_point_to_the_native_env(ivy):
    from gradgym.envs import TimeLimit, VecEnv

    env = gradgym.make("Pendulum", backend="ivy")
    for wrap in (TimeLimit, lambda e: VecEnv(e, num_envs=2)):
        with pytest.raises(TypeError, match=r"TimeLimit\(env.native_env\(\)\)"):
            wrap(env)
    limited = TimeLimit(env.native_env(), max_steps=3)
    assert limited.spec.horizon == 3
