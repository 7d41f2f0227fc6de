"""torch side of the pipelines: autograd through a Python-loop rollout, torch.optim.

With ``cfg.torch_compile`` the per-step function (policy + env step) is compiled with
``torch.compile``; the rollout loop and autograd stay in Python. Compiling the whole
100-step rollout instead takes minutes.

The metrics of an iteration come to the host in one transfer before the optimizer step;
the step is skipped on the host when the gradient has a non-finite entry.
"""

from __future__ import annotations

import functools
import time
from typing import Any, Callable, Optional

import numpy as np
import torch

from gradgym.pipelines._rollout import loop_scan, tree_leaves, tree_map
from gradgym.pipelines.config import ADAMW_WEIGHT_DECAY

xp = torch
no_grad = torch.no_grad
scan = functools.partial(loop_scan, torch.stack)

LossFn = Callable[[Any, Any], tuple[Any, Any]]  # (params, inputs) -> (loss, returns [B])


def stop_gradient(tree: Any) -> Any:
    """The same values with no gradient flowing back through them."""
    return tree_map(lambda leaf: leaf.detach(), tree)


def compile_step(step: Callable, cfg: Any) -> Callable:
    """``torch.compile`` of the per-step function when ``cfg.torch_compile``, else as is."""
    return torch.compile(step, dynamic=False) if cfg.torch_compile else step


def make_optimizer(params: list[torch.Tensor], cfg: Any):
    """``(optimizer, scheduler or None)`` of ``cfg`` from ``torch.optim``."""
    optimizers = {
        "adam": lambda: torch.optim.Adam(params, lr=cfg.lr, foreach=True),
        "adamw": lambda: torch.optim.AdamW(
            params, lr=cfg.lr, weight_decay=ADAMW_WEIGHT_DECAY, foreach=True
        ),
        "sgd": lambda: torch.optim.SGD(params, lr=cfg.lr, foreach=True),
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


class Trainer:
    """Gradient descent on ``loss_fn`` with torch autograd and a ``torch.optim`` optimizer."""

    def __init__(self, loss_fn: LossFn, params: Any, cfg: Any):
        self.params = tree_map(lambda p: p.detach().clone().requires_grad_(True), params)
        self._leaves = tree_leaves(self.params)
        for leaf in self._leaves:
            leaf.grad = torch.zeros_like(leaf)
        self._optimizer, self._scheduler = make_optimizer(self._leaves, cfg)
        self._loss_fn = loss_fn
        self._grad_clip = cfg.grad_clip
        self._compiled = bool(cfg.torch_compile)
        self._flat_grad: Optional[torch.Tensor] = None

    def compile(self, inputs: Any, eval_inputs: Optional[Any] = None) -> float:
        """Trigger ``torch.compile`` (a gradient and an evaluation on a copy of the
        parameters, nothing applied); returns the seconds spent, 0 in eager mode."""
        if not self._compiled:
            return 0.0
        began = time.perf_counter()
        scratch = tree_map(lambda p: p.detach().clone().requires_grad_(True), self.params)
        loss, _ = self._loss_fn(scratch, inputs)
        loss.backward()
        for batch in (inputs, eval_inputs):
            if batch is not None:
                self.returns(scratch, batch)
        return time.perf_counter() - began

    def step(self, inputs: Any) -> list[float]:
        """One update; ``GRADIENT_STEP_METRICS`` at the parameters before it."""
        loss, returns = self._loss_fn(self.params, inputs)
        self._optimizer.zero_grad(set_to_none=False)  # zeros where the loss has no path
        if loss.requires_grad:  # e.g. a constant reward whose only dependence is through done
            loss.backward()
        flat = torch.cat([p.grad.reshape(-1) for p in self._leaves])
        metrics = torch.stack(
            [
                returns.mean(),
                returns.min(),
                returns.max(),
                loss.detach(),
                torch.linalg.vector_norm(flat),
                flat.abs().max(),
                (~torch.isfinite(flat)).sum().to(flat.dtype),
            ]
        ).tolist()  # the one host sync of the iteration
        self._flat_grad = flat
        if metrics[-1] == 0:  # every gradient entry is finite
            if self._grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(self._leaves, self._grad_clip, foreach=True)
            self._optimizer.step()
            if self._scheduler is not None:
                self._scheduler.step()
        return metrics

    def snapshot(self) -> Any:
        """A copy of the current parameters (the optimizer updates them in place)."""
        return tree_map(lambda p: p.detach().clone(), self.params)

    def returns(self, params: Any, inputs: Any) -> np.ndarray:
        """The return ``[B]`` of ``params`` from ``inputs``, on the host."""
        with torch.no_grad():
            return self._loss_fn(params, inputs)[1].numpy()

    def gradients(self) -> np.ndarray:
        """The gradient of the last step (before clipping), flat, on the host."""
        return self._flat_grad.numpy().copy()


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
