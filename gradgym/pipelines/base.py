"""What every pipeline shares: the report callback, the result, the metric names.

A pipeline reports through a plain callback so that it runs the same in a notebook, under
``gradgym run`` and inside a Ray trial::

    def report(metrics: dict[str, float], step: int, artifacts: dict | None = None) -> None

``artifacts`` (optional, host-side values) uses these keys:

- ``"video_initial"``, ``"video_best"``: lists of ``H x W x 3`` uint8 frames of the first
  start state's trajectory before optimization and of the best trajectory found;
- ``"gradients"``: a flat numpy array of the current gradient, every ``grad_hist_every``
  iterations, for histograms.

Calls: one per iteration with ``step`` = the iteration index (0-based) and the
iteration metrics measured at the parameters *before* that iteration's update
(``video_initial`` comes with iteration 0); then one final call with ``step`` = the number
of iterations run and the ``FINAL_METRICS`` (``video_best`` comes with it). A run that
stops on a non-finite return makes the final call before raising.

A reporter that defines ``wants_best_params() -> bool`` (e.g. the platform's, while a viewer
follows the run) also gets ``"best_params"`` (the best parameters so far, native arrays) in
the artifacts of every iteration for which it returns ``True``; others never pay for it.

A plain callable gets both kinds of calls. A caller that must tell them apart (the
platform's run recorder) passes a :class:`Reporter`, whose ``iteration`` and ``final``
methods are called instead.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from gradgym.envs.backends import to_numpy

# What a gradient trainer's ``step`` returns, in this order.
GRADIENT_STEP_METRICS = (
    "return_mean",
    "return_min",
    "return_max",
    "loss",
    "grad_norm",
    "grad_max_abs",
    "grad_nonfinite",
)
# What the shared loop adds to every iteration; ``env_steps`` (cumulative env steps
# simulated) is the x-axis that every method shares.
LOOP_METRICS = ("iter_time_s", "env_steps_per_s", "env_steps")
ITERATION_METRICS = GRADIENT_STEP_METRICS + LOOP_METRICS  # of the gradient pipelines
EVAL_METRIC = "eval_return_mean"
FINAL_METRICS = ("compile_time_s", "best_return", "final_return")


class Report(Protocol):
    """The progress callback a pipeline calls once per iteration (and once at the end)."""

    def __call__(
        self, metrics: dict[str, float], step: int, artifacts: dict[str, Any] | None = None
    ) -> None: ...


class Reporter(Protocol):
    """A progress receiver that tells iteration reports from the closing one."""

    def iteration(
        self, metrics: dict[str, float], step: int, artifacts: dict[str, Any] | None = None
    ) -> None: ...

    def final(
        self, metrics: dict[str, float], step: int, artifacts: dict[str, Any] | None = None
    ) -> None: ...


@dataclass
class CallbackReporter:
    """A plain ``report`` callable as a :class:`Reporter`: it receives both kinds of calls."""

    report: Report

    def iteration(self, metrics: dict[str, float], step: int,
                  artifacts: dict[str, Any] | None = None) -> None:
        self.report(metrics, step, artifacts)

    def final(self, metrics: dict[str, float], step: int,
              artifacts: dict[str, Any] | None = None) -> None:
        self.report(metrics, step, artifacts)


def as_reporter(report: Report | Reporter | None) -> Reporter:
    """``report`` as a :class:`Reporter` (``None``: report nothing)."""
    if report is None:
        return CallbackReporter(no_report)
    if callable(getattr(report, "iteration", None)) and callable(getattr(report, "final", None)):
        return report  # type: ignore[return-value]
    return CallbackReporter(report)  # type: ignore[arg-type]


def no_report(
    metrics: dict[str, float], step: int, artifacts: dict[str, Any] | None = None
) -> None:
    """The default callback: report nothing."""


@dataclass
class Replay:
    """What a viewer needs to act like a pipeline's parameters, as host arrays.

    ``kind`` is ``"plan"`` (``arrays["actions"]``: open-loop actions ``[B, T, act_dim]`` in
    [-1, 1], played from the run's start states) or ``"mlp"`` (``arrays["weight_i"]``,
    ``arrays["bias_i"]``: a policy ``action = tanh(... tanh(obs @ weight_0 + bias_0) ...)``).
    """

    kind: str
    arrays: dict[str, np.ndarray]


def plan_replay(actions: Any) -> Replay:
    """The replay of open-loop actions ``[B, T, act_dim]`` (any backend's array)."""
    return Replay("plan", {"actions": to_numpy(actions)})


def mlp_replay(layers: Any) -> Replay:
    """The replay of a tanh MLP given as ``[(weight [in, out], bias [out]), ...]``."""
    arrays: dict[str, np.ndarray] = {}
    for index, (weight, bias) in enumerate(layers):
        arrays[f"weight_{index}"] = to_numpy(weight)
        arrays[f"bias_{index}"] = to_numpy(bias)
    return Replay("mlp", arrays)


class NonFiniteReturnError(RuntimeError):
    """The return became NaN/inf; everything reported before it stays reported."""


@dataclass
class PipelineResult:
    """What a pipeline returns once it has finished."""

    best_return: float
    final_return: float
    compile_time_s: float
    wall_time_s: float
    iterations: int
    history: list[dict[str, float]] = field(default_factory=list)
    params: Any = None  # the optimized logits / policy parameters (native arrays)
    best_params: Any = None  # the parameters that scored ``best_return``
