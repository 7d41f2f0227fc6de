"""Env-steps per second of gradgym's MuJoCo tasks next to Gymnasium's, in one run.

For each of the eight MuJoCo tasks it times, with random actions:

- gradgym on numpy, batched, at B = 1, 64 and 256 (float64, one thread), and at B = 64 on
  ``--threads`` threads (``make(..., num_threads=N)``);
- Gymnasium's single env (``gymnasium.make``, resetting on termination) and its vectorized
  env at B = 64 (``gymnasium.make_vec``: the ``vector_entry_point`` path where the env has
  one, which no MuJoCo env has, so the ``sync`` path);
- the time of the gradient of a 20-step return with respect to the actions (B = 1) on torch
  (autograd) and jax (``jit(grad)`` over ``lax.scan``, timed after compilation);
  InvertedPendulum with ``smooth_reward=True``, as Gymnasium's reward has no gradient.

Every step computes the next state, the observation, the reward and termination. Each
figure is the best of ``--repeats`` rounds after a warm-up round; a round runs every
contender of a task once, interleaved, so that load from other processes hits all of them.
Throughputs are timed in process CPU time (what the work costs, whatever else shares the
CPUs); the thread speedup is a wall-time ratio of gradgym at B = 64 on ``--threads``
threads to one thread, so it shows how many CPUs were free. Both sides run the same MuJoCo
engine on the same models; the ratio column divides gradgym at B = 64 by Gymnasium's
vectorized env (target: >= 2 on two CPUs).

    python benchmarks/mujoco_throughput.py                        # all eight (a few minutes)
    python benchmarks/mujoco_throughput.py --tasks HalfCheetah-v5 --repeats 5
"""

from __future__ import annotations

import argparse
import os
import platform
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

import gradgym

TASKS = (
    "InvertedPendulum-v5",
    "InvertedDoublePendulum-v5",
    "Swimmer-v5",
    "Hopper-v5",
    "HalfCheetah-v5",
    "Walker2d-v5",
    "Ant-v5",
    "Humanoid-v5",
)
GRADIENT_HORIZON = 20
# Gymnasium's InvertedPendulum reward is constant while the pole stands: no gradient.
GRADIENT_KWARGS = {"InvertedPendulum-v5": {"smooth_reward": True}}


@dataclass
class Timed:
    """A workload of ``env_steps`` env steps, timed on ``clock``."""

    label: str
    run: Callable[[], object]
    env_steps: int
    clock: Callable[[], float]
    best: float = float("inf")

    @property
    def rate(self) -> float:
        return self.env_steps / self.best


def measure(workloads: list[Timed], repeats: int) -> None:
    """Best time of each workload over ``repeats`` rounds, after a warm-up round.

    Rounds interleave the workloads, so a burst of load from other processes on a shared
    machine hits every contender instead of one.
    """
    for workload in workloads:
        workload.run()
    for _ in range(repeats):
        for workload in workloads:
            start = workload.clock()
            workload.run()
            workload.best = min(workload.best, workload.clock() - start)


