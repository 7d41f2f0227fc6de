"""Single-env step time of every gradgym Gymnasium id against Gymnasium's own env.

Both sides are made with ``gymnasium.make`` (so both carry Gymnasium's default wrappers)
and stepped with the same pre-drawn random actions, resetting on termination or
truncation. A round times every contender of an id once, interleaved, so that load from
other processes hits both; each figure is the best of ``--repeats`` short rounds after a
warm-up, in process CPU time (``time.process_time``: what a step costs, whatever else runs on
the machine). The target is a ratio gradgym / Gymnasium <= 1.0 for every id Gymnasium has
too (the MuJoCo ids).

For the MuJoCo ids a second pair of columns times the same steps with MuJoCo's engine
calls (``mj_step``, ``mj_rnePostConstraint``) made no-ops: what each side spends outside
the physics, which both share. On a shared machine this difference is far steadier than
the whole step's ratio, whose physics part swings with the load.

The MuJoCo ids are compared with the same Gymnasium id; the classic ids, which Gymnasium
does not have, with its nearest classic-control env where there is one (different dynamics,
the same kind of work per step; CartPole-v1's actions are discrete) and alone otherwise.

    python benchmarks/gym_step.py
    python benchmarks/gym_step.py --ids Hopper-v5 --steps 1000 --repeats 50
"""

from __future__ import annotations

import argparse
import contextlib
import time
from collections.abc import Callable, Iterator

import gymnasium
import mujoco
import numpy as np
from machine_load import load_average

import gradgym  # noqa: F401  (registers the gradgym ids)

# gradgym id -> Gymnasium's id it is timed against (None: Gymnasium has nothing alike)
PAIRS: dict[str, str | None] = {
    **{f"gradgym/{task}-v5": f"{task}-v5" for task in (
        "InvertedPendulum", "InvertedDoublePendulum", "Swimmer", "Hopper", "HalfCheetah",
        "Walker2d", "Ant", "Humanoid")},
    "gradgym/Pendulum-v0": "Pendulum-v1",
    "gradgym/MountainCar-v0": "MountainCarContinuous-v0",
    "gradgym/CartPole-v0": "CartPole-v1",
    "gradgym/Reacher-v0": None,
    "gradgym/Fish-v0": None,
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


def time_pair(ours: str, theirs: str | None, steps: int, repeats: int,
              physics: bool = True) -> dict[str, float]:
    """Best-of-``repeats`` CPU µs per step of both ids (``theirs=None``: ours alone), rounds
    interleaved (``physics=False``: MuJoCo's engine calls are no-ops)."""
    runs = {"gradgym": stepper(ours, steps)}
    if theirs is not None:
        runs["gymnasium"] = stepper(theirs, steps)
    best = dict.fromkeys(runs, float("inf"))
    with contextlib.nullcontext() if physics else physics_off():
        for round_ in range(repeats + 1):
            for side, run in runs.items():
                cpu = time.process_time()
                run()
                if round_:  # round 0 warms up
                    best[side] = min(best[side], (time.process_time() - cpu) / steps * 1e6)
    return best


@contextlib.contextmanager
def physics_off() -> Iterator[None]:
    """MuJoCo's step and its post-constraint pass as no-ops (both sides call them through
    the ``mujoco`` module)."""
    step, post = mujoco.mj_step, mujoco.mj_rnePostConstraint
    mujoco.mj_step = lambda *args, **kwargs: None
    mujoco.mj_rnePostConstraint = lambda *args: None
    try:
        yield
    finally:
        mujoco.mj_step, mujoco.mj_rnePostConstraint = step, post


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ids", nargs="+", default=[ours.split("/")[1] for ours in PAIRS],
                        help="gradgym ids without the namespace (default: all)")
    parser.add_argument("--steps", type=int, default=500, help="env steps per timed round")
    parser.add_argument("--repeats", type=int, default=30, help="timed rounds (the best counts)")
    args = parser.parse_args()
    load_before = load_average()
    print(f"{'gradgym id':34s} {'vs':26s} {'gradgym µs':>10s} {'Gymnasium µs':>12s} {'ratio':>6s}"
          f"   {'outside MuJoCo: gradgym':>23s} {'Gymnasium':>9s}")
    for name in args.ids:
        ours = f"gradgym/{name}"
        theirs = PAIRS[ours]
        t = time_pair(ours, theirs, args.steps, args.repeats)
        line = f"{ours:34s} {theirs or '-':26s} {t['gradgym']:10.1f} "
        if theirs is None:
            print(line + f"{'-':>12s} {'-':>6s}", flush=True)
            continue
        line += f"{t['gymnasium']:12.1f} {t['gradgym'] / t['gymnasium']:6.2f}"
        if theirs.endswith("-v5"):
            off = time_pair(ours, theirs, args.steps, args.repeats, physics=False)
            line += f"   {off['gradgym']:23.1f} {off['gymnasium']:9.1f}"
        print(line, flush=True)
    print(f"load average before: {load_before}; after: {load_average()}")
    print(f"numpy {np.__version__}, gymnasium {gymnasium.__version__}; target: ratio <= 1.0 where the env is the same (the -v5 ids)")


if __name__ == "__main__":
    main()
