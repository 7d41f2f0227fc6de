"""PPO, SHAC and BPTT (pipeline=policy) side by side, and PPO's rollout speed next to SB3's.

Parts (``--parts``, all by default):

- ``ppo``: PPO on Pendulum for 100k env steps, jax and torch, ``--seeds`` seeds: the
  held-out return of the final policy (target >= 55; SB3's PPO reached 58 at 33k steps).
- ``rollout``: env steps per second of PPO's rollout phase (policy forward, Gaussian
  sampling, env step, auto-reset, storage) on gradgym/Pendulum: gradgym's batched
  functional env (jax: one jitted ``lax.scan``; torch: an eager loop) vs Stable-Baselines3's
  ``collect_rollouts`` on ``gymnasium.make("gradgym/Pendulum-v0")``, measured in this run.
  Target: >= 10x SB3's.
- ``shac``: on the classic tasks where BPTT learns, the env steps SHAC needs to reach PPO's
  final return (PPO at its default 100k steps) and the ratio (target >= 10x fewer).
- ``mujoco``: SHAC on MuJoCo tasks (``--mujoco-tasks``: HalfCheetah-v5 and Hopper-v5 by
  default; through the transition-Jacobian bridge): held-out return before/after and the time
  per iteration.
- ``table``: method x env, held-out return at a fixed env-step budget (``--budget``) and
  wall time, over ``--seeds`` seeds, with the env steps each method needed to reach PPO's
  final return (the ``shac`` part's question at the table's budget).

Every run starts from its pipeline's defaults for its env (``--no-env-defaults``: from the
config dataclass's) and uses a compile cache in a temporary folder, so seeds after the first
of a (method, env) skip most of jax's compilation; wall times include what remains.

    python benchmarks/methods.py                      # everything (long)
    python benchmarks/methods.py --parts ppo rollout --seeds 1
    python benchmarks/methods.py --parts shac --shac-set critic_iters=32
    python benchmarks/methods.py --parts shac --no-env-defaults    # SHACConfig's everywhere
    python benchmarks/methods.py --parts mujoco --mujoco-tasks Walker2d-v5 --mujoco-backends jax \
        --mujoco-episodes 8 --shac-set lr=0.001
"""

from __future__ import annotations

import argparse
import tempfile
import time
from typing import Any

import numpy as np
import torch
from machine_load import load_average

import gradgym
from gradgym.envs.backends import AUTODIFF_BACKENDS
from gradgym.envs.classic import TASKS as CLASSIC_TASKS
from gradgym.envs.mujoco import TASKS as MUJOCO_TASKS
from gradgym.pipelines import PPOConfig, SHACConfig, get_pipeline, run_pipeline
from gradgym.pipelines.compile_cache import enable_compile_cache
from gradgym.platform.config import ConfigError, parse_dotlist

CLASSIC_BPTT_LEARNS = ("CartPole", "MountainCar", "Reacher", "Swimmer")
SHAC_SETTINGS: dict = {}  # SHACConfig fields every SHAC run of this script takes (--shac-set)
USE_ENV_DEFAULTS = True  # False: every run starts from its config dataclass (--no-env-defaults)


def run_config(method: str, env_name: str, **fields: Any) -> Any:
    """The config of this script's runs of ``method`` on ``env_name``: the pipeline's defaults
    for the env (its dataclass's with ``--no-env-defaults``), then ``--shac-set``, then
    ``fields``."""
    if method == "shac":
        fields = {**SHAC_SETTINGS, **fields}
    start = env_name if USE_ENV_DEFAULTS else None
    return get_pipeline(method).default_config(start, render=False, **fields)


def train(method: str, env_name: str, backend: str, seed: int, **fields: Any) -> dict:
    """One run of :func:`run_config`'s config with ``fields`` set: its held-out curve
    ``[(env steps, return)]``, final return, wall time."""
    curve: list[tuple[float, float]] = []

    def report(metrics: dict, step: int, artifacts: Any = None) -> None:
        if "eval_return_mean" in metrics:
            curve.append((metrics["env_steps"] - metrics["env_steps"] / (step + 1),
                          metrics["eval_return_mean"]))

    env = gradgym.make(env_name, backend=backend)
    began = time.perf_counter()
    result = run_pipeline(method, env, run_config(method, env_name, **fields), seed, report)
    wall = time.perf_counter() - began
    steps = result.history[-1]["env_steps"]
    curve.append((steps, result.final_return))
    iter_times = [h["iter_time_s"] for h in result.history[1:]] or [np.nan]
    return {"curve": curve, "final": result.final_return, "initial": curve[0][1], "wall": wall,
            "steps": steps, "compile": result.compile_time_s,
            "iter_time": float(np.median(iter_times))}


