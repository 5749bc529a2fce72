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
- views, in-place and out= ops, integer and bool results pass through untouched, so aliasing and
  the optimizer's in-place updates keep their meaning.

A dithered replay is one more draw of "another kernel" for the calibration band
(``calibrate.py``); it never runs in an ordinary traced test.
"""

from __future__ import annotations

import torch
from torch.utils._python_dispatch import TorchDispatchMode

aten = torch.ops.aten

MATMULS = frozenset({aten.mm, aten.bmm, aten.addmm, aten.baddbmm, aten.addmv, aten.mv, aten.dot})
_UNIT_ROUNDOFF = {torch.float32: 2.0**-24, torch.float64: 2.0**-53}
_SIXTEEN_BIT = (torch.bfloat16, torch.float16)


_FUNCTIONAL: dict = {}


def _is_functional(func) -> bool:
    """An op that returns fresh tensors: no alias of an input, nothing written in place."""
    known = _FUNCTIONAL.get(func)
    if known is None:
        known = _FUNCTIONAL[func] = _schema_is_functional(func._schema)
    return known


def _schema_is_functional(schema) -> bool:
    if any(r.alias_info is not None for r in schema.returns):
        return False
    return not any(a.alias_info is not None and a.alias_info.is_write for a in schema.arguments)


def _upcast(value):
    if isinstance(value, torch.Tensor) and value.dtype in _SIXTEEN_BIT:
        return value.float()
    if isinstance(value, (list, tuple)):
        return type(value)(_upcast(v) for v in value)
    return value


class KernelDither(TorchDispatchMode):
    """Perturb every functional floating-point result by a random relative ulp (see the module doc)."""

    def __init__(self, seed: int):
        super().__init__()
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
        return t + t * ((u * 2 - 1) * unit)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if not isinstance(out, torch.Tensor) or not _is_functional(func):
            return out
        if out.dtype in _UNIT_ROUNDOFF:
            return self._jitter(out, _UNIT_ROUNDOFF[out.dtype])
        if out.dtype in _SIXTEEN_BIT and func.overloadpacket in MATMULS:
            wide = func(*_upcast(args), **_upcast(kwargs))
            return self._jitter(wide, 2.0**-24).to(out.dtype)
        return out
