"""gradgym's allocator: jemalloc preloaded in the processes it starts (platform/allocator.py)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from conftest import clean_env, run_gradgym

from gradgym.platform.allocator import (
    ALLOCATOR_VARIABLE,
    AllocatorError,
    allocator_library,
    with_allocator,
)
from gradgym.platform.sweep import start_sweep

REPORT = ("import torch; from gradgym.platform.allocator import loaded_allocator; "
          "x = torch.ones(4096); print(loaded_allocator(), int(x.sum()))")


def _report(env: dict[str, str]) -> str:
    """What a fresh Python process started with ``env`` says it runs on."""
    result = subprocess.run([sys.executable, "-c", REPORT], env=env, capture_output=True,
                            text=True, timeout=120, check=True)
    return result.stdout.strip()


def test_jemalloc_is_the_default_and_comes_with_ray():
    library = allocator_library({})
    assert library is not None and Path(library).is_file()
    assert Path(library).name == "libjemalloc.so"


def test_the_library_goes_first_in_ld_preload_once():
    library = allocator_library({})
    env = with_allocator({"LD_PRELOAD": "/opt/other.so"})
    assert env["LD_PRELOAD"].split() == [library, "/opt/other.so"]
    assert with_allocator(env) == env


def test_system_leaves_the_environment_as_it_is():
    environ = {ALLOCATOR_VARIABLE: "system", "PATH": "/bin"}
    assert allocator_library(environ) is None
    assert with_allocator(environ) == environ


def test_another_library_by_its_path(tmp_path):
    library = tmp_path / "libother.so"
    library.write_bytes(b"")
    assert allocator_library({ALLOCATOR_VARIABLE: str(library)}) == str(library)


def test_an_unknown_allocator_is_refused_with_the_choices():
    with pytest.raises(AllocatorError) as caught:
        allocator_library({ALLOCATOR_VARIABLE: "/no/such/libmalloc.so"})
    message = str(caught.value)
    assert "/no/such/libmalloc.so" in message and "'jemalloc'" in message and "'system'" in message


def test_a_process_started_with_it_runs_on_jemalloc_and_without_it_on_the_system_one():
    assert _report(with_allocator(clean_env())) == "libjemalloc.so 4096"
    assert _report(clean_env(**{ALLOCATOR_VARIABLE: "system"})) == "system 4096"


def test_gradgym_run_refuses_an_unknown_allocator_before_it_starts(tmp_path):
    result = run_gradgym(["run", "pipeline=cem", "backend=numpy", "run_dir=never"], cwd=tmp_path,
                         **{ALLOCATOR_VARIABLE: "tcmalloc"})
    assert result.returncode == 2
    assert f"{ALLOCATOR_VARIABLE}='tcmalloc'" in result.stderr and "'jemalloc'" in result.stderr
    assert not (tmp_path / "never").exists()


def test_a_sweep_refuses_an_unknown_allocator_before_it_starts(tmp_path, monkeypatch):
    sweep_file = tmp_path / "sweep.yaml"
    sweep_file.write_text("name: never\ngrid:\n  seed: [0, 1]\n")
    monkeypatch.setenv(ALLOCATOR_VARIABLE, str(tmp_path / "missing.so"))
    with pytest.raises(AllocatorError, match="missing.so"):
        start_sweep(sweep_file, storage=str(tmp_path / "sweeps"))
    assert not (tmp_path / "sweeps").exists() or not any((tmp_path / "sweeps").iterdir())
