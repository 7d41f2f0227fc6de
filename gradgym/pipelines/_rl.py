"""What PPO and SHAC share, written once over an array namespace ``xp`` (numpy, jax, torch).

- advantage and return estimators: :func:`gae`, :func:`td_lambda`;
- running observation statistics: :func:`update_stats`, :func:`normalize`;
- the Gaussian policy's log-density and entropy, the clipped surrogate (:func:`ppo_loss`);
- episodes over a batch of envs that never stops: :class:`Episodes` (time limit, auto-reset,
  the return of each env's last finished episode).

Everything here is a pure function of arrays: no host syncs, no branching on values, so
the same code runs inside ``jax.jit``/``lax.scan`` and under torch autograd.
"""

from __future__ import annotations

import functools
import math
from typing import Any, NamedTuple

from gradgym.pipelines._rollout import tree_map

LOG_2PI = math.log(2.0 * math.pi)
NORMALIZED_OBS_CLIP = 10.0  # normalized observations are clipped to +-this (as SB3/CleanRL)


# ---------------------------------------------------------------------- estimators


def gae(xp: Any, rewards: Any, values: Any, next_values: Any, terminated: Any, dones: Any,
        gamma: float, lam: float) -> Any:
    """Generalized advantage estimates ``[T, B]`` of a time-major rollout.

    Args:
        rewards: ``r_t`` ``[T, B]``.
        values: ``V(s_t)`` ``[T, B]``.
        next_values: ``V(s_{t+1})`` of the *true* next state (before any auto-reset) ``[T, B]``.
        terminated: 1 where ``s_{t+1}`` is terminal (no bootstrap), else 0.
        dones: 1 where the episode ended at ``t`` (terminated or cut by the time limit):
            the estimate does not look past ``t``.

    ``delta_t = r_t + gamma (1 - term_t) V(s_{t+1}) - V(s_t)``,
    ``A_t = delta_t + gamma lam (1 - done_t) A_{t+1}``, ``A_T = 0``.
    """
    deltas = rewards + gamma * (1.0 - terminated) * next_values - values
    return backward_recursion(xp, deltas, gamma * lam * (1.0 - dones))


def td_lambda(xp: Any, rewards: Any, next_values: Any, terminated: Any, dones: Any,
              gamma: float, lam: float) -> Any:
    """TD(lambda) returns ``[T, B]`` (SHAC's critic targets) of a time-major rollout.

    ``G_t = r_t + gamma (1 - term_t) [(1 - lam c_t) V(s_{t+1}) + lam c_t G_{t+1}]`` with
    ``c_t = 1 - done_t`` for ``t < T - 1`` and ``c_{T-1} = 0`` (the window ends: bootstrap).
    Arguments as for :func:`gae`.
    """
    steps = rewards.shape[0]
    inside = xp.reshape(xp.arange(steps) < steps - 1, (steps,) + (1,) * (len(dones.shape) - 1))
    cont = xp.where(inside, 1.0 - dones, xp.zeros_like(dones))
    kept = gamma * (1.0 - terminated)
    return backward_recursion(xp, rewards + kept * (1.0 - lam * cont) * next_values,
                              kept * lam * cont)


def backward_recursion(xp: Any, base: Any, decay: Any) -> Any:
    """``y_t = base_t + decay_t y_{t+1}`` over axis 0 with ``y_T = 0`` (GAE and TD(lambda)
    are both of this form): a reversed ``lax.scan`` on jax (an unrolled loop compiles
    slowly), a loop elsewhere."""
    if getattr(xp, "__name__", "").startswith("jax"):
        import jax

        def step(after: Any, x: tuple) -> tuple:
            value = x[0] + x[1] * after
            return value, value

        return jax.lax.scan(step, xp.zeros_like(base[0]), (base, decay), reverse=True)[1]
    after = xp.zeros_like(base[0])
    values = []
    for t in range(base.shape[0] - 1, -1, -1):
        after = base[t] + decay[t] * after
        values.append(after)
    return xp.stack(values[::-1])


# ---------------------------------------------------------------------- observation statistics


class ObsStats(NamedTuple):
    """Running mean and variance of observations (``count`` is a float scalar array)."""

    mean: Any
    var: Any
    count: Any


