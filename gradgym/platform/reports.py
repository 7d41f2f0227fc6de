"""Plots and tables of runs and sweeps (matplotlib's object API: no pyplot global state).

- :func:`gradient_histogram`: one PNG per reported gradient of a run;
- :func:`backend_comparison`: a sweep's return vs iteration (mean ± std over seeds, one
  line per backend, one column per env) and time per iteration per backend;
- :func:`method_comparison`: a sweep's return vs env steps and vs wall time per pipeline
  (mean ± std over seeds), one column per env;
- :func:`summary_table`: one CSV row per trial.
"""

from __future__ import annotations

import csv
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

# Columns of the summary table that come first, in this order; then the swept keys.
SUMMARY_COLUMNS = (
    "trial", "status", "env", "backend", "pipeline", "seed", "iterations", "final_return",
    "best_return", "compile_time_s", "wall_time_s", "trial_time_s", "mean_iter_time_s",
    "malloc", "mlflow_run_id", "error",
)


def gradient_histogram(gradients: np.ndarray, step: int, path: Path) -> Path:
    """A histogram of a flat gradient (log counts) with its size and non-finite count.

    Drawn as one step line with fixed margins: a sweep draws thousands of these, and
    constrained layout and one patch per bar made each cost most of a second.
    """
    from matplotlib.figure import Figure

    values = np.asarray(gradients, dtype=np.float64).ravel()
    finite = values[np.isfinite(values)]
    fig = Figure(figsize=(5, 3.2))
    fig.subplots_adjust(left=0.13, right=0.97, bottom=0.15, top=0.89)
    ax = fig.add_subplot()
    if finite.size:
        counts, edges = np.histogram(finite, bins=60)
        ax.stairs(counts, edges, fill=True, color="tab:blue")
        ax.set_yscale("log")
    ax.set_xlabel("gradient value")
    ax.set_ylabel("count")
    ax.set_title(
        f"iteration {step}: {values.size} values, max |g| "
        f"{np.max(np.abs(finite)) if finite.size else float('nan'):.3g}, "
        f"{values.size - finite.size} non-finite",
        fontsize=9,
    )
    fig.savefig(path, dpi=80)
    return path


def backend_comparison(trials: Sequence[Mapping[str, Any]], path: Path, title: str = "") -> Path:
    """Compare backends across a sweep's trials and save the figure to ``path``.

    Args:
        trials: one mapping per finished trial with ``env``, ``backend``, ``label`` (the line
            it belongs to: its backend plus any swept key other than env and seed) and
            ``history`` (the iteration records of ``metrics.jsonl``).
        path: where to write the PNG.

    Top row, per env: mean return vs iteration, mean ± std over the trials of a line
    (seeds). Bottom row, per env: mean time per iteration of each line, with its std.
    """
    from matplotlib.figure import Figure

    envs = sorted({trial["env"] for trial in trials})
    fig = Figure(figsize=(4.5 * max(len(envs), 1), 7), layout="constrained")
    axes = fig.subplots(2, max(len(envs), 1), squeeze=False)
    for column, env in enumerate(envs):
        lines = _group(trial for trial in trials if trial["env"] == env)
        ax_return, ax_time = axes[0][column], axes[1][column]
        names, times, spreads, colors = [], [], [], []
        for index, (label, members) in enumerate(sorted(lines.items())):
            color = f"C{index % 10}"  # the same color for a line and its bar
            returns = _aligned([m["history"] for m in members], "return_mean")
            if returns is not None:
                mean, std = np.nanmean(returns, axis=0), np.nanstd(returns, axis=0)
                steps = np.arange(mean.size)
                # Dashes keep lines visible where backends agree exactly (same start states).
                ax_return.plot(steps, mean, color=color, linestyle=_DASHES[index % len(_DASHES)],
                               linewidth=2, label=f"{label} (n={len(members)})")
                ax_return.fill_between(steps, mean - std, mean + std, color=color, alpha=0.25)
            per_trial = [np.mean([h["iter_time_s"] for h in m["history"]]) * 1e3
                         for m in members if m["history"]]
            if per_trial:
                names.append(label)
                times.append(np.mean(per_trial))
                spreads.append(np.std(per_trial))
                colors.append(color)
        ax_return.set_title(f"{env}: return vs iteration (mean ± std over seeds)", fontsize=9)
        ax_return.set_xlabel("iteration")
        ax_return.set_ylabel("return_mean")
        if lines:
            ax_return.legend(fontsize=8)
        ax_time.bar(names, times, yerr=spreads, color=colors, capsize=3)
        ax_time.set_title(f"{env}: time per iteration", fontsize=9)
        ax_time.set_ylabel("ms / iteration")
        ax_time.tick_params(axis="x", labelsize=8, rotation=20)
    if title:
        fig.suptitle(title)
    fig.savefig(path, dpi=90)
    return path


_DASHES = ("-", "--", ":", "-.")


def _group(trials: Any) -> dict[str, list[Mapping[str, Any]]]:
    groups: dict[str, list[Mapping[str, Any]]] = {}
    for trial in trials:
        groups.setdefault(trial["label"], []).append(trial)
    return groups


