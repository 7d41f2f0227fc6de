"""InvertedPendulum-v5: keep a pole upright on a cart (Gymnasium v5 semantics).

============  =============================================================
observation   ``[qpos, qvel]``: cart x, pole angle, their velocities  (4)
action        cart force in [-1, 1], mapped to the actuator's [-3, 3]  (1)
reward        1 while the pole stands, 0 on the step it falls
terminated    ``|pole angle| > 0.2`` or a non-finite observation
reset         qpos0 and zero velocity, plus U(-0.01, 0.01) noise on both
dt            0.04 (2 RK4 substeps of 0.02)
============  =============================================================

Gymnasium's reward is constant while the pole stands, so a return of it has no gradient.
``smooth_reward=True`` (not a Gymnasium option) scales it by ``1 - (angle / 0.2)^2``,
which is 1 upright and reaches 0 exactly where the episode ends, so the return becomes a
continuous, differentiable function of the actions for gradient-based methods.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from gradgym.envs.backends import Backend
from gradgym.envs.mujoco.base import (
    Camera,
    MujocoState,
    MujocoTask,
    all_finite,
    component,
    indicator,
)


@dataclass(frozen=True)
class InvertedPendulum(MujocoTask):
    """Cart-pole balancing on MuJoCo."""

    xml_file: str = "inverted_pendulum.xml"
    frame_skip: int = 2
    reset_noise_scale: float = 0.01
    smooth_reward: bool = False

    name = "InvertedPendulum-v5"
    camera = Camera(distance=2.04, elevation=-10.0, lookat=(0.0, 0.0, 0.3))
    tracks_x = False  # its reward never reads x_velocity

    def observe(self, xp: Any, state: MujocoState) -> Any:
        return xp.concat([state.qpos, state.qvel], axis=-1)

    def reward_terms(self, xp: Any, state: MujocoState) -> dict[str, Any]:
        return self._reward_terms(xp, state, self._standing(xp, state, self.observe(xp, state)))

    def terminated(self, backend: Backend, state: MujocoState) -> Any:
        xp = backend.xp
        return xp.logical_not(self._standing(xp, state, self.observe(xp, state)))

    def step_outputs(self, backend: Backend, state: MujocoState) -> tuple[Any, dict[str, Any], Any]:
        # the three share the observation and the standing check: each computed once
        xp = backend.xp
        obs = self.observe(xp, state)
        standing = self._standing(xp, state, obs)
        return obs, self._reward_terms(xp, state, standing), xp.logical_not(standing)

    def _standing(self, xp: Any, state: MujocoState, obs: Any) -> Any:
        """Whether the pole is within 0.2 rad of upright and the state (its observation
        ``obs``) finite; a NaN angle compares false."""
        return xp.logical_and(all_finite(xp, obs), xp.abs(component(state.qpos, 1)) <= 0.2)

    def _reward_terms(self, xp: Any, state: MujocoState, standing: Any) -> dict[str, Any]:
        survive = indicator(xp, standing, component(state.qpos, 0))
        if self.smooth_reward:
            survive = survive * (1.0 - (component(state.qpos, 1) / 0.2) ** 2)
        return {"reward_survive": survive}
