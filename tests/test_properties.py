"""The property kit on the reference functions, and on broken variants it must catch."""

import pytest
import torch
import torch.nn.functional as F
from hypothesis import example, given
from hypothesis import strategies as st

from pytest_gpttrace.properties import (
    BF16_TABLE_EPS,
    PropertyViolation,
    check_rmsnorm,
    check_rope,
    float32_arrays,
    norm_inputs,
    rmsnorm_unit_rms,
    rope_inputs,
    rope_preserves_norm,
    rope_relative_position,
)
from reference_model import apply_rotary_emb, norm, rotary_tables


def reference_rope(table_dtype=torch.bfloat16):
    def rope(x, positions):
        cos, sin = rotary_tables(positions, x.shape[-1], dtype=table_dtype)
        return apply_rotary_emb(x, cos, sin)
    return rope


def rope_flipped_sin(x, positions):
    """The sign of sin flipped in the first half only: no longer a rotation."""
    cos, sin = rotary_tables(positions, x.shape[-1])
    d = x.shape[-1] // 2
    x1, x2 = x[..., :d], x[..., d:]
    return torch.cat([x1 * cos - x2 * sin, x1 * (-sin) + x2 * cos], -1).to(x.dtype)


def rope_interleaved_with_half_split_tables(x, positions):
    """Interleaved pairs (2i, 2i+1) rotated with tables laid out for half-split pairs."""
    cos, sin = rotary_tables(positions, x.shape[-1])
    cos, sin = torch.cat([cos, cos], -1), torch.cat([sin, sin], -1)
    rotated = torch.stack([-x[..., 1::2], x[..., ::2]], -1).flatten(-2)
    return (x * cos + rotated * sin).to(x.dtype)


def norm_with_scale_two(x):
    return F.rms_norm(x, (x.size(-1),), weight=torch.full((x.size(-1),), 2.0, dtype=x.dtype))


def norm_over_wrong_dim(x):
    return F.rms_norm(x.transpose(-1, -2), (x.size(-2),)).transpose(-1, -2)


# ------------------------------------------------------------------ the reference passes
def test_reference_rope_with_bf16_tables_passes():
    check_rope(reference_rope(), head_dims=(2, 8, 128))


def test_reference_rope_with_float32_tables_passes_the_tight_bounds():
    check_rope(reference_rope(torch.float32), table_eps=2.0**-24)


def test_reference_norm_passes():
    check_rmsnorm(norm)


# ------------------------------------------------------------------ broken variants fail
def test_flipped_sin_fails():
    with pytest.raises(PropertyViolation, match=r"^rope preserves norms: "):  # the first property checked
        check_rope(rope_flipped_sin)


def test_flipped_sin_fails_each_check():
    gen = torch.Generator().manual_seed(0)
    q, k = torch.randn(8, generator=gen), torch.randn(8, generator=gen)
    with pytest.raises(PropertyViolation, match="relative position"):
        rope_relative_position(rope_flipped_sin, q, k, 5, 2, 7)
    x = torch.randn(1, 3, 1, 8, generator=gen)
    with pytest.raises(PropertyViolation, match="preserves norms"):
        rope_preserves_norm(rope_flipped_sin, x, torch.tensor([1, 2, 3]))


def test_interleaved_pairs_fail_the_relative_position_check():
    with pytest.raises(PropertyViolation, match="relative position"):
        rope_relative_position(rope_interleaved_with_half_split_tables, torch.ones(8), torch.ones(8), 3, 1, 5)
    with pytest.raises(PropertyViolation, match=r"^rope preserves norms: "):
        check_rope(rope_interleaved_with_half_split_tables)


def test_a_correct_interleaved_rope_is_caught_by_the_layout_check_only():
    def interleaved(x, positions):
        cos, sin = rotary_tables(positions, x.shape[-1], dtype=torch.float32)
        cos, sin = cos.repeat_interleave(2, -1), sin.repeat_interleave(2, -1)
        rotated = torch.stack([x[..., 1::2], -x[..., ::2]], -1).flatten(-2)
        return x * cos + rotated * sin
    check_rope(interleaved, half_split=False, table_eps=2.0**-24)
    # every head vector keeps its norm (it is a rotation), but the half-split pairs do not
    with pytest.raises(PropertyViolation, match=r"^rope preserves norms: a pair \(i, i\+D/2\) norm went from "):
        check_rope(interleaved, table_eps=2.0**-24)


def test_norm_with_learnable_scale_two_fails():
    with pytest.raises(PropertyViolation, match="rms 1"):
        check_rmsnorm(norm_with_scale_two, shrink=False)


def test_norm_over_the_wrong_dim_fails():
    with pytest.raises(PropertyViolation, match=r"^rmsnorm output has rms 1: "):
        check_rmsnorm(norm_over_wrong_dim, shrink=False)


# ------------------------------------------------------------------ pinned edge cases
@given(rope_inputs(head_dims=(8,)))
@example((torch.zeros(1, 2, 1, 8), torch.tensor([0, 4096])))  # zero vectors, the largest position
@example((torch.full((1, 1, 1, 8), 10.0), torch.tensor([4095])))  # largest magnitude, far position
def test_reference_rope_preserves_norms_at_edges(xp):
    x, positions = xp
    rope_preserves_norm(reference_rope(), x, positions, table_eps=BF16_TABLE_EPS)


@given(st.tuples(float32_arrays((8,)), float32_arrays((8,))))
@example((torch.zeros(8), torch.ones(8)))  # a zero query: every product is 0
def test_reference_rope_relative_position_at_edges(qk):
    rope_relative_position(reference_rope(), qk[0], qk[1], 0, 2048, 1024)


@given(norm_inputs())
@example(torch.tensor([[[1e-3, 0.2], [10.0, -10.0]]]).add(0.4))  # a nearly degenerate row lifted
@example(torch.tensor([[[10.0] + [0.0] * 63, [0.3] * 64]]))  # one spike: rms sqrt(1/64)*10
def test_reference_norm_unit_rms_at_edges(x):
    rmsnorm_unit_rms(norm, x)


def test_zero_input_gives_a_finite_norm():
    y = norm(torch.zeros(3, 4))
    assert torch.isfinite(y).all() and not y.any()
