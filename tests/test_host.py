"""The host path's namespace (gradgym.envs.host.HOST_XP) against plain numpy: the same values
and types for the inputs its fast paths take, and for the ones they leave to numpy."""

import numpy as np
import pytest

from gradgym.envs.host import HOST_XP
from gradgym.envs.mujoco.base import HostMujocoState, MujocoState, all_finite, per_state

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
