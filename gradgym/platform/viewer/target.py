"""What ``gradgym view`` shows: an env (with task arguments) or a run folder, checked up front.

Every check here runs before the server starts, so bad input costs nothing and gets a message
that says what was wrong and what is allowed.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from gradgym.platform.records import CONFIG_FILE, RunRecord


class ViewerError(ValueError):
    """Bad input to ``gradgym view`` (unknown env, not a run folder, busy port...)."""


@dataclass(frozen=True)
class ViewTarget:
    """An env to show, and optionally the run whose plan or policy acts in it.

    Attributes:
        env: a registered env name.
        env_kwargs: its task arguments.
        seed: the default reset seed (a run's own seed when there is a run).
        run: the run folder that provides actions (replay, or follow while it runs).
    """

    env: str
    env_kwargs: dict[str, Any] = field(default_factory=dict)
    seed: int = 0
    run: RunRecord | None = None

    @property
    def title(self) -> str:
        args = ", ".join(f"{key}={value}" for key, value in self.env_kwargs.items())
        name = f"{self.env}({args})" if args else self.env
        return f"{name} — run {self.run.folder.name}" if self.run else name


def resolve_target(what: str, overrides: Sequence[str] = (), run: str | None = None) -> ViewTarget:
    """The target of ``gradgym view WHAT [key=value ...] [--run FOLDER]``.

    ``what`` is a registered env name or a run folder (``gradgym run``'s or a sweep trial's).
    ``key=value`` items are task arguments of the env (e.g. ``num_joints=3``), or ``seed=N``.

    Raises:
        ViewerError: an unknown env or task argument, a malformed item, a folder that is not
            a run, or ``--run`` on a run of another env.
    """
    kwargs = _parse_overrides(overrides)
    seed = kwargs.pop("seed", None)
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int) or seed < 0):
        raise ViewerError(f"seed must be an int >= 0, got {seed!r}")
    if _looks_like_folder(what):
        if kwargs:
            raise ViewerError(f"a run folder is replayed with its own env arguments; drop {sorted(kwargs)}")
        target = _run_target(Path(what))
        return ViewTarget(target.env, target.env_kwargs, target.seed if seed is None else seed, target.run)

    kwargs = _live_render_defaults(what, kwargs)
    _check_env(what, kwargs)
    record = None
    if run is not None:
        run_target = _run_target(Path(run))
        record = run_target.run
        if run_target.env != what or _physics_kwargs(run_target.env_kwargs) != _physics_kwargs(kwargs):
            raise ViewerError(
                f"--run {run}: that run optimized {run_target.env} with "
                f"{_physics_kwargs(run_target.env_kwargs)}, not {what} with {_physics_kwargs(kwargs)}; "
                f"its actions only fit its own env (view it with: gradgym view {run})")
    return ViewTarget(what, kwargs, 0 if seed is None else seed, record)


RENDER_KWARGS = ("width", "height", "render_effects")  # task arguments that only change frames


def _physics_kwargs(kwargs: dict[str, Any]) -> dict[str, Any]:
    return {key: value for key, value in kwargs.items() if key not in RENDER_KWARGS}


def _looks_like_folder(what: str) -> bool:
    return Path(what).is_dir() or "/" in what or what.startswith(".")


def _run_target(folder: Path) -> ViewTarget:
    if not folder.is_dir():
        raise ViewerError(f"{str(folder)!r} is not a folder (give an env name such as Pendulum, "
                          "or a run folder such as runs/<name> or a sweep trial's folder)")
    record = RunRecord(folder)
    if not record.started():
        raise ViewerError(f"{str(folder)!r} is not a run folder: it has no {CONFIG_FILE} (a run "
                          "folder is what `gradgym run` or a sweep trial writes)")
    try:
        cfg = record.read_config()
        env, seed = str(cfg.env), int(cfg.seed)
        kwargs = dict(cfg.get("env_kwargs") or {})
    except Exception as err:
        raise ViewerError(f"{str(folder / CONFIG_FILE)!r} is not a readable run config: {err}") from err
    kwargs = _live_render_defaults(env, kwargs)
    _check_env(env, kwargs)
    return ViewTarget(env, kwargs, seed, record)


def _live_render_defaults(name: str, kwargs: dict[str, Any]) -> dict[str, Any]:
    """MuJoCo frames without shadows, reflections and multisampling unless asked for: ~25x
    cheaper on a software GL renderer, the difference between a few and 30+ frames/s there
    (``benchmarks/viewer_fps.py``). ``render_effects=true`` on the command line restores them."""
    from gradgym.envs import registered
    from gradgym.envs.core import task_arguments

    entry = registered().get(name)
    if entry is not None and "render_effects" in task_arguments(entry.factory):
        return {"render_effects": False, **kwargs}
    return kwargs


def _check_env(name: str, kwargs: dict[str, Any]) -> None:
    from gradgym.envs import make

    try:
        make(name, backend="numpy", **kwargs)
    except (ValueError, TypeError) as err:
        raise ViewerError(str(err)) from err


def _parse_overrides(items: Sequence[str]) -> dict[str, Any]:
    parsed: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ViewerError(f"expected key=value (a task argument such as num_joints=3, or "
                              f"seed=N), got {item!r}")
        key = key.removeprefix("env_kwargs.")
        try:
            parsed[key] = yaml.safe_load(value)
        except yaml.YAMLError as err:
            raise ViewerError(f"cannot read the value of {item!r}: {err}") from err
    return parsed
