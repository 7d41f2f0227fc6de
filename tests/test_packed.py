"""Packed trials: a pack of configs run as one vectorized computation gives every member
exactly what its lone run gives (metrics, reports, artifacts, parameters, errors), per
pipeline and backend; which configs may share a pack; the persistent compile cache.

Small sizes (a few iterations, B <= 4, T <= 20) keep these fast.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from dataclasses import dataclass, replace
from typing import Any, NamedTuple

import numpy as np
import pytest
import torch
from conftest import REPO_ROOT

import gradgym
from gradgym.envs import get_backend, to_numpy
from gradgym.envs.core import Env, Task
from gradgym.pipelines import (
    CEMConfig,
    PolicyConfig,
    TrajectoryConfig,
    can_pack,
    get_pipeline,
    pack_key,
    run_pack,
    run_pipeline,
)
from gradgym.pipelines.base import NonFiniteReturnError, PipelineResult

torch.set_num_threads(1)

TIMING = {"iter_time_s", "env_steps_per_s", "compile_time_s"}  # differ between runs


class Recorder:
    """A report callback that keeps every call."""

    def __init__(self):
        self.calls: list[tuple[dict, int, dict]] = []

    def __call__(self, metrics, step, artifacts=None):
        self.calls.append((dict(metrics), step, dict(artifacts or {})))


def leaves(params: Any) -> list[np.ndarray]:
    """The arrays of logits / plans / ``[(weight, bias), ...]`` as numpy arrays."""
    if isinstance(params, (list, tuple)):
        return [leaf for item in params for leaf in leaves(item)]
    return [to_numpy(params)]


def assert_same_run(alone: Recorder, packed: Recorder, rtol: float = 1e-5) -> None:
    """The same report calls: steps, metric keys, artifact keys, values to ``rtol``."""
    assert [step for _, step, _ in packed.calls] == [step for _, step, _ in alone.calls]
    for (a_metrics, _, a_art), (p_metrics, _, p_art) in zip(alone.calls, packed.calls):
        assert set(p_metrics) == set(a_metrics)
        assert set(p_art) == set(a_art)
        for key in set(a_metrics) - TIMING:
            np.testing.assert_allclose(p_metrics[key], a_metrics[key], rtol=rtol, atol=1e-6,
                                       err_msg=key)


def assert_same_result(alone: PipelineResult, packed: PipelineResult, rtol: float = 1e-5) -> None:
    assert isinstance(packed, PipelineResult), packed
    assert packed.iterations == alone.iterations
    np.testing.assert_allclose(packed.final_return, alone.final_return, rtol=rtol)
    np.testing.assert_allclose(packed.best_return, alone.best_return, rtol=rtol)
    for name in ("params", "best_params"):
        for a, p in zip(leaves(getattr(alone, name)), leaves(getattr(packed, name))):
            np.testing.assert_allclose(p, a, rtol=rtol, atol=1e-6, err_msg=name)


def run_alone_and_packed(pipeline: str, env: Env, cfgs: list, seeds: list[int]):
    """Each config alone, then all in one pack: ``(alone results, alone reports, pack
    outcomes, pack reports)``."""
    alone_reports = [Recorder() for _ in cfgs]
    alone = [
        run_pipeline(pipeline, env, cfg, seed=seed, report=rec)
        for cfg, seed, rec in zip(cfgs, seeds, alone_reports)
    ]
    pack_reports = [Recorder() for _ in cfgs]
    packed = run_pack(pipeline, env, cfgs, seeds, pack_reports)
    return alone, alone_reports, packed, pack_reports


# ---------------------------------------------------------------------- configs


def trajectory_cfgs(**shared) -> list[TrajectoryConfig]:
    base = TrajectoryConfig(iters=4, horizon=12, batch=4, render=False, grad_hist_every=0)
    base = replace(base, **shared)
    return [
        replace(base, lr=0.1, init_scale=2.0, grad_clip=0.0),
        replace(base, lr=0.03, init_scale=1.0, grad_clip=0.5),  # clipping bites
        replace(base, lr=0.3, init_scale=0.5, grad_clip=5.0),
    ]


def policy_cfgs(**shared) -> list[PolicyConfig]:
    base = PolicyConfig(iters=4, horizon=10, batch=4, hidden=[8, 8], eval_every=2,
                        eval_batch=3, render=False, grad_hist_every=0)
    base = replace(base, **shared)
    return [
        replace(base, lr=1e-2, grad_clip=0.0),
        replace(base, lr=3e-2, grad_clip=0.05),
        replace(base, lr=3e-3, grad_clip=1.0),
    ]


def cem_cfgs() -> list[CEMConfig]:
    base = CEMConfig(iters=3, horizon=10, batch=3, population=16, elites=4, render=False)
    return [
        replace(base, lr=1.0, init_std=1.0),
        replace(base, lr=0.5, init_std=0.5, smoothing=0.3, min_std=0.2),
        replace(base, lr=0.8, init_std=1.5, min_std=0.4),
    ]


CASES = [
    ("trajectory", "Pendulum", "jax", trajectory_cfgs),
    ("trajectory", "Pendulum", "torch", trajectory_cfgs),
    ("trajectory", "CartPole", "torch", lambda: trajectory_cfgs(lr_schedule="cosine")),
    ("trajectory", "CartPole", "jax", lambda: trajectory_cfgs(optimizer="sgd",
                                                              lr_schedule="linear")),
    # four jax compilations each (three lone runs and the pack): about 25-30 s
    pytest.param("policy", "CartPole", "jax", policy_cfgs, marks=pytest.mark.slow),
    ("policy", "CartPole", "torch", lambda: policy_cfgs(optimizer="adamw", grad_horizon=4)),
    ("cem", "Pendulum", "numpy", cem_cfgs),
    pytest.param("cem", "Pendulum", "jax", cem_cfgs, marks=pytest.mark.slow),
    ("cem", "Pendulum", "torch", cem_cfgs),
]


CASE_IDS = [
    "-".join((case.values if hasattr(case, "values") else case)[:3]) for case in CASES
]


# ---------------------------------------------------------------------- equality


@pytest.mark.parametrize("pipeline,env_name,backend,make_cfgs", CASES, ids=CASE_IDS)
def test_each_member_equals_its_lone_run(pipeline, env_name, backend, make_cfgs):
    env = gradgym.make(env_name, backend=backend)
    cfgs, seeds = make_cfgs(), [0, 1, 5]
    alone, alone_reports, packed, pack_reports = run_alone_and_packed(pipeline, env, cfgs, seeds)
    for a, a_rec, p, p_rec in zip(alone, alone_reports, packed, pack_reports):
        assert_same_run(a_rec, p_rec)
        assert_same_result(a, p)
        for a_metrics, p_metrics in zip(a.history, p.history):
            assert set(p_metrics) == set(a_metrics)
    # The members really differ (seed, lr, init scale, clipping): no member copies another.
    curves = [tuple(round(m["return_mean"], 5) for m in p.history) for p in packed]
    assert len(set(curves)) == len(curves)


@pytest.mark.parametrize("backend", ["jax", "torch"])
def test_per_member_hyperparameters_change_only_that_member(backend):
    """Same seed, different lr / init_scale: the members differ, each as its lone run."""
    env = gradgym.make("Pendulum", backend=backend)
    base = TrajectoryConfig(iters=3, horizon=10, batch=4, render=False, grad_hist_every=0)
    cfgs = [base, replace(base, lr=0.01), replace(base, init_scale=0.5)]
    packed = run_pack("trajectory", env, cfgs, [3, 3, 3])
    logits = [leaves(p.params)[0] for p in packed]
    # lr changes the steps, not the start: same initial return, different later ones
    assert packed[0].history[0]["return_mean"] == pytest.approx(packed[1].history[0]["return_mean"])
    assert packed[0].history[-1]["return_mean"] != pytest.approx(
        packed[1].history[-1]["return_mean"], rel=1e-4)
    # init_scale changes the initial logits
    assert packed[0].history[0]["return_mean"] != pytest.approx(
        packed[2].history[0]["return_mean"], rel=1e-4)
    assert not np.allclose(logits[0], logits[1]) and not np.allclose(logits[0], logits[2])
    for cfg, p in zip(cfgs, packed):
        assert_same_result(run_pipeline("trajectory", env, cfg, seed=3), p)


# ---------------------------------------------------------------------- reports and artifacts


@pytest.mark.parametrize("backend", ["jax", "torch"])
def test_each_member_reports_its_own_videos_and_gradients(backend):
    env = gradgym.make("Pendulum", backend=backend)
    base = TrajectoryConfig(iters=5, horizon=8, batch=2, render=True, grad_hist_every=2)
    cfgs = [base, replace(base, lr=0.3, grad_hist_every=3), replace(base, render=False)]
    _, alone_reports, _, pack_reports = run_alone_and_packed("trajectory", env, cfgs, [0, 1, 2])
    for cfg, a_rec, p_rec in zip(cfgs, alone_reports, pack_reports):
        assert len(p_rec.calls) == cfg.iters + 1  # one per iteration and the final call
        artifact_steps = {step: set(art) for _, step, art in p_rec.calls if art}
        expected: dict[int, set] = {}
        for step in range(0, cfg.iters, cfg.grad_hist_every):
            expected.setdefault(step, set()).add("gradients")
        if cfg.render:
            expected.setdefault(0, set()).add("video_initial")
            expected.setdefault(cfg.iters, set()).add("video_best")
        assert artifact_steps == expected
        for (_, _, a_art), (_, _, p_art) in zip(a_rec.calls, p_rec.calls):
            for key in ("video_initial", "video_best"):
                if key in a_art:
                    assert len(p_art[key]) == cfg.horizon + 1
                    np.testing.assert_array_equal(np.stack(p_art[key]), np.stack(a_art[key]))
            if "gradients" in a_art:
                assert p_art["gradients"].shape == (cfg.batch * cfg.horizon * env.spec.act_dim,)
                np.testing.assert_allclose(p_art["gradients"], a_art["gradients"],
                                           rtol=1e-5, atol=1e-7)
    # each member's videos are its own: other seeds, other start states
    first = {k: v for _, _, art in pack_reports[0].calls for k, v in art.items()}
    second = {k: v for _, _, art in pack_reports[1].calls for k, v in art.items()}
    assert not np.array_equal(first["video_initial"][0], second["video_initial"][0])


# ---------------------------------------------------------------------- non-finite members


class GapState(NamedTuple):
    x: Any


@dataclass(frozen=True)
class Gap(Task):
    """x' = a; reward log(1 + x): -inf once an action rounds to -1 (tanh of a logit below
    about -9 in float32), finite for small logits. A member's ``init_scale`` decides."""

    name = "Gap"
    dt = 1.0
    State = GapState

    @property
    def obs_dim(self) -> int:
        return 1

    @property
    def act_dim(self) -> int:
        return 1

    def reset_state(self, backend, rng, batch):
        return GapState(backend.zeros((batch,)))

    def dynamics(self, xp, state, action):
        return GapState(action[..., 0])

    def observe(self, xp, state):
        return xp.stack([state.x], axis=-1)

    def reward(self, xp, state):
        return xp.log(1.0 + state.x)


