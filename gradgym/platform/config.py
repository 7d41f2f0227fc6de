"""Run and sweep configurations: omegaconf structured configs, validated before any work.

A run config is composed from *layers* — a base YAML (``configs/run.yaml``), a sweep's
``overrides``, one trial's grid values, command-line ``key=value`` items — each a mapping of
(possibly dotted) run-config keys. ``pipeline=<name>`` (any registered pipeline, see
``gradgym.pipelines.registry``) selects the schema of the ``pipeline`` node, then every layer
is merged on top of it::

    cfg = compose_run_config(["pipeline=trajectory", "env=Pendulum", "pipeline.iters=200"])

Anything invalid — an unknown key, a value of the wrong type, an unknown env, backend or
pipeline, a task argument the env does not take, a gradient pipeline on numpy — raises
:class:`ConfigError` naming the key, the bad value and what is allowed.
"""

from __future__ import annotations

import difflib
import functools
import itertools
import math
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any

import numpy as np
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException, ValidationError

from gradgym.envs import DTYPES, make, registered
from gradgym.pipelines import get_pipeline, pipelines
from gradgym.pipelines.config import PipelineConfigError, torch_compiles
from gradgym.pipelines.registry import DEFAULT_PIPELINE

# Where compiled programs are kept between processes (see gradgym.pipelines.compile_cache).
DEFAULT_COMPILE_CACHE = "~/.cache/gradgym/compile"
# The repository's configs/ folder (present in a source checkout or an editable install).
CONFIGS_DIR = Path(__file__).resolve().parents[2] / "configs"


class ConfigError(ValueError):
    """An invalid run or sweep configuration; the message names the key and what is allowed."""


# ---------------------------------------------------------------------- schemas

@dataclass
class TrackingConfig:
    """Where and how a run is logged to MLflow."""

    enabled: bool = True
    # None: $MLFLOW_TRACKING_URI if set, else the embedded store sqlite:///mlflow.db in the
    # working directory.
    uri: str | None = None
    experiment: str = "gradgym"
    flush_every_s: float = 1.0  # buffered metrics go out in one log_batch this often
    outage_limit_s: float = 300.0  # how long the tracking server may stay unreachable
    request_timeout_s: float = 10.0  # per HTTP request to a tracking server
    # SQL stores (sqlite, PostgreSQL): write every run's points of a flush in one transaction
    # (much cheaper than MLflow's log_batch); false: log_batch, as for a tracking server.
    bulk_sql: bool = True


@dataclass
class RunConfig:
    """One pipeline run on one env, backend and seed (``gradgym run``, or one sweep trial)."""

    env: str = "Pendulum"
    backend: str = "torch"
    dtype: str = "float32"
    seed: int = 0
    # The selected pipeline's config dataclass (the registry's ``PipelineSpec.config``).
    pipeline: Any = None
    env_kwargs: dict[str, Any] = field(default_factory=dict)  # task arguments, e.g. num_joints
    run_dir: str | None = None  # None: runs/<pipeline>-<env>-<backend>-s<seed>-<time>
    torch_threads: int = 1  # torch intra-op threads; one trial per CPU wants 1
    # jax's and torch inductor's persistent compile caches, shared by every run and sweep
    # trial on this machine (node-local); null: no cache.
    compile_cache: str | None = DEFAULT_COMPILE_CACHE
    progress: bool = True  # progress bar on the terminal
    tracking: TrackingConfig = field(default_factory=TrackingConfig)


@dataclass
class AshaConfig:
    """ASHA early stopping (Ray Tune's ASHAScheduler) over the reported iterations."""

    metric: str = "return_mean"
    mode: str = "max"
    grace_period: int = 10  # iterations before a trial can be stopped
    reduction_factor: int = 3


