"""Persistent compile caches: compile a pipeline once per node, not once per process.

A jax trajectory trial spends seconds compiling for milliseconds of iterations, and every
Ray trial, sweep and ``gradgym run`` is a fresh process. :func:`enable_compile_cache` points
jax's persistent compilation cache and torch inductor's caches at subfolders of one folder,
so the second process that compiles the same computation loads it instead. The folder
should be node-local and shared by the processes of a node (e.g. ``~/.cache/gradgym`` or a
sweep's working directory); caches are keyed by the computation, the library versions and
the machine, so sharing one folder between different programs is safe.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

JAX_SUBFOLDER = "jax"
TORCH_SUBFOLDER = "torchinductor"

_enabled: dict[str, str] = {}  # library -> the folder its cache was pointed at


def enable_compile_cache(folder: str | Path) -> None:
    """Turn on jax's persistent compilation cache and torch inductor's caches under ``folder``.

    ``folder/jax`` holds jax's cache (every compilation is written, however short or small),
    ``folder/torchinductor`` inductor's FX graph, AOT autograd and autotuning caches. Safe to
    call in any process, several times, before compiling: it imports neither library (it
    configures jax if jax is importable and sets inductor's environment variables, which
    torch reads when it compiles; an already imported ``torch._inductor.config`` is updated
    too). Calling it again with the same folder does nothing; with another folder it
    switches both caches to it.
    """
    root = Path(folder).expanduser().resolve()
    _enable_jax(root / JAX_SUBFOLDER)
    _enable_torch(root / TORCH_SUBFOLDER)


def _enable_jax(path: Path) -> None:
    if _enabled.get("jax") == str(path):
        return
    try:
        import jax
    except ImportError:  # jax is optional for this function: nothing to configure
        return
    path.mkdir(parents=True, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", str(path))
    # The defaults skip compilations under 1 s and tiny entries: a pipeline's are worth it.
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", -1)
    if "jax" in _enabled:  # switching folders: drop the cache opened on the old one
        from jax.experimental.compilation_cache import compilation_cache

        compilation_cache.reset_cache()
    _enabled["jax"] = str(path)


def _enable_torch(path: Path) -> None:
    if _enabled.get("torch") == str(path):
        return
    path.mkdir(parents=True, exist_ok=True)
    settings = {
        "TORCHINDUCTOR_CACHE_DIR": str(path),
        "TORCHINDUCTOR_FX_GRAPH_CACHE": "1",
        "TORCHINDUCTOR_AUTOGRAD_CACHE": "1",
        "TRITON_CACHE_DIR": str(path / "triton"),
    }
    os.environ.update(settings)  # read when inductor compiles; inherited by child processes
    config = sys.modules.get("torch._inductor.config")
    if config is not None:  # already imported: its flags were read from the environment
        for flag in ("fx_graph_cache", "autotune_local_cache"):
            if hasattr(config, flag):
                setattr(config, flag, True)
    functorch_config = sys.modules.get("torch._functorch.config")
    if functorch_config is not None and hasattr(functorch_config, "enable_autograd_cache"):
        functorch_config.enable_autograd_cache = True
    _enabled["torch"] = str(path)