def initial_stats(backend: Any, obs_dim: int) -> ObsStats:
    """Statistics of no data: mean 0, variance 1 (normalizing is the identity at first)."""
    zeros = backend.zeros((obs_dim,))
    return ObsStats(mean=zeros, var=zeros + 1.0, count=backend.zeros(()) + 1e-4)


def update_stats(xp: Any, stats: ObsStats, batch: Any) -> ObsStats:
    """``stats`` merged with a batch ``[N, obs_dim]`` (Chan et al.'s parallel update)."""
    n = batch.shape[0]
    batch_mean = xp.mean(batch, axis=0)
    batch_var = xp.mean((batch - batch_mean) ** 2, axis=0)
    total = stats.count + n
    delta = batch_mean - stats.mean
    mean = stats.mean + delta * (n / total)
    m2 = stats.var * stats.count + batch_var * n + delta**2 * (stats.count * n / total)
    return ObsStats(mean=mean, var=m2 / total, count=total)


def normalize(xp: Any, stats: ObsStats, obs: Any) -> Any:
    """Observations standardized by ``stats`` and clipped to +-``NORMALIZED_OBS_CLIP``."""
    scaled = (obs - stats.mean) / xp.sqrt(stats.var + 1e-8)
    return xp.clip(scaled, -NORMALIZED_OBS_CLIP, NORMALIZED_OBS_CLIP)


def normalize_advantages(xp: Any, advantages: Any) -> Any:
    """Advantages shifted to mean 0 and scaled to std 1 (per minibatch, as SB3 does)."""
    mean = xp.mean(advantages)
    std = xp.sqrt(xp.mean((advantages - mean) ** 2))
    return (advantages - mean) / (std + 1e-8)


# ---------------------------------------------------------------------- networks


def mlp(xp: Any, layers: list[tuple[Any, Any]], x: Any, layer_norm: bool = False) -> Any:
    """``tanh`` hidden layers, each followed by :func:`normalize_features` if ``layer_norm``
    (as SHAC's networks), and a linear output layer."""
    for weight, bias in layers[:-1]:
        x = xp.tanh(x @ weight + bias)
        if layer_norm:
            x = normalize_features(xp, x)
    weight, bias = layers[-1]
    return x @ weight + bias


def normalize_features(xp: Any, x: Any) -> Any:
    """Layer normalization without a learned scale and shift (the next layer's weights
    and bias can express them): each row of ``x`` to mean 0 and variance 1."""
    mean = xp.mean(x, axis=-1, keepdims=True)
    var = xp.mean((x - mean) ** 2, axis=-1, keepdims=True)
    return (x - mean) / xp.sqrt(var + 1e-5)


def squash(xp: Any, raw_action: Any, how: str) -> Any:
    """A raw (Gaussian) action as the env's action in [-1, 1]: ``clip`` or ``tanh``."""
    return xp.tanh(raw_action) if how == "tanh" else xp.clip(raw_action, -1.0, 1.0)


# ---------------------------------------------------------------------- PPO's loss


def gaussian_log_prob(xp: Any, mean: Any, log_std: Any, raw_action: Any) -> Any:
    """``log N(raw_action; mean, exp(log_std)^2)`` summed over the action dimensions ``[N]``.

    The log-density of the raw (unsquashed) action: the squashing's Jacobian cancels in
    PPO's probability ratio, so tanh and clipping need no correction term.
    """
    z = (raw_action - mean) / xp.exp(log_std)
    return xp.sum(-0.5 * z**2 - log_std - 0.5 * LOG_2PI, axis=-1)


def gaussian_entropy(xp: Any, log_std: Any) -> Any:
    """Entropy of a diagonal Gaussian with state-independent ``log_std`` (a scalar)."""
    return xp.sum(log_std + 0.5 * (LOG_2PI + 1.0))


def clipped_surrogate(xp: Any, ratio: Any, advantages: Any, clip: float) -> Any:
    """PPO's policy loss: ``-mean(min(ratio A, clip(ratio, 1 - clip, 1 + clip) A))``."""
    unclipped = ratio * advantages
    clipped = xp.clip(ratio, 1.0 - clip, 1.0 + clip) * advantages
    return -xp.mean(xp.minimum(unclipped, clipped))


