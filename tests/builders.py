"""Trace records built by keyword for the tests: a TensorStats or an Iteration that says which
number is which."""

import math
from collections.abc import Mapping

from pytest_gpttrace.trace import Iteration, TensorStats, Trace


def make_stats(
    shape: tuple[int, ...] = (4,),
    *,
    mean: float | None = None,
    std: float | None = None,
    min: float | None = None,
    max: float | None = None,
    rms: float | None = None,
    zero_frac: float | None = None,
    dtype: str = "torch.float32",
    device: str = "cpu",
    nan: int = 0,
    inf: int = 0,
    band: Mapping[str, float] | None = None,
) -> TensorStats:
    """The statistics of a tensor of ``shape`` (numel follows from it); statistics not given are None."""
    return TensorStats(shape=shape, dtype=dtype, device=device, numel=math.prod(shape), mean=mean, std=std,
                       min=min, max=max, rms=rms, zero_frac=zero_frac, nan=nan, inf=inf, band=band)


def make_iteration(
    index: int = 0,
    loss: float | None = 1.0,
    forward: Mapping[str, TensorStats] | None = None,
    stage_grads: Mapping[str, TensorStats] | None = None,
    param_grads: Mapping[str, TensorStats | None] | None = None,
    *,
    stepped: bool | None = True,
    lr: Mapping[str, float] | None = None,
) -> Iteration:
    """One iteration of a trace; sections not given are empty."""
    return Iteration(index=index, loss=loss, stepped=stepped, lr=dict(lr or {}), forward=dict(forward or {}),
                     stage_grads=dict(stage_grads or {}), param_grads=dict(param_grads or {}))


def losses(trace: Trace) -> list[float]:
    """Every iteration's loss; a trace without one fails the test here."""
    out = [it.loss for it in trace.iterations]
    assert None not in out, f"an iteration without a loss: {out}"
    return [loss for loss in out if loss is not None]


def stage(stats: TensorStats | None) -> TensorStats:
    """A stage's statistics that must be there (``None`` marks a tensor without them)."""
    assert stats is not None, "no statistics recorded"
    return stats
