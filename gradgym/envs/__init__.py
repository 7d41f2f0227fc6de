"""Differentiable environments: a functional, batched core over numpy, jax and torch.

``make`` builds an :class:`~gradgym.envs.core.Env`; ``registered`` lists what exists.
"""

from gradgym.envs.backends import BACKENDS, DTYPES, Backend, get_backend, to_numpy
from gradgym.envs.classic import TASKS as CLASSIC_TASKS
from gradgym.envs.core import Env, EnvSpec, Renderer, Task, make, register, registered

for _task in CLASSIC_TASKS:
    register(_task.name, _task, family="classic")

# The MuJoCo family (Gymnasium v5 semantics on MuJoCo's engine; no ivy boundary).
from gradgym.envs.mujoco import TASKS as MUJOCO_TASKS

for _task in MUJOCO_TASKS:
    register(_task.name, _task, backends=("numpy", "jax", "torch"), family="mujoco")

__all__ = [
    "BACKENDS",
    "DTYPES",
    "Backend",
    "Env",
    "EnvSpec",
    "Renderer",
    "Task",
    "get_backend",
    "make",
    "register",
    "registered",
    "to_numpy",
]

# Beside the functional core: wrappers, videos, ivy interop and the Gymnasium adapter.
# The adapter registers every env above as "gradgym/<Name>-v0" with Gymnasium; keep this
# call after the last register() so that every family is included.
from gradgym.envs.gym_adapter import GymEnv, gym_id, register_gymnasium_envs
from gradgym.envs.ivy_interop import IvyEnv
from gradgym.envs.video import render_rollout, write_gif, write_mp4, write_video
from gradgym.envs.wrappers import TimeLimit, TimeLimitState, VecEnv

register_gymnasium_envs()

__all__ += [
    "GymEnv",
    "IvyEnv",
    "TimeLimit",
    "TimeLimitState",
    "VecEnv",
    "gym_id",
    "register_gymnasium_envs",
    "render_rollout",
    "write_gif",
    "write_mp4",
    "write_video",
]
