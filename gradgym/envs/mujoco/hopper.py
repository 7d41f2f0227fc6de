"""Hopper-v5: a one-legged planar robot hopping forward (Gymnasium v5 semantics).

============  =============================================================
observation   ``[qpos[1:], clip(qvel, -10, 10)]`` (the root x left out)  (11)
action        three joint torques in [-1, 1]  (3)
reward        ``forward_reward_weight * x_velocity + healthy_reward * healthy
              - ctrl_cost_weight * |u|^2``
healthy       ``qpos[2:]`` and ``qvel`` inside ``healthy_state_range``, height
              ``qpos[1]`` inside ``healthy_z_range``, torso angle ``qpos[2]``
              inside ``healthy_angle_range`` (all open intervals)
terminated    unhealthy, if ``terminate_when_unhealthy``
reset         qpos0 + U(-5e-3, 5e-3), qvel ~ U(-5e-3, 5e-3)
dt            0.008 (4 RK4 substeps of 0.002)
============  =============================================================
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from gradgym.envs.backends import Backend
from gradgym.envs.mujoco.base import (
    Camera,
    MujocoState,
    MujocoTask,
    component,
    inside,
    locomotion_terms,
    per_state,
    walker_info,
)


@dataclass(frozen=True)
class Hopper(MujocoTask):
    """MuJoCo hopper."""

    xml_file: str = "hopper.xml"
    frame_skip: int = 4
    forward_reward_weight: float = 1.0
    ctrl_cost_weight: float = 1e-3
    healthy_reward: float = 1.0
    terminate_when_unhealthy: bool = True
    healthy_state_range: tuple[float, float] = (-100.0, 100.0)
    healthy_z_range: tuple[float, float] = (0.7, float("inf"))
    healthy_angle_range: tuple[float, float] = (-0.2, 0.2)
    reset_noise_scale: float = 5e-3
    exclude_current_positions_from_observation: bool = True

    name = "Hopper-v5"
    camera = Camera(distance=3.0, elevation=-20.0, lookat=(0.0, 0.0, 1.15), track_body=1)

    def observe(self, xp: Any, state: MujocoState) -> Any:
        skip = 1 if self.exclude_current_positions_from_observation else 0
        return xp.concat([state.qpos[..., skip:], xp.clip(state.qvel, -10.0, 10.0)], axis=-1)

    @per_state
    def healthy(self, xp: Any, state: MujocoState) -> Any:
        """Whether the hopper is upright, high enough and not blowing up."""
        rest = xp.concat([state.qpos[..., 2:], state.qvel], axis=-1)
        return xp.logical_and(
            xp.all(inside(xp, rest, self.healthy_state_range), axis=-1),
            xp.logical_and(
                inside(xp, component(state.qpos, 1), self.healthy_z_range),
                inside(xp, component(state.qpos, 2), self.healthy_angle_range),
            ),
        )

    def reward_terms(self, xp: Any, state: MujocoState) -> dict[str, Any]:
        return locomotion_terms(xp, self, state)

    def info(self, xp: Any, state: MujocoState, previous: MujocoState | None = None) -> dict[str, Any]:
        return walker_info(self, state, previous)

    def terminated(self, backend: Backend, state: MujocoState) -> Any:
        xp = backend.xp
        unhealthy = xp.logical_not(self.healthy(xp, state))
        return unhealthy if self.terminate_when_unhealthy else xp.zeros_like(unhealthy)
