"""jax side of PPO and SHAC: one jitted function per iteration (``lax.scan`` rollout, optax).

Each trainer keeps the env's batch running across iterations (its carry), takes fresh
start states for the envs whose episode ends as the iteration's input, and returns the
iteration's metrics in one host transfer. Trainers have the interface of the shared
loop's optimizers (``compile``, ``step``, ``snapshot``, ``member``, ``returns``,
``gradients``, ``params``) for a lone run.
"""

from __future__ import annotations

import functools
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from gradgym.pipelines import _jax
from gradgym.pipelines._rl import (
    episode_return_stats,
    gaussian_mean_action,
    initial_stats,
    no_episodes,
    normalize,
    ppo_batch,
    ppo_collect_step,
    ppo_loss,
    restart_from,
    shac_actor_loss,
    shac_policy,
    shac_targets,
    update_stats,
    value_loss,
)
from gradgym.pipelines._rollout import initial_carry, rollout_returns, transition


def _flat_grads(grads: Any) -> Any:
    return jnp.concatenate([jnp.ravel(g) for g in jax.tree_util.tree_leaves(grads)])


def _grad_stats(grads: Any) -> Any:
    """``[norm, max |g|, non-finite count]`` of a gradient tree."""
    flat = _flat_grads(grads)
    return jnp.stack([jnp.sqrt(jnp.sum(flat**2)), jnp.max(jnp.abs(flat)),
                      jnp.sum(~jnp.isfinite(flat)).astype(flat.dtype)])


def _schedule(cfg: Any, lr: float, updates_per_iter: int, iters: int) -> Any:
    if cfg.lr_schedule == "linear":
        return optax.linear_schedule(lr, 0.0, transition_steps=updates_per_iter * iters)
    return optax.constant_schedule(lr)


def _clipped(max_norm: float, optimizer: Any) -> Any:
    if max_norm > 0:
        return optax.chain(optax.clip_by_global_norm(max_norm), optimizer)
    return optimizer


def _shuffled_minibatches(key: Any, size: int, passes: int, count: int) -> Any:
    """``[passes * count, size // count]`` indices: each pass a fresh permutation."""
    keys = jax.random.split(key, passes)
    perms = jax.vmap(lambda k: jax.random.permutation(k, size))(keys)
    per = size // count
    return perms[:, : per * count].reshape(passes * count, per)


class _Base:
    """What both trainers share: the running env batch, evaluation, the loop interface."""

    def __init__(self, env: Any, cfg: Any, seed: int, time_limit: int, act: Any):
        self.env, self.cfg, self.time_limit = env, cfg, time_limit
        self.key = jax.random.key(int(seed))
        self.carry: tuple | None = None
        self._grads = None

        def eval_returns(params: Any, start: Any) -> Any:
            step = functools.partial(transition, env, act)
            return rollout_returns(_jax, step, params, initial_carry(env, start), None,
                                   time_limit)[None]

        self._returns = jax.jit(eval_returns)

    member = staticmethod(lambda tree, index: tree)  # a lone run: the tree is the member's

    def snapshot(self) -> Any:
        return self.params

    def returns(self, inputs: Any) -> np.ndarray:
        """Held-out returns ``[1, B]`` of the current policy from the start states ``inputs``."""
        return np.asarray(self._returns(self.params, inputs))

    def gradients(self, index: int) -> np.ndarray:
        return np.asarray(_flat_grads(self._grads))

    def _begin(self, inputs: Any) -> None:
        env = self.env
        if self.carry is None:  # the first iteration's start states begin the run
            self.carry = (inputs, env.observe(inputs), no_episodes(env.backend, self.cfg.num_envs))

    def compile(self, inputs: Any, eval_inputs: Any | None = None) -> float:
        """Compile the iteration (and the evaluation) ahead of time; returns the seconds."""
        began = time.perf_counter()
        self._begin(inputs)
        self._iterate = self._iterate.lower(*self._arguments(inputs)).compile()
        if eval_inputs is not None:
            jax.block_until_ready(self._returns(self.params, eval_inputs))
        return time.perf_counter() - began

    def step(self, inputs: Any) -> list[list[float]]:
        self._begin(inputs)
        metrics = self._run(inputs)
        return [np.asarray(metrics).tolist()]  # the one host sync of the iteration


