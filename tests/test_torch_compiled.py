"""The compiled torch path (compiled loops, or chunks for host steps) and jax's batched metrics.

Compiled rollouts must give eager's returns and gradients, compile once per pipeline (a
graph break or a recompilation in the step path fails here), and load from the compile
cache folder in a new process. jax's metrics arrive in batches without changing a value.
"""

from __future__ import annotations

import functools
import itertools
import json
import subprocess
import sys
from dataclasses import replace

import numpy as np
import pytest
import torch
import torch._dynamo
from conftest import REPO_ROOT
from torch._dynamo.utils import counters

import gradgym
from gradgym.pipelines import (
    PolicyConfig,
    TrajectoryConfig,
    _jax,
    _torch,
    policy,
    run_pack,
    trajectory,
)
from gradgym.pipelines._rollout import (
    initial_carry,
    masked_return,
    rollout_returns,
    start_states,
    transition,
)
from gradgym.pipelines._torch import CompiledChunks
from gradgym.pipelines._torch_loop import CompiledLoop
from gradgym.pipelines.config import AUTO_COMPILE_MIN_ITERS, torch_compiles

CLASSIC = ("CartPole", "Pendulum", "MountainCar", "Reacher", "Swimmer")
TIMING = {"iter_time_s", "env_steps_per_s", "compile_time_s"}


def mlp_returns(env, step, weights, start, horizon):
    """Returns ``[B]`` of an MLP policy: exercises observations, actions and dynamics."""
    return rollout_returns(_torch, step, weights, initial_carry(env, start), None, horizon)


def mlp_weights(env, generator):
    """float64 weights obs -> 8 -> act that require grad."""
    sizes = [env.spec.obs_dim, 8, env.spec.act_dim]
    return [
        (torch.randn(a, b, generator=generator, dtype=torch.float64).requires_grad_(True),
         torch.randn(b, generator=generator, dtype=torch.float64).requires_grad_(True))
        for a, b in itertools.pairwise(sizes)
    ]


def mlp_act(params, obs, unused):
    hidden = obs
    for weight, bias in params:
        hidden = torch.tanh(hidden @ weight + bias)
    return hidden


def offset_mlp_case(env_name, seed, horizon):
    """A float64 env, MLP weights, per-step action offsets ``[T, 3, act_dim]`` (the scanned
    inputs) that require grad, and a step whose action is the MLP's plus the offset."""
    env = gradgym.make(env_name, backend="torch", dtype="float64")
    generator = torch.Generator().manual_seed(seed)
    weights = mlp_weights(env, generator)
    offsets = (0.3 * torch.randn(horizon, 3, env.spec.act_dim, generator=generator,
                                 dtype=torch.float64)).requires_grad_(True)
    step = functools.partial(transition, env, lambda params, obs, x: mlp_act(params, obs, x) + x)
    return env, weights, offsets, step


@pytest.mark.parametrize(("env_name", "simd"), [(name, True) for name in CLASSIC]
                         + [("CartPole", False)])
def test_compiled_chunks_give_eager_returns_and_gradients(env_name, simd, tmp_path):
    env = gradgym.make(env_name, backend="torch", dtype="float64")
    generator = torch.Generator().manual_seed(0)
    weights = mlp_weights(env, generator)
    start = start_states(env, 0, 3)
    step = functools.partial(transition, env, mlp_act)
    leaves = [leaf for layer in weights for leaf in layer]

    eager = mlp_returns(env, step, weights, start, horizon=6)
    eager_grads = torch.autograd.grad(eager.sum(), leaves)
    counters.clear()
    with torch._dynamo.config.patch(error_on_recompile=True):
        compiled_step = CompiledChunks(step, chunk=3, simd=simd)
        compiled = mlp_returns(env, compiled_step, weights, start, horizon=6)
        compiled_grads = torch.autograd.grad(compiled.sum(), leaves)
    assert not counters["graph_break"], dict(counters["graph_break"])
    assert eager.abs().sum() > 0 and all(g.abs().sum() > 0 for g in eager_grads)
    torch.testing.assert_close(compiled, eager, rtol=1e-10, atol=1e-12)
    for got, want in zip(compiled_grads, eager_grads):
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize(("env_name", "unroll"), [(name, 2) for name in CLASSIC]
                         + [("CartPole", 1), ("Pendulum", 3)])
