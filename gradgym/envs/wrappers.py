"""Wrappers over the functional core, named after their Gymnasium counterparts.

- :class:`TimeLimit` is functional like the env it wraps: its state carries a step counter
  and ``done`` turns true at the limit. It stays pure, so ``jax.jit``/``lax.scan`` and torch
  autograd pass through.
- :class:`VecEnv` is a stateful batched env (``reset(seed)``, ``step(action)``) for code
  written against the Gymnasium vector API. Finished entries restart on their own, chosen
  with the backend's ``where``: no host sync, no Python branch on array values.
"""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

import numpy as np

from gradgym.envs.core import EnvSpec


class TimeLimitState(NamedTuple):
    """The wrapped env's state and the number of steps taken in the episode (``[B]`` int32)."""

    env_state: Any
    steps: Any


class TimeLimit:
    """End episodes after ``max_steps`` steps (functional).

    ``step`` returns ``(state, obs, reward, done)`` like the env, with ``done`` true where
    the env terminated or the episode reached ``max_steps``; :meth:`transition` returns
    termination and truncation separately.

    Args:
        env: a functional env (``Env`` from ``gradgym.make``, numpy/jax/torch backend).
        max_steps: the episode length; default ``env.spec.horizon``.
    """

    def __init__(self, env: Any, max_steps: int | None = None):
        if max_steps is None:
            max_steps = env.spec.horizon
        if not _is_positive_int(max_steps):
            raise ValueError(f"max_steps must be a positive int, got {max_steps!r}")
        if getattr(getattr(env, "spec", None), "backend", None) == "ivy":
            raise TypeError(
                "TimeLimit and VecEnv work on numpy, jax and torch envs; for an ivy env wrap "
                "its native env instead: TimeLimit(env.native_env())"
            )
        if not hasattr(env, "backend") or not hasattr(env.backend, "xp"):
            raise TypeError(
                f"TimeLimit wraps a functional env from gradgym.make (numpy, jax or torch "
                f"backend), got {type(env).__name__}"
            )
        self.env = env
        self.max_steps = int(max_steps)
        self.backend = env.backend
        self.xp = env.backend.xp
        self.spec: EnvSpec = dataclasses.replace(env.spec, horizon=self.max_steps)

    def __repr__(self) -> str:
        return f"TimeLimit({self.env!r}, max_steps={self.max_steps})"

    def reset(self, rng: Any, batch: int = 1) -> TimeLimitState:
        """``batch`` start states with their step counters at zero."""
        env_state = self.env.reset(rng, batch)
        steps = self.xp.zeros(self.env.task.batch_shape(env_state), dtype=self.xp.int32)
        return TimeLimitState(env_state, steps)

    def transition(self, state: TimeLimitState, action: Any) -> tuple[Any, Any, Any, Any, Any]:
        """One step: ``(state, obs, reward, terminated, truncated)``.

        ``truncated`` is true where the limit is reached and the env did not terminate.
        """
        env_state, obs, reward, terminated = self.env.step(state.env_state, action)
        steps = state.steps + 1
        truncated = self.xp.logical_and(steps >= self.max_steps, self.xp.logical_not(terminated))
        return TimeLimitState(env_state, steps), obs, reward, terminated, truncated

    def step(self, state: TimeLimitState, action: Any) -> tuple[TimeLimitState, Any, Any, Any]:
        """One step: ``(state, obs, reward, done)``, ``done = terminated or truncated``."""
        state, obs, reward, terminated, truncated = self.transition(state, action)
        return state, obs, reward, self.xp.logical_or(terminated, truncated)

    def observe(self, state: TimeLimitState) -> Any:
        """The observation ``[B, obs_dim]`` of a state."""
        return self.env.observe(state.env_state)

    def reward(self, state: TimeLimitState) -> Any:
        """The reward ``[B]`` of a state."""
        return self.env.reward(state.env_state)

    def render(self, state: TimeLimitState, index: int = 0, size: int | None = None) -> np.ndarray:
        """An ``H x W x 3`` uint8 frame of entry ``index`` (``size``: see :meth:`Env.render`)."""
        return self.env.render(state.env_state, index, size)


