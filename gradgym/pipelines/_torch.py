"""torch side of the pipelines: autograd through a Python-loop rollout, torch.optim.

With ``cfg.torch_compile`` (true or false here: the pipelines decide ``"auto"`` first, see
``config.torch_compiles``) the rollout runs compiled. Where the env's step traces into one
graph (the classic envs) a rollout is a :class:`~gradgym.pipelines._torch_loop.CompiledLoop`:
one compiled forward loop and one compiled backward loop, in C++, per rollout; a loss that
has a ``value_and_grad`` (the pipelines' whole-horizon losses) runs both loops and its own
VJP in one compiled call, without autograd (see :class:`Trainer`). A MuJoCo step
calls the host, so there the rollout runs in *chunks*: ``torch_compile_chunk`` env steps
(policy + env step, unrolled) are one ``torch.compile``d function, called ``T / chunk``
times per rollout, with autograd between chunks. Either way every call sees the same
shapes, dtypes and ``requires_grad`` flags, so it is compiled once (training and
evaluation share the graphs).

The metrics of an iteration come to the host in one transfer before the optimizer step;
the step is skipped on the host when the gradient has a non-finite entry.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from gradgym.pipelines._rollout import (
    generators_each,
    loop_scan,
    member_of,
    normal_each,
    split_each,
    stack_trees,
    tree_leaves,
    tree_map,
)
from gradgym.pipelines._torch_loop import CompiledLoop, largest_divisor, with_own_code
from gradgym.pipelines.config import ADAMW_WEIGHT_DECAY, steps_in_graph

xp = torch
no_grad = torch.no_grad

LossFn = Callable[[Any, Any], tuple[Any, Any]]  # (params, inputs) -> (loss, returns [B])


def stop_gradient(tree: Any) -> Any:
    """The same values with no gradient flowing back through them."""
    return tree_map(lambda leaf: leaf.detach(), tree)


def compile_step(step: Callable, cfg: Any, env_name: str) -> Callable:
    """``step`` whose rollouts run compiled when ``cfg.torch_compile``, else as is: as one
    compiled forward and backward loop where the step traces into one graph, else in
    compiled chunks."""
    if not cfg.torch_compile:
        return step
    if steps_in_graph(env_name):
        return CompiledLoop(step, cfg.torch_compile_chunk, cfg.torch_compile_simd)
    return CompiledChunks(step, cfg.torch_compile_chunk, cfg.torch_compile_simd)


def scan(step: Callable, params: Any, carry: Any, xs: Any, length: int) -> tuple[Any, Any]:
    """``lax.scan`` semantics: a Python loop of ``step``, or its compiled loop or chunks."""
    if isinstance(step, (CompiledChunks, CompiledLoop)):
        return step.scan(params, carry, xs, length)
    return loop_scan(torch.stack, step, params, carry, xs, length)


class CompiledChunks:
    """A per-step function whose rollouts call ``torch.compile``d chunks of ``chunk`` steps
    (steps that call the host, which a compiled loop cannot hold).

    Each call pays torch.compile's per-call overhead (guards, AOT autograd wrappers) twice
    per iteration (forward and backward): larger chunks run faster and compile slower.

    A rollout (or window) of ``length`` steps uses the largest divisor of ``length`` that is
    at most ``chunk``, so every call of a chunk has the same shapes (one compilation);
    a prime horizon falls back to chunks of one step. Called directly, it is the plain step.

    ``simd=False`` has inductor write scalar CPU loops (``cpp.simdlen=1``) instead of
    vectorized ones: about half the compile time, for iterations about 10% slower when
    every op works on a ``[B]`` vector of a few dozen entries (an env step); layers of a
    network gain more from SIMD. No effect on GPU kernels.
    """

    def __init__(self, step: Callable, chunk: int, simd: bool = True):
        self.step, self.chunk = step, int(chunk)
        self._options = None if simd else {"cpp.simdlen": 1}
        self._compiled: dict[int, Callable] = {}

    def __call__(self, params: Any, carry: Any, x: Any) -> tuple[Any, Any]:
        return self.step(params, carry, x)

    def chunk_length(self, length: int) -> int:
        """Steps per compiled call for a rollout of ``length`` steps."""
        return largest_divisor(length, self.chunk)

    def compiled(self, length: int) -> Callable:
        """The compiled function of ``length`` unrolled steps (compiled on first call)."""
        if length not in self._compiled:
            self._compiled[length] = torch.compile(
                _unrolled(self.step, length), dynamic=False, fullgraph=False,
                options=self._options,
            )
        return self._compiled[length]

    def scan(self, params: Any, carry: Any, xs: Any, length: int) -> tuple[Any, Any]:
        """``length`` steps from ``carry``: per-step outputs stacked on axis 0."""
        size = self.chunk_length(length)
        run = self.compiled(size)
        outputs = []
        for begin in range(0, length, size):
            if torch.is_grad_enabled():  # the same requires_grad flags on every call
                carry = tree_map(_requiring_grad, carry)
            carry, output = run(params, carry, None if xs is None else xs[begin : begin + size])
            outputs.append(output)
        return carry, tuple(torch.cat(list(column)) for column in zip(*outputs))


def _unrolled(step: Callable, length: int) -> Callable:
    """``length`` steps of ``step`` as one function with a code object of its own (one per
    pipeline: see :func:`~gradgym.pipelines._torch_loop.with_own_code`)."""

    def chunk(params: Any, carry: Any, xs: Any) -> tuple[Any, Any]:
        return loop_scan(torch.stack, step, params, carry, xs, length)

    return with_own_code(chunk, f"chunk_of_{length}")


def _requiring_grad(leaf: torch.Tensor) -> torch.Tensor:
    """A float leaf that does not require grad (a start state) as one that does: its
    unused gradient costs nothing and the compiled chunk sees one set of flags."""
    if leaf.requires_grad or not leaf.is_floating_point():
        return leaf
    return leaf.detach().requires_grad_(True)


def make_optimizer(params: list[torch.Tensor], cfg: Any):
    """``(optimizer, scheduler or None)`` of ``cfg`` from ``torch.optim``.

    Fused: one C++ kernel per step, about 60 µs against foreach's 140 on one CPU thread
    here (the update of a compiled trajectory iteration of about 2 ms)."""
    optimizers = {
        "adam": lambda: torch.optim.Adam(params, lr=cfg.lr, fused=True),
        "adamw": lambda: torch.optim.AdamW(
            params, lr=cfg.lr, weight_decay=ADAMW_WEIGHT_DECAY, fused=True
        ),
        "sgd": lambda: torch.optim.SGD(params, lr=cfg.lr, fused=True),
    }
    optimizer = optimizers[cfg.optimizer]()
    schedulers = {
        "constant": lambda: None,
        "cosine": lambda: torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=cfg.iters),
        "linear": lambda: torch.optim.lr_scheduler.LinearLR(
            optimizer, start_factor=1.0, end_factor=0.0, total_iters=cfg.iters
        ),
    }
    return optimizer, schedulers[cfg.lr_schedule]()


def stack_members(trees: list[Any]) -> Any:
    """Member trees stacked along a new leading (member) axis."""
    return stack_trees(torch, trees)


class _Member:
    """One member's leaf tensors, ``torch.optim`` optimizer and scheduler."""

    def __init__(self, params: Any, cfg: Any):
        self.params = tree_map(lambda p: p.detach().clone().requires_grad_(True), params)
        self.leaves = tree_leaves(self.params)
        for leaf in self.leaves:
            leaf.grad = torch.zeros_like(leaf)
        self.optimizer, self.scheduler = make_optimizer(self.leaves, cfg)
        self.grad_clip = float(cfg.grad_clip)

    def update(self, grad_norm: torch.Tensor) -> None:
        """Clip (with the norm already computed) and step, as a lone run does."""
        if self.grad_clip > 0:
            torch.nn.utils.clip_grads_with_norm_(
                self.leaves, self.grad_clip, grad_norm, foreach=True
            )
        self.optimizer.step()
        if self.scheduler is not None:
            self.scheduler.step()


