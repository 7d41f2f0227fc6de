"""The C allocator of the processes gradgym starts: jemalloc, preloaded.

A compiled torch rollout (``pipelines/_torch_loop.py``) allocates each loop iteration's
intermediate tensors anew, a dozen small ones per step. torch aligns CPU tensors to 64
bytes, and glibc (2.36, Debian 12) serves aligned requests outside its per-thread cache:
``malloc``/``free`` took about a quarter of a compiled Reacher iteration. jemalloc serves
them from per-thread caches; the compiled call then takes about 30% less (see the README's
speed section). The wheel of Ray, a dependency, ships a ``libjemalloc.so``.

A process's allocator is fixed when it starts, so it is chosen for the processes gradgym
starts: ``gradgym run`` executes itself again once with the library in ``LD_PRELOAD``, and
sweeps pass it to their trials' workers in Ray's runtime env. Python that imports gradgym
in a process of its own (a notebook, a script) keeps the allocator it started with; start
it with ``LD_PRELOAD=$(python -m gradgym.platform.allocator)`` to match ``gradgym run``.

``GRADGYM_MALLOC`` picks the allocator: ``jemalloc`` (the default), ``system`` (the C
library's own), or the path of another malloc library (e.g. Debian's
``/usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4``).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

from gradgym.platform.config import ConfigError

ALLOCATOR_VARIABLE = "GRADGYM_MALLOC"
DEFAULT_ALLOCATOR = "jemalloc"
SYSTEM = "system"
# Set in the environment of a process that gradgym executed again with its allocator: it
# is never executed a second time, whether or not the loader could preload the library.
_EXECUTED_AGAIN = "GRADGYM_MALLOC_PRELOADED"


class AllocatorError(ConfigError):
    """``GRADGYM_MALLOC`` names no allocator gradgym can preload."""


def allocator_library(environ: Mapping[str, str] = os.environ) -> str | None:
    """The path of the library to preload, or ``None`` for the C library's own allocator.

    Raises :class:`AllocatorError` when ``GRADGYM_MALLOC`` is neither a known name nor a
    file. ``jemalloc`` falls back to the system allocator where Ray's wheel has none (a
    platform it ships no library for)."""
    choice = environ.get(ALLOCATOR_VARIABLE, DEFAULT_ALLOCATOR).strip() or DEFAULT_ALLOCATOR
    if choice == SYSTEM:
        return None
    if choice == DEFAULT_ALLOCATOR:
        bundled = _ray_jemalloc()
        return str(bundled) if bundled is not None else None
    if not Path(choice).is_file():
        raise AllocatorError(
            f"{ALLOCATOR_VARIABLE}={choice!r}: no such file; allowed: {DEFAULT_ALLOCATOR!r} "
            f"(the default), {SYSTEM!r}, or the path of a malloc library")
    return str(Path(choice).resolve())


def with_allocator(environ: Mapping[str, str]) -> dict[str, str]:
    """A copy of ``environ`` whose processes start with gradgym's allocator: the library
    first in ``LD_PRELOAD`` (kept as is where it is there already, or where the choice is
    ``system``)."""
    env = dict(environ)
    library = allocator_library(environ)
    preloaded = env.get("LD_PRELOAD", "").split()
    if library is not None and library not in preloaded:
        env["LD_PRELOAD"] = " ".join([library, *preloaded])
    return env


def loaded_allocator() -> str:
    """The malloc library this process runs on: a preloaded library's file name (e.g.
    ``libjemalloc.so``), or ``system``."""
    preloaded = os.environ.get("LD_PRELOAD", "").split()
    mapped = _mapped_files()
    for library in preloaded:
        if os.path.realpath(library) in mapped or any(
                Path(path).name == Path(library).name for path in mapped):
            return Path(library).name
    return SYSTEM


def execute_with_allocator(argv: Sequence[str]) -> None:
    """Replace this process by ``argv`` (a Python command line) started with gradgym's
    allocator, unless it runs on it already, or was started so once. Returns only when
    nothing is to be done; an invalid ``GRADGYM_MALLOC`` raises :class:`AllocatorError`
    first."""
    if os.environ.get(_EXECUTED_AGAIN):
        return
    library = allocator_library()
    if library is None or loaded_allocator() == Path(library).name:
        return
    env = with_allocator(os.environ) | {_EXECUTED_AGAIN: "1"}
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, [sys.executable, *argv], env)


def _ray_jemalloc() -> Path | None:
    """The jemalloc of Ray's wheel, found without importing Ray; ``None`` where it has none."""
    import importlib.util

    spec = importlib.util.find_spec("ray")
    if spec is None or not spec.submodule_search_locations:
        return None
    library = Path(next(iter(spec.submodule_search_locations))) / "core" / "libjemalloc.so"
    return library if library.is_file() else None


def _mapped_files() -> set[str]:
    """The files mapped into this process (Linux; empty elsewhere)."""
    try:
        lines = Path("/proc/self/maps").read_text().splitlines()
    except OSError:
        return set()
    fields = (line.split(maxsplit=5) for line in lines)  # the 6th, where present: the path
    return {f[5] for f in fields if len(f) == 6}


if __name__ == "__main__":  # the library to preload, for a shell: LD_PRELOAD=$(python -m ...)
    print(allocator_library() or "")