def parse_settings(pairs: list[str]) -> dict:
    """``key=value`` pairs as SHACConfig fields (parsed as ``gradgym run`` parses overrides)."""
    try:
        fields = parse_dotlist(pairs)
    except ConfigError as err:
        raise SystemExit(str(err)) from None
    unknown = sorted(set(fields) - set(SHACConfig.__dataclass_fields__))
    if unknown:
        raise SystemExit(f"not SHACConfig fields: {', '.join(unknown)}")
    return fields


def mean_std(values: list[float]) -> str:
    return f"{np.mean(values):6.1f} ± {np.std(values):4.1f}"


# ---------------------------------------------------------------------- parts


def part_ppo(seeds: list[int]) -> None:
    print(f"\n== PPO on Pendulum, 100k env steps, held-out return (target >= 55) [load average {load_average()}]")
    for backend in ("jax", "torch"):
        runs = [train("ppo", "Pendulum", backend, s, env_steps=100_000) for s in seeds]
        finals = [r["final"] for r in runs]
        print(f"{backend:6s} initial {mean_std([r['initial'] for r in runs])} -> final "
              f"{mean_std(finals)} (per seed {', '.join(f'{f:.1f}' for f in finals)}), "
              f"wall {np.mean([r['wall'] for r in runs]):.1f} s [load average {load_average()}]")


def gradgym_rollout_rate(backend: str, num_envs: int, num_steps: int, repeats: int) -> float:
    """Env steps per second of PPO's collection scan alone (the trainer's own code)."""
    from gradgym.pipelines import _rl
    from gradgym.pipelines._rollout import start_states
    from gradgym.pipelines.ppo import initial_weights

    env = gradgym.make("Pendulum", backend=backend)
    cfg = PPOConfig(num_envs=num_envs, num_steps=num_steps)
    weights = initial_weights(env, cfg, 0)
    stats = _rl.initial_stats(env.backend, env.spec.obs_dim)
    starts = start_states(env, 0, num_envs)
    carry = (starts, env.observe(starts), _rl.no_episodes(env.backend, num_envs))
    collect = lambda p, c, x: _rl.ppo_collect_step(env, env.spec.horizon, "clip", p, c, x)
    shape = (num_steps, num_envs, env.spec.act_dim)
    if backend == "jax":
        import jax

        @jax.jit
        def rollout(carry, key):
            params = (weights["policy"], weights["log_std"], stats, _rl.restart_from(env, starts))
            noise = jax.random.normal(key, shape)
            return jax.lax.scan(lambda c, x: collect(params, c, x), carry, noise)

        key = jax.random.key(0)
        jax.block_until_ready(rollout(carry, key))
        began = time.perf_counter()
        for _ in range(repeats):
            key, sub = jax.random.split(key)
            carry, data = rollout(carry, sub)
        jax.block_until_ready(data)
    else:
        from gradgym.pipelines._rollout import loop_scan

        params = (weights["policy"], weights["log_std"], stats, _rl.restart_from(env, starts))
        began = time.perf_counter()
        with torch.no_grad():
            for _ in range(repeats):
                carry, data = loop_scan(torch.stack, collect, params, carry,
                                        torch.randn(shape), num_steps)
    return repeats * num_envs * num_steps / (time.perf_counter() - began)


def sb3_rollout_rate(steps: int) -> float:
    """Env steps per second of SB3 PPO's ``collect_rollouts`` on gradgym/Pendulum-v0."""
    import gymnasium
    from stable_baselines3 import PPO
    from stable_baselines3.common.callbacks import BaseCallback

    class Nothing(BaseCallback):
        def _on_step(self) -> bool:
            return True

    model = PPO("MlpPolicy", gymnasium.make("gradgym/Pendulum-v0"), n_steps=steps, device="cpu",
                seed=0)
    _, callback = model._setup_learn(steps, Nothing())
    callback.on_training_start(locals(), globals())
    model.collect_rollouts(model.env, callback, model.rollout_buffer, n_rollout_steps=256)
    began = time.perf_counter()  # after a warm-up rollout, as gradgym's are timed
    model.collect_rollouts(model.env, callback, model.rollout_buffer, n_rollout_steps=steps)
    return steps / (time.perf_counter() - began)


