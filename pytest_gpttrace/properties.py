"""Property checks for RoPE and RMSNorm implementations, driven by hypothesis.

Bring your own function and run the whole kit against it::

    from pytest_gpttrace.properties import check_rope, check_rmsnorm

    def test_my_rope():
        check_rope(lambda x, positions: my_rope(x, positions), head_dims=(64,))

    def test_my_norm():
        check_rmsnorm(my_rms_norm)

Interfaces:

- a RoPE function is called as ``rope(x, positions)`` with ``x`` of shape (B, T, H, D), float32,
  and ``positions`` an int64 tensor of shape (T,) (positions may be negative: rotating by -θ);
  it returns the rotated tensor.
- an RMSNorm function is called as ``norm(x)`` and normalises over the last dim.

Each ``rope_*``/``rmsnorm_*`` function checks one property on given inputs and raises
``PropertyViolation`` (an AssertionError) naming the property and by how much it failed, so the
functions also serve in your own ``@given`` tests. ``check_rope``/``check_rmsnorm`` drive them all
with bounded, deterministic hypothesis strategies.

Tolerances. bfloat16 keeps 8 significant bits, so every cos/sin entry of a bf16 table carries a
relative rounding error of at most 2^-9. A rotation built from rounded entries scales each pair's
norm by sqrt(cos'^2 + sin'^2), which lies within 2^-9 of 1. ``table_eps`` is that relative error
(2^-9 for bf16 tables, 2^-24 for float32); the norm bound allowed is 2*table_eps*|x| plus float32
slack, the dot-product bound 4*table_eps*|q||k| plus slack.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Sequence
from typing import NoReturn

import numpy as np
import torch
from hypothesis import Phase, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

RopeFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
NormFn = Callable[[torch.Tensor], torch.Tensor]

BF16_TABLE_EPS = 2.0**-9
FLOAT32_TABLE_EPS = 2.0**-24
# float32 arithmetic slack, relative to the magnitudes involved (|x| <= 10, D <= 256)
_F32_SLACK = 1e-5


class PropertyViolation(AssertionError):
    """A RoPE or RMSNorm property does not hold."""


def _fail(prop: str, detail: str) -> NoReturn:
    raise PropertyViolation(f"{prop}: {detail}")


# --------------------------------------------------------------------------- strategies
# Values are bounded to [-10, 10] float32: the invariants are about geometry, not overflow, and a
# bounded range keeps float32 rounding proportional so one relative tolerance fits every example.
_ELEMENT = st.floats(-10.0, 10.0, allow_nan=False, allow_infinity=False, width=32)


def float32_arrays(shape: tuple[int, ...]) -> st.SearchStrategy[torch.Tensor]:
    return hnp.arrays(np.float32, shape, elements=_ELEMENT).map(torch.from_numpy)


@st.composite
def rope_inputs(draw: st.DrawFn, head_dims: Sequence[int] = (2, 8, 64),
                max_position: int = 4096) -> tuple[torch.Tensor, torch.Tensor]:
    """(x (B, T, H, D) float32, positions (T,) int64), small B, T, H."""
    D = draw(st.sampled_from(tuple(head_dims)))
    B, T, H = draw(st.integers(1, 2)), draw(st.integers(1, 4)), draw(st.integers(1, 2))
    x = draw(float32_arrays((B, T, H, D)))
    positions = draw(st.lists(st.integers(0, max_position), min_size=T, max_size=T))
    return x, torch.tensor(positions, dtype=torch.int64)


@st.composite
def norm_inputs(draw: st.DrawFn, min_rms: float = 0.2) -> torch.Tensor:
    """(B, T, D) float32 with T >= 2 and every last-dim row of rms >= min_rms (non-degenerate)."""
    B, T, D = draw(st.integers(1, 2)), draw(st.integers(2, 4)), draw(st.integers(2, 64))
    x = draw(float32_arrays((B, T, D)))
    rms = x.pow(2).mean(-1, keepdim=True).sqrt()
    # lift degenerate rows rather than filter them, so hypothesis never runs dry
    x = torch.where(rms < min_rms, x + min_rms * 2, x)
    return x


# --------------------------------------------------------------------------- RoPE properties
def _head_norms(x: torch.Tensor) -> torch.Tensor:
    norms: torch.Tensor = x.double().norm(dim=-1)  # Tensor.norm is unannotated in torch
    return norms


def rope_shape_dtype(rope: RopeFn, x: torch.Tensor, positions: torch.Tensor) -> None:
    y = rope(x, positions)
    if y.shape != x.shape or y.dtype != x.dtype:
        _fail("rope keeps shape and dtype", f"input {tuple(x.shape)} {x.dtype}, output {tuple(y.shape)} {y.dtype}")


def rope_preserves_norm(
    rope: RopeFn, x: torch.Tensor, positions: torch.Tensor, table_eps: float = BF16_TABLE_EPS,
    half_split: bool = True,
) -> None:
    """Every head vector, and (half-split layout) every rotated pair (dim i, dim i + D/2), keeps its norm."""
    y = rope(x, positions)
    d = x.shape[-1] // 2
    checks = [("head vector", _head_norms(x), _head_norms(y))]
    if half_split:
        checks.append(("pair (i, i+D/2)", torch.hypot(x[..., :d].double(), x[..., d:].double()),
                       torch.hypot(y[..., :d].double(), y[..., d:].double())))
    for what, a, b in checks:
        allowed = 2 * table_eps * a + _F32_SLACK * (1 + a)
        excess = (b - a).abs() - allowed
        if (excess > 0).any():
            i = int(excess.argmax())
            _fail("rope preserves norms",
                  f"a {what} norm went from {a.flatten()[i].item():.6g} to {b.flatten()[i].item():.6g} "
                  f"(allowed ±{allowed.flatten()[i].item():.3g})")


def rope_position_zero_is_identity(rope: RopeFn, x: torch.Tensor) -> None:
    """At position 0 cos = 1 and sin = 0 exactly, in any table precision."""
    positions = torch.zeros(x.shape[1], dtype=torch.int64)
    y = rope(x, positions)
    diff = (y.double() - x.double()).abs().max().item() if x.numel() else 0.0
    if diff > _F32_SLACK:
        _fail("rope at position 0 is the identity", f"max |rope(x, 0) - x| = {diff:.3g}")


def rope_relative_position(
    rope: RopeFn, q: torch.Tensor, k: torch.Tensor, m: int, n: int, shift: int,
    table_eps: float = BF16_TABLE_EPS,
) -> None:
    """<rope(q, m), rope(k, n)> depends only on m - n: it equals <rope(q, m+s), rope(k, n+s)>.

    q and k are single head vectors of shape (D,).
    """
    def at(v: torch.Tensor, p: int) -> torch.Tensor:
        return rope(v.view(1, 1, 1, -1), torch.tensor([p], dtype=torch.int64)).view(-1).double()

    a = torch.dot(at(q, m), at(k, n)).item()
    b = torch.dot(at(q, m + shift), at(k, n + shift)).item()
    scale = q.double().norm().item() * k.double().norm().item()
    allowed = 4 * table_eps * scale + _F32_SLACK * (1 + scale)
    if abs(a - b) > allowed:
        _fail("rope depends only on relative position",
              f"<rope(q,{m}), rope(k,{n})> = {a:.6g} but <rope(q,{m + shift}), rope(k,{n + shift})> = {b:.6g} "
              f"(|diff| {abs(a - b):.3g} > allowed {allowed:.3g})")


def rope_inverse(rope: RopeFn, x: torch.Tensor, positions: torch.Tensor, table_eps: float = FLOAT32_TABLE_EPS) -> None:
    """Rotating by -θ (negative positions) undoes rotating by +θ."""
    y = rope(rope(x, positions), -positions)
    a = _head_norms(x)
    allowed = 4 * table_eps * a + _F32_SLACK * (1 + a)
    err = (y.double() - x.double()).norm(dim=-1)
    if (err > allowed).any():
        i = int((err - allowed).argmax())
        _fail("rope by -θ undoes rope by +θ",
              f"|rope(rope(x, p), -p) - x| = {err.flatten()[i].item():.3g} > allowed {allowed.flatten()[i].item():.3g}")


def rope_half_split_pairs(rope: RopeFn, head_dim: int, position: int = 1) -> None:
    """Dim i rotates only with dim i + D/2 (the half-split layout, not interleaved pairs)."""
    d = head_dim // 2
    for i in range(head_dim):
        e = torch.zeros(1, 1, 1, head_dim)
        e[..., i] = 1.0
        y = rope(e, torch.tensor([position], dtype=torch.int64)).view(-1)
        partner = i + d if i < d else i - d
        outside = y.clone()
        outside[i] = 0
        outside[partner] = 0
        if outside.abs().max().item() > _F32_SLACK:
            j = int(outside.abs().argmax())
            _fail("rope pairs dim i with dim i + D/2",
                  f"rotating unit vector e_{i} put {y[j].item():.3g} into dim {j}, outside its pair ({i}, {partner})")


# --------------------------------------------------------------------------- RMSNorm properties
def _rms(x: torch.Tensor) -> torch.Tensor:
    return x.double().pow(2).mean(-1).sqrt()


def rmsnorm_unit_rms(norm: NormFn, x: torch.Tensor, tol: float = 1e-4) -> None:
    """A non-degenerate row comes out with rms 1 (up to the eps inside the norm)."""
    r = _rms(norm(x))
    dev = (r - 1).abs()
    if dev.numel() and dev.max().item() > tol:
        i = int(dev.argmax())
        _fail("rmsnorm output has rms 1",
              f"a row of input rms {_rms(x).flatten()[i].item():.6g} came out with rms {r.flatten()[i].item():.6g} (tolerance {tol:g})")


def rmsnorm_scale_invariant(norm: NormFn, x: torch.Tensor, c: float, tol: float = 1e-4) -> None:
    """norm(c·x) = sign(c)·norm(x) for c != 0."""
    a, b = norm(x * c).double(), math.copysign(1.0, c) * norm(x).double()
    err = ((a - b).abs() / (1 + b.abs())).max().item()
    if err > tol:
        _fail("rmsnorm(c·x) = sign(c)·rmsnorm(x)", f"c = {c:g}: max relative difference {err:.3g} > {tol:g}")


def rmsnorm_idempotent(norm: NormFn, x: torch.Tensor, tol: float = 1e-4) -> None:
    a = norm(x).double()
    b = norm(norm(x)).double()
    err = ((a - b).abs() / (1 + a.abs())).max().item()
    if err > tol:
        _fail("rmsnorm is idempotent", f"max relative |norm(norm(x)) - norm(x)| = {err:.3g} > {tol:g}")


def rmsnorm_zero_is_finite(norm: NormFn, shape: tuple[int, ...] = (2, 3, 8)) -> None:
    y = norm(torch.zeros(shape))
    if not torch.isfinite(y).all():
        _fail("rmsnorm of a zero vector is finite", f"got {y.flatten()[:4].tolist()}")


def rmsnorm_shape_dtype(norm: NormFn, x: torch.Tensor) -> None:
    for dtype in (torch.float32, torch.bfloat16):
        xi = x.to(dtype)
        y = norm(xi)
        if y.shape != xi.shape or y.dtype != xi.dtype:
            _fail("rmsnorm keeps shape and dtype", f"input {tuple(xi.shape)} {xi.dtype}, output {tuple(y.shape)} {y.dtype}")


def rmsnorm_permutation_equivariant(norm: NormFn, x: torch.Tensor, perm: torch.Tensor, tol: float = 1e-5) -> None:
    a = norm(x[..., perm]).double()
    b = norm(x)[..., perm].double()
    err = (a - b).abs().max().item()
    if err > tol * (1 + b.abs().max().item()):
        _fail("rmsnorm commutes with permutations of the last dim", f"max difference {err:.3g}")


# --------------------------------------------------------------------------- drivers
def _settings(max_examples: int, shrink: bool) -> settings:
    # deterministic: the same examples on every run and machine, no example database, no deadline
    phases = [Phase.explicit, Phase.generate] + ([Phase.shrink] if shrink else [])
    return settings(max_examples=max_examples, derandomize=True, deadline=None, database=None, phases=phases)


def check_rope(
    rope: RopeFn,
    *,
    head_dims: Sequence[int] = (2, 8, 64),
    table_eps: float = BF16_TABLE_EPS,
    inverse: bool = True,
    half_split: bool = True,
    max_examples: int = 50,
    shrink: bool = True,
) -> None:
    """Run every RoPE property against ``rope``; raise PropertyViolation on the first that fails.

    table_eps: relative precision of the cos/sin tables ``rope`` uses (bf16 by default).
    inverse: check that negative positions undo positive ones (False for a rope that only takes
    non-negative positions). With float32 tables (table_eps=2**-24) this holds to float32 precision.
    half_split: also check the pair layout (dim i with i + D/2); False for an interleaved RoPE.
    shrink: False reports the first failing example as found (faster; less minimal).
    """
    head_dims = tuple(head_dims)
    inputs = rope_inputs(head_dims)

    @_settings(max_examples, shrink)
    @given(inputs)
    def shape_dtype_and_norm(xp: tuple[torch.Tensor, torch.Tensor]) -> None:
        x, positions = xp
        rope_shape_dtype(rope, x, positions)
        rope_preserves_norm(rope, x, positions, table_eps=table_eps, half_split=half_split)
        rope_position_zero_is_identity(rope, x)

    @_settings(max_examples, shrink)
    @given(st.sampled_from(head_dims).flatmap(
        lambda D: st.tuples(float32_arrays((D,)), float32_arrays((D,)),
                            st.integers(0, 2048), st.integers(0, 2048), st.integers(-1024, 1024))))
    def relative_position(args: tuple[torch.Tensor, torch.Tensor, int, int, int]) -> None:
        q, k, m, n, s = args
        s = max(s, -min(m, n))  # keep positions non-negative
        rope_relative_position(rope, q, k, m, n, s, table_eps=table_eps)

    shape_dtype_and_norm()
    relative_position()
    if inverse:
        @_settings(max_examples, shrink)
        @given(inputs)
        def undoes(xp: tuple[torch.Tensor, torch.Tensor]) -> None:
            x, positions = xp
            rope_inverse(rope, x, positions, table_eps=table_eps)
        undoes()
    if half_split:
        for D in head_dims:
            rope_half_split_pairs(rope, D)


def check_rmsnorm(norm: NormFn, *, tol: float = 1e-4, max_examples: int = 50, shrink: bool = True) -> None:
    """Run every RMSNorm property against ``norm``; raise PropertyViolation on the first that fails.

    shrink=False reports the first failing example as found (faster; less minimal)."""

    @_settings(max_examples, shrink)
    @given(norm_inputs(), st.floats(0.5, 100.0), st.booleans(), st.randoms(use_true_random=False))
    def properties(x: torch.Tensor, c: float, negative: bool, rnd: random.Random) -> None:
        rmsnorm_shape_dtype(norm, x)
        rmsnorm_unit_rms(norm, x, tol)
        rmsnorm_scale_invariant(norm, x, -c if negative else c, tol)
        rmsnorm_idempotent(norm, x, tol)
        perm = list(range(x.shape[-1]))
        rnd.shuffle(perm)
        rmsnorm_permutation_equivariant(norm, x, torch.tensor(perm))

    rmsnorm_zero_is_finite(norm)
    properties()