def gradgym_workload(name: str, batch: int, env_steps: int, threads: int = 1,
                     wall: bool = False) -> Timed:
    env = gradgym.make(name, dtype="float64", num_threads=threads)
    start = env.reset(0, batch=batch)
    steps = max(2, env_steps // batch)
    actions = np.random.default_rng(0).uniform(-1, 1, (steps, batch, env.spec.act_dim))

    def run():
        state = start
        for action in actions:
            state, _, _, _ = env.step(state, action)

    clock = time.perf_counter if wall else time.process_time
    label = f"gradgym B={batch}, {threads} thread(s), {'wall' if wall else 'CPU'} time"
    return Timed(label, run, batch * steps, clock)


def gymnasium_single_workload(name: str, env_steps: int) -> Timed:
    import gymnasium

    env = gymnasium.make(name)
    env.reset(seed=0)
    actions = [env.action_space.sample() for _ in range(env_steps)]

    def run():
        for action in actions:
            _, _, terminated, truncated, _ = env.step(action)
            if terminated or truncated:
                env.reset()

    return Timed("Gymnasium single", run, env_steps, time.process_time)


def gymnasium_vector_workload(name: str, batch: int, env_steps: int) -> Timed:
    import gymnasium

    try:
        envs = gymnasium.make_vec(name, num_envs=batch, vectorization_mode="vector_entry_point")
        mode = "entry point"
    except gymnasium.error.Error:  # no MuJoCo env has a vector entry point
        envs, mode = gymnasium.make_vec(name, num_envs=batch, vectorization_mode="sync"), "sync"
    envs.reset(seed=0)
    steps = max(2, env_steps // batch)
    actions = [envs.action_space.sample() for _ in range(steps)]

    def run():
        for action in actions:
            envs.step(action)  # autoresets terminated envs

    return Timed(f"Gymnasium vector B={batch} ({mode})", run, batch * steps, time.process_time)


def best_time(run: Callable[[], object], repeats: int) -> float:
    """Best wall time of ``repeats`` calls of ``run`` after one warm-up call."""
    run()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        best = min(best, time.perf_counter() - start)
    return best


def gradient_times(name: str, repeats: int) -> tuple[float, float, float]:
    """Seconds of a 20-step return gradient on torch and on jax (and jax's compile time)."""
    import jax
    import torch

    torch.set_num_threads(1)
    kwargs = GRADIENT_KWARGS.get(name, {})
    start = gradgym.make(name, dtype="float64", **kwargs).reset(0, batch=1)
    act_dim = gradgym.make(name).spec.act_dim
    plan = np.random.default_rng(0).uniform(-0.5, 0.5, (GRADIENT_HORIZON, 1, act_dim))

    torch_env = gradgym.make(name, backend="torch", dtype="float64", **kwargs)
    torch_start = torch_env.as_state(start)

    def torch_gradient():
        actions = torch.tensor(plan, requires_grad=True)
        state, total = torch_start, 0.0
        for action in actions:
            state, _, reward, _ = torch_env.step(state, action)
            total = total + reward.sum()
        total.backward()
        return actions.grad

    jax_env = gradgym.make(name, backend="jax", dtype="float64", **kwargs)
    jax_start = jax_env.as_state(start)

    def total_return(actions):
        def body(state, action):
            state, _, reward, _ = jax_env.step(state, action)
            return state, reward.sum()

        return jax.lax.scan(body, jax_start, actions)[1].sum()

    jax_gradient = jax.jit(jax.grad(total_return))
    jax_plan = jax.numpy.asarray(plan)
    compile_start = time.perf_counter()
    jax_gradient(jax_plan).block_until_ready()
    compile_time = time.perf_counter() - compile_start
    jax_time = best_time(lambda: jax_gradient(jax_plan).block_until_ready(), repeats)
    return best_time(torch_gradient, repeats), jax_time, compile_time


def fmt(rate: float) -> str:
    return f"{rate:,.0f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", nargs="+", default=list(TASKS), choices=TASKS, metavar="TASK")
    parser.add_argument("--env-steps", type=int, default=2048, help="env steps per timed run")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2, help="threads of the extra B = 64 column")
    parser.add_argument("--no-gradients", action="store_true", help="skip the gradient timings")
    args = parser.parse_args()

    import gymnasium
    import mujoco

    # Gymnasium compiles half_cheetah.xml once per env, and MuJoCo's compiler warns about a
    # deprecated attribute each time: keep those warnings out of the table.
    mujoco.set_mju_user_warning(lambda message: None)
    print(f"# MuJoCo env throughput, env-steps/s (best of {args.repeats} interleaved rounds); "
          f"mujoco {mujoco.__version__}, gymnasium {gymnasium.__version__}, {platform.machine()}, "
          f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f} at start")
    header = (f"| task | gradgym B=1 | gradgym B=64 | gradgym B=256 | Gymnasium single "
              f"| Gymnasium vector B=64 | ratio B=64 / vector | {args.threads}-thread speedup at B=64 (wall) |")
    if not args.no_gradients:
        header += f" {GRADIENT_HORIZON}-step grad torch | {GRADIENT_HORIZON}-step grad jax (compile) |"
    print(header)
    print("|" + "---|" * (header.count("|") - 1))
    ratios, speedups = [], []
    for name in args.tasks:
        workloads = [gradgym_workload(name, batch, args.env_steps) for batch in (1, 64, 256)]
        workloads += [
            gymnasium_single_workload(name, args.env_steps // 4),
            gymnasium_vector_workload(name, 64, args.env_steps),
            gradgym_workload(name, 64, args.env_steps, wall=True),
            gradgym_workload(name, 64, args.env_steps, threads=args.threads, wall=True),
        ]
        measure(workloads, args.repeats)
        one, b64, b256, single, vector, b64_wall, threaded_wall = (w.rate for w in workloads)
        ratios.append(b64 / vector)
        speedups.append(threaded_wall / b64_wall)
        mode = workloads[4].label.rsplit("(", 1)[-1].rstrip(")")
        row = (f"| {name} | {fmt(one)} | {fmt(b64)} | {fmt(b256)} | {fmt(single)} | {fmt(vector)} ({mode}) "
               f"| {ratios[-1]:.2f}x | {speedups[-1]:.2f}x |")
        if not args.no_gradients:
            torch_time, jax_time, compile_time = gradient_times(name, args.repeats)
            row += f" {torch_time:.3f} s | {jax_time:.3f} s ({compile_time:.1f} s) |"
        print(row, flush=True)

    def geometric_mean(values: list[float]) -> float:
        return float(np.exp(np.mean(np.log(values))))

    print(f"\nTarget: gradgym B=64 >= 2x Gymnasium's vectorized env per env-step. One thread: met "
          f"for {sum(r >= 2 for r in ratios)} of {len(ratios)} tasks (geometric mean "
          f"{geometric_mean(ratios):.2f}x). {args.threads} threads multiply gradgym's rate by "
          f"{geometric_mean(speedups):.2f}x (geometric mean) on this machine's free CPUs; load "
          f"average {os.getloadavg()[0]:.1f} at the end.")


if __name__ == "__main__":
    main()
