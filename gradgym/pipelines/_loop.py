"""The iteration loop every pipeline shares: time, report, keep the best, stop on non-finite.

The loop drives a *pack*: ``M`` members (configs that differ only in seed and in packable
hyperparameters) optimized by one vectorized optimizer; a lone run is a pack of one. A
pipeline hands over an *optimizer* with the small interface of the backend trainers
(``compile``, ``step``, ``snapshot``, ``member``, ``returns``, ``gradients``, ``params``):
``step`` returns one row of metrics per member, on the host, or on the device when the
optimizer has ``report_batch`` > 1 and ``host_rows`` (which brings a batch of iterations'
rows to the host in one transfer).
This module never touches arrays beyond those host values; every member keeps its own
history, best score and report callback, exactly as if it ran alone.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from gradgym.pipelines.base import (
    EVAL_METRIC,
    NonFiniteReturnError,
    PipelineResult,
    Report,
    Reporter,
    as_reporter,
)

# A member's outcome: its result, or the error that stopped it (the others go on).
MemberOutcome = PipelineResult | NonFiniteReturnError


@dataclass
class LoopSpec:
    """How to drive one pack of optimizations (sequences hold one entry per member).

    Attributes:
        names: what each member runs, for messages (e.g. ``"trajectory on CartPole (torch)"``).
        iters: number of iterations.
        steps_per_iter: env steps one member simulates per iteration (``env_steps_per_s``).
        step_metrics: names of the values of one member's row of ``optimizer.step``.
        next_inputs: iteration index -> the (packed) inputs of that iteration's step.
        eval_inputs: held-out (packed) inputs scored every ``eval_every`` iterations, or
            ``None`` to score each iteration by its own ``return_mean`` (fixed start states).
        eval_every: how often to evaluate ``eval_inputs``.
        render: per member, its parameters -> video frames, or ``None`` not to render.
        grad_hist_every: per member, report the gradient every that many iterations (0: never).
    """

    names: Sequence[str]
    iters: int
    steps_per_iter: int
    step_metrics: Sequence[str]
    next_inputs: Callable[[int], Any]
    render: Sequence[Callable[[Any], list[np.ndarray]] | None]
    grad_hist_every: Sequence[int]
    eval_inputs: Any = None
    eval_every: int = 1


def run_loop(
    optimizer: Any, spec: LoopSpec, reports: Sequence[Report | Reporter | None]
) -> list[MemberOutcome]:
    """Run ``spec.iters`` iterations of the pack ``optimizer``, reporting each member's
    iterations to its own callback; one outcome per member.

    A member whose return becomes non-finite is finished (its final call made) at that
    iteration and its outcome is the :class:`NonFiniteReturnError`; the others go on.
    """
    return _Pack(optimizer, spec, reports).run()


# A pack's metrics stay on its device for at most this many seconds (the dashboard stays
# live) and at most ``optimizer.report_batch`` iterations.
REPORT_INTERVAL_S = 0.5


@dataclass
class _Pending:
    """An iteration whose metrics are still on the device."""

    iteration: int
    rows: Any  # what optimizer.step returned
    before: Any  # the pack's parameters before the step (or None when not needed)
    scored: bool  # whether the metrics of this iteration compete for the best parameters
    eval_returns: list[float] | None


class _Pack:
    """The shared part of a pack's run: inputs, timing, the optimizer, pending reports.

    An optimizer whose ``report_batch`` is above 1 (jax) leaves each iteration's metrics on
    its device; they come to the host in one transfer every ``report_batch`` iterations
    (sooner after ``REPORT_INTERVAL_S``, after an iteration that reports gradients, and at
    the end), so no iteration waits for the host. Every iteration is still reported, in
    order, with the values it would have had alone; ``iter_time_s`` is a batch's wall time
    (minus evaluations) over its iterations.
    """

    def __init__(self, optimizer: Any, spec: LoopSpec, reports: Sequence[Report | Reporter | None]):
        self.optimizer, self.spec = optimizer, spec
        self.began = time.perf_counter()
        self.members = [
            _Member(index, spec, as_reporter(report), self.began)
            for index, report in enumerate(reports)
        ]
        self.batch = max(1, int(getattr(optimizer, "report_batch", 1)))
        self.pending: list[_Pending] = []
        self.window_began, self.excluded = 0.0, 0.0

    def run(self) -> list[MemberOutcome]:
        optimizer, spec = self.optimizer, self.spec
        first_inputs = spec.next_inputs(0)
        compile_time = optimizer.compile(first_inputs, spec.eval_inputs)
        for member in self.members:
            member.compile_time = compile_time
            member.render_initial(optimizer)

        self.window_began = time.perf_counter()
        for iteration in range(spec.iters):
            if not any(member.active for member in self.members):
                break
            inputs = first_inputs if iteration == 0 else spec.next_inputs(iteration)
            self.iterate(iteration, inputs)
        self.flush()

        final_inputs = spec.eval_inputs if spec.eval_inputs is not None else first_inputs
        finals = np.mean(optimizer.returns(final_inputs), axis=1).tolist()
        for member in self.members:
            if member.active:
                member.finish_last(optimizer, finals[member.index])
        return [member.outcome for member in self.members]

    def iterate(self, iteration: int, inputs: Any) -> None:
        """One optimizer step of the pack (and evaluation, when due); reports when due."""
        optimizer, spec = self.optimizer, self.spec
        evaluating = spec.eval_inputs is not None and iteration % spec.eval_every == 0
        scored = spec.eval_inputs is None or evaluating
        # Batched, a member that stops mid-batch needs the parameters after its iteration.
        before = optimizer.snapshot() if scored or self.batch > 1 else None
        eval_returns = None
        if evaluating:
            began = time.perf_counter()
            eval_returns = np.mean(optimizer.returns(spec.eval_inputs), axis=1).tolist()
            self.excluded += time.perf_counter() - began

        rows = optimizer.step(inputs)
        self.pending.append(_Pending(iteration, rows, before, scored, eval_returns))
        if (
            len(self.pending) >= self.batch
            or time.perf_counter() - self.window_began >= REPORT_INTERVAL_S
            or any(member.gradients_due(iteration) for member in self.members)
        ):
            self.flush()

    def flush(self) -> None:
        """Bring the pending iterations' metrics to the host and report them in order."""
        if not self.pending:
            return
        optimizer, spec = self.optimizer, self.spec
        rows = [p.rows for p in self.pending]
        to_host = getattr(optimizer, "host_rows", None)  # absent: rows are on the host
        host = to_host(rows) if to_host is not None else rows  # one transfer
        elapsed = (time.perf_counter() - self.window_began - self.excluded) / len(self.pending)
        afters = [p.before for p in self.pending[1:]] + [None]
        for pending, rows, after in zip(self.pending, host, afters):
            for member in self.members:
                if not member.active:
                    continue
                metrics = dict(zip(spec.step_metrics, rows[member.index]))
                metrics["iter_time_s"] = elapsed
                metrics["env_steps_per_s"] = spec.steps_per_iter / elapsed
                metrics["env_steps"] = float(spec.steps_per_iter * (pending.iteration + 1))
                if pending.eval_returns is not None:
                    metrics[EVAL_METRIC] = pending.eval_returns[member.index]
                before = pending.before if pending.scored else None
                member.record(optimizer, pending.iteration, metrics, before, after)
        self.pending.clear()
        self.window_began, self.excluded = time.perf_counter(), 0.0


