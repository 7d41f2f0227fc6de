"""The environment contract: tasks (pure dynamics), ``Env`` (a task bound to a backend),
the registry and ``make``.

A *task* is a frozen dataclass whose fields are the task's parameters (physical constants
and constructor arguments such as ``num_joints``) and whose methods are pure functions of
an array namespace ``xp`` and a batched state NamedTuple. An :class:`Env` binds a task to
one backend and dtype and offers the user-facing, batched, differentiable functions::

    env = gradgym.make("Pendulum", backend="jax")
    state = env.reset(rng, batch=1024)
    state, obs, reward, done = env.step(state, action)

Nothing here converts to numpy, calls ``.item()`` or branches on array values in the step
path, so ``jax.jit``/``vmap``/``grad``/``lax.scan`` and torch autograd pass through.
"""

from __future__ import annotations

import dataclasses
import difflib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np

from gradgym.envs.backends import BACKENDS, Backend, get_backend, to_numpy


@dataclass(frozen=True)
class EnvSpec:
    """Static facts about an environment (independent of batch and backend)."""

    name: str
    obs_dim: int
    act_dim: int
    dt: float
    horizon: int  # the default episode length (TimeLimit)
    backend: str
    dtype: str


class Task:
    """Base class of the pure task definitions (subclasses are frozen dataclasses).

    Subclasses set ``name``, ``dt``, ``horizon`` and ``State`` and implement
    ``reset_state``, ``dynamics``, ``observe`` and ``reward``. Rewards are smooth functions
    of the state so that they can be differentiated; ``terminated`` defaults to never.
    """

    name: ClassVar[str]
    dt: ClassVar[float]
    horizon: ClassVar[int] = 100
    State: ClassVar[type]
    # Whether the task's code also runs on one env's unbatched state (leaves without the
    # batch axis; per-env values read with `component`): the Gymnasium adapter then steps
    # it on the cheap host path (gradgym.envs.host) instead of as a batch of one.
    runs_unbatched: ClassVar[bool] = False

    def validate(self) -> None:
        """Raise ``ValueError`` for parameters outside their allowed range."""

    @property
    def obs_dim(self) -> int:
        raise NotImplementedError

    @property
    def act_dim(self) -> int:
        raise NotImplementedError

    def reset_state(self, backend: Backend, rng: Any, batch: int) -> Any:
        """A batch of start states drawn from the task's reset distribution."""
        raise NotImplementedError

    def dynamics(self, xp: Any, state: Any, action: Any) -> Any:
        """The next state (explicit Euler: velocities first, then positions)."""
        raise NotImplementedError

    def observe(self, xp: Any, state: Any) -> Any:
        """The observation ``[..., obs_dim]`` of a state."""
        raise NotImplementedError

    def reward(self, xp: Any, state: Any) -> Any:
        """The reward ``[...]`` of a state, smooth in the state."""
        raise NotImplementedError

    def batch_shape(self, state: Any) -> tuple[int, ...]:
        """The batch shape of a state (leaves may carry trailing per-env dimensions)."""
        return tuple(state[0].shape)

    def terminated(self, backend: Backend, state: Any) -> Any:
        """Which states end their episode; the classic tasks never terminate."""
        return backend.falses(self.batch_shape(state))

    def make_renderer(self, size: int | None = None) -> Renderer:
        """A renderer that draws states of this task (created once per env and size).

        Args:
            size: frame width in pixels (the height keeps the task's aspect ratio); ``None``:
                the task's own frame size.
        """
        raise NotImplementedError


def component(x: Any, index: int) -> Any:
    """``x[..., index]``. On one env's unbatched vector (the Gymnasium ids' host path,
    :mod:`gradgym.envs.host`) a numpy scalar rather than a 0-d array: the arithmetic that
    follows runs about ten times faster on scalars. The same values on every backend."""
    return x[index] if x.ndim == 1 else x[..., index]


class Renderer:
    """Draws one state of a task into an RGB frame; subclasses reuse their artists."""

    def draw(self, state: Any, reward: float) -> np.ndarray:
        """``H x W x 3`` uint8 frame of a single (unbatched, numpy) state."""
        raise NotImplementedError


