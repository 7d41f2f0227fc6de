"""The single-env host path: the tasks' Array API code run on one env's unbatched state.

The Gymnasium ids step one env at a time on the host. They run the same task code as the
functional envs, on numpy, but on an unbatched state (leaves without the batch axis), so
that per-env quantities are numpy scalars, and with :data:`HOST_XP`: numpy with the
functions the tasks use made cheap on scalars and short vectors. numpy's Python-level
wrappers (``np.clip``, ``np.sum``, ``np.where``, ``np.stack``) and its ufuncs on scalars
cost about a microsecond each, several times a step; here they cost tens of nanoseconds
where the input allows. Results are bit-identical to numpy's.
"""

from __future__ import annotations

import itertools
import math
import types
from typing import Any

import numpy as np

# one env's per-env reward terms are numpy float64 scalars: these, shared, not made per step
FLOAT64_ONE, FLOAT64_ZERO = np.float64(1.0), np.float64(0.0)


def _where(condition: Any, x: Any, y: Any) -> Any:
    if isinstance(condition, (bool, np.bool_)):  # one env: a scalar choice, no array op
        return x if condition else y
    return np.where(condition, x, y)


def _like(fill: int) -> Any:
    constant = FLOAT64_ONE if fill else FLOAT64_ZERO

    def like(x: Any) -> Any:
        if type(x) is np.float64:  # the common case: a per-env reward term
            return constant
        if np.ndim(x) == 0:  # a scalar of x's dtype (numpy scalars and 0-d arrays)
            return x.dtype.type(fill)
        return np.full_like(x, fill)
    return like


def _on_floats(scalar: Any, array: Any) -> Any:
    """``scalar`` on a float (numpy's float64 is one), ``array`` on anything else."""
    def function(x: Any) -> Any:
        return scalar(x) if isinstance(x, float) else array(x)
    return function


def _logical_not(a: Any) -> Any:
    if type(a) is np.bool_:  # one env's flag: numpy's ~ on a scalar costs about a microsecond
        return np.False_ if a else np.True_
    return (not a) if isinstance(a, bool) else ~a


def _all(x: Any, axis: Any = None) -> Any:
    # One env's vector of checks: counting its true entries is one cheap C call, where
    # numpy's reduction machinery costs microseconds (on the same truth values).
    if type(x) is np.ndarray and x.ndim == 1 and x.dtype.kind == "b" and axis in (None, 0, -1):
        return np.True_ if np.count_nonzero(x) == x.size else np.False_
    return np.logical_and.reduce(x, axis=axis)


def _stack(arrays: Any, axis: int = 0) -> Any:
    # numpy scalars (one env's per-env quantities) stack into a vector in one C call
    if axis in (0, -1) and all(map(isinstance, arrays, itertools.repeat(np.generic))):
        return np.array(arrays)
    return np.stack(arrays, axis=axis)


def _clip_by_min_max(x: Any, low: Any, high: Any) -> Any:
    return np.minimum(np.maximum(x, low), high)


# The ufunc np.clip ends in, without its Python-level argument handling (about 0.7 µs of a
# 1.5 µs call on a short vector); numpy keeps it in a private module, hence the fallback.
_clip = getattr(getattr(getattr(np, "_core", None), "umath", None), "clip", _clip_by_min_max)


def unbatched(state: Any) -> Any:
    """The only member of a batch of one (a state NamedTuple of numpy leaves ``[1, ...]``)."""
    return type(state)(*(leaf[0] for leaf in state))


def batch_of_one(state: Any) -> Any:
    """An unbatched state as a batch of one (leaves ``[1, ...]``): what the functional env takes."""
    return type(state)(*(np.asarray(leaf)[None] for leaf in state))


def as_scalar(value: Any) -> Any:
    """A 0-d array as its numpy scalar (what Gymnasium returns); anything else as is."""
    return value[()] if type(value) is np.ndarray and value.ndim == 0 else value


HOST_XP = types.SimpleNamespace(**{name: getattr(np, name) for name in dir(np) if not name.startswith("_")})
"""The Array API namespace of the host path (see the module docstring)."""
HOST_XP.__dict__.update(
    logical_and=lambda a, b: a & b,
    logical_or=lambda a, b: a | b,
    logical_not=_logical_not,
    where=_where,
    ones_like=_like(1),
    zeros_like=_like(0),
    abs=abs,
    isfinite=_on_floats(math.isfinite, np.isfinite),
    clip=_clip,
    sum=lambda x, axis=None: np.add.reduce(x, axis=axis),
    prod=lambda x, axis=None: np.multiply.reduce(x, axis=axis),
    all=_all,
    concat=lambda arrays, axis=0: np.concatenate(arrays, axis=axis),
    stack=_stack,
    # the method, not np.reshape's Python wrapper (several a step on the readouts)
    reshape=lambda x, shape, copy=None: x.reshape(shape) if copy is None else np.reshape(x, shape, copy=copy),
)

HOST_BACKEND = types.SimpleNamespace(
    xp=HOST_XP, falses=lambda shape: np.False_ if shape == () else np.zeros(shape, dtype=bool))
"""What ``Task.terminated`` reads of a backend, on the host path."""