def test_compiled_loop_gives_eager_returns_and_gradients(env_name, unroll):
    """Gradients for the weights, the start state and the scanned inputs (an additive
    action offset per step), through the forward and the reverse loop."""
    horizon = 6
    env, weights, offsets, step = offset_mlp_case(env_name, 0, horizon)
    start = tree_of_leaves_requiring_grad(start_states(env, 0, 3))
    leaves = [leaf for layer in weights for leaf in layer] + [offsets, *float_leaves(start)]

    def returns(step):
        carry = initial_carry(env, start)
        return rollout_returns(_torch, step, weights, carry, offsets, horizon)

    eager = returns(step)
    eager_grads = torch.autograd.grad(eager.sum(), leaves, allow_unused=True)
    counters.clear()
    with torch._dynamo.config.patch(error_on_recompile=True):
        loop = CompiledLoop(step, unroll=unroll)
        compiled = returns(loop)
        compiled_grads = torch.autograd.grad(compiled.sum(), leaves, allow_unused=True)
        with torch.no_grad():  # evaluation: the same forward loop, no recompilation
            torch.testing.assert_close(returns(loop), compiled.detach(), rtol=0, atol=0)
    assert not counters["graph_break"], dict(counters["graph_break"])
    assert counters["stats"]["unique_graphs"] == 2  # the forward and the backward loop
    assert eager.abs().sum() > 0 and all(g.abs().sum() > 0 for g in eager_grads[:5])
    torch.testing.assert_close(compiled, eager, rtol=1e-10, atol=1e-12)
    for got, want in zip(compiled_grads, eager_grads):
        if want is None:  # a start-state leaf the return does not depend on
            assert got is None or not got.abs().sum()
        else:
            torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-12)


def end_and_return_reduce(end_carry, outputs):
    """A value from both the end carry and the stacked outputs, and an aux tree."""
    returns = masked_return(torch, *outputs)
    _, end_obs = end_carry
    return torch.stack([returns.mean(), (end_obs**2).sum()]), {"returns": returns}


