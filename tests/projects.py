"""The user project the plugin tests build with pytester: a conftest with a small config and one
traced test; and the shipped tiny golden."""

from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TINY_GOLDEN = ROOT / "golden" / "tests" / "test_traces" / "test_reference_model_tiny[tiny].json"

# a conftest that makes the reference model small enough for a test of the plugin
CONFTEST = """
import pytest
from reference_model import GPTConfig

@pytest.fixture
def gpt_config():
    return GPTConfig(sequence_len=16, vocab_size=64, n_layer=2, n_head=2, n_kv_head=2, n_embd=16)
"""

# one traced test compared with its golden
TEST_FILE = """
import pytest

@pytest.mark.gpt_trace(iterations=2)
def test_model(gpt_trace, gpt_golden):
    assert gpt_trace == gpt_golden
"""
