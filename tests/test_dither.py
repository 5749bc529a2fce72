"""The kernel dither perturbs results like another kernel would, and nothing else."""

import torch

from pytest_gpttrace import capture
from pytest_gpttrace.dither import KernelDither, undithered
from tests.models import tiny_reference


def test_float32_results_move_by_at_most_one_ulp_and_do_move():
    a, b = torch.randn(64, 64), torch.randn(64, 64)
    exact = a @ b
    with KernelDither(1):
        dithered = a @ b
    rel = ((dithered - exact).abs() / exact.abs().clamp_min(1e-30)).max().item()
    assert 0 < rel <= 2.0**-23 * 1.0001  # 2^-24 of dither, half an ulp of rounding
    with KernelDither(1):
        again = a @ b
    assert torch.equal(dithered, again)  # a seed is one fixed draw
    with KernelDither(2):
        other = a @ b
    assert not torch.equal(dithered, other)


def test_16_bit_matmuls_are_accumulated_in_float32_then_rounded():
    a, b = torch.randn(32, 32).bfloat16(), torch.randn(32, 32).bfloat16()
    wide = (a.float() @ b.float())
    with KernelDither(3):
        out = a @ b
    assert out.dtype == torch.bfloat16
    # within one bf16 rounding of the float32 result
    assert ((out.float() - wide).abs() <= wide.abs() * 2.0**-8 + 1e-6).all()


def test_views_in_place_ops_integers_and_the_global_rng_are_untouched():
    torch.manual_seed(0)
    expected_draw = torch.rand(3)
    torch.manual_seed(0)
    base = torch.ones(4, 4)
    counts = torch.arange(10)
    with KernelDither(1):
        view = base[1]          # a view keeps aliasing its base
        view.mul_(3.0)          # an in-place op writes exactly
        summed = counts.sum()   # integers are exact
        draw = torch.rand(3)    # the global generator draws as without the dither
        const = torch.full((3,), 0.1)  # a constant is no kernel's result
    assert base[1].eq(3.0).all() and base[0].eq(1.0).all()
    assert summed.item() == 45
    assert torch.equal(draw, expected_draw)
    assert torch.equal(const, torch.full((3,), 0.1))


def test_undithered_blocks_see_exact_results():
    a = torch.randn(16, 16)
    with KernelDither(1), undithered():
        out = a @ a
    assert torch.equal(out, a @ a)


def test_a_dithered_training_step_keeps_exact_zeros_and_the_tool_measures_exactly():
    """lm_head and c_proj start at zero: their outputs stay exactly zero under the dither (0 * (1 + e)
    is 0), and the capture's zero counts are not dithered either."""
    model, batches, _ = tiny_reference()
    idx, targets = next(batches)
    with KernelDither(5), capture(model) as cap:
        loss = model(idx, targets)
        loss.backward()
        cap.end_iteration(loss=loss)
    forward = cap.trace().iterations[0].forward
    assert forward["blocks.0.mlp.out"].all_zero and forward["lm_head.logits"].all_zero
    zero_frac = forward["blocks.0.mlp.relu2"].zero_frac
    assert zero_frac is not None and zero_frac < 1


def test_an_additive_mask_keeps_its_infinities():
    x = torch.randn(8, 8)
    mask = torch.triu(torch.full((8, 8), float("-inf")), diagonal=1)
    with KernelDither(1):
        out = x + mask
    assert torch.equal(torch.isinf(out), torch.isinf(mask)) and not torch.isnan(out).any()


def test_a_dithered_capture_leaves_the_compiled_statistics_path_to_later_ones(monkeypatch):
    """torch.compile cannot run under a dispatch mode: a dithered capture takes the eager path
    for itself and records nothing about the compiled one, so the next capture compiles."""
    from pytest_gpttrace import stats

    monkeypatch.setattr(stats, "_COMPILED", stats._Compiled())  # a process that has not probed yet
    monkeypatch.setenv(stats.ENV_VAR, "auto")
    model, _, _ = tiny_reference()
    with KernelDither(2), capture(model) as cap:
        pass
    assert cap.stats_path == "eager" and "TorchDispatchMode" in (cap.stats_note or "")
    assert stats._COMPILED.probed == {} and stats._COMPILED.failures == {}
    with capture(model) as cap:
        pass
    assert cap.stats_path == "compiled"