def part_rollout() -> None:
    print(f"\n== PPO rollout phase on Pendulum: env steps/s (target >= 10x SB3) [load average {load_average()}]")
    sb3 = sb3_rollout_rate(4096)
    print(f"SB3 PPO collect_rollouts (1 gymnasium env):  {sb3:10.0f} steps/s")
    for backend, num_envs in (("jax", 32), ("jax", 1024), ("torch", 32), ("torch", 1024)):
        rate = gradgym_rollout_rate(backend, num_envs, 64, repeats=20 if backend == "jax" else 3)
        print(f"gradgym {backend:5s} {num_envs:5d} envs x 64 steps:     {rate:10.0f} steps/s "
              f"= {rate / sb3:6.1f}x SB3 [load average {load_average()}]")


def steps_to_reach(curve: list[tuple[float, float]], target: float) -> float:
    """The env steps at which a held-out curve first reaches ``target`` (NaN: never)."""
    for steps, value in curve:
        if value >= target:
            return steps
    return float("nan")


def best_within(curve: list[tuple[float, float]], steps: float) -> float:
    """The best held-out return a curve reached within ``steps`` env steps."""
    return max(value for at, value in curve if at <= steps)


def part_shac(seeds: list[int], shac_steps: int, envs: list[str]) -> None:
    """Per env: PPO's final held-out return at 100k steps (mean over seeds, the target), the
    env steps at which each SHAC seed's held-out return first reaches it, the ratio
    100k / mean(those steps) over the seeds that reach it, and SHAC's best held-out return
    within 10k steps (what the >= 10x target asks for)."""
    ppo_steps = 100_000
    print(f"\n== SHAC vs PPO: env steps to reach PPO's final return (PPO {ppo_steps} steps; SHAC "
          f"up to {shac_steps}, {'each env' if USE_ENV_DEFAULTS else 'SHACConfig'}'s defaults), "
          f"jax, {len(seeds)} seeds "
          f"[load average {load_average()}]")
    for env_name in envs:
        ppo = [train("ppo", env_name, "jax", s, env_steps=ppo_steps) for s in seeds]
        shac = [train("shac", env_name, "jax", s, env_steps=shac_steps, eval_every=2)
                for s in seeds]
        target = float(np.mean([r["final"] for r in ppo]))
        reach = np.array([steps_to_reach(r["curve"], target) for r in shac])
        reached = reach[~np.isnan(reach)]
        ratio = ppo_steps / np.mean(reached) if reached.size else float("nan")
        early = [best_within(r["curve"], ppo_steps / 10) for r in shac]
        print(f"{env_name:12s} PPO final {mean_std([r['final'] for r in ppo])} | SHAC final "
              f"{mean_std([r['final'] for r in shac])}; reaches {target:.1f} at "
              f"{', '.join('never' if np.isnan(x) else f'{x:.0f}' for x in reach)} steps "
              f"-> {ratio:.2f}x fewer than PPO ({reached.size}/{len(seeds)} seeds); best "
              f"within {ppo_steps // 10} steps {mean_std(early)} [load average {load_average()}]", flush=True)