@pytest.mark.parametrize("backend", ["jax", "torch"])
def test_a_non_finite_member_stops_like_its_lone_run_and_the_others_go_on(backend):
    env = Env(Gap(), get_backend(backend))
    base = TrajectoryConfig(iters=4, horizon=10, batch=4, render=False, grad_hist_every=0,
                            lr=0.05)
    cfgs = [replace(base, init_scale=0.5), replace(base, init_scale=40.0),
            replace(base, init_scale=1.0)]
    seeds = [0, 1, 2]
    lone_bad = Recorder()
    with pytest.raises(NonFiniteReturnError) as lone_error:
        run_pipeline("trajectory", env, cfgs[1], seed=1, report=lone_bad)
    good = [run_pipeline("trajectory", env, cfgs[i], seed=seeds[i]) for i in (0, 2)]

    reports = [Recorder() for _ in cfgs]
    packed = run_pack("trajectory", env, cfgs, seeds, reports)

    assert isinstance(packed[1], NonFiniteReturnError)
    assert "return_mean became -inf at iteration 0" in str(packed[1])
    assert "return_mean became -inf at iteration 0" in str(lone_error.value)
    assert [step for _, step, _ in reports[1].calls] == [0, 1]  # iteration 0, final call
    final = reports[1].calls[-1][0]
    assert set(final) == {"compile_time_s", "best_return", "final_return"}
    assert final["final_return"] == -math.inf == lone_bad.calls[-1][0]["final_return"]
    for lone, member, rec in zip(good, (packed[0], packed[2]), (reports[0], reports[2])):
        assert_same_result(lone, member)
        assert [step for _, step, _ in rec.calls] == list(range(base.iters + 1))
        assert all(math.isfinite(m["return_mean"]) and m["grad_nonfinite"] == 0
                   for m in member.history)