class Env:
    """A task bound to a backend and dtype: batched, pure, differentiable functions.

    The object is immutable; every method is a pure function of its arguments, so bound
    methods can be passed to ``jax.jit``, ``jax.vmap`` and ``jax.lax.scan`` directly.
    """

    def __init__(self, task: Task, backend: Backend):
        self.task = task
        self.backend = backend
        self.xp = backend.xp
        self.State = task.State
        self.spec = EnvSpec(
            name=task.name,
            obs_dim=task.obs_dim,
            act_dim=task.act_dim,
            dt=task.dt,
            horizon=task.horizon,
            backend=backend.name,
            dtype=backend.dtype_name,
        )
        self._renderers: dict[int | None, Renderer] = {}  # by frame size

    def __repr__(self) -> str:
        return f"Env({self.task!r}, backend={self.backend.name!r}, dtype={self.spec.dtype!r})"

    # ------------------------------------------------------------------ functional
    def reset(self, rng: Any, batch: int = 1) -> Any:
        """``batch`` start states; ``rng`` is an int seed or a native key/generator."""
        if isinstance(batch, bool) or not isinstance(batch, (int, np.integer)) or batch < 1:
            raise ValueError(f"batch must be a positive int, got {batch!r}")
        return self.task.reset_state(self.backend, rng, int(batch))

    def step(self, state: Any, action: Any) -> tuple[Any, Any, Any, Any]:
        """Advance every state by one step.

        Args:
            state: a batched state (``env.State``) of this env's backend.
            action: ``[B, act_dim]`` array in [-1, 1] of this env's dtype.

        Returns:
            ``(next_state, obs, reward, done)``; reward and done are ``[B]``, the reward
            is that of the next state.
        """
        self._check_action(state, action)
        task, xp = self.task, self.xp
        next_state = task.dynamics(xp, state, action)
        return (
            next_state,
            task.observe(xp, next_state),
            task.reward(xp, next_state),
            task.terminated(self.backend, next_state),
        )

    def observe(self, state: Any) -> Any:
        """The observation ``[B, obs_dim]`` of a state."""
        return self.task.observe(self.xp, state)

    def reward(self, state: Any) -> Any:
        """The reward ``[B]`` of a state."""
        return self.task.reward(self.xp, state)

    # ------------------------------------------------------------------ utilities
    def as_state(self, state: Any) -> Any:
        """Convert a state whose leaves are arrays of any backend to this env's arrays."""
        if not isinstance(state, tuple) or not hasattr(state, "_fields"):
            raise TypeError(f"expected a {self.State.__name__} NamedTuple, got {type(state).__name__}")
        fields = state._asdict()
        missing = set(self.State._fields) - set(fields)
        if missing:
            raise ValueError(
                f"state lacks fields {sorted(missing)}; {self.State.__name__} has {list(self.State._fields)}"
            )
        return self.State(**{k: self.backend.asarray(fields[k]) for k in self.State._fields})

    def state_from_qpos_qvel(self, qpos: Any, qvel: Any) -> Any:
        """A state at MuJoCo generalized positions ``qpos [B, nq]`` and velocities
        ``qvel [B, nv]`` (arrays of any backend); MuJoCo tasks only."""
        build = getattr(self.task, "state_from_qpos_qvel", None)
        if build is None:
            raise TypeError(
                f"{self.spec.name} has no MuJoCo qpos/qvel: state_from_qpos_qvel builds "
                "states of the MuJoCo family only"
            )
        return build(self.backend, qpos, qvel)

    def render(self, state: Any, index: int = 0, size: int | None = None) -> np.ndarray:
        """An ``H x W x 3`` uint8 frame of state ``index`` of the batch, colored by reward.

        Args:
            size: frame width in pixels, >= 16 (the same scene, scaled; the height keeps the
                task's aspect ratio); ``None``: the task's own size (256 for the classic tasks,
                ``width`` x ``height`` for MuJoCo's).
        """
        if size is not None and (isinstance(size, bool) or not isinstance(size, int) or size < 16):
            raise ValueError(f"frame size must be an int >= 16 pixels or None, got {size!r}")
        batch = self.task.batch_shape(state)
        members = batch[0] if batch else 1
        if not -members <= index < members:
            raise IndexError(f"index {index} is out of range for a batch of {members}")
        single = type(state)(*(to_numpy(leaf)[index] if batch else to_numpy(leaf) for leaf in state))
        reward = float(to_numpy(self.task.reward(np, _numpy_state(self.task, single))))
        renderer = self._renderers.get(size)
        if renderer is None:
            renderer = self._renderers[size] = self.task.make_renderer(size)
        return renderer.draw(single, reward)

    def _check_action(self, state: Any, action: Any) -> None:
        # Shapes and dtypes are static (also under jit tracing): checking them costs no
        # host sync. Values (NaN, bounds) are checked by the Gymnasium adapter only.
        shape = getattr(action, "shape", None)
        if shape is None:
            raise TypeError(
                f"action must be a {self.backend.name} array of shape [B, {self.spec.act_dim}], "
                f"got {type(action).__name__}"
            )
        expected = self.task.batch_shape(state) + (self.spec.act_dim,)
        if tuple(shape) != expected:
            raise ValueError(
                f"{self.spec.name}: action has shape {tuple(shape)}, expected {expected} "
                f"([batch, act_dim] with act_dim={self.spec.act_dim})"
            )
        dtype = getattr(action, "dtype", None)
        if dtype != self.backend.dtype:
            raise TypeError(
                f"{self.spec.name}: action dtype {_dtype_name(dtype)} does not match the env dtype "
                f"{self.spec.dtype}; cast the action or make the env with dtype={_dtype_name(dtype)!r}"
            )


