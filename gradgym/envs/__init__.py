"""Differentiable environments: a functional, batched core over numpy, jax and torch.

``make`` builds an :class:`~gradgym.envs.core.Env`; ``registered`` lists what exists.
"""

from gradgym.envs.backends import BACKENDS, DTYPES, Backend, get_backend, to_numpy
from gradgym.envs.classic import TASKS as CLASSIC_TASKS
from gradgym.envs.core import Env, EnvSpec, Renderer, Task, make, register, registered

for _task in CLASSIC_TASKS:
    register(_task.name, _task, family="classic")

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
