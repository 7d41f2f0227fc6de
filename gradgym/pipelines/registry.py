"""The pipeline registry: what the platform may know about a pipeline, declared by it.

Every pipeline module declares one :class:`PipelineSpec` and registers it at import::

    PIPELINE = register(PipelineSpec(name="trajectory", config=TrajectoryConfig, optimize=optimize,
                                     backends=AUTODIFF_BACKENDS, ...))

The platform (configs, runner, sweeps, schedulers) reads specs from here and never names a
pipeline. Adding a pipeline: a module in ``gradgym/pipelines/`` that registers its spec, and
its module name in ``BUILTIN`` below.
"""

from __future__ import annotations

import difflib
import importlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields
from typing import Any

from gradgym.envs import registered
from gradgym.pipelines.base import FINAL_METRICS, LOOP_METRICS

# Modules that register the built-in pipelines, in the order they are listed to users.
BUILTIN = ("trajectory", "policy", "cem", "ppo", "shac")
DEFAULT_PIPELINE = "trajectory"


@dataclass(frozen=True)
class PipelineSpec:
    """One pipeline as the platform sees it.

    Attributes:
        name: the value of ``pipeline=`` on the command line.
        config: the config dataclass (its fields are the ``pipeline.*`` keys).
        optimize: ``optimize(env, cfg, seed=0, report=None) -> PipelineResult``.
        backends: the array backends it runs on.
        needs_gradients: whether it differentiates through the env (for error messages).
        step_metrics: what its optimizer step reports; the loop adds ``LOOP_METRICS``.
        eval_metric: the held-out score it reports every few iterations, if any.
        schedule_metric: the metric early-stopping schedulers (ASHA) should watch.
        summary: one line for listings.
        optimize_pack: ``optimize_pack(env, cfgs, seeds, reports) -> [result or error]``:
            configs that differ only in seed and ``packable_fields`` as one vectorized
            computation, each member reporting what its lone run would.
        packable_fields: the config fields that may differ inside a pack: per-member
            hyperparameters and what only decides what a member reports. Every other field
            shapes the shared computation and must be equal.
        iterations: ``iterations(cfg) -> int``, how many iterations a config runs (progress
            bars, schedulers): ``cfg.iters`` unless the pipeline budgets otherwise (PPO and
            SHAC derive it from ``env_steps``).
        replay: ``replay(params) -> base.Replay``: a result's parameters as what
            ``gradgym view`` replays (``None``: the pipeline saves no replay).
        env_defaults: env name -> config fields whose defaults differ on that env. A run
            starts from the config dataclass's defaults, then these, then what the user sets
            (see :meth:`default_config`; ``gradgym run`` and sweeps layer them the same way).
    """

    name: str
    config: type
    optimize: Callable[..., Any]
    backends: tuple[str, ...]
    needs_gradients: bool
    step_metrics: tuple[str, ...]
    eval_metric: str | None = None
    schedule_metric: str = "return_mean"
    summary: str = ""
    optimize_pack: Callable[..., list[Any]] | None = None
    packable_fields: tuple[str, ...] = ()
    iterations: Callable[[Any], int] = lambda cfg: int(cfg.iters)
    replay: Callable[[Any], Any] | None = None
    env_defaults: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)

    def defaults_for(self, env: str | None) -> Mapping[str, Any]:
        """The config fields whose defaults differ on ``env`` (empty where none do)."""
        return self.env_defaults.get(env, {})

    def default_config(self, env: str | None = None, **overrides: Any) -> Any:
        """The config a run on ``env`` starts from: the dataclass's defaults, then
        :meth:`defaults_for` ``env``, then ``overrides`` (config fields)."""
        return self.config(**{**self.defaults_for(env), **overrides})

    @property
    def iteration_metrics(self) -> tuple[str, ...]:
        """Every metric name an iteration report may carry."""
        extra = (self.eval_metric,) if self.eval_metric else ()
        return self.step_metrics + LOOP_METRICS + extra

    @property
    def final_metrics(self) -> tuple[str, ...]:
        """The metrics of the closing report."""
        return FINAL_METRICS


_SPECS: dict[str, PipelineSpec] = {}


def register(spec: PipelineSpec) -> PipelineSpec:
    """Add ``spec`` to the registry (a pipeline module calls this at import).

    Raises:
        ValueError: ``spec.env_defaults`` names an env that is not registered, a field its
            config does not have, or a value the config refuses.
    """
    envs, config_fields = registered(), {f.name for f in fields(spec.config)}
    for env, overrides in spec.env_defaults.items():
        if env not in envs:
            raise ValueError(f"pipeline {spec.name!r}: env_defaults names {env!r}, which is not "
                             f"a registered env; registered: {', '.join(envs)}")
        unknown = sorted(set(overrides) - config_fields)
        if unknown:
            raise ValueError(f"pipeline {spec.name!r}: env_defaults[{env!r}] sets "
                             f"{', '.join(unknown)}, which {spec.config.__name__} does not have")
        try:
            spec.default_config(env).validate()
        except ValueError as err:
            raise ValueError(f"pipeline {spec.name!r}: env_defaults[{env!r}]: {err}") from None
    _SPECS[spec.name] = spec
    return spec


def pipelines() -> dict[str, PipelineSpec]:
    """Every registered pipeline, by name (the built-in ones first, in ``BUILTIN`` order)."""
    for module in BUILTIN:
        importlib.import_module(f"gradgym.pipelines.{module}")
    order = [name for name in BUILTIN if name in _SPECS] + [n for n in _SPECS if n not in BUILTIN]
    return {name: _SPECS[name] for name in order}


def get_pipeline(name: str) -> PipelineSpec:
    """The spec of pipeline ``name``.

    Raises:
        ValueError: no such pipeline (the message lists the available ones).
    """
    specs = pipelines()
    if name not in specs:
        close = difflib.get_close_matches(str(name), specs, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ValueError(f"unknown pipeline {name!r}{hint}; available: {', '.join(specs)}")
    return specs[name]


def pack_key(cfg: Any, **context: Any) -> tuple:
    """A hashable key: two configs may share a pack exactly when their keys are equal.

    It holds the pipeline's name and every field that is not packable (the seed is not a
    config field: members always differ in it). ``context`` adds what the config does not
    hold and a pack must share, e.g. ``pack_key(cfg, env="Pendulum", backend="jax",
    dtype="float32")``. ``cfg`` is a config dataclass or an omegaconf ``DictConfig`` of one.
    """
    spec = get_pipeline(getattr(cfg, "name", None))
    shared = tuple(
        (f.name, _hashable(getattr(cfg, f.name)))
        for f in fields(spec.config)
        if f.name not in spec.packable_fields
    )
    return shared + tuple(sorted((key, _hashable(value)) for key, value in context.items()))


def _hashable(value: Any) -> Any:
    """Lists (``hidden``, also omegaconf ``ListConfig``) as tuples, so keys hash."""
    if isinstance(value, (str, bytes)) or not hasattr(value, "__iter__"):
        return value
    return tuple(_hashable(item) for item in value)
