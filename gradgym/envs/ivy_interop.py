"""ivy interop: ``gradgym.make(name, backend="ivy")`` takes and returns ``ivy.Array``s.

ivy is supported at the boundary only. The arrays ivy wraps are unwrapped, the step runs
on the native arrays of the backend ivy is set to (``ivy.set_backend("torch")``; numpy when
none is set) with gradgym's own numpy/jax/torch code, and the results are wrapped again.
ivy is not the computation substrate: with ivy 1.0.0.5 an elementwise op through ivy costs
about a millisecond, and ``jax.jit`` cannot trace ivy arrays.

::

    import ivy
    ivy.set_backend("torch")
    env = gradgym.make("Pendulum", backend="ivy")
    state = env.reset(0, batch=8)              # fields are ivy.Array wrapping torch tensors
    state, obs, reward, done = env.step(state, ivy.zeros((8, 1)))

What works with ivy 1.0.0.5 here: the numpy and torch ivy backends fully; torch autograd
flows through the wrapped tensors (``reward.data.sum().backward()``). With the jax ivy
backend stepping works, but ivy itself cannot print an array or convert it with
``ivy.to_numpy`` (it looks up ``jax.interpreters.batching.BatchTracer``, which current jax
removed); use ``gradgym.envs.to_numpy(x)`` or ``x.data`` instead. For ``jax.jit``/``grad``
use ``backend="jax"`` directly.

Importing ivy takes a few seconds and makes an empty ``ivy_logs.txt`` in the working
directory (ivy's own logger), so ivy is imported only when an ivy env is built.
"""

from __future__ import annotations

import warnings
from typing import Any

import numpy as np

from gradgym.envs.backends import ARRAY_BACKENDS, DTYPES, BackendUnavailableError, get_backend
from gradgym.envs.core import Env, EnvSpec, Task

NATIVE_BACKENDS = ARRAY_BACKENDS
"""The ivy backends gradgym computes on."""


def import_ivy() -> Any:
    """The ``ivy`` module, or a clear error when it is not installed."""
    try:
        import ivy
    except ImportError as err:  # pragma: no cover - depends on the install
        raise BackendUnavailableError(
            f"backend 'ivy' needs the 'ivy' package, which is not importable: {err}. "
            "Install gradgym with its dependencies (pip install -e .)."
        ) from err
    return ivy


