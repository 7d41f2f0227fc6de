"""Where the compiled torch rollout's time goes: dynamo's call path against a direct call.

The compiled torch path (``pipeline.torch_compile=true``) calls a ``torch.compile``d chunk
of env steps ``T / chunk`` times per rollout, forward and backward. Each call's kernel takes
tens of microseconds; the rest is per-call overhead. This probe times one trajectory loss
and its gradient (B = 32, T = 100, as in benchmarks/pipeline_speed.py), in one process with
the variants interleaved (a shared machine's load hits them alike):

- ``dynamo``: the pipeline's ``CompiledChunks`` (dynamo guards and frame wrapper, AOT
  autograd's runtime wrappers, inductor's Python wrapper);
- ``direct``: the same chunk traced with ``make_fx`` and compiled with inductor's
  ``compile_fx`` (AOT autograd + inductor, no dynamo), called without guards;
- ``export``: the chunk exported with ``torch.export`` and compiled ahead of time by
  AOTInductor, and its VJP (traced with ``make_fx``, the forward recomputed) likewise, both
  called from one ``torch.autograd.Function`` per chunk: no dynamo, no AOT autograd
  wrappers, C++ wrappers around the kernels;
- ``loop``: the pipeline's ``CompiledLoop`` (the default where the step traces into one
  graph): one compiled forward and one backward ``while_loop`` in C++ per rollout,
  ``--chunk`` steps unrolled per loop iteration;
- ``<variant>+<option>=<value>``: a variant compiled with inductor options (one or more,
  each after a ``+``), e.g. ``dynamo+cpp.simdlen=1`` or ``dynamo+cpp_wrapper=1+cpp.simdlen=1``.

    python benchmarks/torch_chunk_overhead.py --env CartPole --variants dynamo direct
    python benchmarks/torch_chunk_overhead.py --variants dynamo dynamo+cpp.simdlen=1
    python benchmarks/torch_chunk_overhead.py --variants dynamo+cpp.simdlen=1 export+cpp.simdlen=1

Compile seconds are wall and CPU (this process and its compiler subprocesses); the CPU
figure is the one to compare on a loaded machine. Cold or warm depends on ``--cache``.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import resource
import statistics
import tempfile
import time
from collections.abc import Callable
from typing import Any

import torch

import gradgym
from gradgym.pipelines import _torch
from gradgym.pipelines._rollout import start_states, transition, tree_leaves, tree_map
from gradgym.pipelines._torch import CompiledChunks, _unrolled
from gradgym.pipelines._torch_loop import CompiledLoop
from gradgym.pipelines.compile_cache import enable_compile_cache
from gradgym.pipelines.trajectory import open_loop_action, packed_open_loop_loss

BATCH, HORIZON = 32, 100


class DirectChunk:
    """A chunk traced with ``make_fx`` and compiled by inductor, called without dynamo.

    Only for this probe: it has no guards (every call must see the first call's shapes,
    dtypes and ``requires_grad`` flags) and relies on inductor internals.
    """

    def __init__(self, fn: Callable, options: dict[str, Any]):
        self.fn, self.options = fn, options
        self.compiled: Callable | None = None
        self.out_tree: Any = None

    def __call__(self, *args: Any) -> Any:
        tensors = [leaf for leaf in tree_leaves(args) if isinstance(leaf, torch.Tensor)]
        if self.compiled is None:
            self.compiled = self._compile(args, tensors)
        outputs = iter(self.compiled(*tensors))
        return tree_map(lambda leaf: next(outputs), self.out_tree)

    def _compile(self, args: Any, tensors: list[torch.Tensor]) -> Callable:
        from torch._guards import TracingContext, tracing
        from torch._inductor.compile_fx import compile_fx
        from torch._subclasses.fake_tensor import FakeTensorMode
        from torch.fx.experimental.proxy_tensor import make_fx
        from torch.fx.experimental.symbolic_shapes import ShapeEnv

        def flat(*flat_tensors: torch.Tensor) -> tuple:
            it = iter(flat_tensors)
            rebuilt = tree_map(lambda leaf: next(it) if isinstance(leaf, torch.Tensor) else leaf, args)
            self.out_tree = self.fn(*rebuilt)
            return tuple(tree_leaves(self.out_tree))

        graph = make_fx(flat)(*tensors)
        # inductor's FX graph and AOT autograd caches need a shape env (dynamo brings one)
        context = TracingContext(FakeTensorMode(shape_env=ShapeEnv()))
        with torch._inductor.config.patch(self.options), tracing(context):
            return compile_fx(graph, tensors)


class ExportChunk:
    """A chunk (``params=None``: trajectory) exported with ``torch.export`` and compiled by
    AOTInductor, forward and VJP, run by :class:`_ExportedChunk`.

    Only for this probe: every call must see the first call's shapes and dtypes (inputs are
    made contiguous: the compiled kernels assume the example's strides)."""

    def __init__(self, fn: Callable, options: dict[str, Any]):
        self.fn, self.options = fn, options
        self.forward: Callable | None = None
        self.vjp: Callable | None = None
        self.carry_tree: Any = None  # the structure of the carry, set by every call
        self.out_tree: Any = None
        self.float_outputs: list[torch.Tensor] = []
        self.is_float: list[bool] = []

    def __call__(self, params: Any, carry: Any, xs: torch.Tensor) -> Any:
        assert params is None, "the export probe runs open-loop (trajectory) chunks"
        self.carry_tree = carry
        inputs = [leaf.contiguous() for leaf in tree_leaves(carry)] + [xs.contiguous()]
        if self.forward is None:
            self._compile(inputs)
        outputs = iter(_ExportedChunk.apply(self, *inputs))
        return tree_map(lambda leaf: next(outputs), self.out_tree)

    def flat(self, *inputs: torch.Tensor) -> tuple:
        leaves = iter(inputs[:-1])
        carry = tree_map(lambda leaf: next(leaves), self.carry_tree)
        self.out_tree = self.fn(None, carry, inputs[-1])
        return tuple(tree_leaves(self.out_tree))

    def flat_vjp(self, *inputs_and_cotangents: torch.Tensor) -> tuple:
        count = len(inputs_and_cotangents) - len(self.float_outputs)
        inputs, cotangents = inputs_and_cotangents[:count], inputs_and_cotangents[count:]

        def float_outputs(*args: torch.Tensor) -> tuple:
            return tuple(out for out in self.flat(*args) if out.is_floating_point())

        _, pullback = torch.func.vjp(float_outputs, *inputs)
        return pullback(tuple(cotangents))

    def _compile(self, inputs: list[torch.Tensor]) -> None:
        from torch.fx.experimental.proxy_tensor import make_fx

        folder = tempfile.mkdtemp(prefix="gradgym-export-")

        def aot(module: torch.nn.Module | Callable, args: tuple, name: str) -> Callable:
            program = torch.export.export(module, args)
            package = torch._inductor.aoti_compile_and_package(
                program, package_path=os.path.join(folder, f"{name}.pt2"),
                inductor_configs=self.options)
            return torch._inductor.aoti_load_package(package)

        outputs = self.flat(*inputs)
        self.is_float = [out.is_floating_point() for out in outputs]
        self.float_outputs = [out for out in outputs if out.is_floating_point()]
        self.forward = aot(_AsModule(self.flat), tuple(inputs), "forward")
        cotangents = tuple(torch.ones_like(out) for out in self.float_outputs)
        traced_vjp = make_fx(self.flat_vjp)(*inputs, *cotangents)
        self.vjp = aot(traced_vjp, tuple(inputs) + cotangents, "vjp")


