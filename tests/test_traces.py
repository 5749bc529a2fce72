"""The project's own trace tests: the reference model against its shipped goldens (golden/).

Regenerate after an intended change of the reference model: pytest --update-golden tests/test_traces.py
"""

import pytest

from tests.models import TINY_GOLDEN_CONFIG


@pytest.mark.gpt_trace(iterations=3, seed=42)
def test_reference_model_at_the_seed_config(gpt_trace, gpt_golden):
    """Depth 4, d 256, 2 heads, V 65536, T 1024: the config of the seed report (about a minute)."""
    assert gpt_trace == gpt_golden


@pytest.mark.gpt_trace(iterations=3, seed=42)
@pytest.mark.parametrize("gpt_config", [TINY_GOLDEN_CONFIG], ids=["tiny"])
def test_reference_model_tiny(gpt_trace, gpt_golden):
    assert gpt_trace == gpt_golden


@pytest.mark.gpt_trace(iterations=4, seed=7, micro_steps=2)
@pytest.mark.parametrize("gpt_config", [TINY_GOLDEN_CONFIG], ids=["tiny"])
def test_reference_model_tiny_gradient_accumulation(gpt_trace, gpt_golden):
    assert [it.stepped for it in gpt_trace.iterations] == [False, True, False, True]
    assert gpt_trace == gpt_golden
