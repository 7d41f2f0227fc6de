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

from gradgym.envs.backends import Backend
from gradgym.envs.core import Task


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

    def tip(self, xp: Any, state: ReacherState) -> Any:
        """End-effector position ``[..., 2]``."""
        return xp.stack(
            [xp.sum(xp.cos(state.angles), axis=-1), xp.sum(xp.sin(state.angles), axis=-1)], axis=-1
        )

    def observe(self, xp: Any, state: ReacherState) -> Any:
        return xp.concat(
            [xp.cos(state.angles), xp.sin(state.angles), state.angle_vels, state.goal], axis=-1
        )

    def reward(self, xp: Any, state: ReacherState) -> Any:
        return xp.exp(-xp.sum((self.tip(xp, state) - state.goal) ** 2, axis=-1))