# ---------------------------------------------------------------------- MuJoCo


def test_mujoco_pack_on_torch_equals_lone_runs():
    env = gradgym.make("InvertedPendulum-v5", backend="torch", dtype="float64",
                       smooth_reward=True)
    base = TrajectoryConfig(iters=2, horizon=6, batch=2, render=False, grad_hist_every=0)
    cfgs = [base, replace(base, lr=0.02, init_scale=0.5)]
    alone, alone_reports, packed, pack_reports = run_alone_and_packed(
        "trajectory", env, cfgs, [0, 1]
    )
    for a, a_rec, p, p_rec in zip(alone, alone_reports, packed, pack_reports):
        assert_same_run(a_rec, p_rec, rtol=1e-7)
        assert_same_result(a, p, rtol=1e-7)
    assert can_pack("trajectory", env)


# ---------------------------------------------------------------------- which configs pack


def test_pack_key_groups_configs_that_differ_only_in_packable_fields():
    base = TrajectoryConfig()
    same = [replace(base, lr=0.01), replace(base, init_scale=0.5), replace(base, grad_clip=1.0),
            replace(base, grad_hist_every=0, render=False)]
    assert all(pack_key(cfg) == pack_key(base) for cfg in same)
    for field, value in [("horizon", 50), ("batch", 8), ("iters", 10), ("optimizer", "sgd"),
                         ("lr_schedule", "cosine"), ("torch_compile", True)]:
        assert pack_key(replace(base, **{field: value})) != pack_key(base), field
    # the context (what a config does not hold) takes part, and keys hash
    assert pack_key(base, env="Pendulum", backend="jax") != pack_key(base, env="Pendulum",
                                                                       backend="torch")
    policy_key = pack_key(PolicyConfig(hidden=[32, 32]))
    assert hash(policy_key) == hash(pack_key(PolicyConfig(hidden=[32, 32], lr=0.1)))
    assert policy_key != pack_key(PolicyConfig(hidden=[64, 64]))
    assert pack_key(CEMConfig(init_std=0.3, smoothing=0.5)) == pack_key(CEMConfig())
    assert pack_key(CEMConfig(population=32)) != pack_key(CEMConfig())
    # configs of different pipelines never share a pack
    assert pack_key(CEMConfig()) != pack_key(TrajectoryConfig())
    # packable fields are real config fields of their pipeline
    for name, cfg in [("trajectory", base), ("policy", PolicyConfig()), ("cem", CEMConfig())]:
        packable = get_pipeline(name).packable_fields
        assert all(hasattr(cfg, field) for field in packable) and "lr" in packable


