"""Sweep scaling: parallel efficiency of a Ray Tune sweep and the cost of MLflow logging.

One 16-trial sweep of short trajectory-optimization runs on a local Ray, one CPU per trial:
4 classic envs x {jax, torch} x {MLflow logging on, off}. The two trials of a pair differ
only in ``tracking.enabled`` and are next to each other in the grid, so they run side by
side on the machine's CPUs, under the same load (on a shared machine the load drifts, and
comparing two separate sweeps mostly measures that drift). Prints

- parallel efficiency = sum of trial times / (CPUs x wall time of Tune's fit)
  (target >= 0.7); the end-to-end figure, with Ray's start, is shown beside it;
- MLflow logging overhead per trial = mean over pairs of time(on) / time(off) - 1
  (target <= 10%), its median, and the same mean for the time per iteration; the time of
  each pair, and what importing MLflow costs;
- the mean of these over ``--repeats`` sweeps (the machine's load drifts between them).

Importing MLflow takes seconds and happens once per Ray worker process (trials reuse their
worker), in the first logged trial a worker runs: in this short sweep, 2 of the 8 logged
trials on two CPUs carry it, which the median over pairs leaves out.

A trial's time is Ray Tune's ``time_total_s``: everything the trial does (config, env,
compile, iterations, videos and, with logging on, the MLflow run, its uploads and the final
flush to the embedded sqlite store).

    python benchmarks/sweep_scaling.py                 # 2 sweeps of 40 iterations per trial
    python benchmarks/sweep_scaling.py --iters 100 --cpus 2 --repeats 3
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import yaml

from gradgym.platform.sweep import start_sweep

ENVS = ["CartPole", "Pendulum", "MountainCar", "Reacher"]
BACKENDS = ["jax", "torch"]


def run_sweep(folder: Path, iters: int, cpus: int) -> tuple[list[dict], float, float]:
    """The 16-trial sweep: (summary rows, Tune fit wall time, end-to-end wall time)."""
    path = folder / "scaling.yaml"
    path.write_text(yaml.safe_dump({
        "name": "scaling",
        "num_cpus": cpus,
        "overrides": {
            "pipeline": "trajectory", "pipeline.iters": iters, "pipeline.horizon": 100,
            "pipeline.batch": 32,
        },
        # The last key varies fastest: the on/off trials of a pair are started together.
        "grid": {"env": ENVS, "backend": BACKENDS, "tracking.enabled": [True, False]},
    }, sort_keys=False))
    began = time.perf_counter()
    outcome = start_sweep(path, storage=str(folder / "sweeps"))
    end_to_end = time.perf_counter() - began
    assert outcome.all_finished, outcome.describe()
    return outcome.rows, outcome.fit_wall_s, end_to_end


def pairs(rows: list[dict], key: str = "trial_time_s") -> dict[tuple[str, str], dict[bool, float]]:
    """``{(env, backend): {logging on?: value of key}}``."""
    by_pair: dict[tuple[str, str], dict[bool, float]] = {}
    for row in rows:
        by_pair.setdefault((row["env"], row["backend"]), {})[logged(row)] = row[key]
    return by_pair


def logged(row: dict) -> bool:
    """Whether the trial of a summary row logged to MLflow (the CSV holds it as text)."""
    return str(row["tracking.enabled"]).lower() == "true"


def paired_ratio(rows: list[dict], key: str, backend: str | None = None,
                 average: Callable[[list[float]], float] = statistics.mean) -> float:
    """Mean (or ``average``) over (env, backend) pairs of value(logging on) / value(logging off)."""
    return average([pair[True] / pair[False] for (_, b), pair in pairs(rows, key).items()
                    if backend is None or b == backend])


def mlflow_import_s() -> float:
    """Seconds to import MLflow's client, in a fresh interpreter."""
    code = "import time; t = time.perf_counter(); import mlflow; print(time.perf_counter() - t)"
    return float(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                                check=True).stdout.split()[-1])


