"""The MuJoCo env step as an operation of each array backend.

The physics runs on the host, in MuJoCo's C engine, in float64. This module makes it an
operation of the backend a task runs on:

- numpy: a plain call (no gradients);
- torch: a ``torch.autograd.Function`` whose backward multiplies the output cotangents by
  the step's Jacobian (:meth:`Physics.vjp`);
- jax: a ``jax.custom_vjp`` function over ``jax.pure_callback``, so it works under
  ``jit``, ``vmap``, ``grad`` and ``lax.scan``.

Jacobians are computed in the backward pass, from the saved inputs, so a forward pass
costs one physics step whether or not gradients are recorded. The warm start of the
constraint solver passes through without gradient.
"""

from __future__ import annotations

import functools
from typing import Any

import numpy as np

from gradgym.envs.backends import ARRAY_BACKENDS
from gradgym.envs.mujoco.physics import Physics


def namespace_kind(xp: Any) -> str:
    """The array backend (one of ``ARRAY_BACKENDS``) of an array namespace."""
    name = getattr(xp, "__name__", "").removeprefix("array_api_compat.")
    for kind in ARRAY_BACKENDS:
        if name == kind or name.startswith(kind + "."):
            return kind
    raise TypeError(
        f"MuJoCo tasks run on {', '.join(ARRAY_BACKENDS)}; got array namespace {name!r}"
    )


def physics_step(xp: Any, physics: Physics, qpos: Any, qvel: Any, ctrl: Any,
                 warmstart: Any) -> tuple[Any, Any, Any, Any]:
    """One env step of a batch: ``(qpos, qvel, readouts, warmstart)`` in the inputs'
    backend and dtype, differentiable on torch and jax with respect to qpos, qvel, ctrl."""
    kind = namespace_kind(xp)
    if kind == "torch":
        return _torch_step.apply(physics, qpos, qvel, ctrl, warmstart)
    if kind == "jax":
        return _jax_step(physics)(qpos, qvel, ctrl, warmstart)
    out = physics.step(qpos, qvel, ctrl, warmstart)
    dtype = qpos.dtype
    return (out.qpos.astype(dtype, copy=False), out.qvel.astype(dtype, copy=False),
            out.readouts.astype(dtype, copy=False), out.warmstart.astype(dtype, copy=False))


def physics_readouts(xp: Any, physics: Physics, qpos: Any, qvel: Any) -> Any:
    """The readouts of freshly set states (:meth:`Physics.forward`), without gradient."""
    kind = namespace_kind(xp)
    if kind == "jax":
        import jax

        shape = jax.ShapeDtypeStruct(qpos.shape[:-1] + (physics.readout_size,), qpos.dtype)
        return jax.pure_callback(
            lambda q, v: physics.forward(np.asarray(q), np.asarray(v)).astype(q.dtype),
            shape, qpos, qvel, vmap_method="broadcast_all",
        )
    if kind == "torch":
        import torch

        out = physics.forward(_torch_to_numpy(qpos), _torch_to_numpy(qvel))
        return torch.as_tensor(out, dtype=qpos.dtype, device=qpos.device)
    return physics.forward(qpos, qvel).astype(qpos.dtype, copy=False)


# ---------------------------------------------------------------------------- torch
def _torch_to_numpy(x: Any) -> np.ndarray:
    return x.detach().cpu().numpy()


def _torch_function() -> type:
    import torch

    class TorchStep(torch.autograd.Function):
        """MuJoCo env step with a Jacobian-vector-product backward."""

        @staticmethod
        def forward(ctx, physics, qpos, qvel, ctrl, warmstart):
            out = physics.step(*(_torch_to_numpy(x) for x in (qpos, qvel, ctrl, warmstart)))
            ctx.physics = physics
            ctx.save_for_backward(qpos, qvel, ctrl, warmstart)
            like = {"dtype": qpos.dtype, "device": qpos.device}
            warm = torch.as_tensor(out.warmstart, **like)
            ctx.mark_non_differentiable(warm)
            return (torch.as_tensor(out.qpos, **like), torch.as_tensor(out.qvel, **like),
                    torch.as_tensor(out.readouts, **like), warm)

        @staticmethod
        def backward(ctx, grad_qpos, grad_qvel, grad_readouts, _grad_warmstart):
            inputs = [_torch_to_numpy(x) for x in ctx.saved_tensors]
            grads = ctx.physics.vjp(*inputs, *(_torch_to_numpy(g) for g in
                                               (grad_qpos, grad_qvel, grad_readouts)))
            like = ctx.saved_tensors[0]
            return (None, *(torch.as_tensor(g, dtype=like.dtype, device=like.device)
                            for g in grads), None)

    return TorchStep


class _LazyTorchStep:
    """Defers importing torch until a torch env steps."""

    @functools.cached_property
    def apply(self) -> Any:
        import torch

        # torch.compile stops at the host call (a graph break) instead of tracing MuJoCo
        return torch.compiler.disable(_torch_function().apply)


_torch_step = _LazyTorchStep()


# ---------------------------------------------------------------------------- jax
@functools.cache
def _jax_step(physics: Physics) -> Any:
    """The jax operation of ``physics`` (one per Physics, so jit caches stay valid)."""
    import jax

    def host_step(qpos, qvel, ctrl, warmstart):
        out = physics.step(*(np.asarray(x) for x in (qpos, qvel, ctrl, warmstart)))
        dtype = np.asarray(qpos).dtype
        return tuple(x.astype(dtype) for x in (out.qpos, out.qvel, out.readouts, out.warmstart))

    def host_vjp(qpos, qvel, ctrl, warmstart, grad_qpos, grad_qvel, grad_readouts):
        args = [np.asarray(x) for x in (qpos, qvel, ctrl, warmstart, grad_qpos, grad_qvel,
                                        grad_readouts)]
        dtype = args[0].dtype
        return tuple(g.astype(dtype) for g in physics.vjp(*args))

    def output_shapes(qpos, qvel, warmstart):
        lead = qpos.shape[:-1]
        return (
            jax.ShapeDtypeStruct(qpos.shape, qpos.dtype),
            jax.ShapeDtypeStruct(qvel.shape, qpos.dtype),
            jax.ShapeDtypeStruct(lead + (physics.readout_size,), qpos.dtype),
            jax.ShapeDtypeStruct(warmstart.shape, qpos.dtype),
        )

    @jax.custom_vjp
    def step(qpos, qvel, ctrl, warmstart):
        return jax.pure_callback(host_step, output_shapes(qpos, qvel, warmstart),
                                 qpos, qvel, ctrl, warmstart, vmap_method="broadcast_all")

    def step_fwd(qpos, qvel, ctrl, warmstart):
        return step(qpos, qvel, ctrl, warmstart), (qpos, qvel, ctrl, warmstart)

    def step_bwd(saved, cotangents):
        qpos, qvel, ctrl, warmstart = saved
        grad_qpos, grad_qvel, grad_readouts, _ = cotangents
        shapes = tuple(jax.ShapeDtypeStruct(x.shape, x.dtype) for x in (qpos, qvel, ctrl))
        grads = jax.pure_callback(host_vjp, shapes, qpos, qvel, ctrl, warmstart, grad_qpos,
                                  grad_qvel, grad_readouts, vmap_method="broadcast_all")
        return (*grads, jax.numpy.zeros_like(warmstart))

    step.defvjp(step_fwd, step_bwd)
    return step