@dataclass
class SweepConfig:
    """A sweep file: the trials are the product of ``grid`` (times ``num_samples`` draws of
    ``search``), each one run config composed from ``overrides`` and its own values."""

    name: str = "sweep"
    overrides: dict[str, Any] = field(default_factory=dict)  # run-config keys for every trial
    grid: dict[str, Any] = field(default_factory=dict)  # run-config key -> list of values
    # run-config key -> {distribution: args}: uniform/loguniform/randint [low, high], choice [..]
    search: dict[str, Any] = field(default_factory=dict)
    num_samples: int = 1  # draws of the search space per grid point
    scheduler: str = "fifo"  # fifo | asha
    asha: AshaConfig = field(default_factory=AshaConfig)
    max_failures: int = 2  # retries of a crashed trial
    max_concurrent: int = 0  # 0: as many as the CPUs allow
    cpus_per_trial: float = 1.0
    gpus_per_trial: float = 0.0
    num_cpus: int | None = None  # CPUs of a local Ray (None: all); ignored with RAY_ADDRESS
    storage: str = "sweeps"  # folder of the sweeps' state and trial folders
    experiment: str | None = None  # MLflow experiment; None: the sweep's name
    tune_report_every_s: float = 1.0  # how often a trial reports its progress to Tune
    # Configs per Tune trial: configs that differ only in seed and per-member hyperparameters
    # run together as one vectorized computation (a pack) of at most this many. 1: no packing.
    # null: PACK_DEFAULT, or 1 with scheduler=asha (ASHA stops configs one by one).
    pack: int | None = None
    search_seed: int = 0  # seeds the draws of the search space (the same draws on --resume)


SCHEDULERS = ("fifo", "asha")
MAX_SEED = 2**32 - 1  # numpy's SeedSequence takes any int >= 0; jax and torch take 32/64 bits
# A sweep's folder name, with room for "-N" and Ray's own names beneath it (a file name
# may be 255 bytes on most file systems).
MAX_SWEEP_NAME = 200
# Peak memory of a differentiated rollout over the values it steps through (tape,
# optimizer state, temporaries); generous, so that the check refuses only what cannot fit.
AUTODIFF_OVERHEAD = 4
PACK_DEFAULT = 64
SEARCH_DISTRIBUTIONS = ("uniform", "loguniform", "randint", "choice")
MODES = ("max", "min")


# ---------------------------------------------------------------------- layers

Layer = Mapping[str, Any] | Sequence[str] | DictConfig


def parse_dotlist(items: Iterable[str]) -> dict[str, Any]:
    """``["a.b=1", "c=[0,1]"]`` -> ``{"a.b": 1, "c": [0, 1]}`` (values parsed as YAML)."""
    items = list(items)
    for item in items:
        if "=" not in item or item.startswith("="):
            raise ConfigError(f"expected key=value, got {item!r} (e.g. pipeline.iters=200)")
    flat: dict[str, Any] = {}
    for item in items:
        # One item at a time: "pipeline=cem" and "pipeline.iters=5" must both survive.
        try:
            flat.update(flatten(OmegaConf.to_container(OmegaConf.from_dotlist([item]))))
        except OmegaConfBaseException as err:
            raise ConfigError(f"cannot parse {item!r}: {err}") from None
    return flat


