"""Sweep scaling: parallel efficiency of a Ray Tune sweep and the cost of MLflow logging.

Runs the same 16-trial sweep of short trajectory-optimization runs (4 classic envs x jax,
torch x 2 seeds) twice on a local Ray with one CPU per trial: once logging to MLflow (the
embedded sqlite store) and once with logging off. Prints

- parallel efficiency = sum of trial times / (CPUs x wall time of Tune's fit)
  (target >= 0.7); the end-to-end wall time, with Ray's start, is shown beside it;
- MLflow overhead per trial = mean trial time with logging / without - 1 (target <= 10%).

A trial's time is Ray Tune's ``time_total_s``: everything the trial does (config, env,
compile, iterations, videos, MLflow run creation and the final flush).

    python benchmarks/sweep_scaling.py                 # 16 trials, 40 iterations each
    python benchmarks/sweep_scaling.py --iters 100 --cpus 2
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

import yaml

from gradgym.platform.sweep import start_sweep

ENVS = ["CartPole", "Pendulum", "MountainCar", "Reacher"]


def run_sweep(folder: Path, name: str, iters: int, cpus: int, tracking: bool) -> dict:
    """Run the 16-trial sweep in ``folder``; return its timings."""
    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump({
        "name": name,
        "num_cpus": cpus,
        "overrides": {
            "pipeline": "trajectory", "pipeline.iters": iters, "pipeline.horizon": 100,
            "pipeline.batch": 32, "tracking.enabled": tracking,
        },
        "grid": {"env": ENVS, "backend": ["jax", "torch"], "seed": [0, 1]},
    }))
    began = time.perf_counter()
    outcome = start_sweep(path, storage=str(folder / "sweeps"))
    end_to_end = time.perf_counter() - began
    assert outcome.all_finished, outcome.describe()
    trial_times = [row["trial_time_s"] for row in outcome.rows]
    return {
        "trials": len(trial_times),
        "sum_trial_s": sum(trial_times),
        "trial_s": {backend: statistics.mean(r["trial_time_s"] for r in outcome.rows if r["backend"] == backend)
                    for backend in ("jax", "torch")},
        "mean_trial_s": statistics.mean(trial_times),
        "mean_iter_ms": statistics.mean(r["mean_iter_time_s"] for r in outcome.rows) * 1e3,
        "fit_wall_s": outcome.fit_wall_s,
        "end_to_end_s": end_to_end,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--iters", type=int, default=40, help="iterations per trial")
    parser.add_argument("--cpus", type=int, default=os.cpu_count(), help="CPUs of the local Ray")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        os.chdir(folder)  # the embedded MLflow store goes here
        off = run_sweep(folder, "logging-off", args.iters, args.cpus, tracking=False)
        on = run_sweep(folder, "logging-on", args.iters, args.cpus, tracking=True)

    print(f"\n16-trial sweep, trajectory optimization (T=100, B=32, {args.iters} iterations), "
          f"{args.cpus} CPUs, 1 CPU per trial\n")
    header = f"{'':28}{'logging off':>14}{'MLflow on':>14}"
    print(header)
    print("-" * len(header))
    rows = [
        ("trials", "trials", "{:14d}"),
        ("sum of trial times [s]", "sum_trial_s", "{:14.1f}"),
        ("mean trial time, jax [s]", None, None),
        ("mean trial time, torch [s]", None, None),
        ("mean time / iteration [ms]", "mean_iter_ms", "{:14.2f}"),
        ("Tune fit wall time [s]", "fit_wall_s", "{:14.1f}"),
        ("end-to-end wall time [s]", "end_to_end_s", "{:14.1f}"),
    ]
    for label, key, fmt in rows:
        if key is None:
            backend = label.split(", ")[1].split(" ")[0]
            print(f"{label:28}{off['trial_s'][backend]:14.2f}{on['trial_s'][backend]:14.2f}")
        else:
            print(f"{label:28}" + fmt.format(off[key]) + fmt.format(on[key]))
    for name, result in (("logging off", off), ("MLflow on", on)):
        efficiency = result["sum_trial_s"] / (args.cpus * result["fit_wall_s"])
        end_to_end = result["sum_trial_s"] / (args.cpus * result["end_to_end_s"])
        print(f"parallel efficiency ({name}): {efficiency:.2f} of Tune's fit "
              f"(target >= 0.7), {end_to_end:.2f} end to end with Ray's start")
    overhead = on["mean_trial_s"] / off["mean_trial_s"] - 1
    print(f"MLflow logging overhead per trial: {overhead * 100:+.1f}% (target <= 10%)")


if __name__ == "__main__":
    main()