class VecEnv:
    """A stateful batched env: ``num_envs`` episodes stepped together, restarted as they end.

    Follows the Gymnasium vector API with *same-step* autoreset: where an episode ends
    (terminated, or truncated at ``max_steps``), the returned observation is already the
    first observation of the next episode and ``info["final_obs"]`` holds the last
    observation of the finished one. Arrays stay on the env's backend; the restart is a
    backend ``where`` over a freshly drawn batch of start states, so a step never syncs
    with the host. Drawing that batch every step is the price: measured on CartPole at
    16384 envs, a VecEnv step runs at about a third of a bare ``env.step``'s throughput
    (numpy 14 vs 45, torch 5 vs 18 M env-steps/s); use the functional env where it counts.

    Args:
        env: a functional env (``Env`` from ``gradgym.make``, numpy/jax/torch backend).
        num_envs: the batch size.
        max_steps: the episode length; default ``env.spec.horizon``.

    Example::

        envs = VecEnv(gradgym.make("Pendulum", backend="torch"), num_envs=64)
        obs = envs.reset(seed=0)
        obs, reward, terminated, truncated, info = envs.step(action)
    """

    def __init__(self, env: Any, num_envs: int, max_steps: int | None = None):
        if not _is_positive_int(num_envs):
            raise ValueError(f"num_envs must be a positive int, got {num_envs!r}")
        self.time_limit = TimeLimit(env, max_steps)
        self.env = env
        self.num_envs = int(num_envs)
        self.spec: EnvSpec = self.time_limit.spec
        self.backend = env.backend
        self.xp = env.backend.xp
        self.state: TimeLimitState | None = None
        self._rng: Any = None

    def __repr__(self) -> str:
        limit = self.time_limit.max_steps
        return f"VecEnv({self.env!r}, num_envs={self.num_envs}, max_steps={limit})"

    def reset(self, seed: Any = None) -> Any:
        """Start ``num_envs`` new episodes; returns the observations ``[num_envs, obs_dim]``.

        ``seed`` is an int or a native key/generator; ``None`` draws fresh entropy.
        """
        if seed is None:
            seed = int(np.random.SeedSequence().generate_state(1)[0])
        self._rng = self.backend.generator(seed)
        self.state = self.time_limit.reset(self._next_rng(), self.num_envs)
        return self.time_limit.observe(self.state)

    def step(self, action: Any) -> tuple[Any, Any, Any, Any, dict[str, Any]]:
        """Step every episode: ``(obs, reward, terminated, truncated, info)``.

        ``info["final_obs"]`` is the observation reached by this step, before any restart
        (meaningful where ``terminated | truncated``).
        """
        if self.state is None:
            raise RuntimeError("VecEnv.step called before reset(); call envs.reset(seed) first")
        transition = self.time_limit.transition(self.state, action)
        state, obs, reward, terminated, truncated = transition
        done = self.xp.logical_or(terminated, truncated)
        fresh = self.time_limit.reset(self._next_rng(), self.num_envs)
        self.state = _where_tree(self.xp, done, fresh, state)
        next_obs = self.time_limit.observe(self.state)
        return next_obs, reward, terminated, truncated, {"final_obs": obs}

    def render(self, index: int = 0, size: int | None = None) -> np.ndarray:
        """An ``H x W x 3`` uint8 frame of episode ``index`` (``size``: see :meth:`Env.render`)."""
        if self.state is None:
            raise RuntimeError("VecEnv.render called before reset(); call envs.reset(seed) first")
        return self.time_limit.render(self.state, index, size)

    def _next_rng(self) -> Any:
        # numpy and torch generators advance as they draw; a jax key must be split.
        if self.backend.name == "jax":
            self._rng, key = self.backend.split(self._rng, 2)
            return key
        return self._rng


def _is_positive_int(value: Any) -> bool:
    return not isinstance(value, bool) and isinstance(value, (int, np.integer)) and value >= 1


def _where_tree(xp: Any, condition: Any, if_true: Any, if_false: Any) -> Any:
    """Leafwise ``where`` over two states; ``condition [B]`` broadcasts over trailing axes."""
    if isinstance(if_true, tuple) and hasattr(if_true, "_fields"):
        return type(if_true)(
            *(_where_tree(xp, condition, a, b) for a, b in zip(if_true, if_false, strict=True))
        )
    trailing = (1,) * (len(if_true.shape) - len(condition.shape))
    return xp.where(xp.reshape(condition, tuple(condition.shape) + trailing), if_true, if_false)
