"""SHAC: critic targets vs a hand computation, actor-loss gradients vs finite differences
(float64, jax and torch), jax/torch agreement, MuJoCo through the bridge, a learning run."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import jax
import numpy as np
import pytest
import torch

import gradgym
from gradgym.pipelines import SHACConfig, _jax, _rl, _torch, get_pipeline, run_pipeline
from gradgym.pipelines._rollout import host_rng, start_states, tree_leaves, tree_map
from gradgym.pipelines.shac import initial_networks

GAMMA, LAM = 0.9, 0.8


def test_td_lambda_targets_match_a_hand_computation():
    rewards = np.array([[1.0, 1.0], [2.0, 2.0], [3.0, 3.0]])
    next_values = np.array([[1.0, 1.0], [1.5, 1.5], [2.0, 2.0]])
    terminated = np.zeros((3, 2))
    dones = np.array([[0.0, 1.0], [0.0, 0.0], [0.0, 0.0]])  # env 1 is cut at t = 0
    targets = _rl.td_lambda(np, rewards, next_values, terminated, dones, GAMMA, LAM)
    g2 = 3 + 0.9 * 2.0  # the window ends: bootstrap
    g1 = 2 + 0.9 * (0.2 * 1.5 + 0.8 * g2)
    g0 = 1 + 0.9 * (0.2 * 1.0 + 0.8 * g1)
    np.testing.assert_allclose(targets[:, 0], [g0, g1, g2], rtol=1e-12)
    np.testing.assert_allclose(targets[:, 1], [1 + 0.9 * 1.0, g1, g2], rtol=1e-12)
    terminated[1, 0] = dones[1, 0] = 1.0  # a terminal state: no value after it
    targets = _rl.td_lambda(np, rewards, next_values, terminated, dones, GAMMA, LAM)
    assert targets[1, 0] == pytest.approx(2.0)
    assert targets[0, 0] == pytest.approx(1 + 0.9 * (0.2 * 1.0 + 0.8 * 2.0))


def test_td_lambda_is_gae_plus_values_and_agrees_across_backends():
    rng = np.random.default_rng(0)
    rewards, values = rng.normal(size=(6, 4)), rng.normal(size=(6, 4))
    dones = (rng.random((6, 4)) < 0.3).astype(float)
    terminated = dones * (rng.random((6, 4)) < 0.5)
    next_values = np.concatenate([values[1:], rng.normal(size=(1, 4))])
    next_values = np.where(dones > 0, rng.normal(size=(6, 4)), next_values)  # after a reset
    dones[-1] = 1.0  # GAE stops at the window's end like TD(lambda)'s bootstrap
    expected = _rl.gae(np, rewards, values, next_values, terminated, dones, GAMMA, LAM) + values
    for xp, convert in ((np, np.asarray), (jax.numpy, np.asarray), (torch, torch.as_tensor)):
        args = [convert(a) if xp is not jax.numpy else jax.numpy.asarray(a)
                for a in (rewards, next_values, terminated, dones)]
        targets = np.asarray(_rl.td_lambda(xp, *args, GAMMA, LAM))
        np.testing.assert_allclose(targets, expected, rtol=1e-5, atol=1e-5)


CFG = SHACConfig(num_envs=3, num_steps=6, time_limit=4, hidden=[8], critic_hidden=[8],
                 layer_norm=False)


def _window_inputs(backend: str, name: str = "Pendulum"):
    """A float64 env, its networks, non-trivial obs statistics, a running batch mid-episode."""
    env = gradgym.make(name, backend=backend, dtype="float64")
    actor, critic = initial_networks(env, CFG, seed=1)
    data = env.backend.asarray(host_rng(0, 9).normal(0.5, 2.0, size=(40, env.spec.obs_dim)))
    stats = _rl.update_stats(env.xp, _rl.initial_stats(env.backend, env.spec.obs_dim), data)
    start = start_states(env, 3, CFG.num_envs)
    episodes = _rl.no_episodes(env.backend, CFG.num_envs)
    episodes = episodes._replace(steps=env.backend.asarray(np.array([0.0, 1.0, 3.0])))
    carry = (start, env.observe(start), episodes)
    restart = _rl.restart_from(env, start_states(env, 4, CFG.num_envs))
    return env, actor, critic, stats, carry, restart


def _flat(leaves) -> np.ndarray:
    return np.concatenate([np.ravel(np.asarray(leaf)) for leaf in leaves])


def _loss_and_gradient(backend: str, name: str = "Pendulum", cfg: SHACConfig = CFG):
    """SHAC's actor loss, its gradient by autodiff and a function of flat actor weights."""
    env, actor, critic, stats, carry, restart = _window_inputs(backend, name)
    time_limit = cfg.time_limit
    if backend == "jax":
        def loss_of(a):
            return _rl.shac_actor_loss(_jax, env, cfg, time_limit, a, critic, stats, carry,
                                       restart)[0]

        loss, grads = jax.value_and_grad(loss_of)(actor)
        gradient = _flat(tree_leaves(grads))
    else:
        leaves = tree_map(lambda p: p.clone().requires_grad_(True), actor)

        def loss_of(a):
            return _rl.shac_actor_loss(_torch, env, cfg, time_limit, a, critic, stats, carry,
                                       restart)[0]

        loss = loss_of(leaves)
        loss.backward()
        gradient = _flat([leaf.grad for leaf in tree_leaves(leaves)])

    shapes = [tuple(leaf.shape) for leaf in tree_leaves(actor)]

    def at(flat: np.ndarray) -> float:
        parts, offset = [], 0
        for shape in shapes:
            size = int(np.prod(shape))
            parts.append(env.backend.asarray(flat[offset:offset + size].reshape(shape)))
            offset += size
        layers = [(parts[i], parts[i + 1]) for i in range(0, len(parts), 2)]
        with torch.no_grad():
            return float(loss_of(layers))

    return float(loss), gradient, at, _flat(tree_leaves(actor))


