"""Running PPO and SHAC through the shared loop: their common set-up and loop spec."""

from __future__ import annotations

import importlib
from collections.abc import Callable
from types import ModuleType
from typing import Any

from gradgym.envs.core import Env
from gradgym.pipelines._loop import LoopSpec, run_loop
from gradgym.pipelines._pack import lone_outcome
from gradgym.pipelines._rollout import backend_ops, host_rng, record_frames, start_states
from gradgym.pipelines.base import PipelineResult, Report
from gradgym.pipelines.config import iterations, validate_config

WEIGHTS_STREAM, TRAIN_STREAM, EVAL_STREAM = 1, 2, 3  # host_rng streams of a run's seed
MAX_VIDEO_STEPS = 300  # a video shows at most this many steps of an episode


def prepare(pipeline: str, env: Env, cfg: Any) -> tuple[ModuleType, ModuleType, int, int]:
    """Validate before any work; ``(backend ops, backend trainers, iterations, time limit)``.

    Raises:
        ValueError: an invalid config, or an env whose backend has no autodiff (numpy).
    """
    validate_config(cfg, pipeline)
    ops = backend_ops(env, pipeline, gradient=True)
    trainers = importlib.import_module(f"gradgym.pipelines._rl_{env.spec.backend}")
    return ops, trainers, iterations(cfg), int(cfg.time_limit or env.spec.horizon)


def run(pipeline: str, env: Env, cfg: Any, seed: int, report: Report | None, ops: ModuleType,
        trainer: Any, act: Callable, iters: int, time_limit: int,
        step_metrics: tuple[str, ...]) -> PipelineResult:
    """Drive ``trainer`` for ``iters`` iterations with the shared loop (a lone run).

    Fresh start states for the envs whose episodes end come from the seed's training
    stream each iteration; held-out start states (``eval_return_mean``, ``final_return``)
    from its evaluation stream.
    """
    train_rng = host_rng(seed, TRAIN_STREAM)
    eval_starts = start_states(env, host_rng(seed, EVAL_STREAM), cfg.eval_batch)
    video_steps = min(time_limit, MAX_VIDEO_STEPS)

    def render(params: Any) -> list:
        return record_frames(ops, env, act, params, eval_starts, None, video_steps)

    spec = LoopSpec(
        names=[f"{pipeline} on {env.spec.name} ({env.spec.backend})"],
        iters=iters,
        steps_per_iter=cfg.num_envs * cfg.num_steps,
        step_metrics=step_metrics,
        next_inputs=lambda iteration: start_states(env, train_rng, cfg.num_envs),
        eval_inputs=eval_starts,
        eval_every=cfg.eval_every,
        render=[render if cfg.render else None],
        grad_hist_every=[cfg.grad_hist_every],
    )
    return lone_outcome(run_loop(trainer, spec, [report]))
