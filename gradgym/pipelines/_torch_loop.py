"""A compiled torch rollout as two native loops: the steps forward, their VJPs in reverse.

``torch.compile`` of a whole unrolled rollout runs fastest but takes minutes to compile;
compiled chunks called from Python pay 100-500 µs of wrappers per call (see
``CompiledChunks``). Here a rollout of ``T`` steps is one autograd node whose forward is
one compiled ``while_loop`` over the steps and whose backward is one compiled
``while_loop`` over the steps' VJPs in reverse. With inductor's C++ wrapper the loops run
in C++: a step costs a fused kernel and a few µs, and only one step (or ``unroll`` steps)
and its VJP are compiled, whatever ``T`` is.

- The forward loop writes every step's outputs and the carry it started from into
  preallocated ``[T, ...]`` buffers (in place: a loop's carry may not grow).
- The backward loop reads those carries, runs the step's VJP (traced once with
  ``make_fx``: functorch transforms cannot run inside a traced loop) and carries the
  cotangent of the carry and the summed cotangent of the parameters; the cotangents of the
  scanned inputs go into a ``[T, ...]`` buffer.

The backward loop is built here because torch 2.13's own gradients of loops do not compile
with the C++ wrapper (``while_loop``'s autograd: not implemented; ``scan``'s: a C++ compile
error).

Training needs less: :meth:`CompiledLoop.value_and_grad` runs the forward loop, a
reduction of the rollout (the losses) and its VJP, and the backward loop as one compiled
call, with no autograd graph: the pipelines' whole-horizon gradients take this path, the
autograd node serves truncated windows and custom losses.

Inside the loops, states are kept batch-last (``[..., B]``): inductor vectorizes along a
kernel's innermost axis, and batch-first ``[B, 2]`` states gave it two-lane vectors.

Every float leaf of the parameters, the start carry and the scanned inputs gets its
gradient; other leaves (ints, bools) pass through. The step must trace into one graph (no
host calls): MuJoCo steps use ``CompiledChunks``.
"""

from __future__ import annotations

import types
from collections.abc import Callable
from typing import Any

import torch
from torch._higher_order_ops.while_loop import while_loop
from torch.fx.experimental.proxy_tensor import make_fx

from gradgym.pipelines._rollout import tree_leaves, tree_map

WHILE_LOOP = "torch.ops.higher_order.while_loop"

# reduce(end carry, outputs) -> (value, aux): see CompiledLoop.value_and_grad
Reduce = Callable[[Any, Any], tuple[torch.Tensor, Any]]


