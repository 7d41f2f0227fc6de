"""Env-steps per second of gradgym's MuJoCo tasks next to Gymnasium's, in one run.

For each of the eight MuJoCo tasks it times, with random actions:

- gradgym on numpy: bare functional steps from a reset state at B = 1, 64 and 256 on one
  thread, and its ``VecEnv`` at B = 64 (episodes restarted as they end, after 1000 steps at
  the latest, as Gymnasium's vector env does) on one thread and on ``--threads`` MuJoCo
  threads (``make(..., num_threads=N)``; default: every CPU);
- Gymnasium's single env (``gymnasium.make``, resetting on termination) and its vectorized
  env at B = 64 in both modes ``make_vec`` offers a MuJoCo env (none has a
  ``vector_entry_point``): ``sync`` (one process) and ``async`` (a worker process per env);
- the time of the gradient of a 20-step return with respect to the actions (B = 1) on torch
  (autograd) and jax (``jit(grad)`` over ``lax.scan``, timed after compilation);
  InvertedPendulum with ``smooth_reward=True``, as Gymnasium's reward has no gradient.

Every step computes the next state, the observation, the reward and termination. Each
figure is the best of ``--repeats`` rounds after a warm-up round; a round runs every
contender of a task once, interleaved, so that load from other processes hits all of them.

Two comparisons, both at B = 64 on the same MuJoCo engine and models:

- one CPU: gradgym's VecEnv on one thread against Gymnasium's sync vector env, in process
  CPU time (what the work costs, whatever else shares the machine);
- all CPUs (the target, >= 2x): gradgym's VecEnv on ``--threads`` threads against the
  faster of Gymnasium's sync and async vector envs, in wall time, so it needs free CPUs.

Where MuJoCo's own step dominates (Ant, Humanoid: 0.4-1 ms per env step here) both sides
pay nearly the same per env on one CPU, and the ratio comes from the second thread.

    python benchmarks/mujoco_throughput.py                        # all eight (a few minutes)
    python benchmarks/mujoco_throughput.py --tasks HalfCheetah-v5 --repeats 5
"""

from __future__ import annotations

import argparse
import contextlib
import os
import platform
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

import gradgym
from gradgym.envs.wrappers import VecEnv

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
    close: Callable[[], object] = lambda: None
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


