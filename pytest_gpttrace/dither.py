"""Kernel dither: emulate another machine's kernels by perturbing every floating-point result.

Two machines run the same model with different kernels (AVX2 or AVX-512, another BLAS, another
thread split). Each kernel computes every matmul, reduction and transcendental with its own order
of operations, so its results differ from another kernel's by a few units in the last place (ulp)
of the accumulation precision, and the differences that cross a rounding boundary of a 16-bit
result (Muon's bfloat16 Newton-Schulz, autocast matmuls) grow by orders of magnitude over the
following optimizer steps.

``KernelDither`` reproduces that on one machine. Under a ``TorchDispatchMode`` (so forward,
backward and the optimizer step alike), the result of every functional floating-point op is
multiplied by ``1 + ulp * u``, with ``u`` uniform in [-1, 1) from a generator of its own (the
global RNG, which drives dropout and data, is never touched):

- float32 and float64 results: ``ulp`` is the unit roundoff of the result's dtype (2^-24, 2^-53);
- 16-bit results of matmuls (``mm``, ``bmm``, ``addmm``, ``baddbmm``, ``addmv``, ``mv``, ``dot``):
  the op is computed again in float32 (as the kernels accumulate), perturbed at 2^-24 and rounded
  to the 16-bit dtype, which is where two real kernels part ways;
- ops that return several tensors (the fused CPU attention and LayerNorm kernels), in-place
  optimizer updates and ``_foreach`` lists are not perturbed: their inputs are, so the noise
  still reaches them, one op later;
- views, in-place and out= ops, integer and bool results pass through untouched, so aliasing and
  the optimizer's in-place updates keep their meaning; so do ops that compute nothing a kernel
  could round otherwise (copies, casts, concatenation, indexing, selections such as max, relu or
  where), random draws and constants (ops without a floating-point tensor input).

The tool's own statistics are computed under ``undithered()``: a replay perturbs the model's
numerics, never the measurement of them (a dithered zero count would no longer be exact).

A dithered replay is one more draw of "another kernel" for the calibration band
(``calibrate.py``); it never runs in an ordinary traced test.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode

aten = torch.ops.aten

MATMULS = frozenset({aten.mm, aten.bmm, aten.addmm, aten.baddbmm, aten.addmv, aten.mv, aten.dot})
_UNIT_ROUNDOFF = {torch.float32: 2.0**-24, torch.float64: 2.0**-53}
_SIXTEEN_BIT = (torch.bfloat16, torch.float16)


# exact in every kernel: data movement, casts, selections
EXACT_OPS = frozenset({
    aten._to_copy, aten.clone, aten.copy, aten.cat, aten.stack, aten.index, aten.index_select, aten.gather,
    aten.embedding, aten.embedding_dense_backward, aten.where, aten.masked_fill, aten.slice_scatter,
    aten.select_scatter, aten.select_backward, aten.slice_backward, aten.repeat, aten.constant_pad_nd,
    aten.flip, aten.roll, aten.max, aten.min, aten.amax, aten.amin, aten.maximum, aten.minimum, aten.sort,
    aten.topk, aten.relu, aten.threshold_backward, aten.abs, aten.neg, aten.sign, aten.clamp, aten.clamp_min,
    aten.clamp_max, aten.expand_copy, aten.permute_copy, aten.transpose_copy, aten.detach_copy,
    aten.zeros_like, aten.ones_like, aten.empty_like, aten.full_like, aten.tril, aten.triu, aten.eq, aten.ne,
    aten.lt, aten.le, aten.gt, aten.ge, aten.isnan, aten.isinf, aten.logical_not, aten.split_with_sizes_copy,
})
_FUNCTIONAL: dict[torch._ops.OpOverload, bool] = {}
_STATE = threading.local()


@contextlib.contextmanager
def undithered() -> Iterator[None]:
    """Ops inside this block pass through every KernelDither untouched."""
    depth = _depth()
    _STATE.depth = depth + 1
    try:
        yield
    finally:
        _STATE.depth = depth


def _depth() -> int:
    """How many ``undithered`` blocks this thread is in."""
    depth: int = getattr(_STATE, "depth", 0)
    return depth


def _is_functional(func: torch._ops.OpOverload) -> bool:
    """An op that returns fresh tensors: no alias of an input, nothing written in place."""
    known = _FUNCTIONAL.get(func)
    if known is None:
        known = _FUNCTIONAL[func] = _schema_is_functional(func._schema)
    return known


def _schema_is_functional(schema: torch.FunctionSchema) -> bool:
    if any(r.alias_info is not None for r in schema.returns):
        return False
    if any(a.name == "generator" for a in schema.arguments):
        return False  # a random draw
    return not any(a.alias_info is not None and a.alias_info.is_write for a in schema.arguments)


def _has_float_input(args: Sequence[object]) -> bool:
    for a in args:
        if isinstance(a, torch.Tensor) and a.is_floating_point():
            return True
        if isinstance(a, (list, tuple)) and _has_float_input(a):
            return True
    return False


def _upcast(value: Any) -> Any:
    """16-bit tensors (also inside lists and tuples) as float32; anything else as it is."""
    if isinstance(value, torch.Tensor) and value.dtype in _SIXTEEN_BIT:
        return value.float()
    if isinstance(value, (list, tuple)):
        return type(value)(_upcast(v) for v in value)
    return value


class KernelDither(TorchDispatchMode):
    """Perturb every functional floating-point result by a random relative ulp (see the module doc)."""

    def __init__(self, seed: int):
        super().__init__()  # type: ignore[no-untyped-call]  # TorchDispatchMode.__init__ is unannotated in torch
        self.seed = int(seed)
        self._generators: dict[torch.device, torch.Generator] = {}

    def _generator(self, device: torch.device) -> torch.Generator:
        g = self._generators.get(device)
        if g is None:
            g = torch.Generator(device=device)
            g.manual_seed(self.seed)
            self._generators[device] = g
        return g

    def _jitter(self, t: torch.Tensor, unit: float) -> torch.Tensor:
        if t.numel() == 0:
            return t
        u = torch.rand(t.shape, generator=self._generator(t.device), dtype=t.dtype, device=t.device)
        # an infinity (an additive mask's -inf) stays what it is: inf * (1 + e) is inf, not inf - inf
        return torch.where(torch.isfinite(t), t + t * ((u * 2 - 1) * unit), t)

    def __torch_dispatch__(self, func: torch._ops.OpOverload, types: Sequence[type], args: Sequence[Any] = (),
                           kwargs: Mapping[str, Any] | None = None) -> Any:
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if not isinstance(out, torch.Tensor) or _depth() or func.overloadpacket in EXACT_OPS \
                or not _is_functional(func) or not _has_float_input(args):
            return out
        if out.dtype in _UNIT_ROUNDOFF:
            return self._jitter(out, _UNIT_ROUNDOFF[out.dtype])
        if out.dtype in _SIXTEEN_BIT and func.overloadpacket in MATMULS:
            wide = func(*_upcast(args), **_upcast(kwargs))
            return self._jitter(wide, 2.0**-24).to(out.dtype)
        return out
