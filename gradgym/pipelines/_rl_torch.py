"""torch side of PPO and SHAC: Python-loop rollouts, autograd, ``torch.optim.Adam``.

The trainers mirror ``_rl_jax``'s (same interface for the shared loop, same math from
``_rl``); each iteration's metrics are gathered on the device and come to the host in one
transfer at its end.
"""

from __future__ import annotations

import functools
from typing import Any

import numpy as np
import torch

from gradgym.pipelines import _torch
from gradgym.pipelines._rl import (
    Collected,
    Window,
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
from gradgym.pipelines._rollout import (
    initial_carry,
    loop_scan,
    rollout_returns,
    transition,
    tree_leaves,
    tree_map,
)

_scan = functools.partial(loop_scan, torch.stack)


def _leaves_of(tree: Any) -> Any:
    """A copy of ``tree`` whose tensors are fresh leaves that record gradients (with zero
    gradients, so that a leaf the loss does not reach still has one)."""

    def leaf(p: torch.Tensor) -> torch.Tensor:
        p = p.detach().clone().requires_grad_(True)
        p.grad = torch.zeros_like(p)
        return p

    return tree_map(leaf, tree)


def _adam(leaves: list, cfg: Any, lr: float, updates: int, betas=(0.9, 0.999), eps=1e-8):
    """``(Adam, scheduler or None)``: a linear decay to 0 over ``updates`` when asked.

    Fused, as the gradient pipelines' (``_torch.make_optimizer``): SHAC's critic and PPO
    take hundreds of small Adam steps per iteration, and the per-tensor kernels of the
    default cost most of the critic fit's time."""
    optimizer = torch.optim.Adam(leaves, lr=lr, betas=betas, eps=eps, fused=True)
    if cfg.lr_schedule != "linear":
        return optimizer, None
    return optimizer, torch.optim.lr_scheduler.LinearLR(
        optimizer, start_factor=1.0, end_factor=0.0, total_iters=updates)


def _clip_and_step(leaves: list, max_norm: float, optimizer: Any, scheduler: Any) -> Any:
    """``[norm, max |g|, non-finite count]`` of the gradient, then clip and step."""
    flat = torch.cat([leaf.grad.reshape(-1) for leaf in leaves])
    norm = torch.linalg.vector_norm(flat)
    if max_norm > 0:
        torch.nn.utils.clip_grads_with_norm_(leaves, max_norm, norm, foreach=True)
    optimizer.step()
    if scheduler is not None:
        scheduler.step()
    return torch.stack([norm, flat.abs().max(), (~torch.isfinite(flat)).sum().to(flat.dtype)])


def _minibatches(generator: Any, size: int, passes: int, count: int):
    """Index tensors: ``passes`` fresh permutations, each cut into ``count`` minibatches."""
    per = size // count
    for _ in range(passes):
        perm = torch.randperm(size, generator=generator)
        for i in range(count):
            yield perm[i * per:(i + 1) * per]


class _Base:
    """The running env batch, evaluation and the shared loop's interface."""

    def __init__(self, env: Any, cfg: Any, seed: int, time_limit: int, act: Any):
        self.env, self.cfg, self.time_limit = env, cfg, time_limit
        self.generator = torch.Generator().manual_seed(int(seed))
        self.stats = initial_stats(env.backend, env.spec.obs_dim)
        self.carry: tuple | None = None
        self._act = act
        self._flat_grad: torch.Tensor | None = None

    member = staticmethod(lambda tree, index: tree)  # a lone run: the tree is the member's

    def snapshot(self) -> Any:
        return self.params

    def compile(self, inputs: Any, eval_inputs: Any | None = None) -> float:
        return 0.0  # eager

    def returns(self, inputs: Any) -> np.ndarray:
        """Held-out returns ``[1, B]`` of the current policy from the start states ``inputs``."""
        step = functools.partial(transition, self.env, self._act)
        with torch.no_grad():
            returns = rollout_returns(_torch, step, self.params, initial_carry(self.env, inputs),
                                      None, self.time_limit)
        return returns[None].numpy()

    def gradients(self, index: int) -> np.ndarray:
        return self._flat_grad.numpy().copy()

    def _begin(self, inputs: Any) -> tuple:
        """The env batch to continue from (the first inputs begin it), detached."""
        env = self.env
        if self.carry is None:
            self.carry = (inputs, env.observe(inputs), no_episodes(env.backend, self.cfg.num_envs))
        return tree_map(lambda leaf: leaf.detach(), self.carry)


class PPOTrainer(_Base):
    """PPO on torch: collect without gradients, GAE, ``epochs x minibatches`` Adam steps."""

    def __init__(self, env: Any, cfg: Any, weights: dict, seed: int, time_limit: int, iters: int):
        super().__init__(env, cfg, seed, time_limit,
                         functools.partial(gaussian_mean_action, torch, cfg.squash))
        self.weights = _leaves_of(weights)
        self._leaves = tree_leaves(self.weights)
        self._optimizer, self._scheduler = _adam(
            self._leaves, cfg, cfg.lr, iters * cfg.epochs * cfg.minibatches, eps=1e-5)

    @property
    def params(self) -> Any:
        with torch.no_grad():
            return (tree_map(lambda p: p.detach().clone(), self.weights["policy"]), self.stats)

    def step(self, inputs: Any) -> list[list[float]]:
        env, cfg, w = self.env, self.cfg, self.weights
        carry = self._begin(inputs)
        size = cfg.num_envs * cfg.num_steps
        with torch.no_grad():
            noise = torch.randn((cfg.num_steps, cfg.num_envs, env.spec.act_dim),
                                generator=self.generator, dtype=env.backend.dtype)
            params = (w["policy"], w["log_std"], self.stats, restart_from(env, inputs))
            collect = functools.partial(ppo_collect_step, env, self.time_limit, cfg.squash)
            self.carry, data = _scan(collect, params, carry, noise, cfg.num_steps)
            data = Collected(*data)
            batch = ppo_batch(torch, w["value"], self.stats, data, cfg)
        rows = []
        for indices in _minibatches(self.generator, size, cfg.epochs, cfg.minibatches):
            loss, aux = ppo_loss(torch, w, {k: v[indices] for k, v in batch.items()}, cfg)
            self._optimizer.zero_grad(set_to_none=False)
            loss.backward()
            grad = _clip_and_step(self._leaves, cfg.max_grad_norm, self._optimizer,
                                  self._scheduler)
            rows.append(torch.cat([loss.detach()[None], grad, aux.detach()]))
        with torch.no_grad():
            if cfg.normalize_obs:
                self.stats = update_stats(torch, self.stats, data.obs.reshape(size, -1))
            self._flat_grad = torch.cat([leaf.grad.reshape(-1) for leaf in self._leaves])
            rows = torch.stack(rows)
            metrics = torch.cat([
                episode_return_stats(torch, self.carry[2]),
                rows[:, :2].mean(dim=0), rows[:, 2:3].amax(dim=0), rows[:, 3:4].sum(dim=0),
                rows[:, 4:].mean(dim=0),
            ])
        return [metrics.tolist()]  # the one host sync of the iteration


class SHACTrainer(_Base):
    """SHAC on torch: the window's loss back-propagated through the env, then the critic's
    TD(lambda) fit and the target critic's update."""

    def __init__(self, env: Any, cfg: Any, actor: Any, critic: Any, seed: int, time_limit: int,
                 iters: int):
        super().__init__(env, cfg, seed, time_limit, shac_policy(torch, cfg))
        self.actor, self.critic = _leaves_of(actor), _leaves_of(critic)
        self.target = tree_map(lambda p: p.detach().clone(), critic)
        self._actor_leaves, self._critic_leaves = tree_leaves(self.actor), tree_leaves(self.critic)
        betas = tuple(float(b) for b in cfg.betas)
        self._actor_opt = _adam(self._actor_leaves, cfg, cfg.lr, iters, betas)
        critic_updates = iters * cfg.critic_iters * cfg.critic_minibatches
        self._critic_opt = _adam(self._critic_leaves, cfg, cfg.critic_lr, critic_updates, betas)

    @property
    def params(self) -> Any:
        with torch.no_grad():
            return (tree_map(lambda p: p.detach().clone(), self.actor), self.stats)

    def step(self, inputs: Any) -> list[list[float]]:
        env, cfg = self.env, self.cfg
        size = cfg.num_envs * cfg.num_steps
        loss, (carry, window) = shac_actor_loss(
            _torch, env, cfg, self.time_limit, self.actor, self.target, self.stats,
            self._begin(inputs), restart_from(env, inputs))
        optimizer, scheduler = self._actor_opt
        optimizer.zero_grad(set_to_none=False)
        loss.backward()
        grad = _clip_and_step(self._actor_leaves, cfg.grad_clip, optimizer, scheduler)
        with torch.no_grad():
            self._flat_grad = torch.cat([leaf.grad.reshape(-1) for leaf in self._actor_leaves])
            self.carry = tree_map(lambda leaf: leaf.detach(), carry)
            window = Window(*(tree_map(lambda leaf: leaf.detach(), tuple(window))))
            targets = shac_targets(torch, self.target, self.stats, window, cfg).reshape(size)
            if cfg.normalize_obs:
                self.stats = update_stats(torch, self.stats, window.obs.reshape(size, -1))
            obs = normalize(torch, self.stats, window.obs.reshape(size, -1))
        critic_losses = self._fit_critic(obs, targets)
        with torch.no_grad():
            alpha = cfg.target_alpha
            self.target = [
                (alpha * tw + (1 - alpha) * cw.detach(), alpha * tb + (1 - alpha) * cb.detach())
                for (tw, tb), (cw, cb) in zip(self.target, self.critic)
            ]
            metrics = torch.cat([episode_return_stats(torch, self.carry[2]), loss.detach()[None],
                                 grad, critic_losses.mean()[None]])
        return [metrics.tolist()]  # the one host sync of the iteration

    def _fit_critic(self, obs: Any, targets: Any) -> Any:
        cfg = self.cfg
        optimizer, scheduler = self._critic_opt
        losses = []
        for indices in _minibatches(self.generator, obs.shape[0], cfg.critic_iters,
                                    cfg.critic_minibatches):
            loss = value_loss(torch, self.critic, obs[indices], targets[indices], cfg.layer_norm)
            optimizer.zero_grad(set_to_none=False)
            loss.backward()
            optimizer.step()
            if scheduler is not None:
                scheduler.step()
            losses.append(loss.detach())
        return torch.stack(losses)
