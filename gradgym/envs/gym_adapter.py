"""Gymnasium adapter: every registered gradgym env as a ``gymnasium.Env``.

``import gradgym`` registers each env as ``gradgym/<Name>-v0`` (an env whose name already
carries a version, such as ``HalfCheetah-v5``, keeps it: ``gradgym/HalfCheetah-v5``; a
task may name its id otherwise: the classic fish ``Swimmer`` is ``gradgym/Fish-v0``, as
``Swimmer`` is MuJoCo's ``Swimmer-v5`` in Gymnasium), with ``max_episode_steps`` set to
the env's horizon::

    import gymnasium as gym
    import gradgym  # noqa: F401  (registers the envs)

    env = gym.make("gradgym/Reacher-v0", num_joints=3, render_mode="rgb_array")

Without an explicit import, the ``module:id`` form of the id imports gradgym first:
``gym.make("gradgym:gradgym/Reacher-v0")`` (handy in config files and command lines).

Two kinds of env stand behind the ids:

- the MuJoCo ids are drop-in replacements of Gymnasium's own ``<Task>-v5`` envs
  (:mod:`gradgym.envs.mujoco.gym_env`: same spaces, resets, steps, ``info`` and
  constructor arguments; ``max_episode_steps`` and ``reward_threshold`` of Gymnasium's id);
- the other ids (the classic family) are :class:`GymEnv`: one stateful env (batch 1) on
  the numpy backend with Gymnasium's conventions for wrappers and dtypes.

Both validate actions (shape, dtype, NaN/inf; bounds for the classic ids) before stepping
-- the functional core never inspects values, so that its step path needs no host sync.
"""

from __future__ import annotations

import functools
import re
from typing import Any, ClassVar, SupportsFloat

import gymnasium
import numpy as np
from gymnasium import spaces

from gradgym.envs.core import make, registered
from gradgym.envs.host import HOST_BACKEND, HOST_XP, batch_of_one, unbatched

NAMESPACE = "gradgym"
RENDER_MODES = ("rgb_array",)
_VERSIONED = re.compile(r"-v\d+$")
# How far past a bound a classic action may lie and still count as on it (then clipped):
# float32 rounding in wrappers such as RescaleAction lands a few ulps outside.
BOUND_TOLERANCE = 1e-6
_REAL_KINDS = frozenset("fiub")  # float, int, unsigned, bool: what a Box action casts from


class GymEnv(gymnasium.Env):
    """A gradgym env as a single ``gymnasium.Env`` (numpy backend, batch 1).

    Observation space: ``Box(-inf, inf, (obs_dim,), float32)``; action space:
    ``Box(-1, 1, (act_dim,), float32)``. Actions of any real dtype (float, int, bool) are
    accepted; values within :data:`BOUND_TOLERANCE` of the bounds are clipped onto them. ``terminated`` comes from the task (the classic
    tasks never terminate); truncation is left to Gymnasium's ``TimeLimit``, which
    ``gymnasium.make`` adds with ``max_episode_steps`` = the env's horizon.

    Args:
        name: a registered gradgym env (``gradgym envs`` lists them).
        render_mode: ``None`` or ``"rgb_array"``.
        dtype: the precision the dynamics run in (``"float32"`` or ``"float64"``);
            observations are float32 either way.
        **task_kwargs: task arguments, e.g. ``num_joints=3`` for Reacher.
    """

    metadata: ClassVar[dict[str, Any]] = {"render_modes": list(RENDER_MODES), "render_fps": 30}

    def __init__(self, name: str, render_mode: str | None = None, dtype: str = "float32",
                 **task_kwargs: Any):
        if render_mode is not None and render_mode not in RENDER_MODES:
            raise ValueError(
                f"render_mode {render_mode!r} is not supported; allowed: None, "
                + ", ".join(repr(mode) for mode in RENDER_MODES)
            )
        self._make_args = (name, dtype, dict(task_kwargs))
        self.env = make(name, backend="numpy", dtype=dtype, **task_kwargs)
        self.render_mode = render_mode
        spec = self.env.spec
        # Videos (e.g. Gymnasium's RecordVideo) play in real time at 1 / dt frames per second.
        self.metadata = {**self.metadata, "render_fps": max(1, round(1.0 / spec.dt))}  # type: ignore[misc]
        self.observation_space = spaces.Box(-np.inf, np.inf, (spec.obs_dim,), np.float32)
        self.action_space = spaces.Box(-1.0, 1.0, (spec.act_dim,), np.float32)
        self._dtype = self.env.backend.dtype
        self._unbatched = self.env.task.runs_unbatched
        self._state: Any = None

    def reset(self, *, seed: int | None = None,
              options: dict[str, Any] | None = None) -> tuple[np.ndarray, dict[str, Any]]:
        """Start an episode; ``seed`` reseeds :attr:`np_random` (Gymnasium's convention)."""
        super().reset(seed=seed)
        state = self.env.reset(self.np_random, batch=1)
        self._state = unbatched(state) if self._unbatched else state
        return self._observation(), {}

    def step(self, action: Any) -> tuple[np.ndarray, SupportsFloat, bool, bool, dict[str, Any]]:
        """Apply a validated ``[act_dim]`` action in [-1, 1]."""
        if self._state is None:
            raise RuntimeError(f"{self.env.spec.name}: step() called before reset()")
        action = self._validated(action)
        if self._unbatched:  # the task's code on one env's state, on the host path
            task = self.env.task
            state = self._state = task.dynamics(HOST_XP, self._state, action)
            obs, reward = task.observe(HOST_XP, state), task.reward(HOST_XP, state)
            terminated = task.terminated(HOST_BACKEND, state)
        else:  # a batch of one
            self._state, obs, reward, terminated = self.env.step(self._state, action[None, :])
            obs, reward, terminated = obs[0], reward[0], terminated[0]
        return np.asarray(obs, dtype=np.float32), float(reward), bool(terminated), False, {}

    def render(self) -> np.ndarray | None:
        """An ``H x W x 3`` uint8 frame when ``render_mode="rgb_array"``, else ``None``."""
        if self.render_mode is None:
            gymnasium.logger.warn(
                "render() called without a render_mode; make the env with "
                'render_mode="rgb_array" to get frames'
            )
            return None
        if self._state is None:
            raise RuntimeError(f"{self.env.spec.name}: render() called before reset()")
        state = self._state
        if self._unbatched:
            state = batch_of_one(state)
        return self.env.render(state, 0)

    def __getstate__(self) -> dict[str, Any]:
        # The functional env holds its array namespace (a module) and, once it has
        # rendered, a matplotlib canvas: it is rebuilt from its arguments instead.
        state = dict(self.__dict__)
        del state["env"]
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        name, dtype, task_kwargs = self._make_args
        self.env = make(name, backend="numpy", dtype=dtype, **task_kwargs)

    def _observation(self) -> np.ndarray:
        if self._unbatched:
            return np.asarray(self.env.task.observe(HOST_XP, self._state), dtype=np.float32)
        return np.asarray(self.env.observe(self._state)[0], dtype=np.float32)

    def _validated(self, action: Any) -> np.ndarray:
        """``action`` as a numpy array, or a clear error naming what is wrong."""
        name, act_dim = self.env.spec.name, self.env.spec.act_dim
        array = np.asarray(action)
        if array.dtype.kind not in _REAL_KINDS:
            raise TypeError(
                f"{name}: action dtype {array.dtype} is not allowed; use a real-number "
                f"(float, int or bool) array of shape ({act_dim},)"
            )
        if array.shape != (act_dim,):
            raise ValueError(
                f"{name}: action has shape {array.shape}, expected ({act_dim},) "
                f"(one env; act_dim={act_dim})"
            )
        array = array.astype(self._dtype)  # a copy: clipping below must not touch the caller's
        # The common path. One env's few entries compare faster as Python floats (exact
        # conversions) than through numpy's reductions; NaN compares false.
        if all(-1.0 <= value <= 1.0 for value in array.tolist()):
            return array
        if not np.isfinite(array).all():
            raise ValueError(f"{name}: action contains NaN or inf: {array.tolist()}")
        outside = np.abs(array) > 1.0 + BOUND_TOLERANCE
        if outside.any():
            raise ValueError(
                f"{name}: action values {array[outside].tolist()} at indices "
                f"{np.flatnonzero(outside).tolist()} are outside the allowed range [-1, 1]"
            )
        np.clip(array, -1.0, 1.0, out=array)
        return array


