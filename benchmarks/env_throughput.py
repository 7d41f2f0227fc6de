"""Env-steps per second of gradgym's classic tasks next to their peers, in one run.

For CartPole, Pendulum and MountainCar at B = 1, 1024 and 16384 it times:

- gradgym on numpy, torch (eager, explicit thread count) and jax (jit + lax.scan);
- a hand-written reference of the same dynamics on the same backend (plain numpy / torch /
  jitted jax, no framework around it), so each gradgym figure has its own yardstick;
- gymnax (jit + vmap + scan; its auto-resetting ``step`` with a fresh key per step, and the
  bare ``step_env``) and Gymnasium (single env, and its vectorized path: the
  native CartPole vector env, a SyncVectorEnv for the others up to B = 1024).

Every step computes the next state, the observation and the reward. Each figure is the best
of ``--repeats`` timed runs after one warm-up run (which also absorbs jax compilation).

    python benchmarks/env_throughput.py                 # full table (a few minutes)
    python benchmarks/env_throughput.py --batches 1024  # one batch size
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import platform
import time
from collections.abc import Callable

import numpy as np

import gradgym

ENVS = ("CartPole", "Pendulum", "MountainCar")
TARGET_ENV_STEPS = 4_000_000  # per timed run on the fast paths; fewer for slow paths


# ----------------------------------------------------------------------- hand-written references
# The same dynamics as gradgym's tasks, written out directly for each library.


def cartpole_ref(lib):
    def step(x, xv, th, thv, action):
        force = 10.0 * action[:, 0]
        s, c = lib.sin(th), lib.cos(th)
        temp = (force + 0.05 * thv * thv * s) / 1.1
        thacc = (9.8 * s - c * temp) / (0.5 * (4.0 / 3.0 - 0.1 * c * c / 1.1))
        xacc = temp - 0.05 * thacc * c / 1.1
        xv = xv + 0.02 * xacc
        thv = thv + 0.02 * thacc
        x = x + 0.02 * xv
        th = th + 0.02 * thv
        c2, s2 = lib.cos(th), lib.sin(th)
        obs = lib.stack([x, xv, c2, s2, thv], -1)
        reward = lib.exp(-x * x) * (c2 + 1.0) / 2.0
        return (x, xv, th, thv), obs, reward

    return step, 4


def pendulum_ref(lib):
    def step(th, thv, action):
        thv = thv + 0.05 * (-14.7 * lib.sin(th + math.pi) + 3.0 * action[:, 0])
        th = th + 0.05 * thv
        c = lib.cos(th)
        obs = lib.stack([c, lib.sin(th), thv], -1)
        return (th, thv), obs, (c + 1.0) / 2.0

    return step, 2


def mountain_car_ref(lib):
    def step(x, xv, action):
        xv = xv + 0.02 * (3.0 * action[:, 0] - 9.8 * lib.cos(3.0 * x))
        x = x + 0.02 * xv
        obs = lib.stack([x, xv], -1)
        return (x, xv), obs, lib.exp(-5.0 * (x - 0.45) ** 2)

    return step, 2


REFERENCES = {"CartPole": cartpole_ref, "Pendulum": pendulum_ref, "MountainCar": mountain_car_ref}


# ------------------------------------------------------------------------------------ timing


def best_rate(run: Callable[[], object], env_steps: int, repeats: int) -> float:
    """Best env-steps/s of ``run`` over ``repeats`` timed calls after one warm-up call."""
    run()
    best = math.inf
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        best = min(best, time.perf_counter() - start)
    return env_steps / best


def horizon_for(batch: int, target: int = TARGET_ENV_STEPS) -> int:
    return max(20, min(20_000, target // batch))


# -------------------------------------------------------------------------- gradgym and refs


def eager_rates(name: str, backend: str, batch: int, repeats: int) -> tuple[float, float]:
    """gradgym and its hand-written reference stepped eagerly on numpy or torch."""
    env = gradgym.make(name, backend=backend)
    lib = env.xp
    steps = horizon_for(batch, TARGET_ENV_STEPS // 4)
    start = env.reset(0, batch=batch)
    action = env.backend.asarray(np.full((batch, 1), 0.5))
    # torch would otherwise record an autograd graph nobody asked for.
    no_grad = lib.no_grad if backend == "torch" else contextlib.nullcontext

    def run_gradgym():
        state = start
        with no_grad():
            for _ in range(steps):
                state, _, _, _ = env.step(state, action)
        return state

    ref_step, _ = REFERENCES[name](lib)
    leaves = tuple(start)

    def run_ref():
        state = leaves
        with no_grad():
            for _ in range(steps):
                state, _, _ = ref_step(*state, action)
        return state

    return best_rate(run_gradgym, steps * batch, repeats), best_rate(run_ref, steps * batch, repeats)


def jax_rates(name: str, batch: int, repeats: int) -> tuple[float, float]:
    import jax
    import jax.numpy as jnp

    env = gradgym.make(name, backend="jax")
    steps = horizon_for(batch)
    start = env.reset(jax.random.key(0), batch=batch)
    action = jnp.full((batch, 1), 0.5, jnp.float32)

    def gradgym_body(state, _):
        state, obs, reward, _ = env.step(state, action)
        return state, reward.sum() + obs.sum()  # keep obs and reward alive under XLA

    run_g = jax.jit(lambda s: jax.lax.scan(gradgym_body, s, None, length=steps))

    ref_step, _ = REFERENCES[name](jnp)
    def ref_body(state, _):
        state, obs, reward = ref_step(*state, action)
        return state, reward.sum() + obs.sum()

    run_r = jax.jit(lambda s: jax.lax.scan(ref_body, s, None, length=steps))
    leaves = tuple(start)
    rate_g = best_rate(lambda: jax.block_until_ready(run_g(start)), steps * batch, repeats)
    rate_r = best_rate(lambda: jax.block_until_ready(run_r(leaves)), steps * batch, repeats)
    return rate_g, rate_r


# --------------------------------------------------------------------------------- peers

GYMNAX_IDS = {"CartPole": "CartPole-v1", "Pendulum": "Pendulum-v1", "MountainCar": "MountainCarContinuous-v0"}
GYMNASIUM_IDS = GYMNAX_IDS


def gymnax_rates(name: str, batch: int, repeats: int) -> tuple[float, float]:
    """gymnax's ``step`` (auto-reset, a fresh key per step as in its own rollouts) and
    ``step_env`` (the bare transition, like gradgym's ``step``), jit + vmap + scan."""
    import gymnax
    import jax
    import jax.numpy as jnp

    env, params = gymnax.make(GYMNAX_IDS[name])
    steps = horizon_for(batch)
    _, states = jax.vmap(env.reset, in_axes=(0, None))(jax.random.split(jax.random.key(0), batch), params)
    discrete = name == "CartPole"
    actions = jnp.ones((batch,), jnp.int32) if discrete else jnp.full((batch,), 0.5, jnp.float32)

    def timed(transition):
        vstep = jax.vmap(transition, in_axes=(0, 0, 0, None))

        def body(carry, _):
            states, key = carry
            key, sub = jax.random.split(key)
            obs, states, reward, *_ = vstep(jax.random.split(sub, batch), states, actions, params)
            return (states, key), reward.sum() + obs.sum()

        run = jax.jit(lambda c: jax.lax.scan(body, c, None, length=steps))
        carry = (states, jax.random.key(1))
        return best_rate(lambda: jax.block_until_ready(run(carry)), steps * batch, repeats)

    return timed(env.step), timed(env.step_env)


def gymnasium_single_rate(name: str, repeats: int) -> float:
    import gymnasium

    env = gymnasium.make(GYMNASIUM_IDS[name]).unwrapped  # no TimeLimit/checker wrappers
    env.reset(seed=0)
    action = 1 if name == "CartPole" else np.array([0.5], np.float32)
    steps = 20_000

    def run():
        for _ in range(steps):
            _, _, terminated, _, _ = env.step(action)
            if terminated:
                env.reset()

    return best_rate(run, steps, repeats)


def gymnasium_vector_rate(name: str, batch: int, repeats: int) -> tuple[float, str] | None:
    import gymnasium

    if name == "CartPole":
        mode = "vector_entry_point"
    elif batch <= 1024:
        mode = "sync"
    else:
        return None  # a Python loop over 16384 envs: minutes per measurement
    envs = gymnasium.make_vec(GYMNASIUM_IDS[name], num_envs=batch, vectorization_mode=mode)
    envs.reset(seed=0)
    if name == "CartPole":
        actions = np.ones(batch, np.int64)
    else:
        actions = np.full((batch, 1), 0.5, np.float32)
    steps = horizon_for(batch, 1_000_000 if mode == "vector_entry_point" else 50_000)

    def run():
        for _ in range(steps):
            envs.step(actions)

    return best_rate(run, steps * batch, repeats), mode


# ------------------------------------------------------------------------------------ main


def fmt(rate: float | None) -> str:
    if rate is None:
        return "—"
    return f"{rate / 1e6:.2f} M" if rate >= 1e5 else f"{rate / 1e3:.1f} k"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--envs", nargs="+", default=list(ENVS), choices=ENVS)
    parser.add_argument("--batches", nargs="+", type=int, default=[1, 1024, 16384])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--torch-threads", type=int, default=1,
                        help="torch intra-op threads (default 1: on a small shared machine "
                             "more threads ran several times slower)")
    args = parser.parse_args()

    import jax
    import torch

    torch.set_num_threads(args.torch_threads)
    print(f"# env throughput, env-steps/s (best of {args.repeats}); {platform.processor() or platform.machine()}, "
          f"{os.cpu_count()} CPUs, torch {torch.__version__} with {torch.get_num_threads()} thread(s), "
          f"jax {jax.__version__} on {jax.default_backend()}, numpy {np.__version__}\n")
    header = ("| env | B | gradgym numpy | ref numpy | ratio | gradgym torch | ref torch | ratio "
              "| gradgym jax | ref jax | ratio | gymnax step | gymnax step_env | jax/gymnax step_env "
              "| Gymnasium single | Gymnasium vec "
              "| numpy/Gym vec |")
    print(header)
    print("|" + "---|" * (header.count("|") - 1))
    for name in args.envs:
        single = gymnasium_single_rate(name, args.repeats)
        for batch in args.batches:
            np_g, np_r = eager_rates(name, "numpy", batch, args.repeats)
            th_g, th_r = eager_rates(name, "torch", batch, args.repeats)
            jx_g, jx_r = jax_rates(name, batch, args.repeats)
            gx_step, gx_env = gymnax_rates(name, batch, args.repeats)
            vec = gymnasium_vector_rate(name, batch, args.repeats)
            vec_rate = vec[0] if vec else None
            vec_text = f"{fmt(vec_rate)} ({vec[1]})" if vec else "—"
            print(
                f"| {name} | {batch} | {fmt(np_g)} | {fmt(np_r)} | {np_g / np_r:.2f} "
                f"| {fmt(th_g)} | {fmt(th_r)} | {th_g / th_r:.2f} "
                f"| {fmt(jx_g)} | {fmt(jx_r)} | {jx_g / jx_r:.2f} "
                f"| {fmt(gx_step)} | {fmt(gx_env)} | {jx_g / gx_env:.2f} | {fmt(single) if batch == 1 else ''} | {vec_text} "
                f"| {'' if vec_rate is None else f'{np_g / vec_rate:.2f}'} |",
                flush=True,
            )
    print("\nTargets at B = 16384: each gradgym/ref ratio >= 0.8; jax/gymnax step_env >= 1; "
          "numpy / Gymnasium's vectorized CartPole >= 2.")


if __name__ == "__main__":
    main()