def report(rows: list[dict], fit_wall: float, end_to_end: float, cpus: int) -> tuple[float, float]:
    """Print one sweep's figures; returns (parallel efficiency of Tune's fit, MLflow overhead)."""
    trial_times = [row["trial_time_s"] for row in rows]
    print(f"{'mean trial time [s]':32}{'logging off':>12}{'MLflow on':>12}")
    for backend in BACKENDS:
        times = {on: statistics.mean(r["trial_time_s"] for r in rows
                                     if r["backend"] == backend and logged(r) == on)
                 for on in (False, True)}
        print(f"{'  ' + backend:32}{times[False]:12.2f}{times[True]:12.2f}")
    efficiency = sum(trial_times) / (cpus * fit_wall)
    print(f"\nsum of trial times: {sum(trial_times):.1f} s; Tune fit wall time: {fit_wall:.1f} s; "
          f"end to end (with Ray's start): {end_to_end:.1f} s")
    print(f"parallel efficiency: {efficiency:.2f} of Tune's fit (target >= 0.7), "
          f"{sum(trial_times) / (cpus * end_to_end):.2f} end to end")
    print(f"\n{'trial time [s] per pair':32}{'logging off':>12}{'MLflow on':>12}{'overhead':>10}")
    for (env, backend), pair in sorted(pairs(rows).items()):
        print(f"{'  ' + env + ' ' + backend:32}{pair[False]:12.2f}{pair[True]:12.2f}"
              f"{(pair[True] / pair[False] - 1) * 100:+9.1f}%")
    print()
    overheads = {}
    for label, backend in (("all", None), ("jax", "jax"), ("torch", "torch")):
        trial = overheads[label] = paired_ratio(rows, "trial_time_s", backend) - 1
        median = paired_ratio(rows, "trial_time_s", backend, statistics.median) - 1
        iteration = paired_ratio(rows, "mean_iter_time_s", backend) - 1
        print(f"MLflow logging overhead ({label:5}): {trial * 100:+6.1f}% per trial "
              f"(target <= 10%; median {median * 100:+.1f}%), {iteration * 100:+6.1f}% per iteration")
    return efficiency, overheads["all"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--iters", type=int, default=40, help="iterations per trial")
    parser.add_argument("--cpus", type=int, default=os.cpu_count(), help="CPUs of the local Ray")
    parser.add_argument("--repeats", type=int, default=2, help="sweeps to run (each on a fresh Ray)")
    args = parser.parse_args()
    import_s = mlflow_import_s()
    print(f"16-trial sweep: trajectory optimization (T=100, B=32, {args.iters} iterations), 4 envs "
          f"x jax, torch x MLflow on/off, {args.cpus} CPUs, 1 CPU per trial; the first MLflow "
          f"trial of each Ray worker also imports MLflow ({import_s:.1f} s in a fresh interpreter "
          f"here, once per worker process)")
    figures = []
    for repeat in range(args.repeats):
        with tempfile.TemporaryDirectory() as tmp:
            previous = os.getcwd()
            os.chdir(tmp)  # the embedded MLflow store goes here
            try:
                rows, fit_wall, end_to_end = run_sweep(Path(tmp), args.iters, args.cpus)
            finally:
                os.chdir(previous)
        print(f"\n## sweep {repeat + 1} of {args.repeats} (load average {os.getloadavg()[0]:.1f})\n")
        figures.append(report(rows, fit_wall, end_to_end, args.cpus))
    efficiencies, overheads = zip(*figures, strict=True)
    print(f"\nover {args.repeats} sweeps: parallel efficiency {statistics.mean(efficiencies):.2f} "
          f"(target >= 0.7); MLflow logging overhead per trial {statistics.mean(overheads) * 100:+.1f}% "
          f"(target <= 10%; per sweep: {', '.join(f'{o * 100:+.1f}%' for o in overheads)})")

if __name__ == "__main__":
    main()