def flatten(mapping: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested mappings -> one mapping of dotted keys (lists and scalars are leaves)."""
    flat: dict[str, Any] = {}
    for key, value in mapping.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, (Mapping, DictConfig)) and value:
            flat.update(flatten(value, dotted + "."))
        else:
            flat[dotted] = value
    return flat


def _as_flat(layer: Layer) -> dict[str, Any]:
    if isinstance(layer, DictConfig):
        layer = OmegaConf.to_container(layer, resolve=True)
    if isinstance(layer, Mapping):
        return flatten(layer)
    if isinstance(layer, (str, bytes)):
        raise TypeError(f"a layer is a mapping or a list of key=value items, got {layer!r}")
    return parse_dotlist(layer)


def _nest(flat: Mapping[str, Any]) -> dict[str, Any]:
    nested: dict[str, Any] = {}
    for dotted, value in flat.items():
        node = nested
        *parents, leaf = dotted.split(".")
        for part in parents:
            child = node.get(part)
            if not isinstance(child, dict):
                child = node[part] = {}
            node = child
        node[leaf] = value
    return nested


def load_yaml(path: str | Path) -> dict[str, Any]:
    """A YAML file as a plain mapping (``ConfigError`` if missing or not a mapping)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {str(path)!r} does not exist")
    try:
        content = OmegaConf.to_container(OmegaConf.load(path), resolve=False)
    except Exception as err:  # noqa: BLE001  (YAML syntax errors come in several types)
        raise ConfigError(f"cannot read {str(path)!r}: {err}") from None
    if not isinstance(content, dict):
        raise ConfigError(f"{str(path)!r} must hold a mapping of config keys, got {content!r}")
    return content


def default_run_layers() -> list[dict[str, Any]]:
    """The base layer of ``gradgym run``: ``configs/run.yaml`` when the checkout has it."""
    base = CONFIGS_DIR / "run.yaml"
    return [load_yaml(base)] if base.is_file() else []


# ---------------------------------------------------------------------- run config

def compose_run_config(*layers: Layer) -> DictConfig:
    """Merge ``layers`` (later ones win) onto the schema of the selected pipeline, validated.

    Returns:
        A read-only ``DictConfig`` of :class:`RunConfig`.

    Raises:
        ConfigError: an unknown key, a wrong type or an invalid value (see the module doc).
    """
    flat_layers = [_as_flat(layer) for layer in layers]
    pipeline = _selected_pipeline(flat_layers)
    cfg = _run_schema(pipeline)
    # The pipeline's own defaults for the env come before every layer, so that any layer
    # (a sweep's overrides, a grid value, the command line) can set them otherwise.
    env = str(_selected(flat_layers, "env", default=RunConfig.env))
    if env_defaults := get_pipeline(pipeline).defaults_for(env):
        cfg = _merge(cfg, {"pipeline": dict(env_defaults)})
    for flat in flat_layers:  # merge returns a new config: the cached schema stays as it is
        flat = {("pipeline.name" if k == "pipeline" else k): v for k, v in flat.items()}
        cfg = _merge(cfg, _nest(flat))
    validate_run_config(cfg)
    _decide_torch_compile(cfg)
    OmegaConf.set_readonly(cfg, True)
    return cfg


def _decide_torch_compile(cfg: DictConfig) -> None:
    """A torch run's ``pipeline.torch_compile=auto`` as what the run will do (true or
    false), so that its config.yaml and MLflow params say whether it compiled."""
    if cfg.backend == "torch" and cfg.pipeline.get("torch_compile") == "auto":
        cfg.pipeline.torch_compile = torch_compiles("auto", cfg.pipeline.iters, cfg.env)


@functools.cache
def _run_schema(pipeline: str) -> DictConfig:
    """The run-config schema with ``pipeline``'s config node (built once: it costs ms)."""
    return OmegaConf.structured(RunConfig(pipeline=get_pipeline(pipeline).config()))


def _selected(flat_layers: list[dict[str, Any]], *keys: str, default: Any) -> Any:
    """The value the last layer that sets one of ``keys`` gives it (``default`` when none
    does)."""
    value = default
    for flat in flat_layers:
        for key in keys:
            if key in flat:
                value = flat[key]
    return value


def _selected_pipeline(flat_layers: list[dict[str, Any]]) -> str:
    name = _selected(flat_layers, "pipeline", "pipeline.name", default=DEFAULT_PIPELINE)
    if name not in pipelines():
        raise ConfigError(_bad_value("pipeline", name, pipelines()))
    return name


def _merge(cfg: DictConfig, nested: dict[str, Any]) -> DictConfig:
    try:
        return OmegaConf.merge(cfg, nested)
    except ConfigKeyError as err:
        raise ConfigError(_unknown_key_message(cfg, err.full_key)) from None
    except ValidationError as err:
        raise ConfigError(
            f"invalid value {err.value!r} for {err.full_key!r}: expected "
            f"{_expected_type(cfg, err.full_key)}"
        ) from None
    except OmegaConfBaseException as err:
        raise ConfigError(f"invalid config: {err}") from None


def _unknown_key_message(cfg: DictConfig, full_key: str) -> str:
    parent_key, _, leaf = full_key.rpartition(".")
    parent = OmegaConf.select(cfg, parent_key) if parent_key else cfg
    allowed = list(parent.keys()) if isinstance(parent, DictConfig) else []
    where = f" of {parent_key!r}" if parent_key else ""
    if parent_key == "pipeline":
        names = {spec.config: name for name, spec in pipelines().items()}
        where = f" of the {names.get(OmegaConf.get_type(parent), '?')!r} pipeline"
    close = difflib.get_close_matches(leaf, allowed, n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    return f"unknown key {full_key!r}{hint}; allowed keys{where}: {', '.join(allowed)}"


def _expected_type(cfg: DictConfig, full_key: str) -> str:
    parent_key, _, leaf = full_key.rpartition(".")
    parent = OmegaConf.select(cfg, parent_key) if parent_key else cfg
    schema = OmegaConf.get_type(parent)
    if is_dataclass(schema):
        for f in fields(schema):
            if f.name == leaf:
                return str(f.type).replace("typing.", "")
    return "a value of the schema's type"


def _bad_value(key: str, value: Any, allowed: Iterable[Any]) -> str:
    allowed = [str(a) for a in allowed]
    close = difflib.get_close_matches(str(value), allowed, n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    return f"invalid value {value!r} for {key!r}{hint}; allowed: {', '.join(allowed)}"


def validate_run_config(cfg: DictConfig) -> None:
    """Check the values a schema cannot express (env, backend, task arguments, ranges)."""
    envs = registered()
    if cfg.env not in envs:
        raise ConfigError(_bad_value("env", cfg.env, sorted(envs)))
    spec = get_pipeline(cfg.pipeline.name)
    every_pipeline = sorted({b for s in pipelines().values() for b in s.backends})
    env_backends = [b for b in registered()[cfg.env].backends if b in every_pipeline]
    if cfg.backend not in env_backends:
        raise ConfigError(_bad_value("backend", cfg.backend, env_backends))
    if cfg.dtype not in DTYPES:
        raise ConfigError(_bad_value("dtype", cfg.dtype, DTYPES))
    if cfg.backend not in spec.backends:
        why = " needs gradients" if spec.needs_gradients else " does not run there"
        others = [n for n, s in pipelines().items() if cfg.backend in s.backends]
        raise ConfigError(
            f"invalid value {cfg.backend!r} for 'backend': the {spec.name!r} pipeline{why}; "
            f"allowed: {', '.join(spec.backends)} (or "
            f"{' / '.join(f'pipeline={n}' for n in others)}, which run on {cfg.backend})"
        )
    _check_pipeline_values(cfg)
    env = _check_env_kwargs(cfg)
    _check_memory(cfg, env.spec.obs_dim, env.spec.act_dim)
    if not 0 <= cfg.seed <= MAX_SEED:
        raise ConfigError(f"invalid value {cfg.seed!r} for 'seed'; allowed: an int in [0, {MAX_SEED}]")
    if cfg.torch_threads < 1:
        raise ConfigError(f"invalid value {cfg.torch_threads!r} for 'torch_threads'; allowed: an int >= 1")
    for key in ("flush_every_s", "outage_limit_s", "request_timeout_s"):
        if not cfg.tracking[key] > 0:
            raise ConfigError(f"invalid value {cfg.tracking[key]!r} for 'tracking.{key}'; allowed: > 0")


def _check_pipeline_values(cfg: DictConfig) -> None:
    try:
        OmegaConf.to_object(cfg.pipeline).validate()
    except PipelineConfigError as err:
        raise ConfigError(
            f"pipeline.{err.field}={err.value!r} is invalid; allowed: {err.allowed}"
        ) from None


def _check_env_kwargs(cfg: DictConfig) -> Any:
    """The env of ``cfg`` (on numpy where it can), or the error its task arguments raise."""
    # make() checks the argument names and ranges; a numpy env is cheap and imports nothing.
    backend = "numpy" if "numpy" in registered()[cfg.env].backends else cfg.backend
    try:
        return make(cfg.env, backend=backend, dtype=cfg.dtype, **OmegaConf.to_container(cfg.env_kwargs))
    except (TypeError, ValueError) as err:
        raise ConfigError(f"invalid 'env_kwargs' for {cfg.env}: {err}") from None


def rollout_bytes(cfg: DictConfig, obs_dim: int, act_dim: int) -> int:
    """A generous estimate of a run's peak memory: every step of every rollout of one
    iteration kept for the backward pass (state, observation, action, reward), times
    ``AUTODIFF_OVERHEAD`` for the tape and optimizer, for the largest batch the pipeline
    steps at once (``batch`` x ``population`` for CEM, ``eval_batch`` for evaluation)."""
    pipeline = cfg.pipeline
    rows = max(int(_batch(pipeline)) * int(pipeline.get("population", 1) or 1),
               int(pipeline.get("eval_batch", 0) or 0))
    per_step = 2 * obs_dim + act_dim + 1
    itemsize = 8 if cfg.dtype == "float64" else 4
    return rows * int(_horizon(pipeline)) * per_step * itemsize * AUTODIFF_OVERHEAD


def _batch(pipeline: DictConfig) -> int:
    """Envs stepped at once: ``batch``, or ``num_envs`` for the RL pipelines (PPO, SHAC)."""
    return pipeline.get("batch", pipeline.get("num_envs", 1))


def _horizon(pipeline: DictConfig) -> int:
    """Steps kept per rollout: ``horizon``, or ``num_steps`` for the RL pipelines."""
    return pipeline.get("horizon", pipeline.get("num_steps", 1))


def _check_memory(cfg: DictConfig, obs_dim: int, act_dim: int) -> None:
    """Refuse a batch x horizon that cannot fit in this machine's memory, before any work
    (instead of a MemoryError minutes into the run)."""
    needed, available = rollout_bytes(cfg, obs_dim, act_dim), physical_memory_bytes()
    if needed > available:
        per_row = max(1, needed // max(1, int(_batch(cfg.pipeline))))
        raise ConfigError(
            f"invalid value {_batch(cfg.pipeline)!r} for 'pipeline.batch' with pipeline.horizon="
            f"{_horizon(cfg.pipeline)}: a run needs about {needed / 2**30:.3g} GiB (estimate) and this "
            f"machine has {available / 2**30:.3g} GiB; allowed: pipeline.batch x pipeline.horizon "
            f"small enough, e.g. pipeline.batch <= {available // per_row} at this horizon"
        )


def physical_memory_bytes() -> int:
    """This machine's physical memory."""
    return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def run_config_to_dict(cfg: DictConfig) -> dict[str, Any]:
    """The resolved config as plain Python containers."""
    return OmegaConf.to_container(cfg, resolve=True)


def env_defaults_in_use(cfg: DictConfig) -> dict[str, Any]:
    """The ``pipeline.*`` keys of ``cfg`` that hold its pipeline's defaults for its env
    (where those differ from the config dataclass's and no layer set them otherwise)."""
    defaults = get_pipeline(cfg.pipeline.name).defaults_for(cfg.env)
    return {f"pipeline.{key}": value for key, value in defaults.items()
            if cfg.pipeline[key] == value}


def flat_params(cfg: DictConfig) -> dict[str, str]:
    """The resolved config flattened to dotted keys (MLflow params)."""
    return {key: str(value) for key, value in flatten(run_config_to_dict(cfg)).items()}


# ---------------------------------------------------------------------- sweep config

SWEEP_SECTIONS = ("overrides", "grid", "search")  # mappings keyed by run-config keys


def load_sweep_config(path: str | Path | None, overrides: Sequence[str] = ()) -> DictConfig:
    """A sweep file merged with ``key=value`` overrides (``grid.seed=[0,1,2]``), validated.

    ``overrides``, ``grid`` and ``search`` are stored flat, keyed by dotted run-config keys
    (``pipeline.iters``), whether the file nests them or not, so that a command-line
    ``overrides.pipeline.iters=20`` replaces the file's value. Every trial's run config is
    composed here too: a bad key or value in any trial fails before Ray starts.
    """
    content = load_yaml(path) if path is not None else {}
    for section in SWEEP_SECTIONS:
        if section in content:
            if not isinstance(content[section], Mapping):
                raise ConfigError(f"{section!r} must be a mapping of run-config keys, got {content[section]!r}")
            content[section] = flatten(content[section])
    command_line: dict[str, Any] = {section: {} for section in SWEEP_SECTIONS}
    others: dict[str, Any] = {}
    for key, value in parse_dotlist(overrides).items():
        section, _, rest = key.partition(".")
        if section in SWEEP_SECTIONS and rest:
            command_line[section][rest] = value
        else:
            others[key] = value
    run_keys = {f.name for f in fields(RunConfig)} - {f.name for f in fields(SweepConfig)}
    for key in list(others) + list(content):
        if key.split(".")[0] in run_keys:
            raise ConfigError(
                f"unknown sweep key {key!r}: run-config keys go under overrides "
                f"(overrides.{key}=...) or grid (grid.{key}=[...])"
            )
    cfg = OmegaConf.structured(SweepConfig)
    for layer in (content, command_line, _nest(others)):
        cfg = _merge_sweep(cfg, layer)
    validate_sweep_config(cfg)
    OmegaConf.set_readonly(cfg, True)
    return cfg


def _merge_sweep(cfg: DictConfig, content: Mapping[str, Any]) -> DictConfig:
    try:
        return OmegaConf.merge(cfg, content)
    except ConfigKeyError as err:
        message = _unknown_key_message(cfg, err.full_key).replace("allowed keys", "allowed sweep keys")
        raise ConfigError(message) from None
    except ValidationError as err:
        raise ConfigError(
            f"invalid value {err.value!r} for sweep key {err.full_key!r}: expected "
            f"{_expected_type(cfg, err.full_key)}"
        ) from None
    except OmegaConfBaseException as err:
        raise ConfigError(f"invalid sweep config: {err}") from None


def grid_axes(cfg: DictConfig) -> dict[str, list[Any]]:
    """The grid as run-config key -> list of values."""
    axes = dict(OmegaConf.to_container(cfg.grid, resolve=True))
    for key, values in axes.items():
        if not isinstance(values, list):
            raise ConfigError(f"grid.{key} must be a list of values, got {values!r}")
        if not values:
            raise ConfigError(f"grid.{key} is empty; give at least one value (e.g. grid.{key}=[...])")
    return axes


def search_space(cfg: DictConfig) -> dict[str, tuple[str, list[Any]]]:
    """The random-search space as run-config key -> (distribution, arguments).

    Written ``search: {pipeline.lr: {loguniform: [1e-3, 1e-1]}}`` (or
    ``search.pipeline.lr.loguniform=[1e-3,1e-1]``): the last part names the distribution.
    """
    space: dict[str, tuple[str, list[Any]]] = {}
    for dotted, args in OmegaConf.to_container(cfg.search, resolve=True).items():
        key, _, kind = dotted.rpartition(".")
        if not key or kind not in SEARCH_DISTRIBUTIONS:
            raise ConfigError(
                f"search.{dotted}: expected search.<run-config key>.<distribution>; "
                f"distributions: {', '.join(SEARCH_DISTRIBUTIONS)}"
            )
        if key in space:
            raise ConfigError(f"search.{key} names two distributions; give one")
        space[key] = _distribution(key, kind, args)
    return space


def _distribution(key: str, kind: str, args: Any) -> tuple[str, list[Any]]:
    if kind == "choice":
        if not isinstance(args, list) or not args:
            raise ConfigError(f"search.{key}.choice must be a non-empty list, got {args!r}")
    elif not (isinstance(args, list) and len(args) == 2 and args[0] < args[1]):
        raise ConfigError(f"search.{key}.{kind} must be [low, high] with low < high, got {args!r}")
    elif kind == "loguniform" and args[0] <= 0:
        raise ConfigError(f"search.{key}.loguniform needs low > 0, got {args!r}")
    return kind, list(args)


def trial_layers(cfg: DictConfig) -> list[dict[str, Any]]:
    """One mapping of run-config keys per grid point (before search-space draws), in the
    order of nested loops over the grid's keys as written: the last key varies fastest."""
    axes = grid_axes(cfg)
    keys = list(axes)
    return [dict(zip(keys, values)) for values in itertools.product(*(axes[k] for k in keys))]


def _representative_draw(space: dict[str, tuple[str, list[Any]]]) -> dict[str, Any]:
    # For validation: one value of each distribution (its low end or first choice).
    return {key: (args[0] if kind != "randint" else int(args[0])) for key, (kind, args) in space.items()}


def validate_sweep_config(cfg: DictConfig) -> None:
    """Check the sweep's own keys and compose the run config of every trial."""
    if not cfg.name or "/" in cfg.name or cfg.name.startswith(".") or "\0" in cfg.name:
        raise ConfigError(f"invalid value {cfg.name!r} for 'name'; allowed: a folder name (no '/')")
    if len(cfg.name) > MAX_SWEEP_NAME:
        raise ConfigError(f"invalid value for 'name' ({len(cfg.name)} characters: "
                          f"{cfg.name[:40]!r}...); allowed: a folder name of at most "
                          f"{MAX_SWEEP_NAME} characters")
    if cfg.num_cpus is not None and cfg.num_cpus < 1:
        raise ConfigError(f"invalid value {cfg.num_cpus!r} for 'num_cpus'; allowed: an int >= 1, "
                          "or null for every CPU of this machine")
    if cfg.scheduler not in SCHEDULERS:
        raise ConfigError(_bad_value("scheduler", cfg.scheduler, SCHEDULERS))
    if cfg.asha.mode not in MODES:
        raise ConfigError(_bad_value("asha.mode", cfg.asha.mode, MODES))
    for key in ("num_samples", "asha.grace_period", "asha.reduction_factor"):
        if OmegaConf.select(cfg, key) < 1:
            raise ConfigError(f"invalid value {OmegaConf.select(cfg, key)!r} for {key!r}; allowed: an int >= 1")
    if cfg.max_failures < 0 or cfg.max_concurrent < 0:
        raise ConfigError("max_failures and max_concurrent must be >= 0")
    if not cfg.cpus_per_trial > 0 or cfg.gpus_per_trial < 0:
        raise ConfigError(
            f"invalid resources cpus_per_trial={cfg.cpus_per_trial}, gpus_per_trial={cfg.gpus_per_trial}; "
            "allowed: cpus_per_trial > 0, gpus_per_trial >= 0"
        )
    if cfg.pack is not None and cfg.pack < 1:
        raise ConfigError(f"invalid value {cfg.pack!r} for 'pack'; allowed: an int >= 1 (1: no "
                          "packing), or null for the default")
    if cfg.scheduler == "asha" and (cfg.pack or 1) > 1:
        raise ConfigError(
            f"invalid value {cfg.pack!r} for 'pack' with scheduler=asha: ASHA stops configs one by "
            "one, so each runs in its own trial; allowed: pack=1 or null"
        )
    trials = trial_run_configs(cfg)
    if cfg.scheduler == "asha":
        # The metrics every trial's pipeline reports, in the first one's order.
        reported = [get_pipeline(trial.pipeline.name).iteration_metrics for trial in trials]
        allowed = [m for m in reported[0] if all(m in metrics for metrics in reported)]
        if cfg.asha.metric not in allowed:
            raise ConfigError(_bad_value("asha.metric", cfg.asha.metric, allowed))


def trial_run_configs(cfg: DictConfig) -> list[DictConfig]:
    """The run config of every grid point (search-space keys at a representative draw).

    Raises:
        ConfigError: a trial's config is invalid (the message names the trial).
    """
    draw = _representative_draw(search_space(cfg))
    base = sweep_base_layer(cfg)
    composed = []
    for layer in trial_layers(cfg):
        try:
            composed.append(compose_run_config(base, layer, draw))
        except ConfigError as err:
            where = ", ".join(f"{k}={v}" for k, v in layer.items()) or "every trial"
            raise ConfigError(f"sweep {cfg.name!r}, trial {where}: {err}") from None
    return composed


def pack_limit(cfg: DictConfig) -> int:
    """The most configs one trial of the sweep runs (the ``pack`` key, or its default)."""
    if cfg.pack is not None:
        return int(cfg.pack)
    return 1 if cfg.scheduler == "asha" else PACK_DEFAULT


def sweep_points(cfg: DictConfig) -> list[dict[str, Any]]:
    """Every config of the sweep as a layer of run-config keys: each grid point (in
    :func:`trial_layers` order) with ``num_samples`` draws of the search space.

    The draws come from ``search_seed``, so the same sweep file gives the same configs.
    ``randint`` draws from [low, high), like Ray Tune's.
    """
    space = search_space(cfg)
    rng = np.random.default_rng(cfg.search_seed)
    points = []
    for layer in trial_layers(cfg):
        for _ in range(cfg.num_samples if space else 1):
            points.append({**layer, **{key: _draw(rng, kind, args) for key, (kind, args) in space.items()}})
    return points


def _draw(rng: np.random.Generator, kind: str, args: list[Any]) -> Any:
    if kind == "choice":
        return args[int(rng.integers(len(args)))]
    if kind == "randint":
        return int(rng.integers(args[0], args[1]))
    if kind == "loguniform":
        return float(math.exp(rng.uniform(math.log(args[0]), math.log(args[1]))))
    return float(rng.uniform(args[0], args[1]))


def sweep_base_layer(cfg: DictConfig) -> dict[str, Any]:
    """The sweep's ``overrides`` as a layer of dotted run-config keys (every trial's base)."""
    return flatten(OmegaConf.to_container(cfg.overrides, resolve=True))
