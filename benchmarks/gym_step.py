"""Single-env step time of every gradgym Gymnasium id against Gymnasium's own env.

Both sides are made with ``gymnasium.make`` (so both carry Gymnasium's default wrappers)
and stepped with the same pre-drawn random actions, resetting on termination or
truncation. A round times every contender of an id once, interleaved, so that load from
other processes hits both; each figure is the best of ``--repeats`` rounds after a warm-up,
in process CPU time (``time.process_time``: what a step costs, whatever else runs on the
machine) and wall time. The target is a ratio gradgym / Gymnasium <= 1.0 for every id.

The MuJoCo ids are compared with the same Gymnasium id; the classic ids with Gymnasium's
nearest classic-control env (different dynamics, the same kind of work per step).

    python benchmarks/gym_step.py
    python benchmarks/gym_step.py --ids Hopper-v5 --steps 5000 --repeats 7
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import gymnasium
import numpy as np

import gradgym  # noqa: F401  (registers the gradgym ids)

# gradgym id -> Gymnasium's id it is timed against
PAIRS = {
    **{f"gradgym/{task}-v5": f"{task}-v5" for task in (
        "InvertedPendulum", "InvertedDoublePendulum", "Swimmer", "Hopper", "HalfCheetah",
        "Walker2d", "Ant", "Humanoid")},
    "gradgym/Pendulum-v0": "Pendulum-v1",
    "gradgym/MountainCar-v0": "MountainCarContinuous-v0",
}


def stepper(env_id: str, steps: int, seed: int = 0) -> Callable[[], None]:
    """A function that steps a fresh ``gymnasium.make(env_id)`` ``steps`` times."""
    env = gymnasium.make(env_id)
    env.action_space.seed(seed)
    actions = [env.action_space.sample() for _ in range(steps)]
    env.reset(seed=seed)

    def run() -> None:
        step, reset = env.step, env.reset
        for action in actions:
            _, _, terminated, truncated, _ = step(action)
            if terminated or truncated:
                reset()

    return run


def time_pair(ours: str, theirs: str, steps: int, repeats: int) -> dict[str, float]:
    """Best-of-``repeats`` µs per step of both ids, CPU and wall, rounds interleaved."""
    runs = {"gradgym": stepper(ours, steps), "gymnasium": stepper(theirs, steps)}
    best = {f"{side}_{clock}": float("inf") for side in runs for clock in ("cpu", "wall")}
    for round_ in range(repeats + 1):
        for side, run in runs.items():
            cpu, wall = time.process_time(), time.perf_counter()
            run()
            cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
            if round_:  # round 0 warms up
                best[f"{side}_cpu"] = min(best[f"{side}_cpu"], cpu / steps * 1e6)
                best[f"{side}_wall"] = min(best[f"{side}_wall"], wall / steps * 1e6)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ids", nargs="+", default=[ours.split("/")[1] for ours in PAIRS],
                        help="gradgym ids without the namespace (default: all)")
    parser.add_argument("--steps", type=int, default=3000, help="env steps per timed run")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    with open("/proc/loadavg") as f:
        load_before = f.read().split()[:3]
    print(f"{'gradgym id':32s} {'vs':26s} {'gradgym µs':>10s} {'Gymnasium µs':>12s} "
          f"{'ratio':>6s} {'(wall: µs':>10s} {'µs':>7s} {'ratio)':>6s}")
    for name in args.ids:
        ours = f"gradgym/{name}"
        theirs = PAIRS[ours]
        t = time_pair(ours, theirs, args.steps, args.repeats)
        print(f"{ours:32s} {theirs:26s} {t['gradgym_cpu']:10.1f} {t['gymnasium_cpu']:12.1f} "
              f"{t['gradgym_cpu'] / t['gymnasium_cpu']:6.2f} {t['gradgym_wall']:10.1f} "
              f"{t['gymnasium_wall']:7.1f} {t['gradgym_wall'] / t['gymnasium_wall']:6.2f}", flush=True)
    with open("/proc/loadavg") as f:
        print(f"load average before: {' '.join(load_before)}; after: {' '.join(f.read().split()[:3])}")
    print(f"numpy {np.__version__}, gymnasium {gymnasium.__version__}; target: ratio <= 1.0")


if __name__ == "__main__":
    main()
