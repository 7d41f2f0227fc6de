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

from gradgym.envs.backends import Backend
from gradgym.envs.core import Task


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