def ppo_loss(xp: Any, params: dict, batch: dict, cfg: Any) -> tuple[Any, Any]:
    """``(loss, [policy_loss, value_loss, entropy, approx_kl, clip_fraction])`` of a minibatch.

    ``params``: ``{"policy": layers, "log_std": [act_dim], "value": layers}``; ``batch``:
    normalized ``obs``, ``raw_action``, ``log_prob`` (at collection), ``advantage``,
    ``target`` (the value targets), all of one flat minibatch.
    """
    mean = mlp(xp, params["policy"], batch["obs"])
    log_prob = gaussian_log_prob(xp, mean, params["log_std"], batch["raw_action"])
    log_ratio = log_prob - batch["log_prob"]
    ratio = xp.exp(log_ratio)
    advantages = batch["advantage"]
    if cfg.normalize_advantage:
        advantages = normalize_advantages(xp, advantages)
    policy_loss = clipped_surrogate(xp, ratio, advantages, cfg.clip_coef)
    value = mlp(xp, params["value"], batch["obs"])[:, 0]
    value_loss = 0.5 * xp.mean((value - batch["target"]) ** 2)
    entropy = gaussian_entropy(xp, params["log_std"])
    loss = policy_loss + cfg.vf_coef * value_loss - cfg.ent_coef * entropy
    approx_kl = xp.mean((ratio - 1.0) - log_ratio)  # Schulman's low-variance estimator
    clip_fraction = xp.mean(as_float(xp, xp.abs(ratio - 1.0) > cfg.clip_coef, ratio))
    return loss, xp.stack([policy_loss, value_loss, entropy, approx_kl, clip_fraction])


# ---------------------------------------------------------------------- episodes


class Episodes(NamedTuple):
    """Per env of the batch: steps into its episode, its return so far, the return of its
    last finished episode and how many it has finished (all ``[B]`` floats)."""

    steps: Any
    running: Any
    last: Any
    finished: Any


def no_episodes(backend: Any, batch: int) -> Episodes:
    """The bookkeeping of ``batch`` envs that have just been reset."""
    zeros = backend.zeros((batch,))
    return Episodes(zeros, zeros, zeros, zeros)


def end_episodes(xp: Any, episodes: Episodes, reward: Any, terminated: Any,
                 time_limit: int) -> tuple[Episodes, Any]:
    """``(episodes after this step, done [B] as 0/1)``: an episode ends when the env
    terminates or reaches ``time_limit`` steps (then it is cut, not terminated)."""
    steps = episodes.steps + 1.0
    running = episodes.running + reward
    ended = terminated | (steps >= time_limit)
    done = as_float(xp, ended, reward)
    zeros = xp.zeros_like(reward)
    return Episodes(
        steps=xp.where(ended, zeros, steps),
        running=xp.where(ended, zeros, running),
        last=xp.where(ended, running, episodes.last),
        finished=episodes.finished + done,
    ), done


def reset_where(xp: Any, done: Any, fresh: Any, current: Any) -> Any:
    """Per env, the ``fresh`` state (tree) where ``done`` else the ``current`` one."""

    def pick(new: Any, old: Any) -> Any:
        mask = xp.reshape(done > 0, tuple(done.shape) + (1,) * (len(old.shape) - 1))
        return xp.where(mask, new, old)

    leaves_fresh = list(fresh)
    return type(current)(*(pick(new, old) for new, old in zip(leaves_fresh, current)))


def episode_return_stats(xp: Any, episodes: Episodes) -> Any:
    """``[mean, min, max]`` of the last finished episode's return over the envs that have
    finished one (all 0 while none has), as one vector."""
    has = episodes.finished > 0
    count = xp.sum(as_float(xp, has, episodes.last))
    mean = xp.sum(xp.where(has, episodes.last, xp.zeros_like(episodes.last)))
    mean = mean / xp.maximum(count, xp.ones_like(count))
    filled = xp.where(has, episodes.last, mean)  # envs without a finished episode: neutral
    return xp.stack([mean, xp.min(filled), xp.max(filled)])