@pytest.mark.parametrize("env_name", CLASSIC)
def test_value_and_grad_gives_eager_values_and_gradients(env_name):
    """One compiled call for the loops, the reduction and its VJP: the value, aux and the
    gradients of ``value.sum()`` for weights, start carry and scanned inputs of eager."""
    horizon = 6
    env, weights, offsets, step = offset_mlp_case(env_name, 1, horizon)
    state, obs = initial_carry(env, start_states(env, 1, 3))
    carry = (tree_of_leaves_requiring_grad(state), obs.detach().requires_grad_(True))

    end, outputs = _torch.scan(step, weights, carry, offsets, horizon)
    want_value, want_aux = end_and_return_reduce(end, outputs)
    leaves = [leaf for layer in weights for leaf in layer] + [*float_leaves(carry[0]), carry[1],
                                                              offsets]
    want = torch.autograd.grad(want_value.sum(), leaves, allow_unused=True)
    counters.clear()
    with torch._dynamo.config.patch(error_on_recompile=True):
        loop = CompiledLoop(step, unroll=2)
        for _ in range(2):  # the second call reuses the first's graph
            (value, aux), (weight_grads, carry_grads, offset_grads) = loop.value_and_grad(
                weights, carry, offsets, horizon, end_and_return_reduce)
    assert not counters["graph_break"], dict(counters["graph_break"])
    assert counters["stats"]["unique_graphs"] == 1
    torch.testing.assert_close(value, want_value.detach(), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(aux["returns"], want_aux["returns"].detach(), rtol=1e-10,
                               atol=1e-12)
    state_grads, obs_grad = carry_grads
    got = [g for layer in weight_grads for g in layer]
    got += [g for g in state_grads if g is not None] + [obs_grad, offset_grads]
    assert [g is None for g in state_grads] == [not leaf.is_floating_point() for leaf in state]
    assert all(g is not None and g.abs().sum() > 0 for g in want[:4] + want[-2:])
    for got_grad, want_grad in zip(got, want, strict=True):
        if want_grad is None:  # a start-state leaf the value does not depend on
            assert not got_grad.abs().sum()
        else:
            torch.testing.assert_close(got_grad, want_grad, rtol=1e-9, atol=1e-12)


def tree_of_leaves_requiring_grad(state):
    return type(state)(*(leaf.detach().requires_grad_(leaf.is_floating_point())
                         for leaf in state))


def float_leaves(state):
    return [leaf for leaf in state if leaf.is_floating_point()]


def test_compile_step_compiles_a_loop_where_the_step_traces_and_chunks_for_host_steps():
    cfg = TrajectoryConfig(torch_compile=True)
    assert isinstance(_torch.compile_step(mlp_act, cfg, "CartPole"), CompiledLoop)
    assert isinstance(_torch.compile_step(mlp_act, cfg, "Hopper-v5"), CompiledChunks)
    assert _torch.compile_step(mlp_act, replace(cfg, torch_compile=False), "CartPole") is mlp_act


def test_chunk_length_divides_the_rollout():
    chunks = CompiledChunks(lambda *args: None, chunk=10)
    assert [chunks.chunk_length(n) for n in (100, 30, 7, 97, 4)] == [10, 10, 7, 1, 4]
    assert CompiledChunks(lambda *args: None, chunk=20).chunk_length(30) == 15
    assert CompiledLoop(lambda *args: None, unroll=4).unroll_length(30) == 3


def histories_without_timing(result):
    return [{k: v for k, v in m.items() if k not in TIMING} for m in result.history]


@pytest.mark.parametrize("method", ["trajectory", "policy"])
def test_compiled_pipeline_takes_eager_steps_and_compiles_once(method):
    env = gradgym.make("Pendulum", backend="torch", dtype="float64")
    if method == "trajectory":
        module = trajectory
        cfg = TrajectoryConfig(iters=4, horizon=8, batch=3, render=False, grad_hist_every=0,
                               torch_compile_chunk=4)
    else:
        module = policy
        cfg = PolicyConfig(iters=4, horizon=8, batch=3, hidden=[8], eval_every=2, eval_batch=3,
                           render=False, grad_hist_every=0, torch_compile_chunk=4)
    eager = module.optimize(env, cfg, seed=0)
    counters.clear()
    # one compiled gradient (the loops, the return and its VJP) serves training and
    # evaluation, without recompiling
    with torch._dynamo.config.patch(error_on_recompile=True):
        compiled = module.optimize(env, replace(cfg, torch_compile=True), seed=0)
    assert not counters["graph_break"], dict(counters["graph_break"])
    assert counters["stats"]["unique_graphs"] == 1
    assert eager.compile_time_s == 0.0 < compiled.compile_time_s
    want, got = histories_without_timing(eager), histories_without_timing(compiled)
    assert [sorted(m) for m in got] == [sorted(m) for m in want]
    for got_metrics, want_metrics in zip(got, want):
        for key, value in want_metrics.items():
            np.testing.assert_allclose(got_metrics[key], value, rtol=1e-9, err_msg=key)
    np.testing.assert_allclose(compiled.final_return, eager.final_return, rtol=1e-9)


def test_compiled_trajectory_pack_members_take_their_lone_eager_steps():
    """The one compiled gradient of a pack (members folded into the batch) gives each
    member the steps of its lone eager run."""
    env = gradgym.make("CartPole", backend="torch", dtype="float64")
    base = TrajectoryConfig(iters=3, horizon=8, batch=3, render=False, grad_hist_every=0)
    cfgs = [replace(base, lr=0.05), replace(base, lr=0.2, init_scale=1.0)]
    seeds = [0, 1]
    compiled = run_pack("trajectory", env, [replace(c, torch_compile=True) for c in cfgs],
                        seeds=seeds)
    for member, cfg, seed in zip(compiled, cfgs, seeds):
        lone = trajectory.optimize(env, replace(cfg, torch_compile=False), seed=seed)
        want, got = histories_without_timing(lone), histories_without_timing(member)
        for got_metrics, want_metrics in zip(got, want, strict=True):
            for key, value in want_metrics.items():
                np.testing.assert_allclose(got_metrics[key], value, rtol=1e-9, err_msg=key)
        np.testing.assert_allclose(member.final_return, lone.final_return, rtol=1e-9)


def test_compiled_truncated_bptt_takes_eager_steps():
    """Windows of 4, 4 and 1 steps (no gradient between them) and an evaluation batch of
    another size: a compiled program per signature, the steps of eager."""
    env = gradgym.make("Pendulum", backend="torch", dtype="float64")
    cfg = PolicyConfig(iters=4, horizon=9, batch=3, hidden=[8], eval_every=2, eval_batch=5,
                       render=False, grad_hist_every=0, grad_horizon=4, torch_compile=False)
    eager = policy.optimize(env, cfg, seed=0)
    compiled = policy.optimize(env, replace(cfg, torch_compile=True, torch_compile_chunk=2),
                               seed=0)
    assert compiled.compile_time_s > 0
    want, got = histories_without_timing(eager), histories_without_timing(compiled)
    assert any("eval_return_mean" in m for m in want)
    for got_metrics, want_metrics in zip(got, want, strict=True):
        for key, value in want_metrics.items():
            np.testing.assert_allclose(got_metrics[key], value, rtol=1e-9, err_msg=key)


def test_auto_compiles_runs_long_enough_to_repay_a_cold_compile_on_classic_envs():
    assert TrajectoryConfig().torch_compile == PolicyConfig().torch_compile == "auto"
    assert torch_compiles("auto", AUTO_COMPILE_MIN_ITERS, "CartPole")
    assert not torch_compiles("auto", AUTO_COMPILE_MIN_ITERS - 1, "CartPole")
    assert not torch_compiles("auto", 10 * AUTO_COMPILE_MIN_ITERS, "Hopper-v5")  # host physics
    assert torch_compiles(True, 1, "Hopper-v5") and not torch_compiles(False, 10**6, "CartPole")
    # the defaults: policy's 2000 iterations compile, trajectory's 200 stay eager
    assert PolicyConfig().with_compile_decided("Reacher").torch_compile is True
    assert TrajectoryConfig().with_compile_decided("Reacher").torch_compile is False


def test_auto_is_decided_by_the_pipeline(monkeypatch):
    env = gradgym.make("Pendulum", backend="torch", dtype="float64")
    cfg = TrajectoryConfig(iters=4, horizon=8, batch=3, render=False, grad_hist_every=0,
                           torch_compile_chunk=4)
    assert trajectory.optimize(env, cfg, seed=0).compile_time_s == 0.0  # 4 < 500: eager
    monkeypatch.setattr("gradgym.pipelines.config.AUTO_COMPILE_MIN_ITERS", 4)
    assert trajectory.optimize(env, cfg, seed=0).compile_time_s > 0.0


COMPILE_IN_A_NEW_PROCESS = """
import json, sys
import torch
from gradgym.pipelines.compile_cache import enable_compile_cache
torch.set_num_threads(1)
enable_compile_cache(sys.argv[1])
import gradgym
from gradgym.pipelines import TrajectoryConfig, trajectory
cfg = TrajectoryConfig(iters=2, horizon=8, batch=4, render=False, grad_hist_every=0,
                       torch_compile=True, torch_compile_chunk=4)
result = trajectory.optimize(gradgym.make("CartPole", backend="torch"), cfg, seed=0)
print(json.dumps({"compile_time_s": result.compile_time_s, "final": result.final_return}))
"""


@pytest.mark.slow
def test_a_warm_cache_compiles_far_faster_in_a_new_process(tmp_path):
    def run() -> dict:
        out = subprocess.run(
            [sys.executable, "-c", COMPILE_IN_A_NEW_PROCESS, str(tmp_path / "cache")],
            check=False, capture_output=True, text=True, timeout=900, cwd=REPO_ROOT,
        )
        assert out.returncode == 0, out.stderr[-2000:]
        return json.loads(out.stdout.strip().splitlines()[-1])

    cold = run()
    assert any((tmp_path / "cache" / "torchinductor").iterdir())
    warm = run()
    print(f"\ntorch compiled: cold {cold['compile_time_s']:.1f}s, "
          f"warm {warm['compile_time_s']:.1f}s")
    assert warm["final"] == cold["final"]
    assert warm["compile_time_s"] < 0.5 * cold["compile_time_s"], (cold, warm)


# ---------------------------------------------------------------------- jax: batched metrics


def reported(module, env, cfg):
    calls = []

    def report(metrics, step, artifacts=None):
        calls.append((step, {k: v for k, v in metrics.items() if k not in TIMING},
                      sorted(artifacts or {}), (artifacts or {}).get("gradients")))

    result = module.optimize(env, cfg, seed=0, report=report)
    return calls, result


@pytest.mark.parametrize("method", ["trajectory", "policy"])
def test_jax_metrics_in_batches_are_those_of_one_iteration_at_a_time(method, monkeypatch):
    env = gradgym.make("Pendulum", backend="jax")
    if method == "trajectory":
        module, cfg = trajectory, TrajectoryConfig(iters=12, horizon=6, batch=3, render=False,
                                                   grad_hist_every=5)
    else:
        module, cfg = policy, PolicyConfig(iters=12, horizon=6, batch=3, hidden=[8],
                                           eval_every=4, eval_batch=3, render=False,
                                           grad_hist_every=5)
    batched, batched_result = reported(module, env, cfg)
    monkeypatch.setattr(_jax.Trainer, "report_batch", 1)
    single, single_result = reported(module, env, cfg)
    assert [c[0] for c in batched] == list(range(cfg.iters)) + [cfg.iters]
    assert [c[:3] for c in batched] == [c[:3] for c in single]
    for b, s in zip(batched, single):  # the gradient histograms are those of their iteration
        if s[3] is not None:
            np.testing.assert_array_equal(b[3], s[3])
    assert sum(s[3] is not None for s in single) == 3  # iterations 0, 5, 10
    assert batched_result.best_return == single_result.best_return
    np.testing.assert_array_equal(np.asarray(batched_result.best_params if method ==
                                             "trajectory" else batched_result.best_params[0][0]),
                                  np.asarray(single_result.best_params if method ==
                                             "trajectory" else single_result.best_params[0][0]))
    assert all(m["iter_time_s"] > 0 for m in batched_result.history)
