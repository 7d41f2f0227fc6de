"""The MuJoCo family: eight Gymnasium-v5 tasks on MuJoCo's own engine.

InvertedPendulum-v5, InvertedDoublePendulum-v5, Swimmer-v5, Hopper-v5, HalfCheetah-v5,
Walker2d-v5, Ant-v5 and Humanoid-v5: stepped in batches by MuJoCo (numpy), and
differentiable on torch and jax through the Jacobians of MuJoCo's step. The models are
Gymnasium's XML assets; importing this package does not load MuJoCo (making an env does).
"""

import os

# Headless rendering: MuJoCo picks its GL backend when it is first imported, so the
# default is set here, before any gradgym module imports it, and only if the user has
# not chosen one.
os.environ.setdefault("MUJOCO_GL", "egl")

from gradgym.envs.mujoco.ant import Ant  # noqa: E402
from gradgym.envs.mujoco.base import MujocoState, MujocoTask  # noqa: E402
from gradgym.envs.mujoco.half_cheetah import HalfCheetah  # noqa: E402
from gradgym.envs.mujoco.hopper import Hopper  # noqa: E402
from gradgym.envs.mujoco.humanoid import Humanoid  # noqa: E402
from gradgym.envs.mujoco.inverted_double_pendulum import InvertedDoublePendulum  # noqa: E402
from gradgym.envs.mujoco.inverted_pendulum import InvertedPendulum  # noqa: E402
from gradgym.envs.mujoco.swimmer import Swimmer  # noqa: E402
from gradgym.envs.mujoco.walker2d import Walker2d  # noqa: E402

TASKS = (
    InvertedPendulum,
    InvertedDoublePendulum,
    Swimmer,
    Hopper,
    HalfCheetah,
    Walker2d,
    Ant,
    Humanoid,
)

__all__ = [
    "TASKS",
    "Ant",
    "HalfCheetah",
    "Hopper",
    "Humanoid",
    "InvertedDoublePendulum",
    "InvertedPendulum",
    "MujocoState",
    "MujocoTask",
    "Swimmer",
    "Walker2d",
]
