"""Screen SHAC settings against the ">= 10x fewer env steps than PPO" target, cheaply.

The ``shac`` part of ``methods.py`` runs SHAC for 100k env steps per seed; this script runs
each setting for ``--steps`` (12k) env steps only, with the learning-rate schedule of a
``--schedule-steps`` (102,400) run, so that what it measures is the start of that run. It
prints, per env, SHAC's best held-out return within 10k env steps (mean over ``--seeds``)
and the env steps at which each seed first reaches PPO's final return at 100k steps (the
target: PPO is trained in the same run, seeds 0-2, unless ``--target ENV=RETURN`` is given).
The held-out return is measured every 2 iterations, before the update, as ``methods.py``
does with ``eval_every=2``. Each env starts from SHAC's defaults for it (``SHACConfig``'s,
then the pipeline's ``env_defaults``); ``--set`` changes fields on top of those.

    python benchmarks/shac_screen.py                                  # each env's defaults
    python benchmarks/shac_screen.py --no-env-defaults                # SHACConfig's everywhere
    python benchmarks/shac_screen.py --set critic_iters=32 normalize_obs=false
    python benchmarks/shac_screen.py --envs CartPole --set num_envs=2 num_steps=32
"""

from __future__ import annotations

import argparse
import time

import numpy as np
from machine_load import load_average
from methods import CLASSIC_BPTT_LEARNS, parse_settings, train

import gradgym
from gradgym.pipelines import _rl_run, get_pipeline
from gradgym.pipelines._rollout import host_rng, start_states
from gradgym.pipelines.shac import initial_networks

PPO_STEPS = 100_000
EARLY_STEPS = PPO_STEPS // 10  # the target: PPO's final return within a tenth of its steps


def shac_curve(env_name: str, seed: int, steps: int, schedule_steps: int, fields: dict,
               env_defaults: bool = True) -> list[tuple[int, float]]:
    """``[(env steps before the update, held-out return)]`` of the first ``steps`` env steps
    of a SHAC run whose budget (and so lr schedule) is ``schedule_steps``, from SHAC's
    defaults for the env (``SHACConfig``'s if not ``env_defaults``) with ``fields`` set."""
    env = gradgym.make(env_name, backend="jax")
    cfg = get_pipeline("shac").default_config(env_name if env_defaults else None, render=False,
                                              env_steps=schedule_steps, **fields)
    _, trainers, iters, time_limit = _rl_run.prepare("shac", env, cfg)
    actor, critic = initial_networks(env, cfg, seed)
    trainer = trainers.SHACTrainer(env, cfg, actor, critic, seed, time_limit, iters)
    train_rng = host_rng(seed, _rl_run.TRAIN_STREAM)  # the streams a run of the pipeline uses
    eval_starts = start_states(env, host_rng(seed, _rl_run.EVAL_STREAM), cfg.eval_batch)
    per_iter = cfg.num_envs * cfg.num_steps
    curve = []
    for iteration in range(steps // per_iter):
        inputs = start_states(env, train_rng, cfg.num_envs)
        if iteration % 2 == 0:
            curve.append((iteration * per_iter, float(np.mean(trainer.returns(eval_starts)))))
        trainer.step(inputs)
    curve.append((steps // per_iter * per_iter, float(np.mean(trainer.returns(eval_starts)))))
    return curve


def ppo_target(env_name: str) -> float:
    """PPO's mean final held-out return over seeds 0-2 at 100k env steps (its defaults)."""
    return float(np.mean([train("ppo", env_name, "jax", s, env_steps=PPO_STEPS)["final"]
                          for s in range(3)]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                        help="SHACConfig fields to set (default: none: SHAC's defaults for each env)")
    parser.add_argument("--envs", nargs="+", default=list(CLASSIC_BPTT_LEARNS))
    parser.add_argument("--seeds", type=int, default=4)
    parser.add_argument("--steps", type=int, default=12_000)
    parser.add_argument("--schedule-steps", type=int, default=102_400)
    parser.add_argument("--no-env-defaults", action="store_true",
                        help="start every env from SHACConfig's defaults, not its own")
    parser.add_argument("--target", nargs="*", default=[], metavar="ENV=RETURN",
                        help="PPO's final return per env, instead of training PPO here")
    args = parser.parse_args()
    fields = parse_settings(args.set)
    targets = {name: float(value) for name, value in (t.split("=") for t in args.target)}
    start = "SHACConfig's defaults" if args.no_env_defaults else "each env's defaults"
    print(f"SHAC{f' {fields}' if fields else ''} over {start}: {args.steps} env steps of a {args.schedule_steps}-step "
          f"schedule, jax, seeds 0-{args.seeds - 1} [load average {load_average()}]")
    began = time.perf_counter()
    for env_name in args.envs:
        target = targets.get(env_name)
        if target is None:
            target = ppo_target(env_name)
        curves = [shac_curve(env_name, seed, args.steps, args.schedule_steps, fields,
                             env_defaults=not args.no_env_defaults)
                  for seed in range(args.seeds)]
        early = [max(value for at, value in curve if at <= EARLY_STEPS) for curve in curves]
        reach = [next((at for at, value in curve if value >= target), None) for curve in curves]
        print(f"{env_name:12s} best within {EARLY_STEPS} steps {np.mean(early):6.1f} "
              f"(per seed {', '.join(f'{v:.1f}' for v in early)}); PPO's {target:.1f} reached at "
              f"{', '.join('-' if r is None else str(r) for r in reach)} "
              f"[load average {load_average()}]", flush=True)
    print(f"{time.perf_counter() - began:.0f} s")


if __name__ == "__main__":
    main()
