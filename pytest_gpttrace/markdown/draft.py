"""Statistics and iterations being assembled from what a report prints.

A statistic may print more than once (an rms bullet, an L2 norm cell, a zero count in a sparsity
line); each printed value is known to within its rounding, and ``reconcile`` picks one value
consistent with all of them.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import NamedTuple

from ..trace import TensorStats
from .layout import HALF_ULP

Candidate = tuple[float | None, float]  # a printed value and the half-width of its rounding


class Counts(NamedTuple):
    """A printed Non-finite value: NaN n, Inf m."""

    nan: int
    inf: int


Value = float | Counts | None  # a printed statistic, or the non-finite counts


def reconcile(candidates: Iterable[Candidate]) -> float | None:
    """One value consistent with every printed candidate (value, half-width); the most precise wins."""
    cands = [(v, h) for v, h in candidates if v is not None]
    if not cands:
        return None
    for v, _ in cands:
        if not math.isfinite(v):
            return v
    cands.sort(key=lambda c: c[1])
    lo, hi = max(v - h for v, h in cands), min(v + h for v, h in cands)
    for v, _ in cands:
        if lo <= v <= hi:
            return v
    return (lo + hi) / 2 if lo <= hi else cands[0][0]


class Stats:
    """A TensorStats being assembled from a stat block, table rows and sparsity lines."""

    def __init__(self, shape: Sequence[int], dtype: str, device: str):
        self.shape: tuple[int, ...] = tuple(shape)
        self.dtype, self.device = dtype, device
        self.values: dict[str, float | None] = {}
        self.rms: list[Candidate] = []
        self.zero: list[Candidate] = []
        self.nonfinite: Counts | None = None

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    def set(self, field: str, value: Value) -> None:
        if field == "nonfinite":
            if isinstance(value, Counts):
                self.nonfinite = self.nonfinite or value
            return
        if isinstance(value, Counts):
            raise TypeError(f"{field}: non-finite counts are no statistic")
        if field == "rms":
            self.rms.append((value, HALF_ULP))
        elif field == "zero_frac":
            self.zero.append((value, HALF_ULP))
        elif field == "l2":
            if value is not None and self.numel:
                root = math.sqrt(self.numel)
                self.rms.append((value / root, HALF_ULP / root))
        elif self.values.get(field) is None:
            self.values[field] = value

    def zero_count(self, zeros: int) -> None:
        if self.numel:
            self.zero.append((zeros / self.numel, 0.5 / self.numel))

    def build(self) -> TensorStats:
        numel = self.numel
        mean, std, lo, hi = (self.values.get(k) for k in ("mean", "std", "min", "max"))
        if numel == 1 and std is not None and math.isnan(std):
            std = 0.0
        if self.nonfinite is not None:
            nan, inf = self.nonfinite
        else:
            nan = int(any(v is not None and math.isnan(v) for v in (mean, lo, hi)))
            inf = int(any(v is not None and math.isinf(v) for v in (lo, hi)))
        zero = reconcile(self.zero)
        if zero is None:
            zero = _zero_frac_from_range(lo, hi, numel)
        return TensorStats(shape=self.shape, dtype=self.dtype, device=self.device, numel=numel,
                           mean=mean, std=std, min=lo, max=hi, rms=reconcile(self.rms), zero_frac=zero,
                           nan=nan, inf=inf)


def _zero_frac_from_range(lo: float | None, hi: float | None, numel: int) -> float | None:
    if lo is None or hi is None or numel == 0 or math.isnan(lo) or math.isnan(hi):
        return None
    if lo > 0 or hi < 0 or (hi == 0 and math.copysign(1.0, hi) < 0):
        return 0.0
    if lo == 0 and hi == 0 and math.copysign(1.0, lo) > 0:
        return 1.0
    return None


class IterationDraft:
    """An iteration being assembled: its position in the report, what its lines said so far."""

    def __init__(self, pos: int):
        self.pos = pos
        self.index: int | None = None
        self.loss: float | None = None
        self.stepped: bool | None = None
        self.completed = False
        self.forward: dict[str, Stats] = {}
        self.stage_grads: dict[str, Stats] = {}
        self.param_grads: dict[str, Stats | None] = {}