class PPOTrainer(_Base):
    """PPO on jax: collect (``lax.scan``), GAE, ``epochs x minibatches`` optax updates,
    observation statistics, all in one jitted function."""

    def __init__(self, env: Any, cfg: Any, weights: dict, seed: int, time_limit: int, iters: int):
        super().__init__(env, cfg, seed, time_limit,
                         functools.partial(gaussian_mean_action, jnp, cfg.squash))
        self.weights = weights
        self.stats = initial_stats(env.backend, env.spec.obs_dim)
        updates = cfg.epochs * cfg.minibatches
        schedule = _schedule(cfg, cfg.lr, updates, iters)
        self._tx = _clipped(cfg.max_grad_norm, optax.adam(schedule, eps=1e-5))
        self._opt_state = self._tx.init(weights)
        self._iterate = jax.jit(self._make_iterate())

    @property
    def params(self) -> Any:
        """``(policy layers, obs stats)``: what acting needs."""
        return (self.weights["policy"], self.stats)

    def _arguments(self, inputs: Any) -> tuple:
        return (self.weights, self._opt_state, self.stats, self.carry, self.key, inputs)

    def _run(self, inputs: Any) -> Any:
        (self.weights, self._opt_state, self.stats, self.carry, self.key, metrics,
         self._grads) = self._iterate(*self._arguments(inputs))
        return metrics

    def _make_iterate(self) -> Any:
        env, cfg, tx = self.env, self.cfg, self._tx
        collect = functools.partial(ppo_collect_step, env, self.time_limit, cfg.squash)
        size = cfg.num_envs * cfg.num_steps

        def minibatch_update(state, indices):
            weights, opt_state, batch = state
            mini = {k: v[indices] for k, v in batch.items()}
            (loss, aux), grads = jax.value_and_grad(
                lambda w: ppo_loss(jnp, w, mini, cfg), has_aux=True)(weights)
            updates, opt_state = tx.update(grads, opt_state, weights)
            weights = optax.apply_updates(weights, updates)
            row = jnp.concatenate([loss[None], _grad_stats(grads), aux])
            return (weights, opt_state, batch), (row, grads)

        def iterate(weights, opt_state, stats, carry, key, starts):
            key, noise_key, shuffle_key = jax.random.split(key, 3)
            noise = jax.random.normal(noise_key, (cfg.num_steps, cfg.num_envs, env.spec.act_dim),
                                      dtype=env.backend.dtype)
            params = (weights["policy"], weights["log_std"], stats, restart_from(env, starts))
            carry, data = jax.lax.scan(lambda c, x: collect(params, c, x), carry, noise)
            batch = ppo_batch(jnp, weights["value"], stats, data, cfg)
            indices = _shuffled_minibatches(shuffle_key, size, cfg.epochs, cfg.minibatches)
            (weights, opt_state, _), (rows, grads) = jax.lax.scan(
                minibatch_update, (weights, opt_state, batch), indices)
            if cfg.normalize_obs:
                stats = update_stats(jnp, stats, data.obs.reshape(size, -1))
            metrics = jnp.concatenate([
                episode_return_stats(jnp, carry[2]),
                jnp.mean(rows[:, :2], axis=0),  # loss, grad_norm: mean over the updates
                jnp.max(rows[:, 2:3], axis=0),  # grad_max_abs
                jnp.sum(rows[:, 3:4], axis=0),  # grad_nonfinite
                jnp.mean(rows[:, 4:], axis=0),  # policy_loss .. clip_fraction
            ])
            last_grads = jax.tree_util.tree_map(lambda g: g[-1], grads)
            return weights, opt_state, stats, carry, key, metrics, last_grads

        return iterate