class IvyEnv:
    """A task computed on the native arrays under ``ivy.Array``s (see the module docs).

    Same functions as :class:`~gradgym.envs.core.Env`: ``reset``, ``step``, ``observe``,
    ``reward``, ``render``, ``as_state`` and ``spec`` (with ``spec.backend == "ivy"``).
    Inputs may be ``ivy.Array``s or native arrays of ivy's current backend; outputs are
    ``ivy.Array``s. The native backend is read from ivy at each call, so an env follows
    ``ivy.set_backend``; a state made under one ivy backend must be converted
    (:meth:`as_state`) before stepping under another.

    Args:
        task: the task (built by ``gradgym.make``).
        dtype: ``"float32"`` or ``"float64"``.
    """

    def __init__(self, task: Task, dtype: str = "float32"):
        if dtype not in DTYPES:
            raise ValueError(f"unknown dtype {dtype!r}; available: {', '.join(DTYPES)}")
        self.ivy = import_ivy()
        self.task = task
        self.dtype = dtype
        self.State = task.State
        self.spec = EnvSpec(name=task.name, obs_dim=task.obs_dim, act_dim=task.act_dim,
                            dt=task.dt, horizon=task.horizon, backend="ivy", dtype=dtype)
        self._native_envs: dict[str, Env] = {}

    def __repr__(self) -> str:
        return f"IvyEnv({self.task!r}, dtype={self.dtype!r})"

    # ------------------------------------------------------------------ functional
    def reset(self, rng: Any, batch: int = 1) -> Any:
        """``batch`` start states; ``rng`` is an int seed or a generator of the native backend."""
        return self._wrap(self.native_env().reset(rng, batch))

    def step(self, state: Any, action: Any) -> tuple[Any, Any, Any, Any]:
        """``(next_state, obs, reward, done)`` as ``ivy.Array``s (see ``Env.step``)."""
        env = self.native_env()
        result = env.step(self._unwrap(env, state, "state"), self._unwrap(env, action, "action"))
        return tuple(self._wrap(item) for item in result)  # type: ignore[return-value]

    def observe(self, state: Any) -> Any:
        """The observation ``[B, obs_dim]``."""
        env = self.native_env()
        return self._wrap(env.observe(self._unwrap(env, state, "state")))

    def reward(self, state: Any) -> Any:
        """The reward ``[B]``."""
        env = self.native_env()
        return self._wrap(env.reward(self._unwrap(env, state, "state")))

    # ------------------------------------------------------------------ utilities
    @property
    def backend(self) -> Any:
        """The :class:`~gradgym.envs.backends.Backend` ivy currently computes on."""
        return self.native_env().backend

    def native_env(self) -> Env:
        """The :class:`Env` on ivy's current backend (numpy when none is set)."""
        name = self.ivy.current_backend_str() or "numpy"
        env = self._native_envs.get(name)
        if env is None:
            if name not in NATIVE_BACKENDS:
                raise ValueError(
                    f"ivy's backend is {name!r}, which gradgym does not compute on; call "
                    f"ivy.set_backend with one of {', '.join(NATIVE_BACKENDS)}"
                )
            if name == "jax":
                _warn_about_ivy_jax()
            env = Env(self.task, get_backend(name, self.dtype))
            self._native_envs[name] = env
        return env

    def as_state(self, state: Any) -> Any:
        """Convert a state of any backend's (or ivy's) arrays to ivy's current backend."""
        return self._wrap(self.native_env().as_state(_map(_data, state)))

    def render(self, state: Any, index: int = 0, size: int | None = None) -> np.ndarray:
        """An ``H x W x 3`` uint8 frame of entry ``index`` (``size``: see :meth:`Env.render`)."""
        return self.native_env().render(_map(_data, state), index, size)

    def _wrap(self, value: Any) -> Any:
        return _map(self.ivy.Array, value)

    def _unwrap(self, env: Env, value: Any, what: str) -> Any:
        expected = env.backend.name
        ivy = self.ivy

        def unwrap(leaf: Any) -> Any:
            native = leaf.data if isinstance(leaf, ivy.Array) else leaf
            if _library_of(native) != expected:
                raise TypeError(
                    f"{self.spec.name}: {what} holds a {type(native).__module__}."
                    f"{type(native).__name__}, but ivy's backend is {expected!r}; pass "
                    f"ivy.Arrays made under that backend (or convert a state with as_state)"
                )
            return native

        return _map(unwrap, value)


def _library_of(array: Any) -> str:
    module = type(array).__module__.split(".")[0]
    return {"jaxlib": "jax", "jax": "jax", "torch": "torch", "numpy": "numpy"}.get(module, module)


def _data(leaf: Any) -> Any:
    return getattr(leaf, "data", leaf) if type(leaf).__module__.startswith("ivy") else leaf


def _map(fn: Any, value: Any) -> Any:
    """Apply ``fn`` to every array of a (possibly nested) NamedTuple, or to one array."""
    if isinstance(value, tuple) and hasattr(value, "_fields"):
        return type(value)(*(_map(fn, leaf) for leaf in value))
    return fn(value)


_warned_about_jax = False


def _warn_about_ivy_jax() -> None:
    global _warned_about_jax
    from jax.interpreters import batching

    if _warned_about_jax or hasattr(batching, "BatchTracer"):
        return
    _warned_about_jax = True
    warnings.warn(
        "ivy 1.0.0.5's jax backend predates this jax: ivy cannot print jax-backed ivy.Arrays "
        "or convert them with ivy.to_numpy (it needs jax.interpreters.batching.BatchTracer). "
        "gradgym's step works; read values with gradgym.envs.to_numpy(x) or x.data, and use "
        'backend="jax" for jit/grad.',
        RuntimeWarning,
        stacklevel=4,
    )