def test_run_pack_refuses_configs_that_may_not_share_a_pack_before_any_work():
    env = gradgym.make("Pendulum", backend="numpy")
    cfg = CEMConfig(iters=2, horizon=5, batch=2, population=8, elites=2, render=False)
    with pytest.raises(ValueError, match="differ in horizon"):
        run_pack("cem", env, [cfg, replace(cfg, horizon=6)], [0, 1])
    with pytest.raises(ValueError, match="one seed and one report per config"):
        run_pack("cem", env, [cfg, cfg], [0])
    with pytest.raises(ValueError, match=r"cem\.elites=9 is invalid"):
        run_pack("cem", env, [cfg, replace(cfg, elites=9)], [0, 1])
    with pytest.raises(ValueError, match="at least one config"):
        run_pack("cem", env, [], [])
    assert not can_pack("trajectory", env)  # no gradients on numpy: it does not run at all
    assert can_pack("cem", env)


# ---------------------------------------------------------------------- compile cache

COMPILE_ONCE = """
import json, sys
from gradgym.pipelines.compile_cache import enable_compile_cache
enable_compile_cache(sys.argv[1])
enable_compile_cache(sys.argv[1])  # idempotent
import gradgym
from gradgym.pipelines import TrajectoryConfig, run_pipeline
cfg = TrajectoryConfig(iters=2, horizon=40, batch=4, render=False, grad_hist_every=0)
result = run_pipeline("trajectory", gradgym.make("CartPole", backend="jax"), cfg, seed=0)
print(json.dumps({"compile_time_s": result.compile_time_s, "final": result.final_return}))
"""


def test_second_process_loads_the_jax_compilation_from_the_cache(tmp_path):
    def run() -> dict:
        out = subprocess.run(
            [sys.executable, "-c", COMPILE_ONCE, str(tmp_path / "cache")],
            check=False, capture_output=True, text=True, timeout=300, cwd=REPO_ROOT,
        )
        assert out.returncode == 0, out.stderr[-2000:]
        return json.loads(out.stdout.strip().splitlines()[-1])

    first = run()
    assert any((tmp_path / "cache" / "jax").iterdir())  # the compilation was written
    second = run()
    assert second["final"] == first["final"]
    assert second["compile_time_s"] < 0.5 * first["compile_time_s"], (first, second)
    assert (tmp_path / "cache" / "torchinductor").is_dir()
