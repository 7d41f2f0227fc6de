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

from gradgym.envs.mujoco.ant import Ant
from gradgym.envs.mujoco.base import MujocoState, MujocoTask
from gradgym.envs.mujoco.half_cheetah import HalfCheetah
from gradgym.envs.mujoco.hopper import Hopper
from gradgym.envs.mujoco.humanoid import Humanoid
from gradgym.envs.mujoco.inverted_double_pendulum import InvertedDoublePendulum
from gradgym.envs.mujoco.inverted_pendulum import InvertedPendulum
from gradgym.envs.mujoco.swimmer import Swimmer
from gradgym.envs.mujoco.walker2d import Walker2d

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