def part_mujoco(seeds: list[int], iters: int, num_envs: int | None, tasks: list[str],
                backends: list[str], episodes: int) -> None:
    """SHAC on MuJoCo ``tasks`` from each one's defaults (``num_envs`` replaces theirs when
    given): held-out return (``episodes`` episodes) of every seed before and after ``iters``
    iterations, and the cost of an iteration."""
    print(f"\n== SHAC on MuJoCo through the Jacobian bridge, {iters} iterations, seeds "
          f"{seeds[0]}-{seeds[-1]} [load average {load_average()}]")
    for env_name in tasks:
        cfg = run_config("shac", env_name)
        batch = num_envs or cfg.num_envs
        for backend in backends:
            runs = [train("shac", env_name, backend, s, iters=iters, num_envs=batch,
                          env_steps=iters * batch * cfg.num_steps, eval_every=max(iters // 4, 1),
                          eval_batch=episodes) for s in seeds]
            iter_time = float(np.mean([r["iter_time"] for r in runs]))
            per_seed = ", ".join(f"{r['initial']:.1f} -> {r['final']:.1f}" for r in runs)
            print(f"{env_name:15s} {backend:5s} ({batch} envs x {cfg.num_steps} steps, lr "
                  f"{cfg.lr:g}) held-out {per_seed}; mean final "
                  f"{mean_std([r['final'] for r in runs])}; {iter_time:.2f} s/iteration "
                  f"({batch * cfg.num_steps / iter_time:.0f} env steps/s), compile "
                  f"{runs[0]['compile']:.1f} s [load average {load_average()}]", flush=True)


def part_table(seeds: list[int], budget: int, envs: list[str]) -> None:
    print(f"\n== method x env at {budget} env steps (policy: {budget // 6400} iterations of "
          f"64 x 100), held-out return and wall time, jax, {len(seeds)} seeds; and the env "
          f"steps SHAC and BPTT need to reach PPO's final return [load average {load_average()}]")
    print(f"{'env':12s} {'method':7s} {'initial':>15s} {'final':>15s} {'wall s':>8s} "
          f"{'steps to PPO final':>20s}")
    for env_name in envs:
        runs = {}
        for method in ("ppo", "shac", "policy"):
            fields = ({"iters": max(budget // 6400, 1), "eval_every": 2} if method == "policy"
                      else {"env_steps": budget, "eval_every": 2})
            runs[method] = [train(method, env_name, "jax", s, **fields) for s in seeds]
        target = float(np.mean([r["final"] for r in runs["ppo"]]))
        for method, group in runs.items():
            reach = [steps_to_reach(r["curve"], target) for r in group]
            reached = ", ".join("never" if np.isnan(x) else f"{x / 1e3:.0f}k" for x in reach)
            print(f"{env_name:12s} {method:7s} {mean_std([r['initial'] for r in group]):>15s} "
                  f"{mean_std([r['final'] for r in group]):>15s} "
                  f"{np.mean([r['wall'] for r in group]):8.1f} {reached:>20s} [load average {load_average()}]",
                  flush=True)


# What each of --parts runs, given the parsed arguments and the seeds.
PARTS = {
    "ppo": lambda args, seeds: part_ppo(seeds),
    "rollout": lambda args, seeds: part_rollout(),
    "shac": lambda args, seeds: part_shac(seeds, args.shac_steps, args.shac_envs),
    "mujoco": lambda args, seeds: part_mujoco(seeds, args.mujoco_iters, args.mujoco_envs,
                                              args.mujoco_tasks, args.mujoco_backends,
                                              args.mujoco_episodes),
    "table": lambda args, seeds: part_table(seeds, args.budget, args.envs),
}


def main() -> None:
    global USE_ENV_DEFAULTS
    classic = [task.name for task in CLASSIC_TASKS]
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--parts", nargs="+", default=list(PARTS), choices=PARTS,
                        help="what to measure, in this order (default: all; see the docstring)")
    parser.add_argument("--seeds", type=int, default=3, help="seeds 0..N-1 of every run")
    parser.add_argument("--shac-steps", type=int, default=102_400,
                        help="env steps of each SHAC run of the shac part")
    parser.add_argument("--budget", type=int, default=200_000,
                        help="env steps of every run of the table part")
    parser.add_argument("--envs", nargs="+", choices=classic, default=classic,
                        help="envs of the table part")
    parser.add_argument("--shac-envs", nargs="+", choices=classic,
                        default=list(CLASSIC_BPTT_LEARNS), help="envs of the shac part")
    parser.add_argument("--mujoco-iters", type=int, default=160,
                        help="SHAC iterations per MuJoCo run")
    parser.add_argument("--mujoco-envs", type=int, default=None,
                        help="envs per SHAC iteration on MuJoCo (default: each env's default)")
    parser.add_argument("--mujoco-tasks", nargs="+", default=["HalfCheetah-v5", "Hopper-v5"],
                        choices=[task.name for task in MUJOCO_TASKS])
    parser.add_argument("--mujoco-backends", nargs="+", default=list(AUTODIFF_BACKENDS),
                        choices=AUTODIFF_BACKENDS)
    parser.add_argument("--mujoco-episodes", type=int, default=4,
                        help="held-out episodes per evaluation on MuJoCo")
    parser.add_argument("--shac-set", nargs="*", default=[], metavar="KEY=VALUE",
                        help="SHACConfig fields for every SHAC run, over each env's defaults")
    parser.add_argument("--no-env-defaults", action="store_true",
                        help="start every run from its config dataclass, not its env's defaults")
    args = parser.parse_args()
    SHAC_SETTINGS.update(parse_settings(args.shac_set))
    USE_ENV_DEFAULTS = not args.no_env_defaults
    if SHAC_SETTINGS:
        print(f"SHAC settings: {SHAC_SETTINGS}")
    torch.set_num_threads(1)
    enable_compile_cache(tempfile.mkdtemp(prefix="gradgym-methods-"))
    seeds = list(range(args.seeds))
    for part in args.parts:
        PARTS[part](args, seeds)


if __name__ == "__main__":
    main()
