"""InvertedDoublePendulum-v5: balance two poles on a cart (Gymnasium v5 semantics).

============  =============================================================
observation   cart x, sin and cos of the two hinge angles, qvel clipped to
              [-10, 10], the cart's constraint force clipped to [-10, 10]  (9)
action        cart force in [-1, 1]  (1)
reward        ``healthy_reward`` while the tip is above 1, minus
              ``0.01 x_tip^2 + (y_tip - 2)^2`` and ``1e-3 w1^2 + 5e-3 w2^2``
terminated    tip height ``y_tip <= 1``
reset         qpos0 + U(-0.1, 0.1), qvel ~ N(0, 0.1^2)
dt            0.05 (5 RK4 substeps of 0.01)
============  =============================================================

The tip position is the model's site 0 as MuJoCo leaves it after the step.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from gradgym.envs.backends import Backend
from gradgym.envs.mujoco.base import (
    Camera,
    MujocoState,
    MujocoTask,
    component,
    indicator,
)


@dataclass(frozen=True)
class InvertedDoublePendulum(MujocoTask):
    """Double cart-pole balancing on MuJoCo."""

    xml_file: str = "inverted_double_pendulum.xml"
    frame_skip: int = 5
    healthy_reward: float = 10.0
    reset_noise_scale: float = 0.1

    name = "InvertedDoublePendulum-v5"
    readout_fields = ("site_xpos", "qfrc_constraint")
    qvel_noise = "normal"
    camera = Camera(distance=2.6, elevation=-10.0, lookat=(0.0, 0.0, 0.6))
    tracks_x = False  # its reward never reads x_velocity

    def observe(self, xp: Any, state: MujocoState) -> Any:
        constraint = self.readout(xp, state.readouts, "qfrc_constraint")
        return xp.concat(
            [
                state.qpos[..., :1],
                xp.sin(state.qpos[..., 1:]),
                xp.cos(state.qpos[..., 1:]),
                xp.clip(state.qvel, -10.0, 10.0),
                xp.clip(constraint[..., :1], -10.0, 10.0),
            ],
            axis=-1,
        )

    def reward_terms(self, xp: Any, state: MujocoState) -> dict[str, Any]:
        return self._reward_terms(xp, state, self.tip(xp, state))

    def terminated(self, backend: Backend, state: MujocoState) -> Any:
        return self._fallen(self.tip(backend.xp, state))

    def step_outputs(self, backend: Backend, state: MujocoState) -> tuple[Any, dict[str, Any], Any]:
        # the reward and the termination share the tip: looked up once
        xp = backend.xp
        tip = self.tip(xp, state)
        return self.observe(xp, state), self._reward_terms(xp, state, tip), self._fallen(tip)

    def tip(self, xp: Any, state: MujocoState) -> Any:
        """``[..., 3]`` world position of the pole tip (site 0)."""
        return self.readout(xp, state.readouts, "site_xpos")[..., 0, :]

    def _reward_terms(self, xp: Any, state: MujocoState, tip: Any) -> dict[str, Any]:
        x, y = component(tip, 0), component(tip, 2)
        distance_penalty = 0.01 * x**2 + (y - 2.0) ** 2
        velocity_penalty = 1e-3 * component(state.qvel, 1) ** 2 + 5e-3 * component(state.qvel, 2) ** 2
        return {
            "reward_survive": self.healthy_reward * indicator(xp, y > 1.0, y),
            "distance_penalty": -distance_penalty,
            "velocity_penalty": -velocity_penalty,
        }

    @staticmethod
    def _fallen(tip: Any) -> Any:
        return component(tip, 2) <= 1.0
