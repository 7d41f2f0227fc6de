"""The host path's namespace (gradgym.envs.host.HOST_XP) against plain numpy: the same values
and types for the inputs its fast paths take, and for the ones they leave to numpy."""

import numpy as np
import pytest

from gradgym.envs.host import HOST_XP

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
