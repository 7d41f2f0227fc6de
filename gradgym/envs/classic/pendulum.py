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

import numpy as np

from gradgym.envs.backends import Backend
from gradgym.envs.core import Task, component
from gradgym.envs.rendering import INK, CanvasRenderer, square_view


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
    runs_unbatched = True
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
        torque = self.torque_scale * component(action, 0)
        angle_acc = -3.0 * self.gravity / (2.0 * self.length) * xp.sin(state.angle + math.pi) + (
            3.0 / (self.mass * self.length**2)
        ) * torque
        angle_vel = state.angle_vel + self.dt * angle_acc
        return PendulumState(state.angle + self.dt * angle_vel, angle_vel)

    def observe(self, xp: Any, state: PendulumState) -> Any:
        return xp.stack([xp.cos(state.angle), xp.sin(state.angle), state.angle_vel], axis=-1)

    def reward(self, xp: Any, state: PendulumState) -> Any:
        return (xp.cos(state.angle) + 1.0) / 2.0

    def make_renderer(self, size: int | None = None) -> PendulumRenderer:
        return PendulumRenderer(self, size)


class PendulumRenderer(CanvasRenderer):
    """The rod swinging about its pivot; the bob is colored by the reward."""

    def __init__(self, task: Pendulum, size: int | None = None):
        self.length = task.length
        super().__init__(square_view(1.35 * task.length), size)

    def build(self, ax: Any) -> None:
        from matplotlib.patches import Circle

        # The bob's circle of motion, for orientation (static).
        ax.add_patch(Circle((0.0, 0.0), self.length, fc="none", ec="#c8c8c0", lw=0.8, ls="--"))
        self.rod = ax.plot([], [], color=INK, lw=3.0, solid_capstyle="round", animated=True)[0]
        self.bob = Circle((0.0, self.length), 0.12 * self.length, ec=INK, lw=1.0, animated=True)
        ax.add_patch(self.bob)
        self.pivot = ax.plot([0.0], [0.0], "o", color=INK, ms=4.0, animated=True)[0]
        self.animated += [self.rod, self.bob, self.pivot]

    def update(self, state: PendulumState, reward: float, color: tuple[float, ...]) -> None:
        # angle 0 points up; a positive angle leans to the right (+x), as in CartPole.
        angle = float(state.angle)
        tip = (self.length * np.sin(angle), self.length * np.cos(angle))
        self.rod.set_data([0.0, tip[0]], [0.0, tip[1]])
        self.bob.set_center(tip)
        self.bob.set_facecolor(color)
