"""The iteration loop every pipeline shares: time, report, keep the best, stop on non-finite.

A pipeline hands over an *optimizer* with the small interface of the backend trainers
(``compile``, ``step``, ``snapshot``, ``returns``, ``gradients``, ``params``); this module
never touches arrays beyond the host values the optimizer returns.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any, Callable, Optional, Sequence

import numpy as np

from gradgym.pipelines.base import (
    EVAL_METRIC,
    GRADIENT_STEP_METRICS,  # noqa: F401 - re-exported: pipelines import it from here
    NonFiniteReturnError,
    PipelineResult,
    Report,
    Reporter,
    as_reporter,
)


@dataclass
class LoopSpec:
    """How to drive one optimization.

    Attributes:
        name: what runs, for messages (e.g. ``"trajectory on CartPole (torch)"``).
        iters: number of iterations.
        steps_per_iter: env steps simulated per iteration (for ``env_steps_per_s``).
        step_metrics: names of the values ``optimizer.step`` returns.
        next_inputs: iteration index -> the inputs of that iteration's step.
        eval_inputs: held-out inputs scored every ``eval_every`` iterations, or ``None`` to
            score each iteration by its own ``return_mean`` (fixed start states).
        eval_every: how often to evaluate ``eval_inputs``.
        render: parameters -> video frames, or ``None`` not to render.
        grad_hist_every: report the gradient every that many iterations (0: never).
    """

    name: str
    iters: int
    steps_per_iter: int
    step_metrics: Sequence[str]
    next_inputs: Callable[[int], Any]
    eval_inputs: Any = None
    eval_every: int = 1
    render: Optional[Callable[[Any], list[np.ndarray]]] = None
    grad_hist_every: int = 0


def run_loop(optimizer: Any, spec: LoopSpec, report: Report | Reporter | None) -> PipelineResult:
    """Run ``spec.iters`` iterations of ``optimizer``, reporting each, and finish."""
    return _Run(optimizer, spec, as_reporter(report)).run()


class _Run:
    """The state of one run: history, best score so far, timing."""

    def __init__(self, optimizer: Any, spec: LoopSpec, report: Reporter):
        self.optimizer, self.spec, self.report = optimizer, spec, report
        self.began = time.perf_counter()
        self.compile_time = 0.0
        self.best_score, self.best_params = -math.inf, None
        self.history: list[dict[str, float]] = []

    def run(self) -> PipelineResult:
        optimizer, spec = self.optimizer, self.spec
        first_inputs = spec.next_inputs(0)
        self.compile_time = optimizer.compile(first_inputs, spec.eval_inputs)
        initial_video = spec.render(optimizer.params) if spec.render else None

        for iteration in range(spec.iters):
            inputs = first_inputs if iteration == 0 else spec.next_inputs(iteration)
            metrics = self.iterate(iteration, inputs)
            artifacts: dict[str, Any] = {}
            if iteration == 0 and initial_video is not None:
                artifacts["video_initial"] = initial_video
            if spec.grad_hist_every and iteration % spec.grad_hist_every == 0:
                artifacts["gradients"] = optimizer.gradients()
            self.report.iteration(metrics, iteration, artifacts or None)
            self.history.append(metrics)
            self.stop_if_not_finite(iteration, metrics)

        final_inputs = spec.eval_inputs if spec.eval_inputs is not None else first_inputs
        final_return = _mean(optimizer.returns(optimizer.params, final_inputs))
        if final_return > self.best_score or self.best_params is None:
            self.best_score, self.best_params = final_return, optimizer.snapshot()
        return self.finish(final_return)

    def iterate(self, iteration: int, inputs: Any) -> dict[str, float]:
        """One optimizer step (and evaluation, when due); its metrics."""
        optimizer, spec = self.optimizer, self.spec
        evaluating = spec.eval_inputs is not None and iteration % spec.eval_every == 0
        scored = spec.eval_inputs is None or evaluating
        before = optimizer.snapshot() if scored else None
        if evaluating:
            eval_return = _mean(optimizer.returns(optimizer.params, spec.eval_inputs))

        started = time.perf_counter()
        values = optimizer.step(inputs)
        elapsed = time.perf_counter() - started

        metrics = dict(zip(spec.step_metrics, values))
        metrics["iter_time_s"] = elapsed
        metrics["env_steps_per_s"] = spec.steps_per_iter / elapsed
        metrics["env_steps"] = float(spec.steps_per_iter * (iteration + 1))
        if evaluating:
            metrics[EVAL_METRIC] = eval_return
        if scored:  # the metrics describe the parameters before the step: keep those
            score = metrics[EVAL_METRIC] if evaluating else metrics["return_mean"]
            if score > self.best_score:
                self.best_score, self.best_params = score, before
        return metrics

    def stop_if_not_finite(self, iteration: int, metrics: dict[str, float]) -> None:
        """Finish (reporting what there is) and raise when a return is NaN or infinite."""
        for key in ("return_mean", EVAL_METRIC):
            value = metrics.get(key, 0.0)
            if not math.isfinite(value):
                self.finish(final_return=value)
                raise NonFiniteReturnError(
                    f"{self.spec.name}: {key} became {value} at iteration {iteration}; stopped "
                    f"after reporting {len(self.history)} iterations (best return so far "
                    f"{self.best_score:.4g}). Lower the learning rate or set grad_clip."
                )

    def finish(self, final_return: float) -> PipelineResult:
        """Report the final metrics and the best trajectory's video; build the result."""
        artifacts = {}
        if self.spec.render is not None and self.best_params is not None:
            artifacts["video_best"] = self.spec.render(self.best_params)
        final = {
            "compile_time_s": self.compile_time,
            "best_return": self.best_score,
            "final_return": final_return,
        }
        self.report.final(final, len(self.history), artifacts or None)
        return PipelineResult(
            best_return=self.best_score,
            final_return=final_return,
            compile_time_s=self.compile_time,
            wall_time_s=time.perf_counter() - self.began,
            iterations=len(self.history),
            history=self.history,
            params=self.optimizer.params,
            best_params=self.best_params,
        )


def _mean(values: np.ndarray) -> float:
    return float(np.mean(values))