def _aligned(histories: Sequence[Sequence[Mapping[str, Any]]], key: str) -> np.ndarray | None:
    """``[n_trials, n_iters]`` of ``key``, NaN past the end of a trial stopped early (ASHA)."""
    series = [[h[key] for h in history if key in h] for history in histories]
    series = [s for s in series if s]
    if not series:
        return None
    aligned = np.full((len(series), max(len(s) for s in series)), np.nan)
    for row, values in zip(aligned, series):
        row[:len(values)] = values
    return aligned


def method_comparison(trials: Sequence[Mapping[str, Any]], path: Path, title: str = "") -> Path:
    """Compare methods (pipelines) across a sweep's trials and save the figure to ``path``.

    Args:
        trials: one mapping per finished trial with ``env``, ``pipeline``, ``label`` (its
            line: the pipeline plus any swept key other than env, pipeline and seed) and
            ``history`` (the iteration records of ``metrics.jsonl``).
        path: where to write the PNG.

    Per env (columns), the score (``eval_return_mean`` where a method evaluates, else
    ``return_mean``) against cumulative env steps (top) and wall time (bottom), each
    line the mean ± std over its trials (seeds) on a common grid of its x-axis.
    """
    from matplotlib.figure import Figure

    envs = sorted({trial["env"] for trial in trials})
    fig = Figure(figsize=(4.5 * max(len(envs), 1), 7), layout="constrained")
    axes = fig.subplots(2, max(len(envs), 1), squeeze=False)
    for column, env in enumerate(envs):
        lines = _group(trial for trial in trials if trial["env"] == env)
        for index, (label, members) in enumerate(sorted(lines.items())):
            style = {"color": f"C{index % 10}", "linestyle": _DASHES[index % len(_DASHES)]}
            for row, axis in enumerate(("env_steps", "wall_time_s")):
                curves = [_score_curve(m["history"], axis) for m in members]
                curves = [c for c in curves if c is not None]
                if curves:
                    _mean_std_line(axes[row][column], curves, f"{label} (n={len(curves)})", style)
        for row, xlabel in enumerate(("env steps", "wall time (s)")):
            ax = axes[row][column]
            ax.set_title(f"{env}: return vs {xlabel} (mean ± std over seeds)", fontsize=9)
            ax.set_xlabel(xlabel)
            ax.set_ylabel("held-out return (else return_mean)")
            if lines:
                ax.legend(fontsize=8)
    if title:
        fig.suptitle(title)
    fig.savefig(path, dpi=90)
    return path


def _score_curve(history: Sequence[Mapping[str, Any]], axis: str) -> tuple | None:
    """``(x, score)`` of one trial: its evaluations (or every iteration's ``return_mean``)
    against cumulative env steps or wall time since its first iteration began (from the
    log's timestamps: evaluation and logging count, compilation before it does not;
    summed iteration times where there are no timestamps).

    An evaluation scores the parameters an iteration starts from, so it is placed where
    the previous iteration ended; ``return_mean`` (episodes run during the iteration) at
    the iteration's end.
    """
    key = "eval_return_mean" if any("eval_return_mean" in h for h in history) else "return_mean"
    if history and all("timestamp_ms" in h for h in history):
        first = history[0]["timestamp_ms"] / 1e3 - history[0].get("iter_time_s", 0.0)
        ends = np.asarray([h["timestamp_ms"] / 1e3 - first for h in history])
    else:
        ends = np.cumsum([h.get("iter_time_s", 0.0) for h in history])
    steps = np.asarray([h.get("env_steps", i + 1) for i, h in enumerate(history)], dtype=float)
    x = steps if axis == "env_steps" else ends
    if key == "eval_return_mean":
        x = np.concatenate([[0.0], x[:-1]])
    points = [(x[i], h[key]) for i, h in enumerate(history) if key in h]
    if not points:
        return None
    xs, ys = (np.asarray(v, dtype=float) for v in zip(*points))
    return xs, ys


def _mean_std_line(ax: Any, curves: list[tuple], label: str, style: dict) -> None:
    """Curves interpolated onto one grid (up to where the shortest ends), mean ± std."""
    end = min(x[-1] for x, _ in curves)
    grid = np.linspace(min(x[0] for x, _ in curves), end, 100) if end > 0 else curves[0][0]
    values = np.stack([np.interp(grid, x, y) for x, y in curves])
    mean, std = values.mean(axis=0), values.std(axis=0)
    ax.plot(grid, mean, linewidth=2, label=label, **style)
    ax.fill_between(grid, mean - std, mean + std, color=style["color"], alpha=0.25)


def summary_table(rows: Sequence[Mapping[str, Any]], path: Path) -> Path:
    """Write one CSV row per trial (the known columns first, then any others, sorted)."""
    extra = sorted({key for row in rows for key in row} - set(SUMMARY_COLUMNS))
    columns = [c for c in SUMMARY_COLUMNS if any(c in row for row in rows)] + extra
    with Path(path).open("w", newline="") as file:
        writer = csv.DictWriter(file, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        for row in rows:
            writer.writerow({key: row.get(key, "") for key in columns})
    return path
