"""Pipelines: report contract, gradients vs finite differences, optimizer options by known
values, jax/torch agreement, determinism, non-finite handling, termination, bad input.

Small horizons and batches keep these fast; the quality bars are in test_pipeline_quality.py.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np
import pytest
import torch

import gradgym
from gradgym.envs import get_backend, to_numpy
from gradgym.envs.core import Env, Task
from gradgym.pipelines import (
    CEMConfig,
    PolicyConfig,
    TrajectoryConfig,
    _numpy,
    cem,
    get_pipeline,
    policy,
    run_pipeline,
    trajectory,
)
from gradgym.pipelines._rollout import (
    host_rng,
    host_uniform,
    initial_carry,
    loop_scan,
    masked_return,
    rollout_returns,
    start_states,
    transition,
)
from gradgym.pipelines.base import (
    EVAL_METRIC,
    FINAL_METRICS,
    ITERATION_METRICS,
    NonFiniteReturnError,
)

torch.set_num_threads(1)

GRAD_BACKENDS = ["jax", "torch"]


class Recorder:
    """A report callback that keeps every call."""

    def __init__(self):
        self.calls: list[tuple[dict, int, dict]] = []

    def __call__(self, metrics, step, artifacts=None):
        self.calls.append((dict(metrics), step, dict(artifacts or {})))

    @property
    def iterations(self):
        return [c for c in self.calls if "return_mean" in c[0]]

    @property
    def final(self):
        finals = [c for c in self.calls if "best_return" in c[0]]
        assert len(finals) == 1
        return finals[0]


def small_trajectory(**overrides) -> TrajectoryConfig:
    fields = {"iters": 3, "horizon": 6, "batch": 3, "render": False, "grad_hist_every": 0}
    fields.update(overrides)
    return TrajectoryConfig(**fields)


def small_policy(**overrides) -> PolicyConfig:
    fields = {
        "iters": 4,
        "horizon": 6,
        "batch": 3,
        "hidden": [8, 8],
        "eval_every": 2,
        "eval_batch": 3,
        "render": False,
        "grad_hist_every": 0,
    }
    fields.update(overrides)
    return PolicyConfig(**fields)


def numpy_twin(env: Env) -> Env:
    return Env(env.task, get_backend("numpy", env.spec.dtype))


def central_differences(loss, flat: np.ndarray, eps: float = 1e-6) -> np.ndarray:
    grad = np.zeros_like(flat)
    for i in range(flat.size):
        bump = np.zeros_like(flat)
        bump[i] = eps
        grad[i] = (loss(flat + bump) - loss(flat - bump)) / (2 * eps)
    return grad


# ---------------------------------------------------------------------- report contract


@pytest.mark.parametrize("backend", GRAD_BACKENDS)
def test_trajectory_reports_every_metric_each_iteration_and_final(backend):
    env = gradgym.make("CartPole", backend=backend)
    rec = Recorder()
    result = trajectory.optimize(env, small_trajectory(grad_hist_every=2), seed=0, report=rec)

    assert [step for _, step, _ in rec.iterations] == [0, 1, 2]
    for metrics, step, artifacts in rec.iterations:
        assert set(metrics) == set(ITERATION_METRICS)
        assert all(isinstance(v, float) and math.isfinite(v) for v in metrics.values())
        assert metrics["loss"] == pytest.approx(-metrics["return_mean"])
        assert metrics["return_min"] <= metrics["return_mean"] <= metrics["return_max"]
        assert metrics["grad_nonfinite"] == 0 and metrics["grad_norm"] > 0
        assert metrics["env_steps_per_s"] == pytest.approx(3 * 6 / metrics["iter_time_s"])
        if step % 2 == 0:
            assert artifacts["gradients"].shape == (3 * 6 * 1,)
            assert np.max(np.abs(artifacts["gradients"])) == pytest.approx(
                metrics["grad_max_abs"], rel=1e-5
            )
            assert np.linalg.norm(artifacts["gradients"]) == pytest.approx(
                metrics["grad_norm"], rel=1e-5
            )
        else:
            assert "gradients" not in artifacts
    final, step, artifacts = rec.final
    assert step == 3 and set(final) == set(FINAL_METRICS) and artifacts == {}
    best_seen = max(m["return_mean"] for m, _, _ in rec.iterations)
    assert final["best_return"] == pytest.approx(max(best_seen, final["final_return"]))
    assert result.final_return == final["final_return"] and result.iterations == 3
    assert to_numpy(result.params).shape == (3, 6, 1)


@pytest.mark.parametrize("backend", GRAD_BACKENDS)
def test_policy_evaluates_on_the_held_out_batch_every_eval_every(backend):
    env = gradgym.make("Pendulum", backend=backend)
    rec = Recorder()
    result = policy.optimize(env, small_policy(iters=5), seed=1, report=rec)
    evaluated = [step for metrics, step, _ in rec.iterations if EVAL_METRIC in metrics]
    assert evaluated == [0, 2, 4]
    # final_return is the held-out mean return of the returned weights, recomputed on numpy.
    twin = numpy_twin(env)
    weights = [tuple(to_numpy(p) for p in layer) for layer in result.params]
    eval_start = start_states(twin, host_rng(1, policy.EVAL_STREAM), 3)
    step = functools.partial(transition, twin, functools.partial(policy.mlp_action, np))
    _, returns = policy.policy_loss(twin, _numpy, step, 6, 0, weights, eval_start)
    assert result.final_return == pytest.approx(float(np.mean(returns)), rel=1e-4)
    evals = [m[EVAL_METRIC] for m, _, _ in rec.iterations if EVAL_METRIC in m]
    assert result.best_return == pytest.approx(max(evals + [result.final_return]))


def test_run_pipeline_by_name_and_unknown_name():
    env = gradgym.make("Pendulum", backend="numpy")
    result = run_pipeline(
        "cem",
        env,
        CEMConfig(iters=2, horizon=5, batch=2, population=8, elites=2, render=False),
        seed=0,
    )
    assert result.iterations == 2
    with pytest.raises(
        ValueError, match="unknown pipeline 'ddpg'; available: trajectory, policy, cem, ppo, shac"
    ):
        run_pipeline("ddpg", env, CEMConfig())


# ---------------------------------------------------------------------- gradients


@pytest.mark.parametrize("backend", GRAD_BACKENDS)
def test_trajectory_gradient_matches_central_differences(backend):
    env = gradgym.make("CartPole", backend=backend, dtype="float64")
    rec = Recorder()
    cfg = small_trajectory(iters=1, horizon=6, batch=2, grad_hist_every=1)
    trajectory.optimize(env, cfg, seed=3, report=rec)
    reported = rec.iterations[0][2]["gradients"]

    twin = numpy_twin(env)
    start = start_states(twin, 3, 2)
    logits0 = to_numpy(host_uniform(twin, host_rng(3, trajectory.LOGITS_STREAM), (2, 6, 1), 2.0))
    step = functools.partial(transition, twin, functools.partial(trajectory.open_loop_action, np))

    def loss(flat):
        return trajectory.open_loop_loss(twin, _numpy, step, 6, flat.reshape(2, 6, 1), start)[0]

    np.testing.assert_allclose(
        reported, central_differences(loss, logits0.ravel()), rtol=1e-6, atol=1e-9
    )


@pytest.mark.parametrize("backend", GRAD_BACKENDS)
@pytest.mark.parametrize("grad_horizon", [0, 4])
def test_policy_gradient_matches_central_differences_with_truncation(backend, grad_horizon):
    """Truncated BPTT is the gradient of the return with the window-start states held fixed."""
    env = gradgym.make("Reacher", backend=backend, dtype="float64")
    rec = Recorder()
    cfg = small_policy(
        iters=1, horizon=6, batch=2, hidden=[4], grad_horizon=grad_horizon, grad_hist_every=1
    )
    policy.optimize(env, cfg, seed=5, report=rec)
    reported = rec.iterations[0][2]["gradients"]

    twin = numpy_twin(env)
    sizes = [twin.spec.obs_dim, 4, twin.spec.act_dim]
    weights0 = policy.init_mlp(twin, host_rng(5, policy.WEIGHTS_STREAM), sizes)
    start = start_states(twin, host_rng(5, policy.TRAIN_STREAM), 2)
    step = functools.partial(transition, twin, functools.partial(policy.mlp_action, np))
    shapes = [leaf.shape for layer in weights0 for leaf in layer]
    flat0 = np.concatenate([leaf.ravel() for layer in weights0 for leaf in layer])

    def unflatten(flat):
        leaves, offset = [], 0
        for shape in shapes:
            leaves.append(flat[offset : offset + math.prod(shape)].reshape(shape))
            offset += math.prod(shape)
        return [tuple(leaves[i : i + 2]) for i in range(0, len(leaves), 2)]

    def surrogate(flat, window):
        weights, carry, total = unflatten(flat), initial_carry(twin, start), 0.0
        for begin in range(0, 6, window):
            length = min(window, 6 - begin)
            _, (rewards, _) = loop_scan(np.stack, step, weights, carry, None, length)
            total = total + rewards.sum(axis=0)
            carry, _ = loop_scan(np.stack, step, weights0, carry, None, length)  # held fixed
        return -np.mean(total)

    expected = central_differences(functools.partial(surrogate, window=grad_horizon or 6), flat0)
    np.testing.assert_allclose(reported, expected, rtol=1e-5, atol=1e-8)
    if grad_horizon:  # truncation does change the gradient
        full = central_differences(functools.partial(surrogate, window=6), flat0)
        assert not np.allclose(reported, full, rtol=1e-2)


# ---------------------------------------------------------------------- optimizer options


@pytest.mark.parametrize("backend", GRAD_BACKENDS)
@pytest.mark.parametrize(
    "schedule, factors",
    [
        ("constant", [1.0, 1.0, 1.0]),
        ("linear", [1.0, 2 / 3, 1 / 3]),
        ("cosine", [1.0, 0.75, 0.25]),
    ],
)
def test_sgd_steps_follow_the_learning_rate_schedule(backend, schedule, factors):
    """With SGD the final logits are init - lr * sum_t schedule(t) * gradient_t."""
    env = gradgym.make("Pendulum", backend=backend, dtype="float64")
    rec = Recorder()
    cfg = small_trajectory(optimizer="sgd", lr=0.05, lr_schedule=schedule, grad_hist_every=1)
    result = trajectory.optimize(env, cfg, seed=0, report=rec)
    grads = [artifacts["gradients"] for _, _, artifacts in rec.iterations]
    init = to_numpy(
        host_uniform(numpy_twin(env), host_rng(0, trajectory.LOGITS_STREAM), (3, 6, 1), 2.0)
    )
    expected = init.ravel() - 0.05 * sum(f * g for f, g in zip(factors, grads))
    np.testing.assert_allclose(to_numpy(result.params).ravel(), expected, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("backend", GRAD_BACKENDS)
def test_gradient_clipping_by_global_norm(backend):
    env = gradgym.make("Pendulum", backend=backend, dtype="float64")
    rec = Recorder()
    cfg = small_trajectory(iters=1, optimizer="sgd", lr=0.05, grad_clip=0.01, grad_hist_every=1)
    result = trajectory.optimize(env, cfg, seed=0, report=rec)
    grad = rec.iterations[0][2]["gradients"]
    assert np.linalg.norm(grad) > 0.01  # the clip is active
    init = to_numpy(
        host_uniform(numpy_twin(env), host_rng(0, trajectory.LOGITS_STREAM), (3, 6, 1), 2.0)
    )
    expected = init.ravel() - 0.05 * grad * 0.01 / np.linalg.norm(grad)
    np.testing.assert_allclose(to_numpy(result.params).ravel(), expected, rtol=1e-5)


@pytest.mark.parametrize(
    "optimizer, schedule, clip",
    [
        ("adam", "cosine", 0.5),
        ("adamw", "linear", 0.0),
        ("sgd", "constant", 1.0),
    ],
)
def test_jax_and_torch_take_the_same_steps(optimizer, schedule, clip):
    """Same seed, same start states and weights: optax and torch.optim agree step by step."""
    cfg = small_policy(
        iters=6, optimizer=optimizer, lr_schedule=schedule, grad_clip=clip, lr=0.01, eval_every=3
    )
    results = {
        b: policy.optimize(gradgym.make("CartPole", backend=b, dtype="float64"), cfg, seed=2)
        for b in GRAD_BACKENDS
    }
    for key in ("return_mean", "grad_norm", "loss"):
        np.testing.assert_allclose(
            [m[key] for m in results["jax"].history],
            [m[key] for m in results["torch"].history],
            rtol=1e-7,
        )
    for jax_layer, torch_layer in zip(results["jax"].params, results["torch"].params):
        for a, b in zip(jax_layer, torch_layer):
            np.testing.assert_allclose(to_numpy(a), to_numpy(b), rtol=1e-6, atol=1e-8)


# ---------------------------------------------------------------------- determinism


@pytest.mark.parametrize("backend", GRAD_BACKENDS)
def test_same_seed_same_result_other_seed_other_result(backend):
    env = gradgym.make("Pendulum", backend=backend)

    def run(seed):
        result = policy.optimize(env, small_policy(), seed=seed)
        return [m["return_mean"] for m in result.history], result.final_return

    first = run(4)
    assert run(4) == first
    assert run(5) != first


@pytest.mark.parametrize("backend", ["numpy", "jax", "torch"])
def test_cem_same_seed_same_result(backend):
    env = gradgym.make("MountainCar", backend=backend)
    cfg = CEMConfig(iters=3, horizon=10, batch=2, population=16, elites=4, render=False)
    first, second = (cem.optimize(env, cfg, seed=7) for _ in range(2))
    assert [m["return_mean"] for m in first.history] == [m["return_mean"] for m in second.history]
    np.testing.assert_array_equal(to_numpy(first.params), to_numpy(second.params))


# ---------------------------------------------------------------------- CEM


@pytest.mark.parametrize("backend", ["numpy", "jax", "torch"])
def test_cem_improves_on_random_actions_and_reports_its_metrics(backend):
    env = gradgym.make("Pendulum", backend=backend)
    cfg = CEMConfig(iters=8, horizon=30, batch=4, population=32, elites=4, render=False)
    rec = Recorder()
    result = cem.optimize(env, cfg, seed=0, report=rec)
    for metrics, _, _ in rec.iterations:
        assert set(metrics) == set(get_pipeline("cem").iteration_metrics)
    stds = [m["action_std_mean"] for m, _, _ in rec.iterations]
    assert stds[0] == pytest.approx(1.0) and stds[-1] < stds[0]
    # random actions on the same start states, on numpy
    twin = numpy_twin(env)
    start = start_states(twin, 0, 4)
    rng = np.random.default_rng(0)
    random_returns = []
    for _ in range(20):
        actions = rng.uniform(-1, 1, size=(30, 4, 1)).astype(np.float32)
        step = functools.partial(transition, twin, cem.plan_action)
        random_returns.append(
            np.mean(
                to_numpy(
                    rollout_returns(_numpy, step, None, initial_carry(twin, start), actions, 30)
                )
            )
        )
    assert result.final_return > np.mean(random_returns) + 2.0
    assert result.final_return == pytest.approx(rec.final[0]["final_return"])


# ---------------------------------------------------------------------- non-finite, termination


class ProbeState(NamedTuple):
    x: Any
    t: Any


@dataclass(frozen=True)
class Probe(Task):
    """A one-dimensional test task: x' = x * (1 + a) (x stays 0 from 0), reward per ``kind``.

    ``kink``: sqrt(|x|), whose gradient at 0 is NaN (0 * inf) on jax and torch;
    ``log``: log(x - 1), NaN at x = 0;
    ``count``: 1 every step, whatever the actions; terminates after ``stop`` steps.
    """

    kind: str = "count"
    stop: int = 3
    name = "Probe"
    dt = 1.0
    State = ProbeState

    @property
    def obs_dim(self) -> int:
        return 1

    @property
    def act_dim(self) -> int:
        return 1

    def reset_state(self, backend, rng, batch):
        return ProbeState(backend.zeros((batch,)), backend.zeros((batch,)))

    def dynamics(self, xp, state, action):
        return ProbeState(state.x * (1.0 + action[..., 0]), state.t + 1.0)

    def observe(self, xp, state):
        return xp.stack([state.x], axis=-1)

    def reward(self, xp, state):
        if self.kind == "kink":
            return xp.sqrt(xp.abs(state.x))
        if self.kind == "log":
            return xp.log(state.x - 1.0)
        return xp.ones_like(state.x)  # no gradient path at all: gradients are zeros

    def terminated(self, backend, state):
        return state.t >= self.stop


def probe(kind, backend, stop=3):
    return Env(Probe(kind=kind, stop=stop), get_backend(backend))


@pytest.mark.parametrize("backend", GRAD_BACKENDS)
def test_non_finite_gradients_are_skipped_and_counted(backend):
    env = probe("kink", backend)
    rec = Recorder()
    result = trajectory.optimize(env, small_trajectory(iters=3), seed=0, report=rec)
    counts = [m["grad_nonfinite"] for m, _, _ in rec.iterations]
    assert counts == [3 * 6] * 3  # every entry, every iteration
    init = to_numpy(
        host_uniform(numpy_twin(env), host_rng(0, trajectory.LOGITS_STREAM), (3, 6, 1), 2.0)
    )
    np.testing.assert_array_equal(to_numpy(result.params), init)  # no update was applied
    assert result.final_return == 0.0


@pytest.mark.parametrize("backend", GRAD_BACKENDS)
def test_non_finite_return_stops_with_a_clear_error_after_reporting(backend):
    env = probe("log", backend)
    rec = Recorder()
    with pytest.raises(
        NonFiniteReturnError, match=r"trajectory on Probe .*return_mean became nan at iteration 0"
    ):
        trajectory.optimize(env, small_trajectory(iters=5), seed=0, report=rec)
    assert [step for _, step, _ in rec.iterations] == [0]
    final, step, _ = rec.final
    assert step == 1 and math.isnan(final["final_return"]) and "compile_time_s" in final


@pytest.mark.parametrize("backend", ["numpy", "jax", "torch"])
def test_masked_return_counts_rewards_up_to_the_first_done(backend):
    xp = get_backend(backend).xp
    rewards = xp.asarray([[1.0, 1.0, 1.0], [2.0, 2.0, 2.0], [4.0, 4.0, 4.0], [8.0, 8.0, 8.0]])
    dones = xp.asarray(
        [[False, True, False], [True, False, False], [True, True, False], [False, False, False]]
    )
    np.testing.assert_array_equal(to_numpy(masked_return(xp, rewards, dones)), [3.0, 1.0, 15.0])


@pytest.mark.parametrize("backend", ["numpy", "jax", "torch"])
def test_rewards_after_the_first_done_are_masked(backend):
    env = probe("count", backend, stop=3)
    cfg = CEMConfig(iters=1, horizon=10, batch=2, population=4, elites=2, render=False)
    assert cem.optimize(env, cfg).final_return == 3.0
    if backend != "numpy":
        result = trajectory.optimize(env, small_trajectory(iters=1, horizon=10))
        assert result.history[0]["return_mean"] == 3.0 and result.final_return == 3.0
        assert result.history[0]["grad_norm"] == 0.0


# ---------------------------------------------------------------------- rendering


@pytest.mark.parametrize(
    "pipeline, backend", [("trajectory", "jax"), ("policy", "torch"), ("cem", "numpy")]
)
def test_videos_of_the_first_start_state(pipeline, backend):
    env = gradgym.make("Pendulum", backend=backend)
    configs = {
        "trajectory": small_trajectory(horizon=4, render=True),
        "policy": small_policy(horizon=4, render=True),
        "cem": CEMConfig(iters=2, horizon=4, batch=2, population=8, elites=2, render=True),
    }
    rec = Recorder()
    run_pipeline(pipeline, env, configs[pipeline], seed=0, report=rec)
    initial = rec.iterations[0][2]["video_initial"]
    best = rec.final[2]["video_best"]
    for frames in (initial, best):
        assert len(frames) == 5  # the start state and 4 steps
        assert all(f.dtype == np.uint8 and f.ndim == 3 and f.shape[2] == 3 for f in frames)
        assert frames[0].shape == initial[0].shape
    assert not any("video_initial" in a for _, _, a in rec.iterations[1:])
    np.testing.assert_array_equal(initial[0], best[0])  # the same start state


# ---------------------------------------------------------------------- bad input


@pytest.mark.parametrize("module", [trajectory, policy])
def test_numpy_backend_has_no_gradient_pipelines(module):
    with pytest.raises(ValueError, match="needs gradients.*'numpy'.*'cem'"):
        module.optimize(gradgym.make("CartPole", backend="numpy"))


def test_ivy_env_is_refused_with_the_backends_that_work(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # importing ivy writes ivy_logs.txt into the working directory
    with pytest.raises(ValueError, match="runs on envs made with backend 'numpy', 'jax', 'torch'"):
        cem.optimize(gradgym.make("CartPole", backend="ivy"))


@pytest.mark.parametrize(
    "module, cfg, message",
    [
        (
            trajectory,
            TrajectoryConfig(lr=-1.0),
            r"trajectory.lr=-1.0 is invalid; allowed: a number > 0",
        ),
        (
            trajectory,
            TrajectoryConfig(lr_schedule="step"),
            r"lr_schedule='step'.*constant, cosine, linear",
        ),
        (
            trajectory,
            TrajectoryConfig(optimizer="rmsprop"),
            r"optimizer='rmsprop'.*adam, adamw, sgd",
        ),
        (
            trajectory,
            PolicyConfig(),
            r"the trajectory pipeline needs its own config, got PolicyConfig",
        ),
        (policy, PolicyConfig(hidden=[64, 0]), r"policy.hidden=\[64, 0\] is invalid"),
        (policy, PolicyConfig(grad_horizon=-1), r"policy.grad_horizon=-1"),
        (
            trajectory,
            TrajectoryConfig(torch_compile_simd="no"),
            r"trajectory.torch_compile_simd='no' is invalid; allowed: true or false",
        ),
        (policy, PolicyConfig(torch_compile=1), r"policy.torch_compile=1 is invalid; allowed: true, false or auto"),
        (policy, PolicyConfig(torch_compile="yes"), r"policy.torch_compile='yes' is invalid"),
        (
            cem,
            CEMConfig(elites=65),
            r"cem.elites=65 is invalid; allowed: an int in \[1, population=64\]",
        ),
        (cem, CEMConfig(iters=0), r"cem.iters=0 is invalid; allowed: an int >= 1"),
    ],
)
def test_bad_config_is_refused_before_any_work(module, cfg, message):
    with pytest.raises(ValueError, match=message):
        module.optimize(gradgym.make("CartPole", backend="jax"), cfg)
