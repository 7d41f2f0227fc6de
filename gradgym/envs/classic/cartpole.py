"""CartPole: swing up and balance a pole on a cart (from Ivy Gym).

============  =============================================================
state         ``x``, ``x_vel``, ``angle``, ``angle_vel``  (each ``[B]``)
observation   ``[x, x_vel, cos(angle), sin(angle), angle_vel]``  (5)
action        horizontal force / 10, in [-1, 1]  (1)
reward        ``exp(-x^2) * (cos(angle) + 1) / 2``  (1 upright at the center)
reset         x ~ U(-1, 1), x_vel ~ U(-0.3, 0.3), angle ~ U(-pi, pi),
              angle_vel ~ U(-0.3, 0.3)
dt            0.02; never terminates
============  =============================================================

angle is 0 when the pole points up.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, NamedTuple

from gradgym.envs.backends import Backend
from gradgym.envs.core import Task


class CartPoleState(NamedTuple):
    """Cart position and velocity, pole angle (0 = upright) and angular velocity."""

    x: Any
    x_vel: Any
    angle: Any
    angle_vel: Any


@dataclass(frozen=True)
class CartPole(Task):
    """Cart-pole swing-up with a smooth reward."""

    gravity: float = 9.8
    cart_mass: float = 1.0
    pole_mass: float = 0.1
    pole_half_length: float = 0.5
    force_scale: float = 10.0

    name = "CartPole"
    dt = 0.02
    State = CartPoleState

    @property
    def obs_dim(self) -> int:
        return 5

    @property
    def act_dim(self) -> int:
        return 1

    def reset_state(self, backend: Backend, rng: Any, batch: int) -> CartPoleState:
        keys = backend.split(rng, 4)
        return CartPoleState(
            x=backend.uniform(keys[0], (batch,), -1.0, 1.0),
            x_vel=backend.uniform(keys[1], (batch,), -0.3, 0.3),
            angle=backend.uniform(keys[2], (batch,), -math.pi, math.pi),
            angle_vel=backend.uniform(keys[3], (batch,), -0.3, 0.3),
        )

    def dynamics(self, xp: Any, state: CartPoleState, action: Any) -> CartPoleState:
        x, x_vel, angle, angle_vel = state
        total_mass = self.cart_mass + self.pole_mass
        pole_moment = self.pole_mass * self.pole_half_length
        force = self.force_scale * action[..., 0]
        sin, cos = xp.sin(angle), xp.cos(angle)
        temp = (force + pole_moment * angle_vel**2 * sin) / total_mass
        angle_acc = (self.gravity * sin - cos * temp) / (
            self.pole_half_length * (4.0 / 3.0 - self.pole_mass * cos**2 / total_mass)
        )
        x_acc = temp - pole_moment * angle_acc * cos / total_mass
        x_vel = x_vel + self.dt * x_acc
        angle_vel = angle_vel + self.dt * angle_acc
        return CartPoleState(x + self.dt * x_vel, x_vel, angle + self.dt * angle_vel, angle_vel)

    def observe(self, xp: Any, state: CartPoleState) -> Any:
        return xp.stack(
            [state.x, state.x_vel, xp.cos(state.angle), xp.sin(state.angle), state.angle_vel],
            axis=-1,
        )

    def reward(self, xp: Any, state: CartPoleState) -> Any:
        return xp.exp(-state.x**2) * (xp.cos(state.angle) + 1.0) / 2.0