def _dtype_name(dtype: Any) -> str:
    return str(dtype).rsplit(".", 1)[-1]


def _numpy_state(task: Task, state: Any) -> Any:
    return task.State(*(np.asarray(leaf) for leaf in state))


# ---------------------------------------------------------------------- registry

@dataclass(frozen=True)
class EnvEntry:
    """A registered environment: how to build its task and which backends run it."""

    name: str
    factory: Callable[..., Task]
    backends: tuple[str, ...] = BACKENDS
    family: str = "classic"


_REGISTRY: dict[str, EnvEntry] = {}


def register(name: str, factory: Callable[..., Task], *, backends: tuple[str, ...] = BACKENDS,
             family: str = "classic") -> None:
    """Register a task factory under ``name`` (used by ``make`` and ``gradgym envs``)."""
    _REGISTRY[name] = EnvEntry(name, factory, backends, family)


def registered() -> dict[str, EnvEntry]:
    """The registered environments, by name."""
    return dict(_REGISTRY)


def task_arguments(factory: Callable[..., Task]) -> list[str]:
    """The constructor arguments of a task class (its dataclass fields)."""
    if dataclasses.is_dataclass(factory):
        return [f.name for f in dataclasses.fields(factory) if f.init]
    return []


def make(name: str, backend: str = "numpy", dtype: str = "float32", **task_kwargs: Any) -> Any:
    """Build environment ``name`` on ``backend`` with floating ``dtype``.

    Args:
        name: a registered env (``gradgym envs`` lists them).
        backend: ``"numpy"``, ``"jax"``, ``"torch"`` or ``"ivy"``.
        dtype: ``"float32"`` (default) or ``"float64"``.
        **task_kwargs: task arguments, e.g. ``num_joints=3`` for Reacher.

    Raises:
        ValueError: unknown env, backend, dtype or task argument (the message lists what is
            available), or a task argument out of range.
    """
    entry = _REGISTRY.get(name)
    if entry is None:
        close = difflib.get_close_matches(name, _REGISTRY, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ValueError(f"unknown env {name!r}{hint}; available: {', '.join(sorted(_REGISTRY))}")
    if backend not in entry.backends:
        raise ValueError(
            f"unknown backend {backend!r} for {name}; available: {', '.join(entry.backends)}"
        )
    allowed = task_arguments(entry.factory)
    unknown = sorted(set(task_kwargs) - set(allowed))
    if unknown:
        raise ValueError(
            f"unknown argument(s) {unknown} for {name}; available: {', '.join(allowed) or 'none'}"
        )
    task = entry.factory(**task_kwargs)
    task.validate()
    if backend == "ivy":
        from gradgym.envs.ivy_interop import IvyEnv

        return IvyEnv(task, dtype)
    return Env(task, get_backend(backend, dtype))
