"""Rollouts written once for every backend.

A rollout is a scan of :func:`transition` over the horizon; the scan itself and gradient
stopping come from the backend module (``ops``: ``_numpy``, ``_jax`` or ``_torch``), so
the same code is a ``lax.scan`` under ``jax.jit`` and a Python loop under torch autograd.

Start states, logits and policy weights are drawn on the host with numpy from the run's
seed and then moved to the env's backend, so every backend starts from the same numbers
and runs can be compared across backends value by value.
"""

from __future__ import annotations

import functools
import importlib
from collections.abc import Callable
from types import ModuleType
from typing import Any

import numpy as np

from gradgym.envs.backends import ARRAY_BACKENDS, AUTODIFF_BACKENDS, get_backend
from gradgym.envs.core import Env

# act(params, obs, x) -> action [B, act_dim]; ``x`` is the scanned input of this step.
Act = Callable[[Any, Any, Any], Any]

def backend_ops(env: Any, pipeline: str, gradient: bool) -> ModuleType:
    """The per-backend module (``_numpy``, ``_jax``, ``_torch``) that runs ``env``.

    Raises:
        ValueError: the env's backend cannot run this pipeline (numpy has no autodiff;
            ivy envs are an interop boundary, not a pipeline backend).
    """
    backend = getattr(getattr(env, "spec", None), "backend", None)
    allowed = AUTODIFF_BACKENDS if gradient else ARRAY_BACKENDS
    if not isinstance(env, Env) or backend not in ARRAY_BACKENDS:
        raise ValueError(
            f"the {pipeline} pipeline runs on envs made with backend "
            f"{', '.join(repr(b) for b in allowed)}; got {env!r}. Make the env with "
            f"gradgym.make(name, backend={allowed[0]!r})."
        )
    if gradient and backend not in AUTODIFF_BACKENDS:
        raise ValueError(
            f"the {pipeline} pipeline needs gradients, which the {backend!r} backend does not "
            f"have; use backend 'jax' or 'torch', or the zeroth-order pipeline 'cem', which "
            f"runs on numpy"
        )
    return importlib.import_module(f"gradgym.pipelines._{backend}")


# ---------------------------------------------------------------------- host randomness


def host_rng(seed: int, stream: int) -> np.random.Generator:
    """An independent numpy generator for one purpose (``stream``) of a run's ``seed``."""
    return np.random.default_rng((int(seed), stream))


def start_states(env: Env, rng: Any, batch: int) -> Any:
    """``batch`` start states drawn on numpy (``env.reset`` of a numpy twin), on ``env``'s backend.

    ``rng`` is an int seed or a ``numpy.random.Generator``; seed ``s`` gives the same start
    states on every backend (those of ``make(name, backend='numpy').reset(s, batch)``).
    """
    return env.as_state(_host_start_states(env, rng, batch))


def _host_start_states(env: Env, rng: Any, batch: int) -> Any:
    """:func:`start_states` as numpy arrays."""
    twin = Env(env.task, get_backend("numpy", env.spec.dtype))
    return twin.reset(rng, batch=batch)


def host_uniform(env: Env, rng: np.random.Generator, shape: tuple[int, ...], scale: float) -> Any:
    """U(-scale, scale) samples drawn on numpy, as an array of ``env``'s backend and dtype."""
    return env.backend.asarray(rng.uniform(-scale, scale, size=shape))


def generators_each(backend: Any, seeds: list[int]) -> list[Any]:
    """One sampling generator per pack member, each that of its lone run (numpy, torch)."""
    return [backend.generator(seed) for seed in seeds]


def normal_each(backend: Any, rngs: list[Any], shape: tuple[int, ...]) -> Any:
    """``[M, *shape]`` standard normal samples, member ``m``'s from its own generator."""
    return backend.xp.stack([backend.normal(rng, shape) for rng in rngs])


