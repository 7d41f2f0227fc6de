"""HalfCheetah-v5: a planar cheetah running forward (Gymnasium v5 semantics).

============  =============================================================
observation   ``[qpos[1:], qvel]`` (the root x left out)  (17)
action        six joint torques in [-1, 1]  (6)
reward        ``forward_reward_weight * x_velocity - ctrl_cost_weight * |u|^2``
terminated    never
reset         qpos0 + U(-0.1, 0.1), qvel ~ N(0, 0.1^2)
dt            0.05 (5 Euler substeps of 0.01)
============  =============================================================

The only one of the eight models on MuJoCo's Euler integrator, so its gradients come from
``mujoco.mjd_transitionFD``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from gradgym.envs.mujoco.base import Camera, MujocoState, MujocoTask, component, control_cost


@dataclass(frozen=True)
class HalfCheetah(MujocoTask):
    """MuJoCo half-cheetah."""

    xml_file: str = "half_cheetah.xml"
    frame_skip: int = 5
    forward_reward_weight: float = 1.0
    ctrl_cost_weight: float = 0.1
    reset_noise_scale: float = 0.1
    exclude_current_positions_from_observation: bool = True

    name = "HalfCheetah-v5"
    qvel_noise = "normal"
    camera = Camera(distance=4.0, elevation=-10.0, track_body=1)

    def observe(self, xp: Any, state: MujocoState) -> Any:
        skip = 1 if self.exclude_current_positions_from_observation else 0
        return xp.concat([state.qpos[..., skip:], state.qvel], axis=-1)

    def reward_terms(self, xp: Any, state: MujocoState) -> dict[str, Any]:
        return {
            "reward_forward": self.forward_reward_weight * state.x_velocity,
            "reward_ctrl": -control_cost(xp, state.ctrl, self.ctrl_cost_weight),
        }

    def info(self, xp: Any, state: MujocoState, previous: MujocoState | None = None) -> dict[str, Any]:
        info = {"x_position": component(state.qpos, 0)}
        return info if previous is None else {**info, "x_velocity": state.x_velocity}
