"""Time per iteration of gradgym's gradient pipelines next to hand-written references, in one run.

For CartPole it times, on jax and on torch (one thread):

- trajectory optimization (B = 32 start states, T = 100, Adam lr 0.1) and policy optimization
  (MLP 5 -> 64 -> 64 -> 1, B = 64 fresh start states per iteration, T = 100, Adam lr 1e-3,
  clipping by global norm 1) through ``gradgym.pipelines``, as users run them: the time per
  iteration is the wall time between two iteration reports (everything the loop does);
- a hand-written reference of the same update on the same backend: the dynamics written
  out directly (``cartpole_ref`` of benchmarks/env_throughput.py), jax ``jit(value_and_grad)``
  of a ``lax.scan`` plus an optax update / a torch eager loop with ``torch.optim``;
- the original Ivy Gym stack: the same 100-step trajectory loss written with ivy functions
  (``ivy.set_backend('torch')``, ``ivy.execute_with_gradients``), one gradient per repeat.

Each figure is the median over ``--iters`` iterations after the first (which absorbs
compilation on jax), best of ``--rounds`` alternating rounds of pipeline and reference;
compile time is reported on its own (that of the fastest round).

    python benchmarks/pipeline_speed.py
    python benchmarks/pipeline_speed.py --rounds 2 --ivy-repeats 0   # quicker, no ivy
"""

from __future__ import annotations

import argparse
import contextlib
import os
import platform
import statistics
import tempfile
import time
from typing import Any, Callable

import numpy as np
from env_throughput import cartpole_ref  # the hand-written CartPole dynamics, per library

import gradgym
from gradgym.pipelines import PolicyConfig, TrajectoryConfig, policy, trajectory

ENV = "CartPole"
TRAJECTORY = dict(batch=32, horizon=100, lr=0.1)
POLICY = dict(batch=64, horizon=100, lr=1e-3, grad_clip=1.0, hidden=[64, 64])


# ----------------------------------------------------------------------- gradgym pipelines


def pipeline_times(module: Any, cfg: Any, backend: str) -> tuple[float, float]:
    """(median seconds per iteration between reports, compile seconds) of a pipeline run."""
    stamps: list[float] = []

    def report(metrics: dict, step: int, artifacts: Any = None) -> None:
        if "return_mean" in metrics:
            stamps.append(time.perf_counter())

    result = module.optimize(gradgym.make(ENV, backend=backend), cfg, seed=0, report=report)
    gaps = np.diff(stamps)
    return float(np.median(gaps)), result.compile_time_s


def run_pipelines(backend: str, iters: int) -> dict[str, tuple[float, float]]:
    common = dict(iters=iters + 1, render=False, grad_hist_every=0)
    return {
        "trajectory": pipeline_times(trajectory, TrajectoryConfig(**TRAJECTORY, **common), backend),
        "policy": pipeline_times(
            policy,
            PolicyConfig(**POLICY, eval_every=iters + 1, eval_batch=POLICY["batch"], **common),
            backend,
        ),
    }


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
        for i, o in zip(sizes[:-1], sizes[1:])
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
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--iters", type=int, default=100, help="timed iterations per figure")
    parser.add_argument(
        "--rounds", type=int, default=5, help="alternating rounds; best median wins"
    )
    parser.add_argument(
        "--ivy-repeats", type=int, default=1, help="ivy gradients to time (0: skip)"
    )
    args = parser.parse_args()

    import jax
    import torch

    torch.set_num_threads(1)
    print(
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs; torch "
        f"{torch.__version__} (1 thread), jax {jax.__version__}; {ENV}; "
        f"median of {args.iters} iterations, best of {args.rounds} rounds\n"
    )

    # Pipeline and reference alternate, and each figure is the best of --rounds medians, so
    # that load from other processes hits both sides alike.
    rows = []
    for backend, references in (("jax", jax_references), ("torch", torch_references)):
        ours: dict[str, list] = {"trajectory": [], "policy": []}
        theirs: dict[str, list] = {"trajectory": [], "policy": []}
        for _ in range(args.rounds):
            for method, times in run_pipelines(backend, args.iters).items():
                ours[method].append(times)
            for method, times in references(args.iters).items():
                theirs[method].append(times)
        for method in ("trajectory", "policy"):
            rows.append((method, backend, *min(ours[method]), *min(theirs[method])))

    header = (
        f"{'pipeline':<11}{'backend':<8}{'gradgym ms/iter':>16}{'reference ms/iter':>19}"
        f"{'ratio':>8}{'gradgym compile s':>19}{'reference compile s':>21}"
    )
    print(header)
    print("-" * len(header))
    for method, backend, ours_s, ours_compile, ref_s, ref_compile in rows:
        print(
            f"{method:<11}{backend:<8}{ours_s * 1e3:>16.2f}{ref_s * 1e3:>19.2f}"
            f"{ours_s / ref_s:>7.2f}x{ours_compile:>19.2f}{ref_compile:>21.2f}"
        )
    print(
        "\ntrajectory: B = 32, T = 100; policy: B = 64, T = 100 (ratio = gradgym / reference; "
        "target <= 1.25x)"
    )

    if args.ivy_repeats > 0:
        ivy_s = ivy_gradient_time(args.ivy_repeats)
        by_backend = {
            backend: ours_s for method, backend, ours_s, *_ in rows if method == "trajectory"
        }
        print(
            f"\nIvy Gym stack (ivy {_ivy_version()}, torch backend), trajectory loss + gradient "
            f"B = 32, T = 100: {ivy_s:.2f} s per gradient"
        )
        for backend, seconds in by_backend.items():
            print(
                f"  gradgym {backend:<5} trajectory iteration {seconds * 1e3:8.2f} ms: "
                f"{ivy_s / seconds:8.0f}x faster"
            )


def _ivy_version() -> str:
    import ivy

    return getattr(ivy, "__version__", "?")


if __name__ == "__main__":
    main()
