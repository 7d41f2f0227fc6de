"""PPO and SHAC run on every registered env (classic and MuJoCo) and both autodiff backends,
from that env's defaults, with the budget and metrics every method shares. Tiny runs: 2
iterations of 2 envs x 4 steps, so this checks that they run and report, not that they learn
(``test_ppo.py`` and ``test_shac.py`` do that)."""

from __future__ import annotations

import math

import pytest
import torch

import gradgym
from gradgym.envs.backends import AUTODIFF_BACKENDS
from gradgym.pipelines import get_pipeline, run_pipeline

torch.set_num_threads(1)

pytestmark = pytest.mark.slow  # a jax compilation per case: about 2 minutes in all

NUM_ENVS, NUM_STEPS, ITERS = 2, 4, 2
# PPO's default 32 minibatches would not fit in 8 samples; SHAC has no such key.
SMALL = {"ppo": {"minibatches": 2}, "shac": {}}


def tiny_run(method: str, env_name: str, backend: str):
    cfg = get_pipeline(method).default_config(
        env_name, num_envs=NUM_ENVS, num_steps=NUM_STEPS, env_steps=ITERS * NUM_ENVS * NUM_STEPS,
        time_limit=6, eval_every=1, eval_batch=2, render=False, **SMALL[method])
    return run_pipeline(method, gradgym.make(env_name, backend=backend), cfg, seed=0)


@pytest.mark.parametrize("method", ["ppo", "shac"])
@pytest.mark.parametrize("env_name", list(gradgym.registered()))
def test_runs_on_every_env_and_backend_with_the_shared_metrics(method, env_name):
    results = {backend: tiny_run(method, env_name, backend) for backend in AUTODIFF_BACKENDS}
    for backend, result in results.items():
        steps = [row["env_steps"] for row in result.history]
        assert steps == [NUM_ENVS * NUM_STEPS * (i + 1) for i in range(ITERS)], backend
        # time_limit=6 ends an episode inside the second iteration's 8 steps per env
        assert all(math.isfinite(row["return_mean"]) for row in result.history), backend
        assert result.history[-1]["return_mean"] != 0.0, backend
        assert math.isfinite(result.final_return), backend
    # The first held-out evaluation comes before any update: the same weights and start
    # states on both backends must give the same return.
    first = [result.history[0]["eval_return_mean"] for result in results.values()]
    assert first[0] == pytest.approx(first[1], rel=1e-3, abs=1e-3)