def gym_id(name: str) -> str:
    """The Gymnasium id of gradgym env ``name``: ``gradgym/<name>-v0`` or, when the name
    already ends in a version (``HalfCheetah-v5``), ``gradgym/<name>``. A task whose class
    sets ``gym_name`` is registered under that name instead (``Swimmer``: ``Fish``)."""
    entry = registered().get(name)
    name = getattr(entry.factory, "gym_name", name) if entry is not None else name
    return f"{NAMESPACE}/{name}" if _VERSIONED.search(name) else f"{NAMESPACE}/{name}-v0"


def register_gymnasium_envs() -> list[str]:
    """Register every gradgym env that runs on numpy with Gymnasium; returns the new ids.

    The MuJoCo family's ids are drop-in replacements of Gymnasium's own (same episode
    limit and reward threshold); the others wrap the functional env in :class:`GymEnv`.
    Idempotent: ids already in Gymnasium's registry are left as they are, so it can be
    called again after more envs are registered with gradgym.
    """
    added = []
    for name, entry in registered().items():
        env_id = gym_id(name)
        if "numpy" not in entry.backends or env_id in gymnasium.registry:
            continue
        if entry.family == "mujoco":
            _register_mujoco(env_id, name, entry.factory)
        else:
            # The task name is bound, not a keyword: gym.make(id, name=...) cannot swap it.
            gymnasium.register(id=env_id, entry_point=functools.partial(GymEnv, name),
                               max_episode_steps=_horizon(entry.factory))
        added.append(env_id)
    return added


def _register_mujoco(env_id: str, name: str, factory: Any) -> None:
    # One class per task (gradgym.envs.mujoco.gym_env), named by string so that importing
    # gradgym does not load MuJoCo; episode limit and threshold are Gymnasium's own.
    own = gymnasium.registry.get(name)
    gymnasium.register(
        id=env_id,
        entry_point=f"gradgym.envs.mujoco.gym_env:{factory.__name__}Env",
        max_episode_steps=own.max_episode_steps if own is not None else _horizon(factory),
        reward_threshold=own.reward_threshold if own is not None else None,
    )


def _horizon(factory: Any) -> int:
    # Tasks declare the horizon as a class attribute: read it without building the task
    # (a MuJoCo task loads its model when built).
    horizon = getattr(factory, "horizon", None)
    if isinstance(horizon, int):
        return horizon
    return int(factory().horizon)