def gradgym_workload(name: str, batch: int, env_steps: int) -> Timed:
    """Bare functional steps from one reset state, timed in CPU time on one thread."""
    env = gradgym.make(name, dtype="float64")
    start = env.reset(0, batch=batch)
    steps = max(2, env_steps // batch)
    actions = np.random.default_rng(0).uniform(-1, 1, (steps, batch, env.spec.act_dim))

    def run():
        state = start
        for action in actions:
            state, _, _, _ = env.step(state, action)

    return Timed(f"gradgym B={batch}", run, batch * steps, time.process_time)


def gradgym_vector_workload(name: str, batch: int, env_steps: int, threads: int = 1,
                            wall: bool = False) -> Timed:
    """gradgym's ``VecEnv``: episodes restarted as they end, like Gymnasium's vector env.

    The episodes go on from round to round, so both sides step the same mix of fresh and
    late states; MuJoCo's cost depends on it (the number of contacts, above all).
    """
    envs = VecEnv(gradgym.make(name, dtype="float64", num_threads=threads), num_envs=batch)
    envs.reset(seed=0)
    steps = max(2, env_steps // batch)
    actions = np.random.default_rng(0).uniform(-1, 1, (steps, batch, envs.spec.act_dim))

    def run():
        for action in actions:
            envs.step(action)

    label = f"gradgym VecEnv B={batch}, {threads} thread(s), {_clock_name(wall)} time"
    return Timed(label, run, batch * steps, _clock(wall))


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


def gymnasium_vector_workload(name: str, batch: int, env_steps: int, mode: str = "sync",
                              wall: bool = False) -> Timed:
    """Gymnasium's vectorized env: ``sync`` (one process) or ``async`` (a process per env).

    No MuJoCo env has a ``vector_entry_point``, so these are the two ways ``make_vec`` offers.
    """
    import gymnasium

    # async workers' MuJoCo compilers print deprecation warnings to the inherited stderr
    with _stderr_silenced() if mode == "async" else contextlib.nullcontext():
        envs = gymnasium.make_vec(name, num_envs=batch, vectorization_mode=mode)
        envs.reset(seed=0)
    steps = max(2, env_steps // batch)
    actions = [envs.action_space.sample() for _ in range(steps)]

    def run():
        for action in actions:
            envs.step(action)  # autoresets terminated envs

    label = f"Gymnasium vector B={batch} ({mode}), {_clock_name(wall)} time"
    return Timed(label, run, batch * steps, _clock(wall), close=envs.close)


def _clock(wall: bool) -> Callable[[], float]:
    """Wall time (needs free CPUs) or this process's CPU time (what the work costs)."""
    return time.perf_counter if wall else time.process_time


def _clock_name(wall: bool) -> str:
    return "wall" if wall else "CPU"


@contextlib.contextmanager
def _stderr_silenced():
    saved = os.dup(2)
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(devnull)
        os.close(saved)


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


def parallel_capacity(threads: int, substeps: int = 4000) -> float:
    """How many times one CPU's MuJoCo work ``threads`` threads get done in the same time.

    Each thread steps its own HalfCheetah (``mj_step`` releases the GIL). 2.0 on two free
    CPUs; less where the CPUs share a physical core's floating-point units (hyperthreads
    of a VM) or other processes run.
    """
    import mujoco

    from gradgym.envs.mujoco.physics import load_model

    model = load_model("half_cheetah.xml")
    datas = [mujoco.MjData(model) for _ in range(threads)]

    def work(data):
        mujoco.mj_step(model, data, nstep=substeps)

    with ThreadPoolExecutor(threads) as pool:
        one = best_time(lambda: work(datas[0]), 3)
        together = best_time(lambda: list(pool.map(work, datas)), 3)
    return threads * one / together


def fmt(rate: float) -> str:
    return f"{rate:,.0f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", nargs="+", default=list(TASKS), choices=TASKS, metavar="TASK")
    parser.add_argument("--env-steps", type=int, default=2048, help="env steps per timed run")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1,
                        help="MuJoCo threads of gradgym's multi-CPU B = 64 column (default: all CPUs)")
    parser.add_argument("--no-gradients", action="store_true", help="skip the gradient timings")
    args = parser.parse_args()

    import gymnasium
    import mujoco

    # Gymnasium compiles half_cheetah.xml once per env, and MuJoCo's compiler warns about a
    # deprecated attribute each time: keep those warnings out of the table.
    mujoco.set_mju_user_warning(lambda message: None)
    print(f"# MuJoCo env throughput, env-steps/s (best of {args.repeats} interleaved rounds); "
          f"mujoco {mujoco.__version__}, gymnasium {gymnasium.__version__}, {platform.machine()}, "
          f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f} at start; "
          f"{args.threads} threads of MuJoCo work do {parallel_capacity(args.threads):.2f}x one "
          f"thread's work in the same time")
    header = (f"| task | gradgym B=1 | gradgym B=64 | gradgym B=256 | Gymnasium single "
              f"| Gymnasium vector B=64 (sync) | gradgym VecEnv B=64 | 1 CPU: ratio VecEnv / vector "
              f"| gradgym VecEnv B=64, {args.threads} threads (wall) | Gymnasium sync (wall) "
              f"| Gymnasium async (wall) | {args.threads} CPUs: ratio B=64 / best vector |")
    if not args.no_gradients:
        header += f" {GRADIENT_HORIZON}-step grad torch | {GRADIENT_HORIZON}-step grad jax (compile) |"
    print(header)
    print("|" + "---|" * (header.count("|") - 1))
    one_cpu_ratios, all_cpu_ratios = [], []
    for name in args.tasks:
        workloads = [gradgym_workload(name, batch, args.env_steps) for batch in (1, 64, 256)]
        workloads += [
            gymnasium_single_workload(name, args.env_steps // 4),
            gymnasium_vector_workload(name, 64, args.env_steps),
            gradgym_vector_workload(name, 64, args.env_steps),
            gradgym_vector_workload(name, 64, args.env_steps, threads=args.threads, wall=True),
            gymnasium_vector_workload(name, 64, args.env_steps, wall=True),
            gymnasium_vector_workload(name, 64, args.env_steps, mode="async", wall=True),
        ]
        try:
            measure(workloads, args.repeats)
        finally:
            for workload in workloads:
                workload.close()
        one, b64, b256, single, vector, vec_env, threaded, sync_wall, async_wall = (
            w.rate for w in workloads
        )
        one_cpu_ratios.append(vec_env / vector)
        all_cpu_ratios.append(threaded / max(sync_wall, async_wall))
        row = (f"| {name} | {fmt(one)} | {fmt(b64)} | {fmt(b256)} | {fmt(single)} | {fmt(vector)} "
               f"| {fmt(vec_env)} | {one_cpu_ratios[-1]:.2f}x | {fmt(threaded)} | {fmt(sync_wall)} | {fmt(async_wall)} "
               f"| {all_cpu_ratios[-1]:.2f}x |")
        if not args.no_gradients:
            torch_time, jax_time, compile_time = gradient_times(name, args.repeats)
            row += f" {torch_time:.3f} s | {jax_time:.3f} s ({compile_time:.1f} s) |"
        print(row, flush=True)

    def summary(ratios: list[float]) -> str:
        mean = float(np.exp(np.mean(np.log(ratios))))
        return f"met for {sum(r >= 2 for r in ratios)} of {len(ratios)} tasks (geometric mean {mean:.2f}x)"

    print(f"\nTarget: gradgym at B=64 >= 2x Gymnasium's vectorized env per env-step on this "
          f"machine's CPUs. On {args.threads} CPUs (wall time; gradgym on {args.threads} MuJoCo "
          f"threads, Gymnasium's faster of sync and async): {summary(all_cpu_ratios)}. On one CPU "
          f"(CPU time, one thread each): {summary(one_cpu_ratios)}. At the end: load average "
          f"{os.getloadavg()[0]:.1f}; {args.threads} threads of MuJoCo work do "
          f"{parallel_capacity(args.threads):.2f}x one thread's work.")

if __name__ == "__main__":
    main()