class _Member:
    """The state of one member: its report, history, best score so far, outcome."""

    def __init__(self, index: int, spec: LoopSpec, report: Reporter, began: float):
        self.index, self.spec, self.report, self.began = index, spec, report, began
        self.render = spec.render[index]
        self.grad_hist_every = spec.grad_hist_every[index]
        self.compile_time = 0.0
        self.best_score = -math.inf
        self._best: tuple[Any, Any] | None = None  # (the pack's params, optimizer)
        self.history: list[dict[str, float]] = []
        self.initial_video: list[np.ndarray] | None = None
        # Only a reporter that asks (a followed run's) gets the best parameters so far.
        self.wants_best_params = getattr(report, "wants_best_params", lambda: False)
        self.outcome: MemberOutcome | None = None

    @property
    def active(self) -> bool:
        return self.outcome is None

    @property
    def best_params(self) -> Any:
        """This member's part of the best parameters (taken only when needed: slicing a
        pack's parameters costs a device call per leaf)."""
        if self._best is None:
            return None
        params, optimizer = self._best
        return optimizer.member(params, self.index)

    def gradients_due(self, iteration: int) -> bool:
        return self.active and bool(self.grad_hist_every) and iteration % self.grad_hist_every == 0

    def render_initial(self, optimizer: Any) -> None:
        if self.render is not None:
            self.initial_video = self.render(optimizer.member(optimizer.params, self.index))

    def record(
        self, optimizer: Any, iteration: int, metrics: dict[str, float], before: Any,
        after: Any = None,
    ) -> None:
        """Keep the best parameters, report the iteration, stop on a non-finite return.

        ``before`` is the pack's snapshot of the parameters the metrics describe (or ``None``
        when this iteration is not scored); ``after`` those after its update when later
        updates already ran (``None``: the optimizer's current ones).
        """
        if before is not None:
            score = metrics.get(EVAL_METRIC, metrics["return_mean"])
            if score > self.best_score:
                self.best_score = score
                self._best = (before, optimizer)
        artifacts: dict[str, Any] = {}
        if iteration == 0 and self.initial_video is not None:
            artifacts["video_initial"] = self.initial_video
        if self.gradients_due(iteration):
            artifacts["gradients"] = optimizer.gradients(self.index)
        if self.best_params is not None and self.wants_best_params():
            artifacts["best_params"] = self.best_params
        self.report.iteration(metrics, iteration, artifacts or None)
        self.history.append(metrics)
        self.stop_if_not_finite(optimizer, iteration, metrics, after)

    def stop_if_not_finite(
        self, optimizer: Any, iteration: int, metrics: dict[str, float], after: Any = None
    ) -> None:
        """Finish (reporting what there is) and keep the error when a return is NaN/inf."""
        for key in ("return_mean", EVAL_METRIC):
            value = metrics.get(key, 0.0)
            if not math.isfinite(value):
                self.finish(optimizer, final_return=value, params=after)
                self.outcome = NonFiniteReturnError(
                    f"{self.spec.names[self.index]}: {key} became {value} at iteration "
                    f"{iteration}; stopped after reporting {len(self.history)} iterations (best "
                    f"return so far {self.best_score:.4g}). Lower the learning rate or set "
                    f"grad_clip."
                )
                return

    def finish_last(self, optimizer: Any, final_return: float) -> None:
        """Finish after the last iteration: the final parameters may be the best."""
        if final_return > self.best_score or self._best is None:
            self.best_score = final_return
            self._best = (optimizer.snapshot(), optimizer)
        self.outcome = self.finish(optimizer, final_return)

    def finish(self, optimizer: Any, final_return: float, params: Any = None) -> PipelineResult:
        """Report the final metrics and the best trajectory's video; build the result.

        ``params``: the pack's parameters the member ends with (``None``: the current ones).
        """
        best_params = self.best_params
        artifacts = {}
        if self.render is not None and best_params is not None:
            artifacts["video_best"] = self.render(best_params)
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
            params=optimizer.member(optimizer.params if params is None else params, self.index),
            best_params=best_params,
        )