class CompiledLoop:
    """A per-step function whose rollouts run as a compiled forward and backward loop.

    ``unroll`` steps (the largest divisor of the rollout's length that is at most
    ``unroll``) run per loop iteration: fewer iterations, a longer compile. ``simd=False``
    has inductor write scalar CPU loops. Called directly, it is the plain step.
    """

    def __init__(self, step: Callable, unroll: int, simd: bool = True):
        self.step, self.unroll = step, int(unroll)
        self._options = {
            "cpp_wrapper": True,  # the loops run in C++, not in Python wrapper code
            # while_loop is not cached by default; the cache key holds the loop bodies' code
            "unsafe_marked_cacheable_functions": {WHILE_LOOP: torch.__version__},
        } | ({} if simd else {"cpp.simdlen": 1})
        self._programs: dict[tuple, _LoopProgram] = {}

    def __call__(self, params: Any, carry: Any, x: Any) -> tuple[Any, Any]:
        return self.step(params, carry, x)

    def unroll_length(self, length: int) -> int:
        """Steps per loop iteration for a rollout of ``length`` steps."""
        return largest_divisor(length, self.unroll)

    def scan(self, params: Any, carry: Any, xs: Any, length: int) -> tuple[Any, Any]:
        """``lax.scan`` semantics: ``length`` steps from ``carry``, outputs stacked on axis 0."""
        inputs = (params, carry, xs)
        return self._program(inputs, length)(inputs)

    def value_and_grad(
        self, params: Any, carry: Any, xs: Any, length: int, reduce: Reduce
    ) -> tuple[tuple[Any, Any], tuple[Any, Any, Any]]:
        """A scan and a reduction of it, and its gradient, in one compiled call.

        ``reduce(end carry, outputs) -> (value, aux)`` turns a scan's result into a value
        (any shape) and anything else to return. Returns ``((value, aux), (params, carry,
        xs) gradients)``: the gradients of ``value.sum()``, ``None`` for leaves that are
        not floats. No autograd graph is built: one call runs the forward loop, the
        reduction and its VJP, and the backward loop. ``reduce`` keys the compiled code:
        pass the same function object every time.
        """
        inputs = tree_map(lambda leaf: leaf.detach() if isinstance(leaf, torch.Tensor)
                          else leaf, (params, carry, xs))
        return self._program(inputs, length).value_and_grad(inputs, reduce)

    def _program(self, inputs: tuple, length: int) -> _LoopProgram:
        """The compiled loops of rollouts of ``length`` steps from inputs like ``inputs``."""
        key = (length, *[_signature(leaf) for leaf in tree_leaves(inputs)])
        if key not in self._programs:
            self._programs[key] = _LoopProgram(
                self.step, inputs, length, self.unroll_length(length), self._options
            )
        return self._programs[key]


def largest_divisor(length: int, limit: int) -> int:
    """The largest divisor of ``length`` that is at most ``limit``: steps per compiled call
    or loop iteration such that every one sees the same shapes."""
    return max(k for k in range(1, min(limit, length) + 1) if length % k == 0)


def _signature(leaf: Any) -> Any:
    """What a compiled program assumes of an input leaf (its tree position aside)."""
    if isinstance(leaf, torch.Tensor):
        return (tuple(leaf.shape), leaf.dtype, leaf.device)
    return leaf


def _tensors(tree: Any) -> list[torch.Tensor]:
    return [leaf for leaf in tree_leaves(tree) if isinstance(leaf, torch.Tensor)]


def _rebuild(template: Any, tensors: Any) -> Any:
    """``template`` with its tensor leaves replaced, in order, by ``tensors``."""
    it = iter(tensors)
    return tree_map(lambda leaf: next(it) if isinstance(leaf, torch.Tensor) else leaf, template)


def _structure(tree: Any) -> Any:
    """``tree`` with placeholders for its tensors (a template for :func:`_rebuild`)."""
    return tree_map(lambda leaf: _PLACEHOLDER if isinstance(leaf, torch.Tensor) else leaf, tree)


_PLACEHOLDER = torch.empty(0)


