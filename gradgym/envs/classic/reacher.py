"""Reacher: bring the tip of an n-link planar arm to a goal (from Ivy Gym).

============  =============================================================
state         ``angles [B, n]``, ``angle_vels [B, n]``, ``goal [B, 2]``
observation   ``[cos(angles), sin(angles), angle_vels, goal]``  (3n + 2)
action        joint torques, in [-1, 1]  (n)
reward        ``exp(-|tip - goal|^2)``, tip = ``(sum cos(angles), sum sin(angles))``
reset         angles ~ U(-pi, pi), angle_vels ~ U(-1, 1), goal ~ U(-n, n)^2
dt            0.05; never terminates
============  =============================================================

Links have unit length and the angles are absolute (measured from the x axis).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np

from gradgym.envs.backends import Backend
from gradgym.envs.core import Task
from gradgym.envs.rendering import INK, CanvasRenderer, square_view


class ReacherState(NamedTuple):
    """Absolute joint angles, their velocities and the goal position."""

    angles: Any
    angle_vels: Any
    goal: Any


@dataclass(frozen=True)
class Reacher(Task):
    """n-link arm reaching for a goal."""

    num_joints: int = 2
    torque_scale: float = 1.0

    name = "Reacher"
    runs_unbatched = True
    dt = 0.05
    State = ReacherState

    def validate(self) -> None:
        if isinstance(self.num_joints, bool) or not isinstance(self.num_joints, int) or self.num_joints < 1:
            raise ValueError(f"Reacher: num_joints must be an int >= 1, got {self.num_joints!r}")

    @property
    def obs_dim(self) -> int:
        return 3 * self.num_joints + 2

    @property
    def act_dim(self) -> int:
        return self.num_joints

    def batch_shape(self, state: ReacherState) -> tuple[int, ...]:
        return tuple(state.goal.shape[:-1])

    def reset_state(self, backend: Backend, rng: Any, batch: int) -> ReacherState:
        keys = backend.split(rng, 3)
        n = self.num_joints
        return ReacherState(
            angles=backend.uniform(keys[0], (batch, n), -math.pi, math.pi),
            angle_vels=backend.uniform(keys[1], (batch, n), -1.0, 1.0),
            goal=backend.uniform(keys[2], (batch, 2), -float(n), float(n)),
        )

    def dynamics(self, xp: Any, state: ReacherState, action: Any) -> ReacherState:
        angle_vels = state.angle_vels + self.dt * self.torque_scale * action
        return ReacherState(state.angles + self.dt * angle_vels, angle_vels, state.goal)

    def tip(self, xp: Any, state: ReacherState) -> tuple[Any, Any]:
        """End-effector position ``(x, y)``, each ``[...]``."""
        return xp.sum(xp.cos(state.angles), axis=-1), xp.sum(xp.sin(state.angles), axis=-1)

    def observe(self, xp: Any, state: ReacherState) -> Any:
        return xp.concat(
            [xp.cos(state.angles), xp.sin(state.angles), state.angle_vels, state.goal], axis=-1
        )

    def reward(self, xp: Any, state: ReacherState) -> Any:
        # Per coordinate, not stacked: a compiled torch step then vectorizes over the batch.
        # d * d, not d ** 2: numpy's scalar power (the host path) can differ from its
        # array square by an ulp.
        tip_x, tip_y = self.tip(xp, state)
        dx, dy = tip_x - state.goal[..., 0], tip_y - state.goal[..., 1]
        return xp.exp(-(dx * dx + dy * dy))

    def make_renderer(self, size: int | None = None) -> ReacherRenderer:
        return ReacherRenderer(self, size)


class ReacherRenderer(CanvasRenderer):
    """The n-link arm (unit links, absolute angles) and the goal; the arm is colored by the
    reward. The dashed circle is the arm's reach (radius n)."""

    def __init__(self, task: Reacher, size: int | None = None):
        self.num_joints = task.num_joints
        super().__init__(square_view(task.num_joints + 0.6), size)

    def build(self, ax: Any) -> None:
        from matplotlib.patches import Circle

        n = self.num_joints
        ax.add_patch(Circle((0.0, 0.0), n, fc="none", ec="#c8c8c0", lw=0.8, ls="--"))
        link_width = float(np.clip(24.0 / (n + 0.6), 1.0, 6.0))
        self.goal = ax.plot([], [], "o", ms=max(6.0, link_width * 2.2), mfc="none", mec="#1f5fa8",
                            mew=1.6, animated=True)[0]
        self.arm = ax.plot([], [], "-o", lw=link_width, ms=link_width * 0.9, mfc=INK,
                           mec=INK, solid_capstyle="round", animated=True)[0]
        self.base = ax.plot([0.0], [0.0], "s", color=INK, ms=link_width * 1.2,
                            animated=True)[0]
        self.animated += [self.goal, self.arm, self.base]

    def update(self, state: ReacherState, reward: float, color: tuple[float, ...]) -> None:
        angles = np.asarray(state.angles, dtype=np.float64)
        joints_x = np.concatenate([[0.0], np.cumsum(np.cos(angles))])
        joints_y = np.concatenate([[0.0], np.cumsum(np.sin(angles))])
        self.arm.set_data(joints_x, joints_y)
        self.arm.set_color(color)
        self.arm.set_markeredgecolor(INK)
        self.arm.set_markerfacecolor(INK)
        goal = np.asarray(state.goal, dtype=np.float64)
        self.goal.set_data([goal[0]], [goal[1]])