def split_each(backend: Any, rngs: list[Any]) -> tuple[list[Any], list[Any]]:
    """``(next generators, keys)``: each member's ``backend.split(rng, 2)``, as a lone run
    splits its generator once per iteration (numpy and torch generators)."""
    pairs = [backend.split(rng, 2) for rng in rngs]
    return [pair[0] for pair in pairs], [pair[1] for pair in pairs]


# ---------------------------------------------------------------------- trees


def tree_map(fn: Callable[[Any], Any], tree: Any) -> Any:
    """Apply ``fn`` to every array of a tree of tuples, NamedTuples, lists and dicts."""
    if isinstance(tree, tuple) and hasattr(tree, "_fields"):
        return type(tree)(*(tree_map(fn, leaf) for leaf in tree))
    if isinstance(tree, (tuple, list)):
        return type(tree)(tree_map(fn, leaf) for leaf in tree)
    if isinstance(tree, dict):
        return {key: tree_map(fn, value) for key, value in tree.items()}
    return fn(tree)


def tree_leaves(tree: Any) -> list[Any]:
    """The arrays of a tree, in :func:`tree_map` order."""
    leaves: list[Any] = []
    tree_map(leaves.append, tree)
    return leaves


def first_of_batch(tree: Any) -> Any:
    """The first element of a batched tree, kept as a batch of one."""
    return tree_map(lambda leaf: leaf[0:1], tree)


def stack_trees(xp: Any, trees: list[Any]) -> Any:
    """Trees of the same structure stacked leaf by leaf along a new leading (member) axis."""
    columns = [xp.stack(list(column)) for column in zip(*(tree_leaves(t) for t in trees))]
    counter = iter(range(len(columns)))
    return tree_map(lambda leaf: columns[next(counter)], trees[0])


def member_of(tree: Any, index: int) -> Any:
    """Member ``index`` of a tree whose leaves have a leading member axis."""
    return tree_map(lambda leaf: leaf[index], tree)


def fold_members(xp: Any, tree: Any) -> Any:
    """Fold the member axis into the batch axis: leaves ``[M, B, ...]`` -> ``[M * B, ...]``.

    Members are independent rows of one bigger batch, so a pack steps its env once per
    time step (and MuJoCo's bridge sees one batch) instead of once per member.
    """

    def fold(leaf: Any) -> Any:
        return xp.reshape(leaf, (leaf.shape[0] * leaf.shape[1],) + tuple(leaf.shape[2:]))

    return tree_map(fold, tree)


def member_states(env: Env, seeds: list[Any], batch: int) -> Any:
    """Each member's :func:`start_states` (from its own seed or generator), ``[M, B, ...]``.

    Stacked on the host, so that the device receives one array per state field (drawn
    every iteration by the policy pipeline: per-array transfers and stacks showed there)."""
    return env.as_state(stack_trees(np, [_host_start_states(env, seed, batch) for seed in seeds]))


# ---------------------------------------------------------------------- rollouts


def initial_carry(env: Env, start: Any) -> tuple[Any, Any]:
    """``(state, obs)`` at the start of a rollout."""
    return start, env.observe(start)


def transition(
    env: Env, act: Act, params: Any, carry: tuple[Any, Any], x: Any
) -> tuple[tuple[Any, Any], tuple[Any, Any]]:
    """One step of a rollout: ``((state, obs), (reward, done))``."""
    state, obs = carry
    state, obs, reward, done = env.step(state, act(params, obs, x))
    return (state, obs), (reward, done)