class SHACTrainer(_Base):
    """SHAC on jax: the actor's window loss differentiated through a ``lax.scan`` of the
    env, the critic's TD(lambda) fit and the target update, in one jitted function."""

    def __init__(self, env: Any, cfg: Any, actor: Any, critic: Any, seed: int, time_limit: int,
                 iters: int):
        super().__init__(env, cfg, seed, time_limit, shac_policy(jnp, cfg))
        self.actor, self.critic, self.target = actor, critic, critic
        self.stats = initial_stats(env.backend, env.spec.obs_dim)
        b1, b2 = (float(b) for b in cfg.betas)
        self._actor_tx = _clipped(cfg.grad_clip, optax.adam(
            _schedule(cfg, cfg.lr, 1, iters), b1=b1, b2=b2))
        critic_updates = cfg.critic_iters * cfg.critic_minibatches
        self._critic_tx = optax.adam(_schedule(cfg, cfg.critic_lr, critic_updates, iters),
                                     b1=b1, b2=b2)
        self._opt = (self._actor_tx.init(actor), self._critic_tx.init(critic))
        self._iterate = jax.jit(self._make_iterate())

    @property
    def params(self) -> Any:
        """``(actor layers, obs stats)``: what acting needs."""
        return (self.actor, self.stats)

    def _nets(self) -> tuple:
        return (self.actor, self.critic, self.target)

    def _arguments(self, inputs: Any) -> tuple:
        return (self._nets(), self._opt, self.stats, self.carry, self.key, inputs)

    def _run(self, inputs: Any) -> Any:
        nets, self._opt, self.stats, self.carry, self.key, metrics, self._grads = (
            self._iterate(*self._arguments(inputs)))
        self.actor, self.critic, self.target = nets
        return metrics

    def _make_iterate(self) -> Any:
        env, cfg = self.env, self.cfg
        actor_tx, critic_tx = self._actor_tx, self._critic_tx
        size = cfg.num_envs * cfg.num_steps
        actor_loss = functools.partial(shac_actor_loss, _jax, env, cfg, self.time_limit)

        def critic_update(state, indices):
            critic, opt_state, obs, targets = state
            loss, grads = jax.value_and_grad(
                lambda c: value_loss(jnp, c, obs[indices], targets[indices], cfg.layer_norm))(critic)
            updates, opt_state = critic_tx.update(grads, opt_state, critic)
            return (optax.apply_updates(critic, updates), opt_state, obs, targets), loss

        def iterate(nets, opt, stats, carry, key, starts):
            actor, critic, target = nets
            actor_opt, critic_opt = opt
            key, shuffle_key = jax.random.split(key)
            (loss, (carry, window)), grads = jax.value_and_grad(actor_loss, has_aux=True)(
                actor, target, stats, carry, restart_from(env, starts))
            updates, actor_opt = actor_tx.update(grads, actor_opt, actor)
            actor = optax.apply_updates(actor, updates)

            window = jax.lax.stop_gradient(window)
            targets = shac_targets(jnp, target, stats, window, cfg).reshape(size)
            if cfg.normalize_obs:
                stats = update_stats(jnp, stats, window.obs.reshape(size, -1))
            obs = normalize(jnp, stats, window.obs.reshape(size, -1))
            indices = _shuffled_minibatches(shuffle_key, size, cfg.critic_iters,
                                            cfg.critic_minibatches)
            (critic, critic_opt, _, _), critic_losses = jax.lax.scan(
                critic_update, (critic, critic_opt, obs, targets), indices)
            alpha = cfg.target_alpha
            target = jax.tree_util.tree_map(lambda t, c: alpha * t + (1 - alpha) * c,
                                            target, critic)
            metrics = jnp.concatenate([
                episode_return_stats(jnp, carry[2]), loss[None], _grad_stats(grads),
                jnp.mean(critic_losses)[None],
            ])
            return (actor, critic, target), (actor_opt, critic_opt), stats, carry, key, metrics, grads

        return iterate