def _at(buffer: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``buffer[index]`` for a 0-d index tensor, without a data-dependent shape."""
    return torch.index_select(buffer, 0, index.reshape(1))[0]


def _put(buffer: torch.Tensor, index: torch.Tensor, value: torch.Tensor) -> None:
    """``buffer[index] = value`` in place."""
    buffer.index_copy_(0, index.reshape(1), value.unsqueeze(0))


def _batch_last(tensor: torch.Tensor, batch_axis: int = 0) -> torch.Tensor:
    """The loops' storage layout of a tensor whose batch is ``batch_axis``: the batch last.

    inductor vectorizes a kernel along its innermost axis. Batch-first ``[B, 2]`` states
    gave it two-lane vectors and scalar ``sin``/``cos``; batch-last ``[2, B]`` gives it
    ``B`` lanes. Tensors with nothing after the batch keep their layout."""
    return tensor.movedim(batch_axis, -1) if tensor.ndim - batch_axis >= 2 else tensor


def _batch_back(tensor: torch.Tensor, batch_axis: int = 0) -> torch.Tensor:
    """The view of a :func:`_batch_last` tensor in its caller's layout."""
    return tensor.movedim(-1, batch_axis) if tensor.ndim - batch_axis >= 2 else tensor


def _stored(tensor: torch.Tensor, batch_axis: int = 0) -> torch.Tensor:
    """:func:`_batch_last` in memory (a copy where the layout differs)."""
    return _batch_last(tensor, batch_axis).contiguous()


class _LoopProgram:
    """The compiled forward and backward loops of one rollout signature."""

    def __init__(
        self, step: Callable, inputs: tuple, length: int, unroll: int, options: dict
    ) -> None:
        self.step, self.length, self.unroll = step, length, unroll
        self.template = _structure(inputs)
        params, carry, xs = (_tensors(part) for part in inputs)
        self.counts = (len(params), len(carry), len(xs))
        x0 = [x[0] for x in xs]
        with torch.no_grad():
            _, outputs = self._step_flat(params, carry, x0)
        self.out_template = _structure(outputs)
        self.out_shapes = [(leaf.shape, leaf.dtype) for leaf in _tensors(outputs)]
        self.stored_shapes = [_batch_last(leaf).shape for leaf in _tensors(outputs)]
        floats = [[leaf.is_floating_point() for leaf in part] for part in (params, carry, xs)]
        self.float_params, self.float_carry, self.float_xs = floats
        self.float_outputs = [dtype.is_floating_point for _, dtype in self.out_shapes]
        example = [leaf.detach() for leaf in (*params, *carry, *x0)]
        cotangents = [torch.ones_like(leaf) for leaf, ok in zip(carry, self.float_carry) if ok]
        cotangents += [torch.ones(shape, dtype=dtype, device=carry[0].device)
                       for (shape, dtype), ok in zip(self.out_shapes, self.float_outputs) if ok]
        self.step_vjp = make_fx(self._vjp_flat)(*example, *cotangents)
        self.compile_fn = _compiler(options)
        self.forward_loop = self.compile_fn(self._forward_loop)
        self.backward_loop = self.compile_fn(self._backward_loop)
        self._fused: dict[Reduce, _FusedGradient] = {}

    def __call__(self, inputs: tuple) -> tuple[Any, Any]:
        flat = _tensors(inputs)
        outputs = _Loop.apply(self, *flat)
        n_carry = self.counts[1]
        carry = _rebuild(self.template[1], outputs[:n_carry])
        return carry, _rebuild(self.out_template, outputs[n_carry:])

    def value_and_grad(self, inputs: tuple, reduce: Reduce) -> tuple[tuple, tuple]:
        """See :meth:`CompiledLoop.value_and_grad` (``inputs`` detached)."""
        if reduce not in self._fused:
            self._fused[reduce] = _FusedGradient(self, reduce, inputs)
        return self._fused[reduce](inputs)

    def stored_inputs(self, flat: list[torch.Tensor]) -> tuple[list, list, list]:
        """``(params, carry, xs)`` of flat detached inputs, in the loops' layout."""
        params, carry, xs = self._split(flat)
        return params, [_stored(leaf) for leaf in carry], [_stored(x, batch_axis=1) for x in xs]

    def buffers(self, carry: list[torch.Tensor]) -> tuple[list, list]:
        """Empty ``(output buffers, carry buffers)`` that the forward loop fills."""
        device = carry[0].device
        outputs = [torch.empty((self.length, *shape), dtype=dtype, device=device)
                   for shape, (_, dtype) in zip(self.stored_shapes, self.out_shapes)]
        carries = [torch.empty((self.length, *leaf.shape), dtype=leaf.dtype, device=device)
                   for leaf in carry]
        return outputs, carries

    def x_cotangent_buffers(self, xs: list[torch.Tensor]) -> list[torch.Tensor]:
        """Empty buffers for the float scanned inputs' cotangents (``xs`` in the loops'
        layout), which the backward loop fills."""
        return [torch.empty_like(x) for x, ok in zip(xs, self.float_xs) if ok]

    # ------------------------------------------------------------- one step, flat
    def _split(self, flat: Any) -> tuple[list, list, list]:
        n_params, n_carry, _ = self.counts
        return (list(flat[:n_params]), list(flat[n_params:n_params + n_carry]),
                list(flat[n_params + n_carry:]))

    def _step_flat(self, params: list, carry: list, x: list) -> tuple[list, list]:
        """The step on flat tensor lists: ``(next carry, outputs)``."""
        template_params, template_carry, template_xs = self.template
        x_tree = _rebuild(template_xs, x)
        next_carry, outputs = self.step(
            _rebuild(template_params, params), _rebuild(template_carry, carry), x_tree
        )
        return _tensors(next_carry), _tensors(outputs)

    def _vjp_flat(self, *args: torch.Tensor) -> tuple:
        """``(param, carry, x cotangents)`` of one step, float leaves, zeros where unused."""
        n_in = sum(self.counts)
        params, carry, x = self._split(args[:n_in])
        cotangents = list(args[n_in:])
        floats = (self.float_params, self.float_carry, self.float_xs)

        def differentiable(*float_leaves: torch.Tensor) -> tuple:
            it = iter(float_leaves)
            parts = [[next(it) if ok else leaf for leaf, ok in zip(part, mask)]
                     for part, mask in zip((params, carry, x), floats)]
            next_carry, outputs = self._step_flat(*parts)
            return tuple(leaf for leaf, ok in zip(next_carry, self.float_carry) if ok) + tuple(
                leaf for leaf, ok in zip(outputs, self.float_outputs) if ok)

        primals = [leaf for part, mask in zip((params, carry, x), floats)
                   for leaf, ok in zip(part, mask) if ok]
        _, pullback = torch.func.vjp(differentiable, *primals)
        return tuple(pullback(tuple(cotangents)))

    # ------------------------------------------------------------- the two loops
    def _forward_loop(self, *args: torch.Tensor) -> tuple:
        """Steps from the carry: ``(steps done, *end carry)``; outputs and start carries go
        into their buffers. Code that reads the buffers in the same graph must depend on
        the steps done (see :func:`_after`)."""
        n_params, n_carry, n_xs = self.counts
        n_in = n_params + n_carry + n_xs
        params, carry, xs = self._split(args[:n_in])
        output_buffers = args[n_in:n_in + len(self.out_shapes)]
        carry_buffers = args[n_in + len(self.out_shapes):]
        unroll = self.unroll

        def body(index: torch.Tensor, *leaves: torch.Tensor) -> tuple:
            leaves = list(leaves)
            for k in range(unroll):
                t = index + k
                for buffer, leaf in zip(carry_buffers, leaves):
                    _put(buffer, t, leaf)
                x = [_batch_back(_at(x, t)) for x in xs]
                leaves, outputs = self._step_flat(params, [_batch_back(v) for v in leaves], x)
                leaves = [_batch_last(leaf) for leaf in leaves]
                for buffer, output in zip(output_buffers, outputs):
                    _put(buffer, t, _batch_last(output))
            return (index + unroll, *[_copy(leaf) for leaf in leaves])

        start = torch.zeros((), dtype=torch.int64)
        return tuple(while_loop(lambda index, *_: index < self.length, body, (start, *carry)))

    def _backward_loop(self, steps_done: torch.Tensor, *args: torch.Tensor) -> tuple:
        """Step VJPs in reverse from the forward loop's ``steps_done``: ``(-1, *start carry
        cotangents, *param cotangents)``; the scanned inputs' cotangents go into their
        buffers."""
        n_params, n_carry, n_xs = self.counts
        params, xs = list(args[:n_params]), list(args[n_params:n_params + n_xs])
        rest = args[n_params + n_xs:]
        carry_buffers, rest = rest[:n_carry], rest[n_carry:]
        n_float_out = sum(self.float_outputs)
        output_cotangents, rest = rest[:n_float_out], rest[n_float_out:]
        n_float_xs = sum(self.float_xs)
        x_cotangent_buffers, end_cotangents = rest[:n_float_xs], rest[n_float_xs:]
        n_float_params, n_float_carry = sum(self.float_params), len(end_cotangents)
        unroll = self.unroll

        def body(index: torch.Tensor, *loop_carry: torch.Tensor) -> tuple:
            carry_cotangents = list(loop_carry[:n_float_carry])
            param_cotangents = list(loop_carry[n_float_carry:])
            for k in range(unroll):
                t = index - k
                carry = [_batch_back(_at(buffer, t)) for buffer in carry_buffers]
                x = [_batch_back(_at(x, t)) for x in xs]
                out = self.step_vjp(
                    *params, *carry, *x, *[_batch_back(c) for c in carry_cotangents],
                    *[_batch_back(_at(buffer, t)) for buffer in output_cotangents],
                )
                param_step = out[:n_float_params]
                carry_cotangents = [_batch_last(c) for c in
                                    out[n_float_params:n_float_params + n_float_carry]]
                for buffer, cotangent in zip(x_cotangent_buffers, out[n_float_params + n_float_carry:]):
                    _put(buffer, t, _batch_last(cotangent))
                param_cotangents = [a + b for a, b in zip(param_cotangents, param_step)]
            return (index - unroll, *[_copy(c) for c in carry_cotangents], *param_cotangents)

        float_params = [p for p, ok in zip(params, self.float_params) if ok]
        initial = (steps_done - 1, *end_cotangents, *[torch.zeros_like(p) for p in float_params])
        return tuple(while_loop(lambda index, *_: index >= 0, body, initial))


def _copy(tensor: torch.Tensor) -> torch.Tensor:
    """A contiguous copy: a loop's next carry may not alias its inputs, and keeps their
    layout."""
    return tensor.clone(memory_format=torch.contiguous_format)


def with_own_code(fn: Callable, name: str | None = None) -> Callable:
    """``fn`` with a code object of its own.

    dynamo keeps compiled graphs and counts recompilations per code object: a fresh one per
    compiled function keeps runs in one process (tests, packed trials, signatures) from
    failing each other's guards and from using up torch's recompile limit.
    """
    return types.FunctionType(fn.__code__.replace(), fn.__globals__, name or fn.__name__, None,
                              fn.__closure__)


def _compiler(options: dict) -> Callable[[Callable], Callable]:
    """``torch.compile`` of a bound method, whole graph, with its own code object."""

    def compile_fn(method: Callable) -> Callable:
        fresh = types.MethodType(with_own_code(method.__func__), method.__self__)
        return torch.compile(fresh, fullgraph=True, dynamic=False, options=options)

    return compile_fn


class _Loop(torch.autograd.Function):
    """A rollout as one autograd node: forward and backward loops of a :class:`_LoopProgram`."""

    @staticmethod
    def forward(ctx: Any, program: _LoopProgram, *flat: torch.Tensor) -> tuple:
        # detached: the compiled loops then see one requires_grad flag whatever the caller's
        params, carry, xs = program.stored_inputs([leaf.detach() for leaf in flat])
        output_buffers, carry_buffers = program.buffers(carry)
        steps_done, *end = program.forward_loop(*params, *carry, *xs, *output_buffers,
                                                *carry_buffers)
        ctx.program = program
        ctx.save_for_backward(steps_done, *params, *xs, *carry_buffers)
        outputs = (*[_batch_back(leaf) for leaf in end],
                   *[_batch_back(buffer, batch_axis=1) for buffer in output_buffers])
        ctx.mark_non_differentiable(*[o for o in outputs if not o.is_floating_point()])
        return outputs

    @staticmethod
    def backward(ctx: Any, *grads: torch.Tensor | None) -> tuple:
        program = ctx.program
        n_params, n_carry, n_xs = program.counts
        steps_done, *saved = ctx.saved_tensors
        params, xs = saved[:n_params], saved[n_params:n_params + n_xs]
        carry_buffers = saved[n_params + n_xs:]
        end_grads, output_grads = grads[:n_carry], grads[n_carry:]
        device = carry_buffers[0].device
        output_cotangents = [
            _stored(_dense(grad, (program.length, *shape), dtype, device), batch_axis=1)
            for grad, (shape, dtype), ok
            in zip(output_grads, program.out_shapes, program.float_outputs) if ok
        ]
        end_cotangents = [
            _stored(_dense(grad, _batch_back(b[0]).shape, b.dtype, device))
            for grad, b, ok in zip(end_grads, carry_buffers, program.float_carry) if ok
        ]
        x_buffers = program.x_cotangent_buffers(xs)
        _, *out = program.backward_loop(steps_done, *params, *xs, *carry_buffers,
                                         *output_cotangents, *x_buffers, *end_cotangents)
        carry_grads = iter([_batch_back(g) for g in out[:len(end_cotangents)]])
        param_grads = iter(out[len(end_cotangents):])
        x_grads = iter([_batch_back(x, batch_axis=1) for x in x_buffers])
        grads_in = [next(param_grads) if ok else None for ok in program.float_params]
        grads_in += [next(carry_grads) if ok else None for ok in program.float_carry]
        grads_in += [next(x_grads) if ok else None for ok in program.float_xs]
        return (None, *grads_in)


class _FusedGradient:
    """A scan, a reduction of it and the reduction's gradient as one compiled call.

    The call runs the forward loop, the reduction and its VJP (traced once with ``make_fx``,
    as the step's), and the backward loop. Training needs nothing else per iteration: no
    autograd graph, one compiled call instead of two, and the reduction runs compiled.
    """

    def __init__(self, program: _LoopProgram, reduce: Reduce, inputs: tuple):
        self.program, self.reduce = program, reduce
        carry = [leaf.detach() for leaf in _tensors(inputs[1])]
        device = carry[0].device
        outputs = [torch.zeros((program.length, *shape), dtype=dtype, device=device)
                   for shape, dtype in program.out_shapes]
        with torch.no_grad():
            value, aux = self._reduce_flat(carry + outputs)
        if not value.is_floating_point():
            raise TypeError(f"value_and_grad: the reduction's value must be floating point, "
                            f"got {value.dtype}")
        self.aux_template = _structure(aux)
        self.n_aux = len(_tensors(aux))
        self.reduce_vjp = make_fx(self._reduce_and_vjp)(*carry, *outputs)
        self.compiled = program.compile_fn(self._fused)
        self._buffers: list[torch.Tensor] | None = None

    def _make_buffers(self, flat: list[torch.Tensor]) -> list[torch.Tensor]:
        """The buffers the loops fill: outputs, carries, the scanned inputs' cotangents.

        Made here, not in the graph: the loops' writes into buffers made inside the graph
        were lost. Every call overwrites them and returns copies, so calls share them.
        """
        program = self.program
        _, carry, xs = program.stored_inputs(flat)
        outputs, carries = program.buffers(carry)
        return [*outputs, *carries, *program.x_cotangent_buffers(xs)]

    def __call__(self, inputs: tuple) -> tuple[tuple, tuple]:
        program = self.program
        flat = _tensors(inputs)
        if self._buffers is None:
            self._buffers = self._make_buffers(flat)
        with torch.no_grad():  # dynamo refuses a loop that writes its inputs under autograd
            results = self.compiled(*flat, *self._buffers)
        value, aux = results[0], _rebuild(self.aux_template, results[1:1 + self.n_aux])
        grads = iter(results[1 + self.n_aux:])
        floats = (program.float_params, program.float_carry, program.float_xs)
        return (value, aux), tuple(
            _rebuild(template, [next(grads) if ok else None for ok in mask])
            for template, mask in zip(program.template, floats)
        )

    def _reduce_flat(self, leaves: list[torch.Tensor]) -> tuple[torch.Tensor, Any]:
        """``reduce`` of flat end-carry and stacked-output leaves (the caller's layout)."""
        program = self.program
        n_carry = program.counts[1]
        return self.reduce(_rebuild(program.template[1], leaves[:n_carry]),
                           _rebuild(program.out_template, leaves[n_carry:]))

    def _reduce_and_vjp(self, *leaves: torch.Tensor) -> tuple:
        """``(value, *aux, *cotangents)``: the cotangents of ``value.sum()`` for the float
        end-carry leaves, then the float output leaves."""
        program = self.program
        floats = program.float_carry + program.float_outputs

        def value_of(*float_leaves: torch.Tensor) -> tuple:
            it = iter(float_leaves)
            value, aux = self._reduce_flat(
                [next(it) if ok else leaf for leaf, ok in zip(leaves, floats)])
            return value, _tensors(aux)

        primals = [leaf for leaf, ok in zip(leaves, floats) if ok]
        value, pullback, aux = torch.func.vjp(value_of, *primals, has_aux=True)
        return (value, *aux, *pullback(torch.ones_like(value)))

    def _fused(self, *args: torch.Tensor) -> tuple:
        """Forward loop, reduction and VJP, backward loop, from flat inputs in the caller's
        layout and then the empty buffers: ``(value, *aux, *gradients)``, the gradients of
        the float leaves of the parameters, start carry and scanned inputs, in order."""
        program = self.program
        n_params, n_carry, n_xs = program.counts
        n_in, n_out = n_params + n_carry + n_xs, len(program.out_shapes)
        params, carry, xs = program.stored_inputs(args[:n_in])
        output_buffers = args[n_in:n_in + n_out]
        carry_buffers = args[n_in + n_out:n_in + n_out + n_carry]
        x_buffers = args[n_in + n_out + n_carry:]
        steps_done, *end = program._forward_loop(*params, *carry, *xs, *output_buffers,
                                                 *carry_buffers)
        outputs = [_batch_back(_after(b, steps_done - program.length), batch_axis=1)
                   for b in output_buffers]
        results = self.reduce_vjp(*[_batch_back(leaf) for leaf in end], *outputs)
        value_and_aux, cotangents = results[:1 + self.n_aux], results[1 + self.n_aux:]
        n_float_carry = sum(program.float_carry)
        end_cotangents = [_stored(c) for c in cotangents[:n_float_carry]]
        output_cotangents = [_stored(c, batch_axis=1) for c in cotangents[n_float_carry:]]
        last, *back = program._backward_loop(steps_done, *params, *xs, *carry_buffers,
                                             *output_cotangents, *x_buffers, *end_cotangents)
        carry_grads, param_grads = back[:n_float_carry], back[n_float_carry:]
        x_grads = [_batch_back(_after(b, last + 1), batch_axis=1) for b in x_buffers]
        return (*value_and_aux, *param_grads, *[_batch_back(g) for g in carry_grads], *x_grads)


def _after(buffer: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    """``buffer`` read through ``zero``, a 0-d result of the loop that writes it.

    inductor (torch 2.13) orders kernels by their data, not by a loop's writes into its
    inputs: a kernel reading a buffer that a loop fills ran before the loop."""
    steps = torch.arange(buffer.shape[0], device=buffer.device) + zero
    return torch.index_select(buffer, 0, steps)


def _dense(grad: torch.Tensor | None, shape: Any, dtype: torch.dtype, device: Any) -> torch.Tensor:
    """An output's cotangent, zeros where autograd passes none."""
    if grad is None:
        return torch.zeros(shape, dtype=dtype, device=device)
    return grad
