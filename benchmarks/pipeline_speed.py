"""Time per iteration of gradgym's gradient pipelines next to hand-written references, in one run.

For CartPole, Pendulum and Reacher it times, on jax, torch eager and torch compiled (one
thread):

- trajectory optimization (B = 32 start states, T = 100, Adam lr 0.1) and policy optimization
  (MLP obs -> 64 -> 64 -> act, B = 64 fresh start states per iteration, T = 100, Adam lr 1e-3,
  clipping by global norm 1) through ``gradgym.pipelines``, as users run them: the time per
  iteration is the median of the loop's ``iter_time_s`` (the wall time of the loop between
  two batches of reports over the iterations in the batch, evaluations and the report
  callbacks left out; jax's metrics arrive in batches);
- torch compiled (``pipeline.torch_compile=true``: one compiled call per iteration, a
  forward and a backward loop of ``torch_compile_chunk`` steps per loop iteration, each
  pipeline's default unless ``--chunk``)
  in fresh processes: cold (an empty compile cache folder) and warm (a second process on
  the same folder), each with its compile time; the time per iteration is the better of
  the two processes' medians;
- a hand-written reference of the same update on the same backend: the dynamics written
  out directly (``cartpole_ref`` of benchmarks/env_throughput.py), jax ``jit(value_and_grad)``
  of a ``lax.scan`` plus an optax update / a torch eager loop with ``torch.optim``;
- the original Ivy Gym stack: the same 100-step trajectory loss written with ivy functions
  (``ivy.set_backend('torch')``, ``ivy.execute_with_gradients``), one gradient per repeat.

The hand-written references exist for CartPole. Each jax figure is the median over
``--iters`` iterations, best of ``--rounds`` alternating rounds of pipeline and reference;
compile time is reported on its own (that of the fastest round).

    python benchmarks/pipeline_speed.py
    python benchmarks/pipeline_speed.py --rounds 2 --ivy-repeats 0   # quicker, no ivy
    python benchmarks/pipeline_speed.py --envs CartPole --chunk 4    # one env, 4 steps unrolled
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from typing import Any

import numpy as np
from env_throughput import cartpole_ref  # the hand-written CartPole dynamics, per library
from machine_load import load_average

import gradgym
from gradgym.pipelines import PolicyConfig, TrajectoryConfig, policy, trajectory
from gradgym.platform.allocator import execute_with_allocator, loaded_allocator

ENV = "CartPole"  # the env of the hand-written references
ENVS = ("CartPole", "Pendulum", "Reacher")
TRAJECTORY = {"batch": 32, "horizon": 100, "lr": 0.1}
POLICY = {"batch": 64, "horizon": 100, "lr": 1e-3, "grad_clip": 1.0, "hidden": [64, 64]}
METHODS = ("trajectory", "policy")


# ----------------------------------------------------------------------- gradgym pipelines


def pipeline_times(method: str, env_name: str, backend: str, iters: int,
                   **compile_fields: Any) -> tuple[float, float]:
    """(median ``iter_time_s`` of the run, compile seconds) of ``iters`` iterations."""
    module, cfg = {
        "trajectory": (trajectory, TrajectoryConfig(**TRAJECTORY)),
        "policy": (policy, PolicyConfig(**POLICY, eval_every=iters + 1, eval_batch=POLICY["batch"])),
    }[method]
    for name, value in dict(iters=iters + 1, render=False, grad_hist_every=0, **compile_fields).items():
        setattr(cfg, name, value)
    result = module.optimize(gradgym.make(env_name, backend=backend), cfg, seed=0)
    times = [m["iter_time_s"] for m in result.history[1:]]  # the first may warm up caches
    return float(np.median(times)), result.compile_time_s


def run_pipelines(env_name: str, backend: str, iters: int) -> dict[str, tuple[float, float]]:
    return {method: pipeline_times(method, env_name, backend, iters) for method in METHODS}


def compiled_torch_in_fresh_process(method: str, env_name: str, cache: str, iters: int,
                                    chunk: int) -> tuple[float, float]:
    """(seconds per iteration, compile seconds) of torch compiled in a new process whose
    compile cache folder is ``cache``."""
    command = [sys.executable, __file__, "--child", method, env_name, cache, str(iters), str(chunk)]
    out = subprocess.run(command, capture_output=True, text=True, check=True)
    seconds, compile_s = json.loads(out.stdout.strip().splitlines()[-1])
    return seconds, compile_s


def child(method: str, env_name: str, cache: str, iters: str, chunk: str) -> None:
    """The body of :func:`compiled_torch_in_fresh_process`: prints its two figures."""
    import torch

    from gradgym.pipelines.compile_cache import enable_compile_cache

    torch.set_num_threads(1)
    enable_compile_cache(cache)
    chunk_field = {"torch_compile_chunk": int(chunk)} if int(chunk) else {}  # 0: the default
    figures = pipeline_times(method, env_name, "torch", int(iters), torch_compile=True,
                             **chunk_field)
    print(json.dumps(figures))


def median_time(update: Callable[[int], None], iters: int) -> float:
    """Median seconds of ``update(i)`` over ``iters`` calls after one warm-up call."""
    update(0)
    times = []
    for i in range(1, iters + 1):
        began = time.perf_counter()
        update(i)
        times.append(time.perf_counter() - began)
    return statistics.median(times)


# ----------------------------------------------------------------------- jax references


def jax_references(iters: int) -> dict[str, tuple[float, float]]:
    import jax
    import jax.numpy as jnp
    import optax

    step, _ = cartpole_ref(jnp)
    key = jax.random.key(0)

    def start(key, batch):
        k = jax.random.split(key, 4)
        return (
            jax.random.uniform(k[0], (batch,), minval=-1.0, maxval=1.0),
            jax.random.uniform(k[1], (batch,), minval=-0.3, maxval=0.3),
            jax.random.uniform(k[2], (batch,), minval=-np.pi, maxval=np.pi),
            jax.random.uniform(k[3], (batch,), minval=-0.3, maxval=0.3),
        )

    def observe(x, xv, th, thv):
        return jnp.stack([x, xv, jnp.cos(th), jnp.sin(th), thv], -1)

    # trajectory: open-loop logits, Adam
    def trajectory_loss(logits, state):
        def body(s, a):
            s, _, r = step(*s, jnp.tanh(a))
            return s, r

        _, rewards = jax.lax.scan(body, state, jnp.swapaxes(logits, 0, 1))
        return -jnp.mean(jnp.sum(rewards, 0))

    adam = optax.adam(TRAJECTORY["lr"])

    def trajectory_update(logits, opt_state, state):
        loss, grads = jax.value_and_grad(trajectory_loss)(logits, state)
        updates, opt_state = adam.update(grads, opt_state)
        return optax.apply_updates(logits, updates), opt_state, loss

    b, t = TRAJECTORY["batch"], TRAJECTORY["horizon"]
    logits = jax.random.uniform(key, (b, t, 1), minval=-2.0, maxval=2.0)
    state0 = start(key, b)
    began = time.perf_counter()
    compiled = jax.jit(trajectory_update).lower(logits, adam.init(logits), state0).compile()
    trajectory_compile = time.perf_counter() - began
    carry = [logits, adam.init(logits)]

    def trajectory_iteration(i):
        carry[0], carry[1], loss = compiled(carry[0], carry[1], state0)
        loss.block_until_ready()

    # policy: MLP, fresh start states drawn inside the jitted update, clip + Adam
    def mlp(params, obs):
        for w, bias in params:
            obs = jnp.tanh(obs @ w + bias)
        return obs

    def policy_loss(params, state):
        def body(carry, _):
            s, obs = carry
            s, obs, r = step(*s, mlp(params, obs))
            return (s, obs), r

        _, rewards = jax.lax.scan(body, (state, observe(*state)), None, length=POLICY["horizon"])
        return -jnp.mean(jnp.sum(rewards, 0))

    tx = optax.chain(optax.clip_by_global_norm(POLICY["grad_clip"]), optax.adam(POLICY["lr"]))

    def policy_update(params, opt_state, key):
        key, sub = jax.random.split(key)
        loss, grads = jax.value_and_grad(policy_loss)(params, start(sub, POLICY["batch"]))
        updates, opt_state = tx.update(grads, opt_state)
        return optax.apply_updates(params, updates), opt_state, key, loss

    sizes = [5, *POLICY["hidden"], 1]
    params = [
        (jax.random.uniform(key, (i, o), minval=-(i**-0.5), maxval=i**-0.5), jnp.zeros(o))
        for i, o in itertools.pairwise(sizes)
    ]
    began = time.perf_counter()
    compiled_policy = jax.jit(policy_update).lower(params, tx.init(params), key).compile()
    policy_compile = time.perf_counter() - began
    policy_carry = [params, tx.init(params), key]

    def policy_iteration(i):
        p, s, k, loss = compiled_policy(*policy_carry)
        policy_carry[:] = [p, s, k]
        loss.block_until_ready()

    return {
        "trajectory": (median_time(trajectory_iteration, iters), trajectory_compile),
        "policy": (median_time(policy_iteration, iters), policy_compile),
    }


# ----------------------------------------------------------------------- torch references


def torch_references(iters: int) -> dict[str, tuple[float, float]]:
    import torch

    step, _ = cartpole_ref(torch)
    gen = torch.Generator().manual_seed(0)

    def start(batch):
        def u(low, high):
            return low + (high - low) * torch.rand(batch, generator=gen)

        return u(-1.0, 1.0), u(-0.3, 0.3), u(-np.pi, np.pi), u(-0.3, 0.3)

    b, t = TRAJECTORY["batch"], TRAJECTORY["horizon"]
    logits = (torch.rand(b, t, 1, generator=gen) * 4 - 2).requires_grad_(True)
    state0 = start(b)
    adam = torch.optim.Adam([logits], lr=TRAJECTORY["lr"])

    def trajectory_iteration(i):
        state, total = state0, 0.0
        actions = torch.tanh(logits)
        for k in range(t):
            state, _, reward = step(*state, actions[:, k])
            total = total + reward
        loss = -total.mean()
        adam.zero_grad()
        loss.backward()
        adam.step()
        loss.item()

    net = torch.nn.Sequential(
        torch.nn.Linear(5, 64),
        torch.nn.Tanh(),
        torch.nn.Linear(64, 64),
        torch.nn.Tanh(),
        torch.nn.Linear(64, 1),
        torch.nn.Tanh(),
    )
    policy_adam = torch.optim.Adam(net.parameters(), lr=POLICY["lr"])

    def policy_iteration(i):
        state = start(POLICY["batch"])
        x, xv, th, thv = state
        obs = torch.stack([x, xv, torch.cos(th), torch.sin(th), thv], -1)
        total = 0.0
        for _ in range(POLICY["horizon"]):
            state, obs, reward = step(*state, net(obs))
            total = total + reward
        loss = -total.mean()
        policy_adam.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), POLICY["grad_clip"])
        policy_adam.step()
        loss.item()

    return {
        "trajectory": (median_time(trajectory_iteration, iters), 0.0),
        "policy": (median_time(policy_iteration, iters), 0.0),
    }


# ----------------------------------------------------------------------- the Ivy Gym stack


def ivy_gradient_time(repeats: int) -> float:
    """Seconds per gradient of the trajectory loss written with ivy functions (torch backend)."""
    with _in_temporary_directory():  # ivy writes ivy_logs.txt into the working directory
        import ivy
    ivy.set_backend("torch")
    b, t = TRAJECTORY["batch"], TRAJECTORY["horizon"]

    def step(x, xv, th, thv, a):  # Ivy Gym's CartPole, in ivy functions
        force = 10.0 * a[:, 0]
        s, c = ivy.sin(th), ivy.cos(th)
        temp = (force + 0.05 * thv * thv * s) / 1.1
        thacc = (9.8 * s - c * temp) / (0.5 * (4.0 / 3.0 - 0.1 * c * c / 1.1))
        xacc = temp - 0.05 * thacc * c / 1.1
        xv = xv + 0.02 * xacc
        thv = thv + 0.02 * thacc
        x = x + 0.02 * xv
        th = th + 0.02 * thv
        return (x, xv, th, thv), ivy.exp(-x * x) * (ivy.cos(th) + 1.0) / 2.0

    state0 = tuple(ivy.random_uniform(low=-1.0, high=1.0, shape=(b,)) for _ in range(4))
    logits = ivy.random_uniform(low=-2.0, high=2.0, shape=(b, t, 1))

    def loss(logits):
        state, total = state0, 0.0
        actions = ivy.tanh(logits)
        for k in range(t):
            state, reward = step(*state, actions[:, k])
            total = total + reward
        return -ivy.mean(total)

    times = []
    for _ in range(repeats):
        began = time.perf_counter()
        ivy.execute_with_gradients(loss, logits)
        times.append(time.perf_counter() - began)
    ivy.unset_backend()
    return statistics.median(times)


@contextlib.contextmanager
def _in_temporary_directory():
    previous = os.getcwd()
    with tempfile.TemporaryDirectory() as folder:
        os.chdir(folder)
        try:
            yield
        finally:
            os.chdir(previous)


# ----------------------------------------------------------------------- table


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        child(*sys.argv[2:])
        return
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--iters", type=int, default=100, help="timed iterations per figure")
    parser.add_argument(
        "--rounds", type=int, default=3, help="alternating rounds; best median wins"
    )
    parser.add_argument("--eager-iters", type=int, default=10, help="torch eager iterations")
    parser.add_argument("--envs", nargs="+", default=list(ENVS), choices=ENVS)
    parser.add_argument("--chunk", type=int, default=0,
                        help="torch_compile_chunk (default 0: each pipeline's default)")
    parser.add_argument(
        "--ivy-repeats", type=int, default=1, help="ivy gradients to time (0: skip)"
    )
    args = parser.parse_args()
    # On the allocator of `gradgym run` and sweep trials (GRADGYM_MALLOC=system: glibc's);
    # the compiled children inherit it.
    execute_with_allocator(sys.orig_argv[1:])

    import jax
    import torch

    torch.set_num_threads(1)
    print(
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, load average "
        f"{load_average()}; malloc {loaded_allocator()}; torch {torch.__version__} (1 thread), "
        f"jax {jax.__version__}; median of {args.iters} iterations ({args.eager_iters} for "
        f"torch eager), best of {args.rounds} rounds; torch compiled: torch_compile_chunk "
        f"{args.chunk or 'as configured'}\n"
    )

    # jax pipeline and reference alternate, and each figure is the best of --rounds medians,
    # so that load from other processes hits both sides alike.
    ours: dict[tuple, tuple[float, float]] = {}  # (env, method, path) -> (s/iter, compile s)
    refs: dict[tuple, tuple[float, float]] = {}  # (method, backend) -> (s/iter, compile s)
    warm: dict[tuple, float] = {}  # (env, method) -> warm compile s
    for env_name in args.envs:
        rounds: dict[str, list] = {method: [] for method in METHODS}
        for _ in range(args.rounds):
            for method, times in run_pipelines(env_name, "jax", args.iters).items():
                rounds[method].append(times)
            if env_name == ENV:
                for backend, references in (("jax", jax_references), ("torch", torch_references)):
                    for method, times in references(args.iters).items():
                        refs[method, backend] = min(refs.get((method, backend), times), times)
        for method in METHODS:
            ours[env_name, method, "jax"] = min(rounds[method])
            ours[env_name, method, "torch eager"] = pipeline_times(
                method, env_name, "torch", args.eager_iters, torch_compile=False
            )
            with tempfile.TemporaryDirectory() as cache:
                cold_s, cold_compile_s = compiled_torch_in_fresh_process(
                    method, env_name, cache, args.iters, args.chunk
                )
                warm_s, warm[env_name, method] = compiled_torch_in_fresh_process(
                    method, env_name, cache, args.iters, args.chunk
                )
            # the cold and the warm process run the same iterations: the better median counts
            ours[env_name, method, "torch compiled"] = (min(cold_s, warm_s), cold_compile_s)
    print_table(args.envs, ours, refs, warm)
    print(
        "\ntrajectory: B = 32, T = 100; policy: B = 64, T = 100. vs jax = time / gradgym jax "
        "(target for torch compiled <= 3x); vs ref = time / the hand-written reference on the "
        "same backend (CartPole; target for jax <= 1.25x). compile s: cold (empty cache "
        "folder, target <= 30 s) / warm (a new process on the same folder, target <= 5 s)."
    )

    if args.ivy_repeats > 0 and ENV in args.envs:
        ivy_s = ivy_gradient_time(args.ivy_repeats)
        print(
            f"\nIvy Gym stack (ivy {_ivy_version()}, torch backend), trajectory loss + gradient "
            f"B = 32, T = 100: {ivy_s:.2f} s per gradient"
        )
        for path in ("jax", "torch eager", "torch compiled"):
            seconds = ours[ENV, "trajectory", path][0]
            print(
                f"  gradgym {path:<14} trajectory iteration {seconds * 1e3:8.2f} ms: "
                f"{ivy_s / seconds:8.0f}x faster"
            )


def print_table(envs: list[str], ours: dict, refs: dict, warm: dict) -> None:
    header = (
        f"{'env':<10}{'pipeline':<11}{'path':<16}{'ms/iter':>9}{'vs jax':>8}{'ref ms':>8}"
        f"{'vs ref':>8}{'compile s':>11}{'warm s':>8}"
    )
    print(header)
    print("-" * len(header))
    for env_name in envs:
        for method in METHODS:
            jax_s = ours[env_name, method, "jax"][0]
            for path in ("jax", "torch eager", "torch compiled"):
                seconds, compile_s = ours[env_name, method, path]
                ref = refs.get((method, path.split()[0])) if env_name == ENV else None
                ref_cols = (
                    f"{ref[0] * 1e3:>8.2f}{seconds / ref[0]:>7.2f}x" if ref else f"{'':>8}{'':>8}"
                )
                warm_col = f"{warm[env_name, method]:>8.2f}" if path == "torch compiled" else ""
                print(
                    f"{env_name:<10}{method:<11}{path:<16}{seconds * 1e3:>9.2f}"
                    f"{seconds / jax_s:>7.2f}x{ref_cols}{compile_s:>11.2f}{warm_col}"
                )


def _ivy_version() -> str:
    import ivy

    return getattr(ivy, "__version__", "?")


if __name__ == "__main__":
    main()
