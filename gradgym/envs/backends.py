"""Array backends: one namespace, dtype and random-number adapter per backend.

Environments are written once against the Python Array API standard and receive the
namespace (``xp``) of their backend. The namespace is the library's own where it already
follows the standard (``numpy`` >= 2, ``jax.numpy``) and ``array_api_compat``'s thin
torch namespace otherwise, so a step costs what the hand-written code would.

Randomness is the one thing the standard lacks. :class:`Backend` maps an ``rng`` -- an
int seed or a native key/generator -- to the backend's own generator and draws uniform
samples from it.
"""

from __future__ import annotations

import functools
import importlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

# The one list of backends; every other module imports these names.
ARRAY_BACKENDS = ("numpy", "jax", "torch")  # gradgym computes on these arrays
AUTODIFF_BACKENDS = ("jax", "torch")  # ... and differentiates through these
INTEROP_BACKENDS = ("ivy",)  # accepted at the boundary, computed on an array backend
BACKENDS = ARRAY_BACKENDS + INTEROP_BACKENDS
DTYPES = ("float32", "float64")


class BackendUnavailableError(ImportError):
    """The backend's library is not installed."""


@dataclass(frozen=True)
class Backend:
    """An array library as environments see it.

    Attributes:
        name: one of ``ARRAY_BACKENDS``.
        xp: the Array API namespace the dynamics are written against.
        dtype: the floating dtype object of that library.
    """

    name: str
    xp: Any
    dtype: Any

    @property
    def dtype_name(self) -> str:
        """``"float32"`` or ``"float64"``."""
        # numpy and jax dtypes are scalar types (str gives "<class 'numpy.float32'>").
        return getattr(self.dtype, "__name__", None) or str(self.dtype).rsplit(".", 1)[-1]

    # ----------------------------------------------------------------- conversion
    def asarray(self, value: Any) -> Any:
        """Convert ``value`` (any backend's array, numpy array or list) to this backend."""
        if self.name == "torch":
            torch = self.xp
            if isinstance(value, torch.Tensor):
                return value.to(self.dtype)
            return torch.as_tensor(np.asarray(value), dtype=self.dtype)
        if self.name == "jax":
            return self.xp.asarray(_to_numpy_if_foreign(value, "jax"), dtype=self.dtype)
        return np.asarray(to_numpy(value), dtype=self.dtype)

    def zeros(self, shape: tuple[int, ...]) -> Any:
        """Floating zeros of this backend's dtype."""
        return self.xp.zeros(shape, dtype=self.dtype)

    def falses(self, shape: tuple[int, ...]) -> Any:
        """Boolean ``False`` array (the classic tasks never terminate)."""
        return self.xp.zeros(shape, dtype=self.xp.bool)

    # ----------------------------------------------------------------- randomness
    def generator(self, rng: Any) -> Any:
        """Map an int seed or a native key/generator to this backend's generator.

        numpy: ``numpy.random.Generator``; torch: ``torch.Generator``; jax: a PRNG key.
        A native generator is returned as is (and advanced by draws from it).
        """
        if self.name == "jax":
            import jax

            if isinstance(rng, (int, np.integer)):
                return jax.random.key(int(rng))
            return rng
        if self.name == "torch":
            torch = self.xp
            if isinstance(rng, torch.Generator):
                return rng
            gen = torch.Generator()
            gen.manual_seed(_int_seed(rng))
            return gen
        if isinstance(rng, np.random.Generator):
            return rng
        return np.random.default_rng(_int_seed(rng))

    def uniform(self, rng: Any, shape: tuple[int, ...], low: Any, high: Any) -> Any:
        """Samples from U(low, high) of the backend's dtype; ``low``/``high`` broadcast."""
        gen = self.generator(rng)
        if self.name == "jax":
            import jax

            return jax.random.uniform(gen, shape, dtype=self.dtype, minval=low, maxval=high)
        if self.name == "torch":
            torch = self.xp
            unit = torch.rand(shape, generator=gen, dtype=self.dtype)
        else:
            unit = gen.random(shape, dtype=self.dtype)
        return low + (high - low) * unit

    def normal(self, rng: Any, shape: tuple[int, ...]) -> Any:
        """Standard normal samples of the backend's dtype."""
        gen = self.generator(rng)
        if self.name == "jax":
            import jax

            return jax.random.normal(gen, shape, dtype=self.dtype)
        if self.name == "torch":
            return self.xp.randn(shape, generator=gen, dtype=self.dtype)
        return gen.standard_normal(shape, dtype=self.dtype)

    def split(self, rng: Any, num: int) -> list[Any]:
        """``num`` independent generators derived from ``rng``."""
        gen = self.generator(rng)
        if self.name == "jax":
            import jax

            return list(jax.random.split(gen, num))
        if self.name == "torch":
            seeds = self.xp.randint(0, 2**62, (num,), generator=gen).tolist()
        else:
            seeds = gen.integers(0, 2**62, size=num).tolist()
        return [self.generator(seed) for seed in seeds]


def _int_seed(rng: Any) -> int:
    if isinstance(rng, (int, np.integer)) and not isinstance(rng, bool):
        return int(rng)
    raise TypeError(
        f"rng must be an int seed or a native generator, got {type(rng).__name__}"
    )


def to_numpy(value: Any) -> np.ndarray:
    """Any backend's array (or ivy array) as a numpy array on the host."""
    if isinstance(value, np.ndarray):
        return value
    module = type(value).__module__
    if module.startswith("torch"):
        return value.detach().cpu().numpy()
    if module.startswith("ivy"):
        return to_numpy(value.data)
    return np.asarray(value)


def _to_numpy_if_foreign(value: Any, backend: str) -> Any:
    module = type(value).__module__
    if module.startswith(backend):
        return value
    return to_numpy(value)


def _import(name: str) -> Any:
    try:
        return importlib.import_module(name)
    except ImportError as err:  # pragma: no cover - depends on the install
        raise BackendUnavailableError(
            f"backend needs the '{name.split('.')[0]}' package, which is not installed: "
            f"{err}. Install gradgym with its default extras (pip install -e .)."
        ) from err


def _numpy_namespace() -> Any:
    return np


def _jax_namespace() -> Any:
    return _import("jax.numpy")


def _torch_namespace() -> Any:
    return _import("torch")


_NAMESPACES: dict[str, Callable[[], Any]] = {
    "numpy": _numpy_namespace,
    "jax": _jax_namespace,
    "torch": _torch_namespace,
}
assert tuple(_NAMESPACES) == ARRAY_BACKENDS


@functools.cache
def get_backend(name: str, dtype: str = "float32") -> Backend:
    """The :class:`Backend` named ``name`` with floating dtype ``dtype``.

    Raises:
        ValueError: unknown backend or dtype (the message lists what is available).
    """
    if name not in ARRAY_BACKENDS:
        interop = " (ivy envs are made with gradgym.make(name, backend='ivy'))" if name in INTEROP_BACKENDS else ""
        raise ValueError(
            f"unknown array backend {name!r}{interop}; available: {', '.join(ARRAY_BACKENDS)}"
        )
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; available: {', '.join(DTYPES)}")
    lib = _NAMESPACES[name]()
    if name == "jax" and dtype == "float64":
        # jax has float64 arrays only with x64 on; it is a global switch, so it is flipped
        # only when float64 is asked for (float32 code keeps jax's defaults).
        import jax

        jax.config.update("jax_enable_x64", True)
    return Backend(name=name, xp=lib, dtype=getattr(lib, dtype))
