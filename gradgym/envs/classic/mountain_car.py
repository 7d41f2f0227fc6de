"""MountainCar: drive an underpowered car up to the flag (from Ivy Gym).

============  =============================================================
state         ``x``, ``x_vel``  (each ``[B]``)
observation   ``[x, x_vel]``  (2)
action        engine force / 3, in [-1, 1]  (1)
reward        ``exp(-5 (x - 0.45)^2)``  (1 at the flag, x = 0.45)
reset         x ~ U(-0.9, -0.2), x_vel = 0
dt            0.02; never terminates
============  =============================================================

The track's height is ``0.45 sin(3x) + 0.55`` (used for drawing).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, NamedTuple

from gradgym.envs.backends import Backend
from gradgym.envs.core import Task


class MountainCarState(NamedTuple):
    """Car position along the track and its velocity."""

    x: Any
    x_vel: Any


@dataclass(frozen=True)
class MountainCar(Task):
    """Continuous mountain car with a smooth reward around the goal."""

    gravity: float = 9.8
    force_scale: float = 3.0
    goal_x: float = 0.45

    name = "MountainCar"
    dt = 0.02
    State = MountainCarState

    @property
    def obs_dim(self) -> int:
        return 2

    @property
    def act_dim(self) -> int:
        return 1

    def reset_state(self, backend: Backend, rng: Any, batch: int) -> MountainCarState:
        return MountainCarState(
            x=backend.uniform(rng, (batch,), -0.9, -0.2),
            x_vel=backend.zeros((batch,)),
        )

    def dynamics(self, xp: Any, state: MountainCarState, action: Any) -> MountainCarState:
        x_acc = self.force_scale * action[..., 0] - self.gravity * xp.cos(3.0 * state.x)
        x_vel = state.x_vel + self.dt * x_acc
        return MountainCarState(state.x + self.dt * x_vel, x_vel)

    def observe(self, xp: Any, state: MountainCarState) -> Any:
        return xp.stack([state.x, state.x_vel], axis=-1)

    def reward(self, xp: Any, state: MountainCarState) -> Any:
        return xp.exp(-5.0 * (state.x - self.goal_x) ** 2)