def as_float(xp: Any, condition: Any, like: Any) -> Any:
    """A boolean array as 1.0/0.0 of ``like``'s dtype (no scalar-dtype surprises on torch)."""
    return xp.where(condition, xp.ones_like(like), xp.zeros_like(like))


def flat(xp: Any, tree: Any) -> Any:
    """The leaves of a tree of ``[T, B, ...]`` arrays as ``[T * B, ...]``."""
    return tree_map(lambda a: xp.reshape(a, (-1,) + tuple(a.shape[2:])), tree)


# ---------------------------------------------------------------------- rollouts


class Collected(NamedTuple):
    """What PPO keeps of one rollout step (time-major ``[T, B, ...]`` after the scan)."""

    obs: Any  # the observation the action was chosen for (raw)
    raw_action: Any
    log_prob: Any
    reward: Any
    terminated: Any  # 0/1
    done: Any  # 0/1: terminated or cut by the time limit
    next_obs: Any  # the true next observation, before any auto-reset


class Restart(NamedTuple):
    """Fresh start states (and their observations) for the envs whose episode ends."""

    state: Any
    obs: Any


def restart_from(env: Any, states: Any) -> Restart:
    """The :class:`Restart` of a batch of start states."""
    return Restart(states, env.observe(states))


def advance(env: Any, time_limit: int, restart: Restart, carry: tuple, action: Any):
    """Step every env, auto-resetting those whose episode ended.

    ``carry`` is ``(state, obs, episodes)``; returns ``(carry after the step, (reward,
    terminated 0/1, done 0/1, true next obs))``.
    """
    xp = env.xp
    state, _, episodes = carry
    state, next_obs, reward, terminated = env.step(state, action)
    episodes, done = end_episodes(xp, episodes, reward, terminated, time_limit)
    state = reset_where(xp, done, restart.state, state)
    obs = xp.where(done[:, None] > 0, restart.obs, next_obs)
    return (state, obs, episodes), (reward, as_float(xp, terminated, reward), done, next_obs)


def ppo_collect_step(env: Any, time_limit: int, how: str, params: tuple, carry: tuple,
                     noise: Any) -> tuple[tuple, Collected]:
    """One step of PPO's data collection (scanned over the iteration's ``noise [T, B, act]``).

    ``params`` is ``(policy, log_std, obs stats, restart)``.
    """
    xp = env.xp
    policy, log_std, stats, restart = params
    obs = carry[1]
    mean = mlp(xp, policy, normalize(xp, stats, obs))
    raw = mean + xp.exp(log_std) * noise
    log_prob = gaussian_log_prob(xp, mean, log_std, raw)
    carry, (reward, terminated, done, next_obs) = advance(
        env, time_limit, restart, carry, squash(xp, raw, how)
    )
    return carry, Collected(obs, raw, log_prob, reward, terminated, done, next_obs)


def ppo_batch(xp: Any, value: Any, stats: ObsStats, data: Collected, cfg: Any) -> dict:
    """The flat training batch of a rollout: normalized obs, actions, log-probs, GAE
    advantages and value targets (no gradient needed: callers wrap it accordingly)."""
    obs = normalize(xp, stats, data.obs)
    values = mlp(xp, value, obs)[..., 0]
    next_values = mlp(xp, value, normalize(xp, stats, data.next_obs))[..., 0]
    advantage = gae(xp, data.reward, values, next_values, data.terminated, data.done,
                    cfg.gamma, cfg.gae_lambda)
    batch = {"obs": obs, "raw_action": data.raw_action, "log_prob": data.log_prob,
             "advantage": advantage, "target": advantage + values}
    return flat(xp, batch)


def gaussian_mean_action(xp: Any, how: str, params: tuple, obs: Any, unused: Any = None) -> Any:
    """PPO's held-out action: the squashed mean of the policy; ``params = (policy, stats)``."""
    policy, stats = params
    return squash(xp, mlp(xp, policy, normalize(xp, stats, obs)), how)


def actor_action(xp: Any, params: tuple, obs: Any, unused: Any = None,
                 layer_norm: bool = False) -> Any:
    """SHAC's (deterministic) action: ``tanh`` of an :func:`mlp` of the normalized
    observation; ``params = (actor, stats)``."""
    actor, stats = params
    return xp.tanh(mlp(xp, actor, normalize(xp, stats, obs), layer_norm))


