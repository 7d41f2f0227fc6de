"""gradgym: experiments on fully differentiable reinforcement-learning environments."""

from gradgym.envs import make, registered

__version__ = "0.1.0"

__all__ = ["__version__", "make", "registered"]
