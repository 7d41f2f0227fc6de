"""Pendulum: swing a pendulum up and hold it there (from Ivy Gym).

============  =============================================================
state         ``angle``, ``angle_vel``  (each ``[B]``)
observation   ``[cos(angle), sin(angle), angle_vel]``  (3)
action        torque, in [-1, 1]  (1)
reward        ``(cos(angle) + 1) / 2``  (1 upright)
reset         angle ~ U(-pi, pi), angle_vel ~ U(-1, 1)
dt            0.05; never terminates
============  =============================================================

angle is 0 when the pendulum points up.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, NamedTuple

from gradgym.envs.backends import Backend
from gradgym.envs.core import Task


class PendulumState(NamedTuple):
    """Pendulum angle (0 = upright) and angular velocity."""

    angle: Any
    angle_vel: Any


@dataclass(frozen=True)
class Pendulum(Task):
    """Torque-limited pendulum swing-up."""

    gravity: float = 9.8
    mass: float = 1.0
    length: float = 1.0
    torque_scale: float = 1.0

    name = "Pendulum"
    dt = 0.05
    State = PendulumState

    @property
    def obs_dim(self) -> int:
        return 3

    @property
    def act_dim(self) -> int:
        return 1

    def reset_state(self, backend: Backend, rng: Any, batch: int) -> PendulumState:
        keys = backend.split(rng, 2)
        return PendulumState(
            angle=backend.uniform(keys[0], (batch,), -math.pi, math.pi),
            angle_vel=backend.uniform(keys[1], (batch,), -1.0, 1.0),
        )

    def dynamics(self, xp: Any, state: PendulumState, action: Any) -> PendulumState:
        torque = self.torque_scale * action[..., 0]
        angle_acc = -3.0 * self.gravity / (2.0 * self.length) * xp.sin(state.angle + math.pi) + (
            3.0 / (self.mass * self.length**2)
        ) * torque
        angle_vel = state.angle_vel + self.dt * angle_acc
        return PendulumState(state.angle + self.dt * angle_vel, angle_vel)

    def observe(self, xp: Any, state: PendulumState) -> Any:
        return xp.stack([xp.cos(state.angle), xp.sin(state.angle), state.angle_vel], axis=-1)

    def reward(self, xp: Any, state: PendulumState) -> Any:
        return (xp.cos(state.angle) + 1.0) / 2.0