def shac_policy(xp: Any, cfg: Any) -> Any:
    """SHAC's acting function ``act(params, obs, unused=None)`` for ``cfg``'s networks."""
    return functools.partial(actor_action, xp, layer_norm=cfg.layer_norm)


class Window(NamedTuple):
    """What SHAC keeps of one step of its window (for the critic's targets)."""

    obs: Any
    reward: Any
    terminated: Any
    done: Any
    next_obs: Any


def shac_window_step(env: Any, time_limit: int, gamma: float, layer_norm: bool, params: tuple,
                     carry: tuple, is_last: Any) -> tuple[tuple, Window]:
    """One differentiable step of SHAC's window (scanned over ``is_last [h]``, 1 at the end).

    ``params = (actor, critic, stats, restart)``; ``carry = (state, obs, episodes,
    value_sum [B], discount [B])``. ``value_sum`` accumulates each env's discounted
    rewards and, where its episode is cut (by the time limit or the window's end, not by
    termination), the discounted critic value of the true next state; the discount
    restarts at 1 with each new episode.
    """
    xp = env.xp
    actor, critic, stats, restart = params
    state, obs, episodes, value_sum, discount = carry
    action = actor_action(xp, (actor, stats), obs, layer_norm=layer_norm)
    (state, next_carry_obs, episodes), (reward, terminated, done, next_obs) = advance(
        env, time_limit, restart, (state, obs, episodes), action
    )
    next_value = mlp(xp, critic, normalize(xp, stats, next_obs), layer_norm)[:, 0]
    bootstrap = (1.0 - terminated) * xp.maximum(done, is_last * xp.ones_like(done))
    value_sum = value_sum + discount * (reward + gamma * bootstrap * next_value)
    discount = xp.where(done > 0, xp.ones_like(discount), discount * gamma)
    carry = (state, next_carry_obs, episodes, value_sum, discount)
    return carry, Window(obs, reward, terminated, done, next_obs)


def shac_targets(xp: Any, target_critic: Any, stats: ObsStats, window: Window, cfg: Any) -> Any:
    """TD(lambda) targets ``[h, B]`` of a window from the target critic's values."""
    next_values = mlp(xp, target_critic, normalize(xp, stats, window.next_obs),
                      cfg.layer_norm)[..., 0]
    return td_lambda(xp, window.reward, next_values, window.terminated, window.done,
                     cfg.gamma, cfg.gae_lambda)


def value_loss(xp: Any, critic: Any, obs: Any, targets: Any, layer_norm: bool = False) -> Any:
    """Mean squared error of the critic on normalized ``obs [N, obs_dim]``."""
    return xp.mean((mlp(xp, critic, obs, layer_norm)[:, 0] - targets) ** 2)


def shac_actor_loss(ops: Any, env: Any, cfg: Any, time_limit: int, actor: Any, critic: Any,
                    stats: ObsStats, carry: tuple, restart: Restart) -> tuple[Any, tuple]:
    """SHAC's actor loss over one window of ``cfg.num_steps`` steps from ``carry = (state,
    obs, episodes)``: ``-mean_B(value_sum) / h`` (see :func:`shac_window_step`).

    Returns ``(loss, (carry after the window, Window [h, B, ...]))``; ``ops`` is the
    backend's pipeline module (``_jax``: a ``lax.scan``; ``_torch``: a Python loop).
    """
    xp = env.xp
    steps = cfg.num_steps
    reward_like = carry[2].running
    is_last = xp.where(xp.arange(steps) == steps - 1, xp.ones((steps,), dtype=reward_like.dtype),
                       xp.zeros((steps,), dtype=reward_like.dtype))
    zeros = xp.zeros_like(reward_like)
    start = tuple(carry) + (zeros, zeros + 1.0)
    step = functools.partial(shac_window_step, env, time_limit, cfg.gamma, cfg.layer_norm)
    end, window = ops.scan(step, (actor, critic, stats, restart), start, is_last, steps)
    return -xp.mean(end[3]) / steps, (end[:3], Window(*window))
