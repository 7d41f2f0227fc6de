"""Swimmer (the fish): swim to the goal while avoiding the urchins (from Ivy Gym).

============  =============================================================
state         ``urchins [B, k, 2]``, ``xy [B, 2]``, ``xy_vel [B, 2]``, ``goal [B, 2]``
observation   ``[urchin xys (2k), xy, xy_vel, goal]``  (2k + 6)
action        acceleration in x and y, in [-1, 1]  (2)
reward        ``exp(-0.5 |xy - goal|^2) * prod_i (1 - exp(-30 |xy - urchin_i|^2))``
reset         urchins, xy, goal ~ U(-1, 1)^2, xy_vel = 0
dt            0.05; never terminates
============  =============================================================

Not the MuJoCo swimmer, which is ``Swimmer-v5``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np

from gradgym.envs.backends import Backend
from gradgym.envs.core import Task
from gradgym.envs.rendering import (
    FIGURE_INCHES,
    INK,
    CanvasRenderer,
    View,
    page_center,
    square_view,
)


class SwimmerState(NamedTuple):
    """Urchin positions, fish position and velocity, goal position."""

    urchins: Any
    xy: Any
    xy_vel: Any
    goal: Any


@dataclass(frozen=True)
class Swimmer(Task):
    """A fish steering to a goal through a field of urchins."""

    num_urchins: int = 5

    name = "Swimmer"
    runs_unbatched = True
    # Its Gymnasium id: "Swimmer" there is MuJoCo's Swimmer-v5, a different env.
    gym_name = "Fish"
    dt = 0.05
    State = SwimmerState

    def validate(self) -> None:
        k = self.num_urchins
        if isinstance(k, bool) or not isinstance(k, int) or k < 0:
            raise ValueError(f"Swimmer: num_urchins must be an int >= 0, got {k!r}")

    @property
    def obs_dim(self) -> int:
        return 2 * self.num_urchins + 6

    @property
    def act_dim(self) -> int:
        return 2

    def batch_shape(self, state: SwimmerState) -> tuple[int, ...]:
        return tuple(state.xy.shape[:-1])

    def reset_state(self, backend: Backend, rng: Any, batch: int) -> SwimmerState:
        keys = backend.split(rng, 3)
        return SwimmerState(
            urchins=backend.uniform(keys[0], (batch, self.num_urchins, 2), -1.0, 1.0),
            xy=backend.uniform(keys[1], (batch, 2), -1.0, 1.0),
            xy_vel=backend.zeros((batch, 2)),
            goal=backend.uniform(keys[2], (batch, 2), -1.0, 1.0),
        )

    def dynamics(self, xp: Any, state: SwimmerState, action: Any) -> SwimmerState:
        xy_vel = state.xy_vel + self.dt * action
        return SwimmerState(state.urchins, state.xy + self.dt * xy_vel, xy_vel, state.goal)

    def observe(self, xp: Any, state: SwimmerState) -> Any:
        urchins = xp.reshape(state.urchins, state.xy.shape[:-1] + (2 * self.num_urchins,))
        return xp.concat([urchins, state.xy, state.xy_vel, state.goal], axis=-1)

    def reward(self, xp: Any, state: SwimmerState) -> Any:
        goal_term = xp.exp(-0.5 * xp.sum((state.xy - state.goal) ** 2, axis=-1))
        urchin_dist2 = xp.sum((state.xy[..., None, :] - state.urchins) ** 2, axis=-1)
        return goal_term * xp.prod(1.0 - xp.exp(-30.0 * urchin_dist2), axis=-1)

    def make_renderer(self, size: int | None = None) -> SwimmerRenderer:
        return SwimmerRenderer(self, size)


class SwimmerRenderer(CanvasRenderer):
    """The fish (heading along its velocity), the urchins and the goal; the fish is colored
    by the reward. The window covers [-1.5, 1.5]^2 while the fish is in [-1, 1]^2 and is
    shifted by multiples of 2 (per axis) to keep a fish outside that square in view.
    """

    half_width = 1.5
    fish_length = 0.22
    urchin_radius = 0.13  # where an urchin's factor 1 - exp(-30 d^2) reaches ~0.4

    def __init__(self, task: Swimmer, size: int | None = None):
        super().__init__(square_view(self.half_width), size)

    def build(self, ax: Any) -> None:
        from matplotlib.patches import Ellipse, Polygon

        points_per_unit = FIGURE_INCHES * 72.0 / (2 * self.half_width)
        diameter = 2 * self.urchin_radius * points_per_unit
        self.urchins = ax.scatter(np.zeros(0), np.zeros(0), s=diameter**2, marker=(12, 2, 0),
                                  c="#5b2a86", linewidths=1.2, animated=True)
        self.goal = ax.plot([], [], "*", ms=0.2 * points_per_unit, mfc="#d9a400", mec=INK,
                            mew=0.8, animated=True)[0]
        self.tail = Polygon(np.zeros((3, 2)), ec=INK, lw=0.8, animated=True)
        self.body = Ellipse((0.0, 0.0), self.fish_length, 0.45 * self.fish_length, ec=INK,
                            lw=0.8, animated=True)
        for patch in (self.tail, self.body):
            ax.add_patch(patch)
        self.animated += [self.urchins, self.goal, self.tail, self.body]

    def view(self, state: SwimmerState) -> View:
        x, y = (page_center(float(v), step=2.0) for v in state.xy)
        return square_view(self.half_width, (x, y))

    def update(self, state: SwimmerState, reward: float, color: tuple[float, ...]) -> None:
        xy = np.asarray(state.xy, dtype=np.float64)
        vx, vy = (float(v) for v in state.xy_vel)
        heading = np.arctan2(vy, vx)  # 0 (facing +x) while at rest
        forward = np.array([np.cos(heading), np.sin(heading)])
        side = np.array([-forward[1], forward[0]])
        self.body.set_center(xy)
        self.body.set_angle(np.degrees(heading))
        self.body.set_facecolor(color)
        tail_root = xy - 0.4 * self.fish_length * forward
        tail_end = xy - 0.8 * self.fish_length * forward
        spread = 0.22 * self.fish_length * side
        self.tail.set_xy([tail_root, tail_end + spread, tail_end - spread])
        self.tail.set_facecolor(color)
        self.urchins.set_offsets(np.asarray(state.urchins, dtype=np.float64).reshape(-1, 2))
        goal = np.asarray(state.goal, dtype=np.float64)
        self.goal.set_data([goal[0]], [goal[1]])