def rollout_returns(
    ops: ModuleType,
    step: Callable,
    params: Any,
    carry: Any,
    xs: Any,
    horizon: int,
    grad_horizon: int = 0,
) -> Any:
    """The return ``[B]`` of ``horizon`` steps of ``step`` (see :func:`masked_return`).

    ``xs`` are time-major per-step inputs (``[T, ...]``) or ``None``. With ``grad_horizon``
    (truncated back-propagation through time) the rollout is cut into windows of that many
    steps and no gradient flows from one window into the previous one.
    """
    window = grad_horizon if 0 < grad_horizon < horizon else horizon
    rewards, dones = [], []
    for begin in range(0, horizon, window):
        length = min(window, horizon - begin)
        if begin > 0:
            carry = ops.stop_gradient(carry)
        window_xs = None if xs is None else xs[begin : begin + length]
        carry, (window_rewards, window_dones) = ops.scan(step, params, carry, window_xs, length)
        rewards.append(window_rewards)
        dones.append(window_dones)
    xp = ops.xp
    if len(rewards) > 1:
        rewards, dones = [xp.concat(rewards, axis=0)], [xp.concat(dones, axis=0)]
    return masked_return(xp, rewards[0], dones[0])


def masked_return(xp: Any, rewards: Any, dones: Any) -> Any:
    """Sum over time (axis 0) of each trajectory's rewards up to its first ``done``.

    The reward of the step that terminates counts, nothing after it does. Done once per
    rollout rather than per step, with ``where`` (no host sync, no branching on values).
    """
    zeros = xp.zeros_like(rewards)
    ended = xp.where(dones, xp.ones_like(rewards), zeros)
    ended_before = xp.cumsum(ended, axis=0) - ended
    return xp.sum(xp.where(ended_before == 0, rewards, zeros), axis=0)


def member_losses(xp: Any, members: int, returns: Any) -> tuple[Any, Any]:
    """``(losses [M], returns [M, B])`` of the folded returns ``[M * B]`` of a pack."""
    returns = xp.reshape(returns, (members, -1))
    return -xp.mean(returns, axis=1), returns


@functools.cache
def rollout_losses(xp: Any, members: int) -> Callable[[Any, Any], tuple[Any, Any]]:
    """``reduce(end carry, (rewards, dones)) -> (losses [M], returns [M, B])`` of a pack's
    rollout; one function per array module and pack size (it keys compiled code)."""

    def reduce(end_carry: Any, outputs: tuple[Any, Any]) -> tuple[Any, Any]:
        return member_losses(xp, members, masked_return(xp, *outputs))

    return reduce


def pack_value_and_grad(
    env: Env, xp: Any, step: Any, horizon: int, params: Any, start: Any, xs: Any
) -> tuple[tuple[Any, Any], tuple[Any, Any, Any]]:
    """``((losses [M], returns [M, B]), (params, carry, xs) gradients)`` of a pack's rollout
    from its start states ``[M, B, ...]`` (folded into one batch), in one call of a compiled
    loop's ``value_and_grad``: the fused path of the pipelines' losses."""
    members = tree_leaves(start)[0].shape[0]
    carry = initial_carry(env, fold_members(xp, start))
    return step.value_and_grad(params, carry, xs, horizon, rollout_losses(xp, members))


def loop_scan(
    stack: Callable[[list], Any], step: Callable, params: Any, carry: Any, xs: Any, length: int
) -> tuple[Any, Any]:
    """``lax.scan`` semantics as a Python loop (numpy, torch): outputs stacked on axis 0.

    ``step`` returns one array or a tuple of arrays per step; each is stacked.
    """
    outputs = []
    for t in range(length):
        carry, output = step(params, carry, None if xs is None else xs[t])
        outputs.append(output)
    if isinstance(outputs[0], tuple):
        return carry, tuple(stack(list(column)) for column in zip(*outputs))
    return carry, stack(outputs)


def record_frames(
    ops: ModuleType, env: Env, act: Act, params: Any, start: Any, xs: Any, horizon: int
) -> list[np.ndarray]:
    """Rendered frames of the first trajectory of the batch: the start state and every step.

    Runs once per video, eagerly and without gradients; host syncs are fine here.
    """
    carry = initial_carry(env, first_of_batch(start))
    xs = None if xs is None else xs[:, 0:1]
    frames = [env.render(carry[0], index=0)]
    with ops.no_grad():
        for t in range(horizon):
            carry, _ = transition(env, act, params, carry, None if xs is None else xs[t])
            frames.append(env.render(carry[0], index=0))
    return frames