LAYER_NORMED = dataclasses.replace(CFG, layer_norm=True)


@pytest.mark.parametrize("cfg", [CFG, LAYER_NORMED], ids=["plain", "layer_norm"])
@pytest.mark.parametrize("backend", ["jax", "torch"])
def test_actor_loss_gradient_matches_finite_differences(backend, cfg):
    """Through a window that crosses episode ends (time limit 4 in a window of 6)."""
    loss, gradient, at, weights = _loss_and_gradient(backend, cfg=cfg)
    assert math.isfinite(loss) and np.abs(gradient).max() > 0
    rng = np.random.default_rng(5)
    eps = 1e-6
    for _ in range(3):
        direction = rng.normal(size=weights.shape)
        numeric = (at(weights + eps * direction) - at(weights - eps * direction)) / (2 * eps)
        assert gradient @ direction == pytest.approx(numeric, rel=1e-5, abs=1e-9)


@pytest.mark.parametrize("cfg", [CFG, LAYER_NORMED], ids=["plain", "layer_norm"])
def test_actor_loss_and_gradient_agree_between_jax_and_torch(cfg):
    jax_loss, jax_gradient, _, _ = _loss_and_gradient("jax", cfg=cfg)
    torch_loss, torch_gradient, _, _ = _loss_and_gradient("torch", cfg=cfg)
    assert jax_loss == pytest.approx(torch_loss, rel=1e-10)
    np.testing.assert_allclose(jax_gradient, torch_gradient, rtol=1e-8, atol=1e-12)


@pytest.mark.parametrize("layer_norm", [False, True])
def test_a_shac_run_starts_identically_on_jax_and_torch(layer_norm):
    """The first iteration's actor step and every held-out evaluation before the critic's
    shuffled minibatches matter are deterministic: both backends must report the same."""
    cfg = SHACConfig(num_envs=4, num_steps=8, env_steps=32, hidden=[16], critic_hidden=[16],
                     eval_batch=3, render=False, layer_norm=layer_norm)
    firsts = []
    for backend in ("jax", "torch"):
        env = gradgym.make("CartPole", backend=backend, dtype="float64")
        firsts.append(run_pipeline("shac", env, cfg, seed=2).history[0])
    for key in ("loss", "grad_norm", "grad_max_abs", "eval_return_mean"):
        assert firsts[0][key] == pytest.approx(firsts[1][key], rel=1e-9), key


def test_layer_norm_is_torchs_without_learned_scale_and_changes_the_loss():
    x = torch.randn(5, 7, dtype=torch.float64) * 3.0 + 1.0
    torch.testing.assert_close(_rl.normalize_features(torch, x),
                               torch.nn.functional.layer_norm(x, (7,), eps=1e-5))
    plain, _, _, _ = _loss_and_gradient("torch")
    normed, _, _, _ = _loss_and_gradient("torch", cfg=LAYER_NORMED)
    assert abs(plain - normed) > 1e-3


def test_only_the_actors_output_layer_starts_scaled():
    env = gradgym.make("Pendulum", backend="numpy")
    plain = initial_networks(env, SHACConfig(actor_output_scale=1.0), seed=3)
    scaled = initial_networks(env, SHACConfig(actor_output_scale=0.1), seed=3)
    assert np.abs(plain[0][-1][0]).max() > 0
    np.testing.assert_allclose(scaled[0][-1][0], 0.1 * plain[0][-1][0])
    np.testing.assert_allclose(scaled[0][-1][1], 0.1 * plain[0][-1][1])
    for kept, same in ((scaled[0][:-1], plain[0][:-1]), (scaled[1], plain[1])):
        for (w1, b1), (w2, b2) in zip(kept, same):
            np.testing.assert_array_equal(w1, w2)
            np.testing.assert_array_equal(b1, b2)


def test_actor_loss_bootstraps_with_the_critic_at_the_window_end():
    """With zero rewards the loss is the discounted critic values alone: check by hand."""
    env, actor, critic, stats, carry, restart = _window_inputs("torch")
    cfg = SHACConfig(num_envs=3, num_steps=1, time_limit=100)
    critic = [(w * 0.0, b * 0.0 + 2.0) for w, b in critic]  # V = 2 everywhere
    loss, (_, window) = _rl.shac_actor_loss(_torch, env, cfg, 100, actor, critic, stats,
                                            carry, restart)
    expected = -(window.reward[0] + cfg.gamma * 2.0).mean()
    torch.testing.assert_close(loss, expected)


