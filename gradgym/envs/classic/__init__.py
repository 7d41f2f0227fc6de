"""The five tasks of Ivy Gym, rebuilt as batched, differentiable, backend-agnostic tasks."""

from gradgym.envs.classic.cartpole import CartPole, CartPoleState
from gradgym.envs.classic.mountain_car import MountainCar, MountainCarState
from gradgym.envs.classic.pendulum import Pendulum, PendulumState
from gradgym.envs.classic.reacher import Reacher, ReacherState
from gradgym.envs.classic.swimmer import Swimmer, SwimmerState

TASKS = (CartPole, Pendulum, MountainCar, Reacher, Swimmer)

__all__ = [
    "TASKS",
    "CartPole",
    "CartPoleState",
    "MountainCar",
    "MountainCarState",
    "Pendulum",
    "PendulumState",
    "Reacher",
    "ReacherState",
    "Swimmer",
    "SwimmerState",
]
