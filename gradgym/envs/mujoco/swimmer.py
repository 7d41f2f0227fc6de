"""Swimmer-v5: a three-link snake swimming forward in a viscous fluid (Gymnasium v5).

============  =============================================================
observation   ``[qpos[2:], qvel]`` (the root x, y left out)  (8)
action        two joint torques in [-1, 1]  (2)
reward        ``forward_reward_weight * x_velocity - ctrl_cost_weight * |u|^2``
terminated    never
reset         qpos0 + U(-0.1, 0.1), qvel ~ U(-0.1, 0.1)
dt            0.04 (4 RK4 substeps of 0.01)
============  =============================================================

Not to be confused with ``Swimmer``, the fish of the classic family.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from gradgym.envs.mujoco.base import (
    Camera,
    MujocoState,
    MujocoTask,
    component,
    control_cost,
    planar_info,
)


@dataclass(frozen=True)
class Swimmer(MujocoTask):
    """MuJoCo swimmer."""

    xml_file: str = "swimmer.xml"
    frame_skip: int = 4
    forward_reward_weight: float = 1.0
    ctrl_cost_weight: float = 1e-4
    reset_noise_scale: float = 0.1
    exclude_current_positions_from_observation: bool = True

    name = "Swimmer-v5"
    camera = Camera(distance=5.0, elevation=-60.0, track_body=1)

    def observe(self, xp: Any, state: MujocoState) -> Any:
        skip = 2 if self.exclude_current_positions_from_observation else 0
        return xp.concat([state.qpos[..., skip:], state.qvel], axis=-1)

    def reward_terms(self, xp: Any, state: MujocoState) -> dict[str, Any]:
        return {
            "reward_forward": self.forward_reward_weight * state.x_velocity,
            "reward_ctrl": -control_cost(xp, state.ctrl, self.ctrl_cost_weight),
        }

    def info(self, xp: Any, state: MujocoState, previous: MujocoState | None = None) -> dict[str, Any]:
        info = planar_info(xp, state.qpos)
        if previous is None:
            return info
        y_velocity = (component(state.qpos, 1) - component(previous.qpos, 1)) / self.dt
        return {**info, "x_velocity": state.x_velocity, "y_velocity": y_velocity}
