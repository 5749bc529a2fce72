"""One-line changes of the reference model's math fail against the shipped goldens, and the first
divergence named is where the change acts."""

import pytest
import torch

import reference_model.gpt as gpt
from pytest_gpttrace.compare import STATISTICAL, compare
from pytest_gpttrace.report import render_comparison
from pytest_gpttrace.trace import load
from reference_model import GPTConfig
from tests.models import TINY_GOLDEN_CONFIG, trace_reference
from tests.paths import SEED_GOLDEN, SEED_REPORT, TINY_GOLDEN


def test_flipped_rope_sin_diverges_first_at_q_rope_in_iteration_0(monkeypatch):
    def flipped(x, cos, sin):
        d = x.shape[-1] // 2
        x1, x2 = x[..., :d], x[..., d:]
        return torch.cat([x1 * cos - x2 * sin, x1 * (-sin) + x2 * cos], -1).to(x.dtype)  # was: + x2 * sin

    monkeypatch.setattr(gpt, "apply_rotary_emb", flipped)
    result = compare(load(SEED_GOLDEN), trace_reference(GPTConfig.from_depth(4), iterations=1))
    assert result.first is not None
    assert (result.first.iteration, result.first.section, result.first.stage) == (0, "forward", "blocks.0.attn.q_rope")
    first_line = render_comparison(result, golden_name=str(SEED_GOLDEN))[0]
    assert "first divergence: blocks.0.attn.q_rope (forward), iteration 0" in first_line


def test_softcap_15_5_diverges_first_at_softcap_in_iteration_1(monkeypatch):
    original = gpt.softcap
    monkeypatch.setattr(gpt, "softcap", lambda logits, cap: original(logits, 15.5))  # was: cap (15)
    result = compare(load(TINY_GOLDEN), trace_reference(TINY_GOLDEN_CONFIG, iterations=2))
    # iteration 0 matches: the logits are exactly zero, so the cap cannot act there
    assert result.first is not None
    assert (result.first.iteration, result.first.section, result.first.stage) == (1, "forward", "lm_head.softcap")


@pytest.mark.parametrize("threads", [1, 2])
def test_the_tiny_golden_passes_with_1_and_2_threads(threads):
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        trace = trace_reference(TINY_GOLDEN_CONFIG, iterations=3)
    finally:
        torch.set_num_threads(before)
    result = compare(load(TINY_GOLDEN), trace)
    assert result.ok, "\n".join(render_comparison(result, golden_name=str(TINY_GOLDEN)))


def test_the_seed_report_as_a_golden_differs_only_in_the_loss_trajectory():
    from pytest_gpttrace import markdown

    seed = markdown.load(SEED_REPORT)
    ours = load(SEED_GOLDEN)  # the reference model at the seed config, 3 optimizer steps
    result = compare(seed, ours, STATISTICAL)
    assert [m.where for m in result.mismatches] == ["loss, iteration 1", "loss, iteration 2"]
