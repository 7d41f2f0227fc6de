"""PPO: its pieces against hand-computed values, jax vs torch, and short learning runs."""

from __future__ import annotations

import math

import jax
import numpy as np
import pytest
import torch

import gradgym
from gradgym.pipelines import PolicyConfig, PPOConfig, SHACConfig, _rl, get_pipeline, run_pipeline
from gradgym.pipelines.config import PipelineConfigError, iterations
from gradgym.pipelines.ppo import initial_weights

GAMMA, LAM = 0.9, 0.8
# Two envs over three steps; env 1's episode terminates at t = 1.
REWARDS = np.array([[1.0, 1.0], [2.0, 2.0], [3.0, 3.0]])
VALUES = np.array([[0.5, 0.5], [1.0, 1.0], [1.5, 1.5]])
NEXT_VALUES = np.array([[1.0, 1.0], [1.5, 1.5], [2.0, 2.0]])
TERMINATED = np.array([[0.0, 0.0], [0.0, 1.0], [0.0, 0.0]])
DONES = TERMINATED.copy()
# By hand: deltas 1.4, 2.35, 3.3 (env 1 at t=1: 2 - 1 = 1); A_t = delta_t + 0.72 A_{t+1}.
EXPECTED_GAE = np.array([[1.4 + 0.72 * (2.35 + 0.72 * 3.3), 1.4 + 0.72 * 1.0],
                         [2.35 + 0.72 * 3.3, 1.0],
                         [3.3, 3.3]])


def _as(backend: str, array: np.ndarray):
    return {"numpy": np.asarray, "jax": jax.numpy.asarray, "torch": torch.as_tensor}[backend](array)


@pytest.mark.parametrize("backend", ["numpy", "jax", "torch"])
def test_gae_matches_a_hand_computation(backend):
    xp = {"numpy": np, "jax": jax.numpy, "torch": torch}[backend]
    args = [_as(backend, a) for a in (REWARDS, VALUES, NEXT_VALUES, TERMINATED, DONES)]
    advantages = _rl.gae(xp, *args, GAMMA, LAM)
    np.testing.assert_allclose(np.asarray(advantages), EXPECTED_GAE, rtol=1e-6)


def test_gae_does_not_look_past_a_cut_episode_but_bootstraps_it():
    dones = np.array([[0.0], [1.0], [0.0]])  # cut by the time limit, not terminated
    advantages = _rl.gae(np, REWARDS[:, :1], VALUES[:, :1], NEXT_VALUES[:, :1], np.zeros_like(dones),
                         dones, GAMMA, LAM)
    # t = 1: delta = 2 + 0.9 * 1.5 - 1 = 2.35 and nothing of t = 2 flows back.
    np.testing.assert_allclose(advantages[:, 0], [1.4 + 0.72 * 2.35, 2.35, 3.3], rtol=1e-12)


def test_clipped_surrogate_takes_the_pessimistic_term_and_stops_gradients_when_clipped():
    ratio = torch.tensor([0.5, 1.0, 1.5, 0.5, 1.5], dtype=torch.float64, requires_grad=True)
    advantages = torch.tensor([1.0, -1.0, 1.0, -1.0, -1.0], dtype=torch.float64)
    loss = _rl.clipped_surrogate(torch, ratio, advantages, 0.2)
    # min(r A, clip(r) A): 0.5, -1, 1.2 (clipped), -0.8 (clipped), -1.5
    assert loss.item() == pytest.approx(-(0.5 - 1.0 + 1.2 - 0.8 - 1.5) / 5)
    loss.backward()
    np.testing.assert_allclose(ratio.grad.numpy(), [-0.2, 0.2, 0.0, 0.0, 0.2])


def test_observation_statistics_match_numpy_over_the_batches_seen():
    rng = np.random.default_rng(0)
    batches = [rng.normal(3.0, 2.0, size=(n, 4)) for n in (50, 70, 30)]
    stats = _rl.initial_stats(gradgym.make("Pendulum").backend, 4)
    stats = _rl.ObsStats(*(np.asarray(x, dtype=np.float64) for x in stats))
    for batch in batches:
        stats = _rl.update_stats(np, stats, batch)
    everything = np.concatenate(batches)
    np.testing.assert_allclose(stats.mean, everything.mean(axis=0), rtol=1e-5)
    np.testing.assert_allclose(stats.var, everything.var(axis=0), rtol=1e-5)
    normalized = _rl.normalize(np, stats, everything)
    np.testing.assert_allclose(normalized.mean(axis=0), 0.0, atol=1e-5)
    np.testing.assert_allclose(normalized.std(axis=0), 1.0, rtol=1e-5)
    far = _rl.normalize(np, stats, everything[:1] + 1e3)
    assert np.all(far == _rl.NORMALIZED_OBS_CLIP)


def test_advantage_normalization_and_gaussian_density_match_torch_distributions():
    rng = np.random.default_rng(1)
    advantages = _rl.normalize_advantages(np, rng.normal(5.0, 3.0, size=256))
    assert abs(advantages.mean()) < 1e-9 and advantages.std() == pytest.approx(1.0, rel=1e-6)
    mean, action = torch.randn(8, 3, dtype=torch.float64), torch.randn(8, 3, dtype=torch.float64)
    log_std = torch.tensor([-0.5, 0.0, 0.3], dtype=torch.float64)
    normal = torch.distributions.Normal(mean, log_std.exp())
    torch.testing.assert_close(_rl.gaussian_log_prob(torch, mean, log_std, action),
                               normal.log_prob(action).sum(-1))
    torch.testing.assert_close(_rl.gaussian_entropy(torch, log_std), normal.entropy()[0].sum())


