"""Humanoid-v5: a 3D humanoid walking forward (Gymnasium v5 semantics).

============  =============================================================
observation   ``[qpos[2:], qvel, cinert[1:], cvel[1:], qfrc_actuator[6:],
              cfrc_ext[1:]]`` (the root x, y left out; the last four
              optional)  (348)
action        17 joint torques in [-1, 1], mapped to [-0.4, 0.4]  (17)
reward        ``forward_reward_weight * x_velocity + healthy_reward * healthy
              - ctrl_cost_weight * |u|^2
              - clip(contact_cost_weight * |cfrc_ext|^2, contact_cost_range)``
healthy       torso height ``qpos[2]`` inside the open ``healthy_z_range``
terminated    unhealthy, if ``terminate_when_unhealthy``
reset         qpos0 + U(-0.01, 0.01), qvel ~ U(-0.01, 0.01)
dt            0.015 (5 RK4 substeps of 0.003)
============  =============================================================

``x_velocity`` is that of the center of mass (body masses times ``xipos``) as MuJoCo
leaves it after the step; contact forces are ``cfrc_ext`` after
``mj_rnePostConstraint``, as in Gymnasium.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any

import numpy as np

from gradgym.envs.backends import Backend
from gradgym.envs.mujoco.base import (
    Camera,
    MujocoState,
    MujocoTask,
    component,
    inside,
    locomotion_terms,
    per_state,
    planar_info,
)


@dataclass(frozen=True)
class Humanoid(MujocoTask):
    """MuJoCo humanoid."""

    xml_file: str = "humanoid.xml"
    frame_skip: int = 5
    forward_reward_weight: float = 1.25
    ctrl_cost_weight: float = 0.1
    contact_cost_weight: float = 5e-7
    contact_cost_range: tuple[float, float] = (float("-inf"), 10.0)
    healthy_reward: float = 5.0
    terminate_when_unhealthy: bool = True
    healthy_z_range: tuple[float, float] = (1.0, 2.0)
    reset_noise_scale: float = 1e-2
    exclude_current_positions_from_observation: bool = True
    include_cinert_in_observation: bool = True
    include_cvel_in_observation: bool = True
    include_qfrc_actuator_in_observation: bool = True
    include_cfrc_ext_in_observation: bool = True

    name = "Humanoid-v5"
    readout_fields = ("xipos", "cinert", "cvel", "qfrc_actuator", "cfrc_ext")
    camera = Camera(distance=4.0, elevation=-20.0, lookat=(0.0, 0.0, 2.0), track_body=1)
    # Gymnasium's Humanoid takes its control cost on the applied controls (float64)
    # rather than on the action as given, and reports the tendons in its info.
    gym_ctrl_cost_on_applied_ctrl = True
    gym_info_data_fields = (("tendon_length", "ten_length"), ("tendon_velocity", "ten_velocity"))

    def tracked_x(self, xp: Any, qpos: Any, readouts: Any) -> Any:
        return self.mass_center(xp, readouts, 0)

    def mass_center(self, xp: Any, readouts: Any, axis: int) -> Any:
        """``[...]`` coordinate ``axis`` of the center of mass of all bodies."""
        xipos = self.readout(xp, readouts, "xipos")
        mass, total = self._body_masses
        return xp.sum(xp.asarray(mass, dtype=xipos.dtype) * xipos[..., axis], axis=-1) / total

    @functools.cached_property
    def _body_masses(self) -> tuple[np.ndarray, float]:
        """The bodies' masses and their sum (read from the model once)."""
        mass = self.physics.model.body_mass.copy()
        return mass, float(np.sum(mass))

    def observe(self, xp: Any, state: MujocoState) -> Any:
        skip = 2 if self.exclude_current_positions_from_observation else 0
        lead = tuple(state.qpos.shape[:-1])

        def per_body(name: str) -> Any:  # the world body (0) left out, flattened
            return xp.reshape(self.readout(xp, state.readouts, name)[..., 1:, :], lead + (-1,))

        parts = [state.qpos[..., skip:], state.qvel]
        if self.include_cinert_in_observation:
            parts.append(per_body("cinert"))
        if self.include_cvel_in_observation:
            parts.append(per_body("cvel"))
        if self.include_qfrc_actuator_in_observation:
            parts.append(self.readout(xp, state.readouts, "qfrc_actuator")[..., 6:])
        if self.include_cfrc_ext_in_observation:
            parts.append(per_body("cfrc_ext"))
        return xp.concat(parts, axis=-1)

    @per_state
    def healthy(self, xp: Any, state: MujocoState) -> Any:
        """Whether the torso height is within ``healthy_z_range``."""
        return inside(xp, component(state.qpos, 2), self.healthy_z_range)

    def reward_terms(self, xp: Any, state: MujocoState) -> dict[str, Any]:
        forces = self.readout(xp, state.readouts, "cfrc_ext")
        low, high = self.contact_cost_range
        contact = xp.clip(
            self.contact_cost_weight * xp.sum(xp.sum(forces * forces, axis=-1), axis=-1), low, high
        )
        return {**locomotion_terms(xp, self, state), "reward_contact": -contact}

    def info(self, xp: Any, state: MujocoState, previous: MujocoState | None = None) -> dict[str, Any]:
        info = planar_info(xp, state.qpos)
        if previous is None:
            return info
        after = self.mass_center(xp, state.readouts, 1)
        before = self.mass_center(xp, previous.readouts, 1)
        return {**info, "x_velocity": state.x_velocity, "y_velocity": (after - before) / self.dt}

    def terminated(self, backend: Backend, state: MujocoState) -> Any:
        xp = backend.xp
        unhealthy = xp.logical_not(self.healthy(xp, state))
        return unhealthy if self.terminate_when_unhealthy else xp.zeros_like(unhealthy)
