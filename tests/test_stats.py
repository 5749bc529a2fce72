import math

import numpy as np
import pytest
import torch
from hypothesis import example, given
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from pytest_gpttrace.stats import StatsBatch, stats_vector, tensor_stats


def oracle(a: np.ndarray):
    """float64 reference statistics."""
    x = a.astype(np.float64).ravel()
    n = x.size
    return {
        "mean": x.mean(), "std": x.std(ddof=1) if n > 1 else 0.0, "min": x.min(), "max": x.max(),
        "rms": math.sqrt((x * x).mean()), "zero_frac": (x == 0).mean(),
    }


# Finite float32 with magnitudes up to 1e4 and means far from zero: float32 accumulation keeps
# about 1e-6 relative error on these sizes (the L2 norm a little more), so 1e-5 separates a wrong formula from rounding.
finite = st.floats(-1e4, 1e4, allow_nan=False, allow_infinity=False, width=32)


@given(hnp.arrays(np.float32, hnp.array_shapes(min_dims=1, max_dims=3, min_side=1, max_side=40), elements=finite),
       st.floats(-1e4, 1e4, width=32))
@example(np.full((7,), 3.0, np.float32), 0.0)  # all equal: std exactly 0
@example(np.zeros((3, 4), np.float32), 0.0)  # all zero
@example(np.array([1.0, 1.0 + 2**-10], np.float32), 1e4)  # large mean, tiny spread
def test_float32_stats_match_a_float64_oracle(a, shift):
    a = (a + np.float32(shift)).astype(np.float32)
    s = tensor_stats(torch.from_numpy(a))
    ref = oracle(a)
    scale = float(np.abs(a.astype(np.float64)).max()) + 1e-30
    assert s.numel == a.size and s.shape == a.shape and s.dtype == "torch.float32"
    assert s.min == ref["min"] and s.max == ref["max"]
    assert s.zero_frac == ref["zero_frac"]
    assert abs(s.mean - ref["mean"]) <= 1e-6 * scale
    assert abs(s.rms - ref["rms"]) <= 1e-5 * scale
    assert abs(s.std - ref["std"]) <= 1e-5 * ref["std"] + 1e-6 * scale
    assert s.nan == 0 and s.inf == 0


def test_integer_and_bool_tensors():
    s = tensor_stats(torch.tensor([[1, 2, 3, 0]], dtype=torch.int32))
    assert (s.dtype, s.mean, s.min, s.max, s.zero_frac) == ("torch.int32", 1.5, 0.0, 3.0, 0.25)
    assert s.std == pytest.approx(np.std([1, 2, 3, 0], ddof=1))
    b = tensor_stats(torch.tensor([True, False, True, True]))
    assert (b.dtype, b.mean, b.zero_frac) == ("torch.bool", 0.75, 0.25)
    big = tensor_stats(torch.tensor([65535, 1], dtype=torch.int64))
    assert big.mean == 32768.0 and big.max == 65535.0


def test_bf16_accumulates_in_float32():
    x = torch.full((4096,), 1.0078125, dtype=torch.bfloat16)  # a bf16 sum would stall at 256
    s = tensor_stats(x)
    assert s.dtype == "torch.bfloat16"
    assert s.mean == pytest.approx(1.0078125, rel=1e-6)
    assert s.std == 0.0


def test_empty_tensor_gives_a_well_defined_record():
    s = tensor_stats(torch.empty(0, 3))
    assert s.numel == 0 and s.shape == (0, 3)
    assert s.mean is s.std is s.min is s.max is s.rms is s.zero_frac is None
    assert s.nan == s.inf == 0 and not s.all_zero


def test_one_element_std_is_zero_not_nan():
    s = tensor_stats(torch.tensor(11.090358))
    assert s.shape == () and s.numel == 1 and s.std == 0.0 and s.mean == pytest.approx(11.090358)


def test_nan_and_inf_are_counted():
    x = torch.tensor([1.0, float("nan"), float("inf"), float("-inf"), 0.0])
    s = tensor_stats(x)
    assert (s.nan, s.inf, s.zero_frac) == (1, 2, 0.2)
    assert s.mean is not None and math.isnan(s.mean) and not s.finite


def test_a_batch_reads_back_in_order_with_missing_slots():
    batch: StatsBatch[str, str] = StatsBatch()
    batch.add("a", torch.ones(3))
    batch.add_missing("none")
    batch.add("empty", torch.empty(0))
    batch.add("b", torch.arange(4.0))
    batch.add_scalar("loss", torch.tensor(2.5))
    rows, scalars = batch.finish()
    assert [k for k, _ in rows] == ["a", "none", "empty", "b"]
    a, none, empty, b = (s for _, s in rows)
    assert a is not None and empty is not None and b is not None
    assert a.mean == 1.0 and none is None and empty.numel == 0
    assert b.max == 3.0 and scalars == {"loss": 2.5}
    assert len(batch) == 0


def test_stats_vector_stays_on_the_device_and_is_detached():
    x = torch.randn(5, requires_grad=True)
    v = stats_vector(x * 2)
    assert v is not None
    assert v.device == x.device and not v.requires_grad and v.dtype == torch.float64


def test_the_same_tensor_twice_is_summarised_once_unless_modified(monkeypatch):
    from pytest_gpttrace import stats

    calls = []
    real = stats.stats_vector

    def counted(x, path="eager"):
        calls.append(1)
        return real(x, path)

    monkeypatch.setattr(stats, "stats_vector", counted)
    batch: StatsBatch[str, str] = StatsBatch()
    x = torch.arange(6.0)
    batch.add("a", x)
    batch.add("a_again", x)  # a tap whose output is another tap's output
    batch.add("a_view", x.view(2, 3))  # another tensor object: summarised on its own
    x.mul_(2)  # modified in place: the version changed
    batch.add("a_doubled", x)
    rows = {key: s for key, s in batch.finish()[0] if s is not None}  # no slot was added as missing
    assert len(calls) == 3
    assert rows["a"].mean == rows["a_again"].mean == rows["a_view"].mean == 2.5
    assert rows["a_doubled"].mean == 5.0 and rows["a_view"].shape == (2, 3)
