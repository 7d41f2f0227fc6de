"""jax side of the pipelines: ``lax.scan`` rollouts and one compiled optax update step.

The metrics of each update stay on the device; the shared loop fetches them in batches
(``Trainer.report_batch``), so the Python around the jitted update overlaps its run.

The update (loss, gradient, optimizer, metrics) is a single ``jax.jit`` function compiled
ahead of time, so iteration times exclude compilation and compile time is measured on
its own. Non-finite gradients are skipped inside the compiled step by
``optax.apply_if_finite``.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from gradgym.pipelines._rollout import member_of, stack_trees
from gradgym.pipelines.config import ADAMW_WEIGHT_DECAY

xp = jnp
no_grad = contextlib.nullcontext

# apply_if_finite's counter saturates at this value, so no non-finite update is ever applied.
_NEVER_GIVE_UP = int(np.iinfo(np.int32).max)

LossFn = Callable[[Any, Any], tuple[Any, Any]]  # (params, inputs) -> (loss, returns [B])


def scan(step: Callable, params: Any, carry: Any, xs: Any, length: int) -> tuple[Any, Any]:
    """``jax.lax.scan`` of ``step(params, carry, x)`` over ``xs`` (or ``length`` steps)."""
    return jax.lax.scan(lambda c, x: step(params, c, x), carry, xs, length=length)


def stop_gradient(tree: Any) -> Any:
    """The same values with no gradient flowing back through them."""
    return jax.tree_util.tree_map(jax.lax.stop_gradient, tree)


def compile_step(step: Callable, cfg: Any, env_name: str) -> Callable:
    """The per-step function as is: the whole update around it is jitted."""
    return step


def make_optimizer(cfg: Any, lr: Any = None, grad_clip: Any = None) -> optax.GradientTransformation:
    """optax optimizer of ``cfg``: schedule, clipping by global norm, skip on non-finite.

    The learning rate and the clipping norm are injected hyperparameters (state, not
    constants), so one compiled update serves members with different values under
    ``jax.vmap``; ``lr``/``grad_clip`` (default: ``cfg``'s) may be traced. A clipping norm of
    0 (disabled) becomes ``inf``: clipping by an infinite norm returns the gradient as is.
    """
    lr = cfg.lr if lr is None else lr
    grad_clip = cfg.grad_clip if grad_clip is None else grad_clip
    if isinstance(grad_clip, (int, float)):
        grad_clip = grad_clip if grad_clip > 0 else jnp.inf

    def transform(learning_rate: Any, max_norm: Any) -> optax.GradientTransformation:
        schedules = {
            "constant": lambda: optax.constant_schedule(learning_rate),
            "cosine": lambda: optax.cosine_decay_schedule(learning_rate, decay_steps=cfg.iters),
            "linear": lambda: optax.linear_schedule(
                learning_rate, 0.0, transition_steps=cfg.iters
            ),
        }
        schedule = schedules[cfg.lr_schedule]()
        optimizers = {
            "adam": lambda: optax.adam(schedule),
            "adamw": lambda: optax.adamw(schedule, weight_decay=ADAMW_WEIGHT_DECAY),
            "sgd": lambda: optax.sgd(schedule),
        }
        return optax.chain(optax.clip_by_global_norm(max_norm), optimizers[cfg.optimizer]())

    injected = optax.inject_hyperparams(transform)(learning_rate=lr, max_norm=grad_clip)
    return optax.apply_if_finite(injected, max_consecutive_errors=_NEVER_GIVE_UP)


def member_hyperparams(cfgs: list[Any], dtype: Any) -> tuple[Any, Any]:
    """The members' learning rates and clipping norms (``inf`` where disabled) as ``[M]``
    arrays of the parameters' ``dtype`` (optax's clipping needs them to agree)."""
    lrs = jnp.asarray([float(cfg.lr) for cfg in cfgs], dtype=dtype)
    clips = [float(c.grad_clip) if c.grad_clip > 0 else np.inf for c in cfgs]
    clips = jnp.asarray(clips, dtype=dtype)
    return lrs, clips


def step_metrics(loss: Any, returns: Any, grads: Any) -> Any:
    """``GRADIENT_STEP_METRICS`` of one member as one vector (vmapped over a pack's members,
    so one transfer brings every member's metrics to the host)."""
    leaves = [jnp.ravel(g) for g in jax.tree_util.tree_leaves(grads)]
    flat = jnp.concatenate(leaves)
    return jnp.stack(
        [
            jnp.mean(returns),
            jnp.min(returns),
            jnp.max(returns),
            loss,
            jnp.sqrt(jnp.sum(flat**2)),
            jnp.max(jnp.abs(flat)),
            jnp.sum(~jnp.isfinite(flat)).astype(flat.dtype),
        ]
    )


def stack_members(trees: list[Any]) -> Any:
    """Member trees stacked along a new leading (member) axis."""
    return stack_trees(jnp, trees)


class Trainer:
    """Gradient descent for a pack of ``M`` members with one jitted update per iteration.

    ``loss_fn(params, inputs) -> (losses [M], returns [M, B])`` takes parameters and inputs
    with a leading member axis; members are independent, so the gradient of the sum of the
    losses is every member's own gradient. The optax update runs under ``jax.vmap`` over
    the members, each with its own state and injected learning rate and clipping norm, so a
    member's steps are those of its lone run (a lone run is a pack of one).
    """

    def __init__(self, loss_fn: LossFn, params: list[Any], cfgs: list[Any]):
        self.params = stack_members(params)
        cfg = cfgs[0]  # the fields that may not differ inside a pack come from any member
        self._transform = make_optimizer(cfg)
        dtype = jax.tree_util.tree_leaves(self.params)[0].dtype
        lrs, clips = member_hyperparams(cfgs, dtype)
        self._opt_state = jax.vmap(
            lambda p, lr, clip: make_optimizer(cfg, lr, clip).init(p)
        )(self.params, lrs, clips)
        self._update = jax.jit(self._make_update(loss_fn))
        self._returns = jax.jit(lambda p, inputs: loss_fn(p, inputs)[1])
        self._grads = None

    def _make_update(self, loss_fn: LossFn) -> Callable:
        transform = self._transform

        def total_loss(params, inputs):
            losses, returns = loss_fn(params, inputs)
            return jnp.sum(losses), (losses, returns)

        def update(params, opt_state, inputs):
            (_, (losses, returns)), grads = jax.value_and_grad(total_loss, has_aux=True)(
                params, inputs
            )
            updates, opt_state = jax.vmap(transform.update)(grads, opt_state, params)
            params = optax.apply_updates(params, updates)
            metrics = jax.vmap(step_metrics)(losses, returns, grads)
            return params, opt_state, metrics, grads

        return update

    def compile(self, inputs: Any, eval_inputs: Any | None = None) -> float:
        """Compile the update (and the evaluation) ahead of time; returns the seconds spent."""
        began = time.perf_counter()
        self._update = self._update.lower(self.params, self._opt_state, inputs).compile()
        # One evaluation per input shape fills jit's cache (its run time is negligible).
        for batch in (inputs, eval_inputs):
            if batch is not None:
                jax.block_until_ready(self._returns(self.params, batch))
        return time.perf_counter() - began

    # Iterations whose metrics stay on the device before the loop fetches them: the host
    # never waits for an update, so dispatching the next one overlaps the current one.
    report_batch = 32

    def step(self, inputs: Any) -> Any:
        """One update of every member (dispatched, not waited for); returns the members'
        ``GRADIENT_STEP_METRICS`` before it as an ``[M, 7]`` device array."""
        self.params, self._opt_state, metrics, self._grads = self._update(
            self.params, self._opt_state, inputs
        )
        return metrics

    @staticmethod
    def host_rows(pending: list[Any]) -> list[list[list[float]]]:
        """The metrics of several steps on the host, in one transfer."""
        return [rows.tolist() for rows in jax.device_get(pending)]

    def snapshot(self) -> Any:
        """The current parameters (jax arrays are immutable: no copy needed)."""
        return self.params

    member = staticmethod(member_of)

    def returns(self, inputs: Any) -> np.ndarray:
        """The returns ``[M, B]`` of the current parameters from ``inputs``, on the host."""
        return np.asarray(self._returns(self.params, inputs))

    def gradients(self, index: int) -> np.ndarray:
        """Member ``index``'s gradient of the last step, flat, on the host (for histograms)."""
        leaves = jax.tree_util.tree_leaves(member_of(self._grads, index))
        return np.concatenate([np.ravel(g) for g in leaves])


# ---------------------------------------------------------------------- zeroth order (CEM)


def compile_function(fn: Callable, *example_args: Any) -> tuple[Callable, float]:
    """``fn`` jitted and compiled for ``example_args``, and the seconds that took."""
    began = time.perf_counter()
    compiled = jax.jit(fn).lower(*example_args).compile()
    return compiled, time.perf_counter() - began


def top_k_indices(values: Any, k: int) -> Any:
    """Indices of the ``k`` largest entries along the last axis."""
    return jax.lax.top_k(values, k)[1]


def take_along_axis(values: Any, indices: Any, axis: int) -> Any:
    """``numpy.take_along_axis`` on jax arrays (indices broadcast)."""
    return jnp.take_along_axis(values, indices, axis=axis)


def member_generators(backend: Any, seeds: list[int]) -> Any:
    """One PRNG key per pack member (a key array ``[M]``), each that of its lone run."""
    keys = [backend.generator(seed) for seed in seeds]
    return jax.random.wrap_key_data(jnp.stack([jax.random.key_data(key) for key in keys]))


def split_members(backend: Any, rngs: Any) -> tuple[Any, Any]:
    """``(next keys, keys)``: each member's ``split(key, 2)`` in one vmapped call."""
    pairs = _split_pairs(rngs)
    return pairs[:, 0], pairs[:, 1]


_split_pairs = jax.jit(jax.vmap(lambda key: jax.random.split(key, 2)))


def member_normal(backend: Any, rngs: Any, shape: tuple[int, ...]) -> Any:
    """``[M, *shape]`` standard normal samples, member ``m``'s from its own key."""
    return jax.vmap(lambda key: backend.normal(key, shape))(rngs)