@pytest.mark.parametrize("backend", ["jax", "torch"])
def test_shac_runs_through_the_mujoco_bridge(backend):
    env = gradgym.make("Hopper-v5", backend=backend)
    cfg = SHACConfig(num_envs=4, num_steps=8, env_steps=64, time_limit=12, critic_iters=2,
                     critic_minibatches=2, eval_batch=2, eval_every=1, render=False)
    reports = []
    result = run_pipeline("shac", env, cfg, seed=0, report=lambda m, s, a=None: reports.append(m))
    steps = [m for m in reports if "env_steps" in m]
    assert [m["env_steps"] for m in steps] == [32.0, 64.0]
    assert all(math.isfinite(v) for m in reports for v in m.values())
    assert steps[0]["grad_norm"] > 0  # gradients came back through the physics
    assert math.isfinite(result.final_return)


def test_bad_configs_are_rejected_before_any_work():
    env = gradgym.make("Pendulum", backend="torch")
    with pytest.raises(ValueError, match=r"shac.betas=.*two numbers in \[0, 1\)"):
        run_pipeline("shac", env, SHACConfig(betas=[0.9]))
    with pytest.raises(ValueError, match=r"shac.critic_minibatches=0"):
        run_pipeline("shac", env, SHACConfig(critic_minibatches=0))
    with pytest.raises(ValueError, match=r"shac.layer_norm='yes'.*true or false"):
        run_pipeline("shac", env, SHACConfig(layer_norm="yes"))
    with pytest.raises(ValueError, match=r"shac.actor_output_scale=0.*a number > 0"):
        run_pipeline("shac", env, SHACConfig(actor_output_scale=0))


@pytest.mark.parametrize("backend", ["jax", "torch"])
def test_shac_improves_the_held_out_return_on_cartpole(backend):
    torch.set_num_threads(1)
    env = gradgym.make("CartPole", backend=backend)
    cfg = get_pipeline("shac").default_config("CartPole", env_steps=10_240, eval_every=20,
                                              render=False)  # what `gradgym run` would use
    result = run_pipeline("shac", env, cfg)
    initial = result.history[0]["eval_return_mean"]
    assert result.final_return > initial + 4.0, (initial, result.final_return)


@pytest.mark.slow
def test_shac_improves_the_held_out_return_on_halfcheetah():
    """Through the transition-Jacobian bridge, from HalfCheetah-v5's defaults: 1,280 env
    steps take every seed's held-out return (8 episodes of 1000 steps) from about 0 up."""
    env = gradgym.make("HalfCheetah-v5", backend="jax")
    cfg = get_pipeline("shac").default_config("HalfCheetah-v5", env_steps=1280, eval_every=10,
                                              eval_batch=8, render=False)
    result = run_pipeline("shac", env, cfg, seed=1)
    initial = result.history[0]["eval_return_mean"]
    assert initial < 50 and result.final_return > initial + 200, (initial, result.final_return)


@pytest.mark.slow
def test_shac_balances_the_inverted_pendulum():
    """From InvertedPendulum-v5's defaults, 10,240 env steps take the held-out return (8
    episodes of up to 1000 steps, +1 per step upright) from the first falls to the maximum
    (seed 0 gets there within about 3,200)."""
    env = gradgym.make("InvertedPendulum-v5", backend="jax")
    cfg = get_pipeline("shac").default_config("InvertedPendulum-v5", env_steps=10240,
                                              eval_every=40, eval_batch=8, render=False)
    result = run_pipeline("shac", env, cfg, seed=0)
    initial = result.history[0]["eval_return_mean"]
    assert initial < 50 and result.final_return == pytest.approx(1000.0), (
        initial, result.final_return)


def test_the_screen_benchmark_measures_the_start_of_a_pipeline_run(monkeypatch):
    """benchmarks/shac_screen.py drives the trainer itself (to stop early within a longer
    lr schedule): its held-out curve must be the pipeline's, point for point."""
    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[1] / "benchmarks"))
    from shac_screen import shac_curve

    env = gradgym.make("MountainCar", backend="jax")
    curve = []

    def report(metrics, step, artifacts=None):
        if "eval_return_mean" in metrics:
            curve.append(metrics["eval_return_mean"])

    cfg = get_pipeline("shac").default_config("MountainCar", env_steps=1280, eval_every=2,
                                              render=False)
    run_pipeline("shac", env, cfg, 0, report)
    every = 2 * cfg.num_envs * cfg.num_steps  # env steps between two held-out evaluations
    screened = shac_curve("MountainCar", 0, steps=5 * every, schedule_steps=1280, fields={})
    assert [at for at, _ in screened] == [i * every for i in range(6)]
    np.testing.assert_allclose([value for _, value in screened], curve[:6], rtol=1e-6)
    assert len(set(np.round(curve[:6], 3))) > 1  # the policy changed along the way