class _AsModule(torch.nn.Module):
    """A function as the module ``torch.export`` takes."""

    def __init__(self, fn: Callable):
        super().__init__()
        self.fn = fn

    def forward(self, *args: torch.Tensor) -> Any:
        return self.fn(*args)


class _ExportedChunk(torch.autograd.Function):
    """One exported chunk under autograd: its inputs are kept, its VJP recomputes the forward."""

    @staticmethod
    def forward(ctx: Any, chunk: ExportChunk, *inputs: torch.Tensor) -> tuple:
        ctx.chunk = chunk
        ctx.save_for_backward(*inputs)
        outputs = tuple(chunk.forward(*inputs))
        ctx.mark_non_differentiable(*[out for out in outputs if not out.is_floating_point()])
        return outputs

    @staticmethod
    def backward(ctx: Any, *grads: torch.Tensor) -> tuple:
        chunk = ctx.chunk
        float_grads = [g for g, is_float in zip(grads, chunk.is_float) if is_float]
        cotangents = [torch.zeros_like(out) if g is None else g.contiguous()
                      for g, out in zip(float_grads, chunk.float_outputs)]
        return (None, *chunk.vjp(*ctx.saved_tensors, *cotangents))


class ProbeChunks(CompiledChunks):
    """``CompiledChunks`` whose chunk is compiled by one probe variant."""

    def __init__(self, step: Callable, chunk: int, variant: str):
        super().__init__(step, chunk)
        self.kind, *options = variant.split("+")
        self.options = {}
        for option in options:
            name, value = option.split("=")
            self.options[name] = int(value) if name != "cpp_wrapper" else bool(int(value))

    def compiled(self, length: int) -> Callable:
        if length not in self._compiled:
            fn = _unrolled(self.step, length)
            if self.kind == "direct":
                self._compiled[length] = DirectChunk(fn, self.options)
            elif self.kind == "export":
                self._compiled[length] = ExportChunk(fn, self.options)
            else:
                self._compiled[length] = torch.compile(fn, dynamic=False, options=self.options)
        return self._compiled[length]