class Trainer:
    """Gradient descent for a pack of ``M`` members with torch autograd and ``torch.optim``.

    ``loss_fn(params, inputs) -> (losses [M], returns [M, B])`` takes parameters with a
    leading member axis and computes every member at once (the pipelines fold the members
    into the env batch), so a pack costs one eager rollout instead of ``M``. Each member
    keeps its own leaf tensors, optimizer, scheduler and clipping: they are stacked for the
    forward pass, and each member's gradient lands in its own leaves. Members are
    independent, so the gradient of the sum of the losses is every member's own gradient;
    a member's steps are those of its lone run (a lone run is a pack of one).

    Compiled, a loss with a ``value_and_grad(params, inputs) -> (losses, returns, grads)``
    (other than ``None``) gives its gradient itself, in one compiled call, and no autograd
    graph is built (see ``trajectory.OpenLoopLoss``, ``policy.PolicyLoss``).
    """

    def __init__(self, loss_fn: LossFn, params: list[Any], cfgs: list[Any]):
        self._members = [_Member(p, cfg) for p, cfg in zip(params, cfgs)]
        self._loss_fn = loss_fn
        self._compiled = bool(cfgs[0].torch_compile)
        fused = getattr(loss_fn, "value_and_grad", None)
        self._value_and_grad = fused if self._compiled else None
        self._flat_grad: torch.Tensor | None = None

    @property
    def params(self) -> Any:
        """The current parameters with a leading member axis (a detached copy)."""
        with torch.no_grad():
            return self._stacked()

    def _stacked(self) -> Any:
        """The members' leaves stacked for the forward pass (gradients flow back to them)."""
        return stack_members([member.params for member in self._members])

    def compile(self, inputs: Any, eval_inputs: Any | None = None) -> float:
        """Trigger ``torch.compile`` (a gradient and an evaluation on a copy of the
        parameters, nothing applied); returns the seconds spent, 0 in eager mode."""
        if not self._compiled:
            return 0.0
        began = time.perf_counter()
        if self._value_and_grad is not None:
            for batch in (inputs, eval_inputs):
                if batch is not None:
                    self._value_and_grad(self.params, batch)  # it evaluates, too
            return time.perf_counter() - began
        scratch = tree_map(lambda p: p.requires_grad_(True), self.params)
        losses, _ = self._loss_fn(scratch, inputs)
        losses.sum().backward()
        if eval_inputs is not None:
            self._loss_fn(scratch, eval_inputs)  # evaluations run with autograd on, too
        return time.perf_counter() - began

    def step(self, inputs: Any) -> list[list[float]]:
        """One update of every member; per member ``GRADIENT_STEP_METRICS`` before it."""
        if self._value_and_grad is not None:
            losses, returns, flat = self._fused_gradients(inputs)
        else:
            losses, returns, flat = self._autograd_gradients(inputs)
        grad_norms = torch.linalg.vector_norm(flat, dim=1)
        metrics = torch.stack(
            [
                returns.mean(dim=1),
                returns.amin(dim=1),
                returns.amax(dim=1),
                losses,
                grad_norms,
                flat.abs().amax(dim=1),
                (~torch.isfinite(flat)).sum(dim=1).to(flat.dtype),
            ],
            dim=1,
        ).tolist()  # the one host sync of the iteration
        self._flat_grad = flat
        norms = grad_norms.unbind()
        for member, row, norm in zip(self._members, metrics, norms):
            if row[-1] == 0:  # every gradient entry of this member is finite
                member.update(norm)
        return metrics

    def _autograd_gradients(self, inputs: Any) -> tuple[torch.Tensor, ...]:
        """``(losses, returns, flat gradients [M, n_params])``; the members' gradients into
        their leaves' ``grad``."""
        losses, returns = self._loss_fn(self._stacked(), inputs)
        for member in self._members:
            member.optimizer.zero_grad(set_to_none=False)  # zeros where the loss has no path
        if losses.requires_grad:  # e.g. a constant reward whose only dependence is via done
            losses.sum().backward()
        columns = zip(*(member.leaves for member in self._members))
        grads = [torch.stack([leaf.grad for leaf in column]) for column in columns]
        return losses.detach(), returns.detach(), _flat(grads)

    def _fused_gradients(self, inputs: Any) -> tuple[torch.Tensor, ...]:
        """:meth:`_autograd_gradients` by the loss's own ``value_and_grad``."""
        losses, returns, grads = self._value_and_grad(self.params, inputs)
        for index, member in enumerate(self._members):
            for leaf, grad in zip(member.leaves, tree_leaves(member_of(grads, index))):
                leaf.grad.copy_(grad)
        return losses, returns, _flat(tree_leaves(grads))

    def snapshot(self) -> Any:
        """A copy of the current parameters (the optimizers update them in place)."""
        return self.params

    member = staticmethod(member_of)

    def returns(self, inputs: Any) -> np.ndarray:
        """The returns ``[M, B]`` of the current parameters from ``inputs``, on the host.

        Compiled, the training program serves (another would cost a compile): the loss's
        own ``value_and_grad`` (its gradient unused), or the loss with autograd on (the graph
        dropped), where ``no_grad`` would compile another one.
        """
        if self._value_and_grad is not None:
            return self._value_and_grad(self.params, inputs)[1].numpy()
        if self._compiled:
            return self._loss_fn(self._stacked(), inputs)[1].detach().numpy()
        with torch.no_grad():
            return self._loss_fn(self.params, inputs)[1].numpy()

    def gradients(self, index: int) -> np.ndarray:
        """Member ``index``'s gradient of the last step (before clipping), flat, on the host."""
        return self._flat_grad[index].numpy().copy()


def _flat(grads: list[torch.Tensor]) -> torch.Tensor:
    """Gradient leaves with a leading member axis as one ``[M, n_params]`` tensor."""
    if len(grads) == 1:
        return grads[0].reshape(grads[0].shape[0], -1)
    return torch.cat([g.reshape(g.shape[0], -1) for g in grads], dim=1)


# ---------------------------------------------------------------------- zeroth order (CEM)


def compile_function(fn: Callable, *example_args: Any) -> tuple[Callable, float]:
    """``fn`` as is (eager, no gradients) and no compile time."""
    return torch.no_grad()(fn), 0.0


def top_k_indices(values: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the ``k`` largest entries along the last axis."""
    return torch.topk(values, k, dim=-1).indices


def take_along_axis(values: torch.Tensor, indices: torch.Tensor, axis: int) -> torch.Tensor:
    """``numpy.take_along_axis`` on tensors (indices broadcast)."""
    return torch.take_along_dim(values, indices, dim=axis)


# Per member: its own generator, as in its lone run.
member_generators = generators_each
split_members = split_each
member_normal = normal_each
