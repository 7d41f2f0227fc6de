"""Sweep scaling: how many configs per minute a sweep runs, and where its time goes.

The issue's sweep: trajectory optimization (T=100, B=32, 200 iterations) on the 5 classic envs
x {jax, torch} x 16 seeds x 4 learning rates = 640 configs, logged to the embedded MLflow
store, on a local Ray with every CPU. It runs three times:

1. packed (the default ``pack``), MLflow on: the sweep as users run it;
2. the same with ``tracking.enabled=false``: MLflow's share of the wall time is
   1 - wall(off) / wall(on);
3. ``pack: 1`` (one config per Tune trial, as before packing) on a subset: every env and
   backend with 2 seeds and 1 learning rate (20 configs), to compare configs per minute.

By default the configs log metrics only (``pipeline.render=false``,
``pipeline.grad_hist_every=0``): their GIFs and gradient histograms are drawn per config on the
CPU (matplotlib frames, GIF encoding) and cost about a second or more per config whatever the
sweep does, so they would measure rendering, not the sweep. ``--artifacts`` keeps the
defaults (two 100-frame GIFs and four histograms per config).

Printed for each: wall time end to end (``start_sweep``, Ray's start and the parent run
included), configs per minute, and the useful-compute fraction = time inside iterations /
(CPUs x wall), where a pack's iterations count once (its members share them). Targets on a
2-CPU machine: the 640-config sweep in <= 5 minutes; >= 10x the configs per minute of
``pack: 1``. The load average is printed before and after: on a shared machine it is part
of the result.

    python benchmarks/sweep_scaling.py                          # the full benchmark
    python benchmarks/sweep_scaling.py --seeds 4 --lrs 2        # a smaller sweep (160 configs)
    python benchmarks/sweep_scaling.py --skip-off --skip-pack1  # only the packed sweep
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import yaml
from machine_load import load_average

from gradgym.platform.sweep import SweepOutcome, start_sweep

ENVS = ["CartPole", "Pendulum", "MountainCar", "Reacher", "Swimmer"]
BACKENDS = ["jax", "torch"]
LEARNING_RATES = [0.1, 0.05, 0.02, 0.01]


ARTIFACTS_OFF = {"pipeline.render": False, "pipeline.grad_hist_every": 0}


def run_sweep(folder: Path, name: str, grid: dict, iters: int, cpus: int, artifacts: bool,
              **extra) -> tuple[SweepOutcome, float]:
    """Run one sweep in ``folder`` (its own MLflow store there): (outcome, end-to-end wall)."""
    overrides = {"pipeline": "trajectory", "pipeline.iters": iters, "pipeline.horizon": 100,
                 "pipeline.batch": 32, "compile_cache": str(folder / "compile-cache"),
                 "tracking.uri": f"sqlite:///{folder / 'mlflow.db'}"}
    overrides.update(extra.pop("overrides", {}))
    if not artifacts:
        overrides.update(ARTIFACTS_OFF)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump({"name": name, "num_cpus": cpus, "overrides": overrides,
                                    "grid": grid, **extra}, sort_keys=False))
    began = time.perf_counter()
    outcome = start_sweep(path, storage=str(folder / "sweeps"))
    wall = time.perf_counter() - began
    assert outcome.all_finished, outcome.describe()
    return outcome, wall


def iteration_seconds(rows: list[dict]) -> float:
    """Time spent inside iterations: each pack's once (its members report the same times)."""
    per_pack = {row["pack"]: row["iterations"] * row["mean_iter_time_s"] for row in rows}
    return sum(per_pack.values())


def describe(label: str, outcome: SweepOutcome, wall: float, cpus: int) -> dict[str, float]:
    """Print one sweep's figures; returns them."""
    rows = outcome.rows
    figures = {
        "configs": len(rows),
        "packs": len({row["pack"] for row in rows}),
        "wall_s": wall,
        "configs_per_min": len(rows) / wall * 60,
        "useful": iteration_seconds(rows) / (cpus * wall),
    }
    print(f"{label:34} {figures['configs']:5d} configs in {figures['packs']:4d} trials  "
          f"wall {wall:7.1f} s  {figures['configs_per_min']:7.1f} configs/min  "
          f"useful compute {figures['useful'] * 100:5.1f}%", flush=True)
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--iters", type=int, default=200)
    parser.add_argument("--seeds", type=int, default=16)
    parser.add_argument("--lrs", type=int, default=4, help="how many of the 4 learning rates")
    parser.add_argument("--cpus", type=int, default=os.cpu_count())
    parser.add_argument("--artifacts", action="store_true",
                        help="keep each config's GIFs and gradient histograms (the run defaults)")
    parser.add_argument("--skip-off", action="store_true", help="skip the MLflow-off sweep")
    parser.add_argument("--skip-pack1", action="store_true", help="skip the pack: 1 subset")
    args = parser.parse_args()
    grid = {"env": ENVS, "backend": BACKENDS, "seed": list(range(args.seeds)),
            "pipeline.lr": LEARNING_RATES[:args.lrs]}
    configs = len(ENVS) * len(BACKENDS) * args.seeds * args.lrs
    print(f"{configs}-config sweep: trajectory optimization (T=100, B=32, {args.iters} iterations), "
          f"{len(ENVS)} envs x jax, torch x {args.seeds} seeds x {args.lrs} learning rates; "
          f"{args.cpus} CPUs; {'with' if args.artifacts else 'without'} GIFs and gradient "
          f"histograms; load average {load_average()}", flush=True)

    with tempfile.TemporaryDirectory(prefix="gradgym-sweep-scaling-") as tmp:
        folder = Path(tmp)
        packed, wall = run_sweep(folder / "on", "packed", grid, args.iters, args.cpus, args.artifacts)
        on = describe("packed, MLflow on", packed, wall, args.cpus)
        if not args.skip_off:
            off_outcome, off_wall = run_sweep(folder / "off", "packed-off", grid, args.iters,
                                              args.cpus, args.artifacts,
                                              overrides={"tracking.enabled": False})
            off = describe("packed, MLflow off", off_outcome, off_wall, args.cpus)
            print(f"{'MLflow share of the wall time':34} {(1 - off['wall_s'] / on['wall_s']) * 100:+.1f}%")
        if not args.skip_pack1:
            subset = {"env": ENVS, "backend": BACKENDS, "seed": [0, 1], "pipeline.lr": LEARNING_RATES[:1]}
            alone_outcome, alone_wall = run_sweep(folder / "alone", "alone", subset, args.iters,
                                                  args.cpus, args.artifacts, pack=1)
            alone = describe("pack: 1 (2 seeds, 1 lr per env/backend)", alone_outcome, alone_wall, args.cpus)
            print(f"{'configs per minute, packed / pack: 1':34} "
                  f"{on['configs_per_min'] / alone['configs_per_min']:.1f}x (target >= 10x)")
    print(f"targets: the {configs}-config sweep in <= 300 s (took {on['wall_s']:.0f} s); load average {load_average()}")


if __name__ == "__main__":
    main()
