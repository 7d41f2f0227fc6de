"""numpy side of the pipelines: Python-loop rollouts, no gradients (zeroth-order only)."""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable
from typing import Any

import numpy as np

from gradgym.pipelines._rollout import generators_each, loop_scan, normal_each, split_each

xp = np
no_grad = contextlib.nullcontext
scan = functools.partial(loop_scan, np.stack)


def stop_gradient(tree: Any) -> Any:
    """numpy has no gradients: the tree as is."""
    return tree


def compile_step(step: Callable, cfg: Any, env_name: str) -> Callable:
    """The per-step function as is."""
    return step


def compile_function(fn: Callable, *example_args: Any) -> tuple[Callable, float]:
    """``fn`` as is and no compile time."""
    return fn, 0.0


def top_k_indices(values: np.ndarray, k: int) -> np.ndarray:
    """Indices of the ``k`` largest entries along the last axis (in no particular order)."""
    return np.argpartition(values, values.shape[-1] - k, axis=-1)[..., values.shape[-1] - k :]


def take_along_axis(values: np.ndarray, indices: np.ndarray, axis: int) -> np.ndarray:
    """``numpy.take_along_axis`` (indices broadcast)."""
    return np.take_along_axis(values, indices, axis=axis)


# Per member: its own generator, as in its lone run.
member_generators = generators_each
split_members = split_each
member_normal = normal_each
