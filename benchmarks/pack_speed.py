"""Time per iteration of a pack of M trajectory-optimization configs vs M lone runs.

For Pendulum and CartPole, trajectory optimization (B = 32 start states, T = 100, Adam),
on jax and on torch (one thread): one pack of M members (seeds 0..M-1, learning rates
spread over [0.03, 0.3]) through ``gradgym.pipelines.run_pack``, against the same M
configs run alone one after the other (M x the time per iteration of a lone run, which is
a pack of one). The time per iteration is the median wall time between two iteration
reports of member 0 (everything the loop does, for every member), after the first.

It also times, on jax, the two ways to put members on an axis: folding them into the env
batch (what the pipelines do) and ``jax.vmap`` of the lone loss over the members.

    python benchmarks/pack_speed.py
    python benchmarks/pack_speed.py --members 1 8 --iters 5
"""

from __future__ import annotations

import argparse
import functools
import platform
import time
from dataclasses import replace

import numpy as np
from machine_load import load_average

import gradgym
from gradgym.pipelines import TrajectoryConfig, run_pack

ENVS = ("Pendulum", "CartPole")
BACKENDS = ("jax", "torch")


def pack_iteration_time(env_name: str, backend: str, members: int, iters: int) -> tuple[float, float]:
    """(median seconds per iteration of one pack of ``members``, compile seconds)."""
    base = TrajectoryConfig(iters=iters + 1, horizon=100, batch=32, render=False,
                            grad_hist_every=0)
    cfgs = [replace(base, lr=float(lr)) for lr in np.geomspace(0.03, 0.3, members)]
    stamps: list[float] = []

    def report(metrics: dict, step: int, artifacts=None) -> None:
        if "return_mean" in metrics:
            stamps.append(time.perf_counter())

    reports = [report] + [None] * (members - 1)
    env = gradgym.make(env_name, backend=backend)
    outcomes = run_pack("trajectory", env, cfgs, list(range(members)), reports)
    return float(np.median(np.diff(stamps))), outcomes[0].compile_time_s


def fold_vs_vmap(env_name: str, members: int, repeats: int = 20) -> tuple[float, float]:
    """Seconds per jitted gradient of a jax pack's loss: members folded into the batch vs
    ``jax.vmap`` of the lone loss (trajectory, B = 32, T = 100)."""
    import jax
    import jax.numpy as jnp

    from gradgym.pipelines import _jax, trajectory
    from gradgym.pipelines._rollout import member_states, transition

    env = gradgym.make(env_name, backend="jax")
    start = member_states(env, list(range(members)), 32)
    logits = jnp.zeros((members, 32, 100, env.spec.act_dim))
    act = functools.partial(trajectory.open_loop_action, jnp)
    step = functools.partial(transition, env, act)
    folded = functools.partial(trajectory.packed_open_loop_loss, env, _jax, step, 100)

    def vmapped(params, start):
        losses, returns = jax.vmap(
            functools.partial(trajectory.open_loop_loss, env, _jax, step, 100)
        )(params, start)
        return losses, returns

    times = []
    for loss in (folded, vmapped):
        grad = jax.jit(jax.grad(lambda p, s, loss=loss: jnp.sum(loss(p, s)[0])))
        jax.block_until_ready(grad(logits, start))
        began = time.perf_counter()
        for _ in range(repeats):
            jax.block_until_ready(grad(logits, start))
        times.append((time.perf_counter() - began) / repeats)
    return times[0], times[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--members", type=int, nargs="+", default=[1, 8, 32, 64])
    parser.add_argument("--iters", type=int, default=6, help="timed iterations per pack")
    parser.add_argument("--envs", nargs="+", default=list(ENVS))
    parser.add_argument("--backends", nargs="+", default=list(BACKENDS))
    args = parser.parse_args()

    import torch

    torch.set_num_threads(1)
    print(f"# {platform.processor() or platform.machine()}, python {platform.python_version()}")
    print(f"# load average before: {load_average()}")
    print("| env | backend | M | lone ms/iter | M lone runs ms/iter | pack ms/iter "
          "| speedup (M lone / pack) | pack / lone | pack compile s |")
    print("|---|---|---|---|---|---|---|---|---|")
    for env_name in args.envs:
        for backend in args.backends:
            lone, _ = pack_iteration_time(env_name, backend, 1, args.iters)
            for members in args.members:
                # M = 1 runs again: a second lone run shows the run-to-run noise
                pack, compile_s = pack_iteration_time(env_name, backend, members, args.iters)
                print(f"| {env_name} | {backend} | {members} | {lone * 1e3:.2f} | "
                      f"{members * lone * 1e3:.1f} | {pack * 1e3:.2f} | "
                      f"{members * lone / pack:.1f}x | {pack / lone:.2f}x | {compile_s:.2f} |",
                      flush=True)
    if "jax" in args.backends:
        print("\n| env | M | jax fold ms/grad | jax vmap ms/grad | vmap / fold |")
        print("|---|---|---|---|---|")
        for env_name in args.envs:
            for members in (8, 32):
                fold, vmap = fold_vs_vmap(env_name, members)
                print(f"| {env_name} | {members} | {fold * 1e3:.2f} | {vmap * 1e3:.2f} | "
                      f"{vmap / fold:.2f}x |", flush=True)
    print(f"# load average after: {load_average()}")


if __name__ == "__main__":
    main()
