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

import numpy as np

from gradgym.envs.backends import Backend
from gradgym.envs.core import Task, component
from gradgym.envs.rendering import INK, CanvasRenderer, View, page_center


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
    runs_unbatched = True
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
        x_acc = self.force_scale * component(action, 0) - self.gravity * xp.cos(3.0 * state.x)
        x_vel = state.x_vel + self.dt * x_acc
        return MountainCarState(state.x + self.dt * x_vel, x_vel)

    def observe(self, xp: Any, state: MountainCarState) -> Any:
        return xp.stack([state.x, state.x_vel], axis=-1)

    def reward(self, xp: Any, state: MountainCarState) -> Any:
        return xp.exp(-5.0 * (state.x - self.goal_x) ** 2)

    def make_renderer(self, size: int | None = None) -> MountainCarRenderer:
        return MountainCarRenderer(self, size)


def track_height(x: Any) -> Any:
    """Height of the drawn track, ``0.45 sin(3x) + 0.55`` (numpy)."""
    return 0.45 * np.sin(3.0 * x) + 0.55


class MountainCarRenderer(CanvasRenderer):
    """The car on the sin-shaped track and the goal flag; the car is colored by the reward.

    The default window shows x in [-1.3, 0.7] (the classic [-1.2, 0.6] with a margin); a
    car outside [-1.2, 0.6] is drawn in the window shifted by a multiple of 1.8.
    """

    width = 2.0
    page_step = 1.8
    origin = -0.3
    car_length, car_height, wheel_radius = 0.16, 0.06, 0.022

    def __init__(self, task: MountainCar, size: int | None = None):
        self.goal_x = task.goal_x
        super().__init__(self._window(self.origin), size)

    def _window(self, center: float) -> View:
        half = self.width / 2
        return ((center - half, center + half), (0.6 - half, 0.6 + half))

    def build(self, ax: Any) -> None:
        from matplotlib.patches import Circle, Polygon

        self.track = ax.plot([], [], color=INK, lw=1.5)[0]
        self.ground = ax.fill_between([0.0], [0.0], color="#e4e0d4", lw=0)
        flag_y = float(track_height(self.goal_x))
        ax.plot([self.goal_x, self.goal_x], [flag_y, flag_y + 0.16], color=INK, lw=1.2)
        ax.add_patch(Polygon([(self.goal_x, flag_y + 0.16), (self.goal_x, flag_y + 0.11),
                              (self.goal_x + 0.08, flag_y + 0.135)], fc="#d9a400", ec=INK,
                             lw=0.6))
        self.on_view_change(self._view)
        self.body = Polygon(np.zeros((4, 2)), ec=INK, lw=1.0, animated=True)
        ax.add_patch(self.body)
        self.wheels = [Circle((0.0, 0.0), self.wheel_radius, fc=INK, animated=True)
                       for _ in range(2)]
        for wheel in self.wheels:
            ax.add_patch(wheel)
        self.animated += [self.body, *self.wheels]

    def view(self, state: MountainCarState) -> View:
        return self._window(page_center(float(state.x), self.page_step, self.origin))

    def on_view_change(self, view: View) -> None:
        (xmin, xmax), (ymin, _) = view
        xs = np.linspace(xmin, xmax, 200)
        self.track.set_data(xs, track_height(xs))
        self.ground.remove()
        self.ground = self.ax.fill_between(xs, np.full_like(xs, ymin), track_height(xs),
                                           color="#e4e0d4", lw=0, zorder=0)

    def update(self, state: MountainCarState, reward: float, color: tuple[float, ...]) -> None:
        x = float(state.x)
        slope = np.arctan(1.35 * np.cos(3.0 * x))  # d/dx of the track height
        along = np.array([np.cos(slope), np.sin(slope)])
        normal = np.array([-along[1], along[0]])
        base = np.array([x, float(track_height(x))]) + normal * self.wheel_radius
        half = 0.5 * self.car_length * along
        up = (self.car_height + self.wheel_radius) * normal
        self.body.set_xy([base - half, base + half, base + half + up, base - half + up])
        self.body.set_facecolor(color)
        for wheel, side in zip(self.wheels, (-0.6, 0.6)):
            wheel.set_center(base + side * half)
