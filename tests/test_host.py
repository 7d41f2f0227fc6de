"""The host path's namespace (gradgym.envs.host.HOST_XP) against plain numpy: the same values
and types for the inputs its fast paths take, and for the ones they leave to numpy."""

import gymnasium
import numpy as np
import pytest

import gradgym
from gradgym.envs.backends import get_backend
from gradgym.envs.host import HOST_BACKEND, HOST_XP
from gradgym.envs.mujoco import TASKS
from gradgym.envs.mujoco.base import HostMujocoState, MujocoState, all_finite, indicator, per_state

NUMPY_BACKEND = get_backend("numpy")

VECTORS = [np.array([True, True, True]), np.array([True, False, True]), np.array([], bool),
           np.array([False])]


@pytest.mark.parametrize("x", VECTORS, ids=str)
@pytest.mark.parametrize("axis", [None, 0, -1])
def test_all_of_a_bool_vector_is_numpys(x, axis):
    result = HOST_XP.all(x, axis=axis)
    assert type(result) is np.bool_ and result == np.all(x, axis=axis)


def test_all_leaves_matrices_and_other_dtypes_to_numpy():
    matrix = np.array([[True, False], [True, True]])
    np.testing.assert_array_equal(HOST_XP.all(matrix, axis=-1), np.all(matrix, axis=-1))
    floats = np.array([1.0, np.nan, 0.0])
    assert HOST_XP.all(floats) == np.all(floats) and HOST_XP.all(floats[:2]) == np.all(floats[:2])


@pytest.mark.parametrize("x", [np.True_, np.False_, True, False, np.array([True, False])], ids=repr)
def test_logical_not_is_numpys(x):
    result = HOST_XP.logical_not(x)
    np.testing.assert_array_equal(result, np.logical_not(x))
    assert type(result) is (bool if type(x) is bool else type(np.logical_not(x)))


def test_reshape_is_numpys_and_keeps_views():
    x = np.arange(12.0)
    reshaped = HOST_XP.reshape(x, (3, 4))
    np.testing.assert_array_equal(reshaped, np.reshape(x, (3, 4)))
    assert np.shares_memory(reshaped, x)
    copied = HOST_XP.reshape(x, (4, 3), copy=True)
    np.testing.assert_array_equal(copied, np.reshape(x, (4, 3)))
    assert not np.shares_memory(copied, x)


FINITE_CASES = [np.array([0.5, -2.0, 3.0]), np.array([1e300, -1e300, 1e300]), np.array([0.0, np.nan]),
                np.array([np.inf, 1.0]), np.array([-np.inf]), np.array([])]


@pytest.mark.parametrize("x", FINITE_CASES, ids=str)
def test_all_finite_of_one_env_is_numpys(x):
    # huge finite entries must not overflow into "not finite"
    assert all_finite(HOST_XP, x) == np.all(np.isfinite(x))


def test_all_finite_of_a_batch_is_per_row():
    batch = np.array([[0.0, 1.0], [np.nan, 1.0], [1e308, -1e308]])
    np.testing.assert_array_equal(all_finite(np, batch), [True, False, True])


def test_per_state_memoizes_on_host_states_only():
    calls = []

    class Task:
        @per_state
        def twice(self, xp, state):
            calls.append(state)
            return state.qpos * 2

    leaves = (np.ones(2), np.ones(2), np.zeros(1), np.float64(0.0), np.empty(0), None)
    task, host = Task(), HostMujocoState.of(*leaves)
    assert task.twice(HOST_XP, host) is task.twice(HOST_XP, host)
    assert len(calls) == 1
    task.twice(HOST_XP, HostMujocoState.of(*leaves))  # another state: computed again
    functional = MujocoState(*leaves)
    task.twice(np, functional)
    task.twice(np, functional)
    assert len(calls) == 4 and not hasattr(functional, "__dict__")


@pytest.mark.parametrize("x", [np.array([-15.0, 3.0, 12.0, np.nan]), np.array([-15.0, 12.0], np.float32),
                               np.float64(12.5), np.float64(-0.5)], ids=repr)
def test_clip_is_numpys(x):
    result = HOST_XP.clip(x, -10.0, 10.0)
    np.testing.assert_array_equal(result, np.clip(x, -10.0, 10.0))
    assert type(result) is type(np.clip(x, -10.0, 10.0)) and result.dtype == np.clip(x, -10.0, 10.0).dtype


@pytest.mark.parametrize("condition", [np.True_, np.False_])
def test_indicator_of_one_env_is_numpys(condition):
    like = np.float64(0.3)
    result = indicator(HOST_XP, condition, like)
    expected = np.where(condition, np.ones_like(like), np.zeros_like(like))
    assert result == expected and type(result) is np.float64


@pytest.mark.parametrize("task_class", TASKS, ids=lambda task_class: task_class.name)
def test_step_outputs_are_observe_reward_terms_and_terminated(task_class):
    # The Gymnasium env's step asks a task for the three together (the pendulums share work
    # between them): the same values as asking one by one, fallen and non-finite states
    # included.
    env = gymnasium.make(f"gradgym/{task_class.name}").unwrapped
    env.reset(seed=3)
    rng = np.random.default_rng(3)
    states = []
    for _ in range(40):
        env.step(env.action_space.sample() * 2.0 + rng.normal(size=env.action_space.shape))
        states.append(env._state)
    nan_state = states[-1]._replace(qvel=np.full_like(states[-1].qvel, np.nan))
    states.append(HostMujocoState.of(*nan_state))
    task = env.task
    for state in states:
        obs, terms, terminated = task.step_outputs(HOST_BACKEND, HostMujocoState.of(*state))
        np.testing.assert_array_equal(obs, task.observe(np, MujocoState(*state)))
        expected = task.reward_terms(np, MujocoState(*state))
        assert terms.keys() == expected.keys()
        for key, value in expected.items():
            np.testing.assert_array_equal(terms[key], value)
        assert bool(terminated) == bool(task.terminated(NUMPY_BACKEND, MujocoState(*state)))
    if task_class.name == "InvertedPendulum-v5":  # the fused one: both outcomes were seen
        outcomes = {bool(task.step_outputs(HOST_BACKEND, state)[2]) for state in states}
        assert outcomes == {True, False}


def test_balancing_tasks_hold_zero_x_velocity_in_the_functional_state():
    # InvertedPendulum's reward never reads x_velocity: the step leaves it 0, as the host does
    env = gradgym.make("InvertedPendulum-v5", backend="numpy")
    state = env.reset(0, 2)
    next_state = env.step(state, np.full((2, 1), 0.5, np.float32))[0]
    np.testing.assert_array_equal(next_state.x_velocity, np.zeros(2))
    assert np.all(next_state.qpos[:, 0] != state.qpos[:, 0])  # the carts moved
