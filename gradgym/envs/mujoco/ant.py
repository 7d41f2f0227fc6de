"""Ant-v5: a four-legged robot walking forward (Gymnasium v5 semantics).

============  =============================================================
observation   ``[qpos[2:], qvel, clip(cfrc_ext[1:], -1, 1)]`` (the root x, y
              left out; contact forces optional)  (105)
action        eight hip and ankle torques in [-1, 1]  (8)
reward        ``forward_reward_weight * x_velocity + healthy_reward * healthy
              - ctrl_cost_weight * |u|^2
              - contact_cost_weight * |clip(cfrc_ext)|^2``
healthy       finite state and torso height ``qpos[2]`` in the closed
              ``healthy_z_range``
terminated    unhealthy, if ``terminate_when_unhealthy``
reset         qpos0 + U(-0.1, 0.1), qvel ~ N(0, 0.1^2)
dt            0.05 (5 RK4 substeps of 0.01)
============  =============================================================

``x_velocity`` is that of ``main_body``'s frame (``xpos``) as MuJoCo leaves it after the
step; contact forces are ``cfrc_ext`` after ``mj_rnePostConstraint``, as in Gymnasium.
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
    inside,
    locomotion_terms,
    per_state,
    planar_info,
)


@dataclass(frozen=True)
class Ant(MujocoTask):
    """MuJoCo ant."""

    xml_file: str = "ant.xml"
    frame_skip: int = 5
    forward_reward_weight: float = 1.0
    ctrl_cost_weight: float = 0.5
    contact_cost_weight: float = 5e-4
    healthy_reward: float = 1.0
    main_body: int | str = 1
    terminate_when_unhealthy: bool = True
    healthy_z_range: tuple[float, float] = (0.2, 1.0)
    contact_force_range: tuple[float, float] = (-1.0, 1.0)
    reset_noise_scale: float = 0.1
    exclude_current_positions_from_observation: bool = True
    include_cfrc_ext_in_observation: bool = True

    name = "Ant-v5"
    readout_fields = ("xpos", "cfrc_ext")
    qvel_noise = "normal"
    camera = Camera(distance=4.0, elevation=-30.0, track_body=1)

    def validate(self) -> None:
        super().validate()
        try:
            self.physics.model.body(self.main_body)
        except (KeyError, IndexError, TypeError) as err:
            names = [self.physics.model.body(i).name for i in range(self.physics.model.nbody)]
            raise ValueError(
                f"{self.name}: main_body {self.main_body!r} is not a body of the model; "
                f"bodies: {names} (or their index)"
            ) from err

    def tracked_x(self, xp: Any, qpos: Any, readouts: Any) -> Any:
        return component(self.main_body_position(xp, readouts), 0)

    def main_body_position(self, xp: Any, readouts: Any) -> Any:
        """``[..., 3]`` world position of ``main_body``'s frame (``xpos``)."""
        body = self.physics.model.body(self.main_body).id
        return self.readout(xp, readouts, "xpos")[..., body, :]

    def contact_forces(self, xp: Any, state: MujocoState) -> Any:
        """``[..., nbody, 6]`` external contact forces, clipped to ``contact_force_range``."""
        low, high = self.contact_force_range
        return xp.clip(self.readout(xp, state.readouts, "cfrc_ext"), low, high)

    def observe(self, xp: Any, state: MujocoState) -> Any:
        skip = 2 if self.exclude_current_positions_from_observation else 0
        parts = [state.qpos[..., skip:], state.qvel]
        if self.include_cfrc_ext_in_observation:
            forces = self.contact_forces(xp, state)[..., 1:, :]
            parts.append(xp.reshape(forces, tuple(forces.shape[:-2]) + (-1,)))
        return xp.concat(parts, axis=-1)

    @per_state
    def healthy(self, xp: Any, state: MujocoState) -> Any:
        """Whether the state is finite and the torso within ``healthy_z_range``."""
        finite = xp.logical_and(
            all_finite(xp, state.qpos), all_finite(xp, state.qvel)
        )
        return xp.logical_and(finite, inside(xp, component(state.qpos, 2), self.healthy_z_range, closed=True))

    def reward_terms(self, xp: Any, state: MujocoState) -> dict[str, Any]:
        forces = self.contact_forces(xp, state)
        contact = self.contact_cost_weight * xp.sum(xp.sum(forces * forces, axis=-1), axis=-1)
        return {**locomotion_terms(xp, self, state), "reward_contact": -contact}

    def info(self, xp: Any, state: MujocoState, previous: MujocoState | None = None) -> dict[str, Any]:
        info = planar_info(xp, state.qpos)
        if previous is None:
            return info
        after = component(self.main_body_position(xp, state.readouts), 1)
        before = component(self.main_body_position(xp, previous.readouts), 1)
        return {**info, "x_velocity": state.x_velocity, "y_velocity": (after - before) / self.dt}

    def terminated(self, backend: Backend, state: MujocoState) -> Any:
        xp = backend.xp
        unhealthy = xp.logical_not(self.healthy(xp, state))
        return unhealthy if self.terminate_when_unhealthy else xp.zeros_like(unhealthy)