def test_episodes_end_at_the_time_limit_and_keep_the_finished_return():
    xp = np
    episodes = _rl.Episodes(*(np.zeros(2) for _ in range(4)))
    never = np.array([False, False])
    episodes, done = _rl.end_episodes(xp, episodes, np.array([1.0, 2.0]), never, time_limit=2)
    assert done.tolist() == [0.0, 0.0]
    episodes, done = _rl.end_episodes(xp, episodes, np.array([1.0, 2.0]), np.array([True, False]), 2)
    assert done.tolist() == [1.0, 1.0]  # env 0 terminated, env 1 reached the limit
    assert episodes.last.tolist() == [2.0, 4.0] and episodes.running.tolist() == [0.0, 0.0]
    assert episodes.steps.tolist() == [0.0, 0.0] and episodes.finished.tolist() == [1.0, 1.0]
    stats = _rl.episode_return_stats(xp, episodes)
    assert stats.tolist() == [3.0, 2.0, 4.0]


def _ppo_batch(env, size, rng):
    return {
        "obs": env.backend.asarray(rng.normal(size=(size, env.spec.obs_dim))),
        "raw_action": env.backend.asarray(rng.normal(size=(size, env.spec.act_dim))),
        "log_prob": env.backend.asarray(rng.normal(-1.0, 0.1, size=size)),
        "advantage": env.backend.asarray(rng.normal(size=size)),
        "target": env.backend.asarray(rng.normal(size=size)),
    }


def test_ppo_loss_and_gradients_agree_between_jax_and_torch():
    cfg = PPOConfig(hidden=[16], init_log_std=-0.3)
    results = {}
    for backend in ("jax", "torch"):
        env = gradgym.make("Reacher", backend=backend, dtype="float64")
        weights = initial_weights(env, cfg, seed=3)
        batch = _ppo_batch(env, 64, np.random.default_rng(2))
        if backend == "jax":
            (loss, aux), grads = jax.value_and_grad(
                lambda w, b=batch: _rl.ppo_loss(jax.numpy, w, b, cfg), has_aux=True)(weights)
            flat = np.concatenate([np.ravel(g) for g in jax.tree_util.tree_leaves(grads)])
        else:
            leaves = _rl.tree_map(lambda p: p.requires_grad_(True), weights)
            loss, aux = _rl.ppo_loss(torch, leaves, batch, cfg)
            loss.backward()
            flat = np.concatenate([p.grad.numpy().ravel() for p in jax.tree_util.tree_leaves(leaves)])
        if backend == "torch":
            loss, aux = loss.detach(), aux.detach()
        results[backend] = (float(loss), np.asarray(aux), flat)
    assert results["jax"][0] == pytest.approx(results["torch"][0], rel=1e-10)
    np.testing.assert_allclose(results["jax"][1], results["torch"][1], rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(results["jax"][2], results["torch"][2], rtol=1e-8, atol=1e-12)
    assert np.abs(results["jax"][2]).max() > 0


def test_bad_configs_are_rejected_before_any_work():
    env = gradgym.make("Pendulum", backend="jax")
    with pytest.raises(PipelineConfigError, match=r"ppo.squash='sigmoid'.*clip, tanh"):
        run_pipeline("ppo", env, PPOConfig(squash="sigmoid"))
    with pytest.raises(PipelineConfigError, match=r"env_steps=100.*num_envs \* num_steps = 2048"):
        run_pipeline("ppo", env, PPOConfig(env_steps=100))
    with pytest.raises(ValueError, match="backend 'jax' or 'torch'"):
        run_pipeline("ppo", gradgym.make("Pendulum", backend="numpy"), PPOConfig())
    assert iterations(PPOConfig(env_steps=100_000)) == 48
    assert iterations(PPOConfig(iters=3)) == 3
    # What the platform reads for progress bars and schedulers, from any pipeline's spec.
    assert get_pipeline("ppo").iterations(PPOConfig(env_steps=100_000)) == 48
    assert get_pipeline("shac").iterations(SHACConfig(env_steps=6_400)) == 100
    assert get_pipeline("policy").iterations(PolicyConfig(iters=7)) == 7


@pytest.mark.parametrize("backend", ["jax", "torch"])
def test_ppo_runs_on_a_terminating_mujoco_task_with_auto_reset(backend):
    env = gradgym.make("Hopper-v5", backend=backend)
    cfg = PPOConfig(num_envs=4, num_steps=32, env_steps=256, time_limit=25, epochs=2,
                    minibatches=4, eval_batch=2, eval_every=1, render=False)
    reports = []
    result = run_pipeline("ppo", env, cfg, seed=0, report=lambda m, s, a=None: reports.append(m))
    iterations_reported = [m for m in reports if "env_steps" in m]
    assert [m["env_steps"] for m in iterations_reported] == [128.0, 256.0]
    # Every env finished at least one episode (terminated or cut at 25 steps) in 32 steps.
    assert iterations_reported[0]["return_mean"] > 0
    assert all(math.isfinite(v) for m in reports for v in m.values())
    assert math.isfinite(result.final_return)


@pytest.mark.parametrize("backend", ["jax", "torch"])
def test_ppo_improves_the_held_out_return_on_pendulum(backend):
    torch.set_num_threads(1)
    env = gradgym.make("Pendulum", backend=backend)
    cfg = PPOConfig(env_steps=24_576, eval_every=4, render=False)
    result = run_pipeline("ppo", env, cfg, seed=0)
    initial = result.history[0]["eval_return_mean"]
    assert result.final_return > initial + 8.0, (initial, result.final_return)
    assert result.history[-1]["env_steps"] == 24_576