def cpu_seconds() -> float:
    """CPU seconds of this process and its finished children (inductor's C++ compiles)."""
    own, children = (resource.getrusage(who) for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN))
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--env", default="CartPole")
    parser.add_argument("--chunk", type=int, default=10)
    parser.add_argument("--iters", type=int, default=300, help="timed iterations per variant")
    parser.add_argument("--cache", default=None, help="compile cache folder (default: a new one)")
    parser.add_argument("--variants", nargs="+", default=["dynamo", "direct"])
    args = parser.parse_args()
    torch.set_num_threads(1)
    enable_compile_cache(args.cache or tempfile.mkdtemp(prefix="gradgym-probe-"))

    env = gradgym.make(args.env, backend="torch")
    step = functools.partial(transition, env, functools.partial(open_loop_action, env.xp))
    start = _torch.stack_members([start_states(env, 0, BATCH)])
    generator = torch.Generator().manual_seed(0)
    shape = (1, BATCH, HORIZON, env.spec.act_dim)
    logits = (torch.rand(shape, generator=generator) * 4 - 2).requires_grad_(True)

    def gradient(loss_fn: Callable) -> torch.Tensor:
        logits.grad = None
        loss_fn(logits, start)[0].sum().backward()
        return logits.grad

    losses, report = {}, {}
    for variant in args.variants:
        if variant == "loop":
            chunks = CompiledLoop(step, args.chunk, simd=True)
        else:
            chunks = ProbeChunks(step, args.chunk, variant)
        losses[variant] = functools.partial(packed_open_loop_loss, env, _torch, chunks, HORIZON)
        wall, cpu = time.perf_counter(), cpu_seconds()
        first = gradient(losses[variant])
        report[variant] = {"compile_s": round(time.perf_counter() - wall, 1),
                           "compile_cpu_s": round(cpu_seconds() - cpu, 1),
                           "max_grad_diff": float((first - gradient(losses[args.variants[0]])).abs().max())}
    times: dict[str, list[float]] = {variant: [] for variant in args.variants}
    for _ in range(args.iters):
        for variant, loss_fn in losses.items():
            began = time.perf_counter()
            gradient(loss_fn)
            times[variant].append(time.perf_counter() - began)
    for variant, seconds in times.items():
        report[variant].update(min_ms=round(1e3 * min(seconds), 3),
                               median_ms=round(1e3 * statistics.median(seconds), 3))
    load = [round(figure, 2) for figure in os.getloadavg()]
    print(json.dumps({"env": args.env, "chunk": args.chunk, "load": load, "variants": report}, indent=1))


if __name__ == "__main__":
    main()
