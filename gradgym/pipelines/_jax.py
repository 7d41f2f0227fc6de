"""jax side of the pipelines: ``lax.scan`` rollouts and one compiled optax update step.

The update (loss, gradient, optimizer, metrics) is a single ``jax.jit`` function compiled
ahead of time, so iteration times exclude compilation and compile time is measured on
its own. Non-finite gradients are skipped inside the compiled step by
``optax.apply_if_finite``.
"""

from __future__ import annotations

import contextlib
import time
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax

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


def compile_step(step: Callable, cfg: Any) -> Callable:
    """The per-step function as is: the whole update around it is jitted."""
    return step


def make_optimizer(cfg: Any) -> optax.GradientTransformation:
    """optax optimizer of ``cfg``: schedule, clipping by global norm, skip on non-finite."""
    schedules = {
        "constant": lambda: optax.constant_schedule(cfg.lr),
        "cosine": lambda: optax.cosine_decay_schedule(cfg.lr, decay_steps=cfg.iters),
        "linear": lambda: optax.linear_schedule(cfg.lr, 0.0, transition_steps=cfg.iters),
    }
    schedule = schedules[cfg.lr_schedule]()
    optimizers = {
        "adam": lambda: optax.adam(schedule),
        "adamw": lambda: optax.adamw(schedule, weight_decay=ADAMW_WEIGHT_DECAY),
        "sgd": lambda: optax.sgd(schedule),
    }
    transform = optimizers[cfg.optimizer]()
    if cfg.grad_clip > 0:
        transform = optax.chain(optax.clip_by_global_norm(cfg.grad_clip), transform)
    return optax.apply_if_finite(transform, max_consecutive_errors=_NEVER_GIVE_UP)


def step_metrics(loss: Any, returns: Any, grads: Any) -> Any:
    """``GRADIENT_STEP_METRICS`` as one vector: one transfer brings them to the host."""
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


class Trainer:
    """Gradient descent on ``loss_fn`` with one jitted update per iteration."""

    def __init__(self, loss_fn: LossFn, params: Any, cfg: Any):
        self.params = params
        self._transform = make_optimizer(cfg)
        self._opt_state = self._transform.init(params)
        self._update = jax.jit(self._make_update(loss_fn))
        self._returns = jax.jit(lambda p, inputs: loss_fn(p, inputs)[1])
        self._grads = None

    def _make_update(self, loss_fn: LossFn) -> Callable:
        transform = self._transform

        def update(params, opt_state, inputs):
            (loss, returns), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, inputs)
            updates, opt_state = transform.update(grads, opt_state, params)
            params = optax.apply_updates(params, updates)
            return params, opt_state, step_metrics(loss, returns, grads), grads

        return update

    def compile(self, inputs: Any, eval_inputs: Optional[Any] = None) -> float:
        """Compile the update (and the evaluation) ahead of time; returns the seconds spent."""
        began = time.perf_counter()
        self._update = self._update.lower(self.params, self._opt_state, inputs).compile()
        # One evaluation per input shape fills jit's cache (its run time is negligible).
        for batch in (inputs, eval_inputs):
            if batch is not None:
                jax.block_until_ready(self._returns(self.params, batch))
        return time.perf_counter() - began

    def step(self, inputs: Any) -> list[float]:
        """One update; ``GRADIENT_STEP_METRICS`` at the parameters before it."""
        self.params, self._opt_state, metrics, self._grads = self._update(
            self.params, self._opt_state, inputs
        )
        return np.asarray(metrics).tolist()  # the one host sync of the iteration

    def snapshot(self) -> Any:
        """The current parameters (jax arrays are immutable: no copy needed)."""
        return self.params

    def returns(self, params: Any, inputs: Any) -> np.ndarray:
        """The return ``[B]`` of ``params`` from ``inputs``, on the host."""
        return np.asarray(self._returns(params, inputs))

    def gradients(self) -> np.ndarray:
        """The gradient of the last step, flat, on the host (for histograms)."""
        return np.concatenate([np.ravel(g) for g in jax.tree_util.tree_leaves(self._grads)])


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
