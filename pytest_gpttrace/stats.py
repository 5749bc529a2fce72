"""Statistics of one tensor, computed on the tensor's device without a host synchronisation.

``stats_vector(x)`` returns a small float64 tensor on x's device holding the raw reductions
(sum, min, max, non-zero count, NaN count, Inf count, variance). Nothing is read back:
``StatsBatch`` gathers the vectors of one iteration and copies them to the host in one transfer,
then ``finish`` turns each row into a TensorStats. ``tensor_stats(x)`` is the one-tensor shortcut.

Accumulation: float16/bfloat16/float32 reduce in float32 (torch's reductions sum pairwise, so the
error grows with log n, not n), float64 in float64; integer and bool tensors are converted to
float64 first. The variance is torch.var's (Welford), so a large mean does not cancel the std, and the
rms comes from them (rms² = mean² + var·(n−1)/n) rather than from a float32 sum of squares, whose
error grows with n.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from .trace import TensorStats

# order of the entries of a stats vector
FIELDS = ("sum", "min", "max", "nonzero", "nan", "inf", "var")
_N = len(FIELDS)

_HALF = (torch.float16, torch.bfloat16)


@dataclass(frozen=True)
class TensorMeta:
    shape: tuple[int, ...]
    dtype: str
    device: str
    numel: int

    @classmethod
    def of(cls, x: torch.Tensor) -> "TensorMeta":
        return cls(tuple(x.shape), str(x.dtype), str(x.device), x.numel())


def _eager_vector(x: torch.Tensor) -> torch.Tensor:
    if not x.is_floating_point():
        x = x.to(torch.float64)
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    xf = x.to(acc) if x.dtype in _HALF else x
    lo, hi = torch.aminmax(x)
    if x.numel() > 1:
        var = torch.var(xf)
    else:
        var = torch.zeros((), dtype=acc, device=x.device)
    parts = (
        torch.sum(x, dtype=acc),
        lo, hi,
        torch.count_nonzero(x),
        torch.isnan(x).sum(),
        torch.isinf(x).sum(),
        var,
    )
    return torch.stack([p.to(torch.float64) for p in parts])


def stats_vector(x: torch.Tensor) -> torch.Tensor | None:
    """The raw reductions of x as a float64 vector on x's device (None for an empty tensor)."""
    if x.numel() == 0:
        return None
    with torch.no_grad():
        return _eager_vector(x.detach())


def from_row(meta: TensorMeta, row) -> TensorStats:
    """Turn one host row of raw reductions into TensorStats."""
    n = meta.numel
    if row is None or n == 0:
        return TensorStats(meta.shape, meta.dtype, meta.device, n)
    s, lo, hi, nonzero, nan, inf, var = (float(v) for v in row)
    mean = s / n
    std = 0.0 if n == 1 else (math.sqrt(var) if var >= 0 else float("nan"))
    ms = mean * mean + (var * (n - 1) / n if n > 1 else 0.0)
    return TensorStats(
        shape=meta.shape,
        dtype=meta.dtype,
        device=meta.device,
        numel=n,
        mean=mean,
        std=std,
        min=lo,
        max=hi,
        rms=math.sqrt(ms) if ms >= 0 else float("nan"),
        zero_frac=(n - nonzero) / n,
        nan=int(nan),
        inf=int(inf),
    )


class StatsBatch:
    """Gathers stats vectors and reads them back to the host in one copy per device."""

    def __init__(self):
        self._items: list[tuple[Any, TensorMeta, torch.Tensor | None]] = []
        self._scalars: list[tuple[Any, torch.Tensor]] = []

    def __len__(self):
        return len(self._items)

    def add(self, key, x: torch.Tensor) -> None:
        self._items.append((key, TensorMeta.of(x), stats_vector(x)))

    def add_missing(self, key) -> None:
        """A slot for a tensor that does not exist (a parameter without a gradient)."""
        self._items.append((key, None, None))

    def add_scalar(self, key, x: torch.Tensor) -> None:
        """A scalar read back with the batch (the loss), as a float."""
        self._scalars.append((key, x.detach().reshape(()).to(torch.float64)))

    def finish(self) -> tuple[list[tuple[Any, TensorStats | None]], dict[Any, float]]:
        """One host copy per device; returns [(key, TensorStats or None)] in order, and the scalars."""
        vectors = [v for _, _, v in self._items if v is not None] + [s.reshape(1).expand(_N) for _, s in self._scalars]
        host_rows: dict[int, Any] = {}
        if vectors:
            by_device: dict[torch.device, list[int]] = {}
            for i, v in enumerate(vectors):
                by_device.setdefault(v.device, []).append(i)
            for device, idxs in by_device.items():
                block = torch.stack([vectors[i] for i in idxs]).cpu().numpy()  # the one copy
                for row, i in zip(block, idxs):
                    host_rows[i] = row
        out, k = [], 0
        for key, meta, v in self._items:
            if meta is None:
                out.append((key, None))
            elif v is None:
                out.append((key, from_row(meta, None)))
            else:
                out.append((key, from_row(meta, host_rows[k])))
                k += 1
        scalars = {key: float(host_rows[k + j][0]) for j, (key, _) in enumerate(self._scalars)}
        self._items, self._scalars = [], []
        return out, scalars


def tensor_stats(x: torch.Tensor) -> TensorStats:
    """Statistics of one tensor (reads back to the host: for use outside a traced step)."""
    batch = StatsBatch()
    batch.add(0, x)
    (_, stats), = batch.finish()[0]
    return stats
