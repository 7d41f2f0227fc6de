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

from gradgym.pipelines.base import EVAL_METRIC, NonFiniteReturnError, PipelineResult, Report

# What a trainer's ``step`` returns, in this order (the first part of ITERATION_METRICS).
GRADIENT_STEP_METRICS = (
    "return_mean", "return_min", "return_max", "loss", "grad_norm", "grad_max_abs", "grad_nonfinite",
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


def run_loop(optimizer: Any, spec: LoopSpec, report: Report) -> PipelineResult:
    """Run ``spec.iters`` iterations of ``optimizer``, reporting each, and finish."""
    began = time.perf_counter()
    first_inputs = spec.next_inputs(0)
    compile_time = optimizer.compile(first_inputs, spec.eval_inputs)
    initial_video = spec.render(optimizer.params) if spec.render else None
    best_score, best_params = -math.inf, None
    history: list[dict[str, float]] = []

    for iteration in range(spec.iters):
        inputs = first_inputs if iteration == 0 else spec.next_inputs(iteration)
        evaluating = spec.eval_inputs is not None and iteration % spec.eval_every == 0
        scored = spec.eval_inputs is None or evaluating
        before = optimizer.snapshot() if scored else None
        eval_return = _mean(optimizer.returns(optimizer.params, spec.eval_inputs)) if evaluating else None

        started = time.perf_counter()
        values = optimizer.step(inputs)
        elapsed = time.perf_counter() - started

        metrics = dict(zip(spec.step_metrics, values))
        metrics["iter_time_s"] = elapsed
        metrics["env_steps_per_s"] = spec.steps_per_iter / elapsed
        if evaluating:
            metrics[EVAL_METRIC] = eval_return
        score = eval_return if spec.eval_inputs is not None else metrics["return_mean"]
        if scored and score > best_score:
            best_score, best_params = score, before

        artifacts: dict[str, Any] = {}
        if iteration == 0 and initial_video is not None:
            artifacts["video_initial"] = initial_video
        if spec.grad_hist_every and iteration % spec.grad_hist_every == 0:
            artifacts["gradients"] = optimizer.gradients()
        report(metrics, iteration, artifacts or None)
        history.append(metrics)

        bad = [k for k in ("return_mean", EVAL_METRIC) if k in metrics and not math.isfinite(metrics[k])]
        if bad:
            _finish(optimizer, spec, report, history, compile_time, began, best_score, best_params,
                    final_return=metrics[bad[0]])
            raise NonFiniteReturnError(
                f"{spec.name}: {bad[0]} became {metrics[bad[0]]} at iteration {iteration}; "
                f"stopped after reporting {len(history)} iterations (best return so far "
                f"{best_score:.4g}). Lower the learning rate or set grad_clip."
            )

    final_inputs = spec.eval_inputs if spec.eval_inputs is not None else first_inputs
    final_return = _mean(optimizer.returns(optimizer.params, final_inputs))
    if final_return > best_score or best_params is None:
        best_score, best_params = final_return, optimizer.snapshot()
    return _finish(optimizer, spec, report, history, compile_time, began, best_score, best_params,
                   final_return=final_return)


def _finish(optimizer: Any, spec: LoopSpec, report: Report, history: list[dict[str, float]],
            compile_time: float, began: float, best_score: float, best_params: Any,
            final_return: float) -> PipelineResult:
    """Report the final metrics and the best trajectory's video; build the result."""
    artifacts = {}
    if spec.render is not None and best_params is not None:
        artifacts["video_best"] = spec.render(best_params)
    final = {"compile_time_s": compile_time, "best_return": best_score, "final_return": final_return}
    report(final, len(history), artifacts or None)
    return PipelineResult(
        best_return=best_score,
        final_return=final_return,
        compile_time_s=compile_time,
        wall_time_s=time.perf_counter() - began,
        iterations=len(history),
        history=history,
        params=optimizer.params,
        best_params=best_params,
    )


def _mean(values: np.ndarray) -> float:
    return float(np.mean(values))
