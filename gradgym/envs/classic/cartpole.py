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

import numpy as np

from gradgym.envs.backends import Backend
from gradgym.envs.core import Task, component
from gradgym.envs.rendering import INK, CanvasRenderer, View, page_center


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
    runs_unbatched = True
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
        force = self.force_scale * component(action, 0)
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

    def make_renderer(self, size: int | None = None) -> CartPoleRenderer:
        return CartPoleRenderer(self, size)


class CartPoleRenderer(CanvasRenderer):
    """The cart on its track and the pole on the cart; the cart is colored by the reward.

    The window is 4 units wide, centered on the multiple of 2 nearest to the cart (so a cart
    in [-1, 1] is drawn in the window around 0); tick marks every 0.5 units and labels at
    whole units show where the cart is.
    """

    half_width = 2.0
    cart_size = (0.5, 0.25)

    def __init__(self, task: CartPole, size: int | None = None):
        self.pole_length = 2.0 * task.pole_half_length
        super().__init__(self._window(0.0), size)

    def _window(self, center: float) -> View:
        h = self.half_width
        return ((center - h, center + h), (-h, h))

    def build(self, ax: Any) -> None:
        from matplotlib.patches import Rectangle

        self.track = ax.plot([], [], color=INK, lw=1.0, solid_capstyle="butt")[0]
        self.tick_labels: list[Any] = []
        self.on_view_change(self._view)
        width, height = self.cart_size
        self.cart = Rectangle((-width / 2, -height / 2), width, height, ec=INK, lw=1.0,
                              animated=True)
        ax.add_patch(self.cart)
        self.pole = ax.plot([], [], color="#8a5a2b", lw=4.0, solid_capstyle="round",
                            animated=True)[0]
        self.hinge = ax.plot([], [], "o", color=INK, ms=3.0, animated=True)[0]
        self.animated += [self.cart, self.pole, self.hinge]

    def view(self, state: CartPoleState) -> View:
        return self._window(page_center(float(state.x), step=2.0))

    def on_view_change(self, view: View) -> None:
        # The track: a line across the window with a tick every 0.5 units (NaN-separated)
        # and the position written under every whole unit, so paged windows differ.
        (xmin, xmax), _ = view
        y0 = -self.cart_size[1] / 2 - 0.05
        ticks = np.arange(np.ceil(xmin * 2) / 2, xmax + 1e-9, 0.5)
        tick_x = np.stack([ticks, ticks, np.full_like(ticks, np.nan)], axis=1).ravel()
        tick_y = np.tile([y0, y0 - 0.1, np.nan], len(ticks))
        self.track.set_data(np.concatenate([[xmin, xmax, np.nan], tick_x]),
                            np.concatenate([[y0, y0, np.nan], tick_y]))
        for label in self.tick_labels:
            label.remove()
        self.tick_labels = [
            self.ax.text(tick, y0 - 0.15, f"{tick:g}", ha="center", va="top", fontsize=6,
                         color=INK)
            for tick in ticks if tick == round(tick)
        ]

    def update(self, state: CartPoleState, reward: float, color: tuple[float, ...]) -> None:
        x, angle = float(state.x), float(state.angle)
        width, height = self.cart_size
        self.cart.set_xy((x - width / 2, -height / 2))
        self.cart.set_facecolor(color)
        # angle 0 points up; a positive angle tilts the pole to the right (+x).
        tip = (x + self.pole_length * np.sin(angle), self.pole_length * np.cos(angle))
        self.pole.set_data([x, tip[0]], [0.0, tip[1]])
        self.hinge.set_data([x], [0.0])
