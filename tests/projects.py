"""The user project the plugin tests build with pytester: a conftest with a small config, one
traced test, and the calls that run pytest in it. The ``project`` fixture (tests/conftest.py)
builds it."""

import pytest

# golden life cycles of uncalibrated goldens (format 1, exact); calibration has tests of its own
NO_CALIBRATION = "[pytest]\ngpt_trace_calibration = false\n"

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

# where that test's golden is written, relative to the project
GOLDEN = "golden/test_model/test_model.json"


def user_project(pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch, test_file: str | None = TEST_FILE) -> pytest.Pytester:
    """The project in ``pytester``'s folder: uncalibrated goldens, CONFTEST, and ``test_file`` as
    test_model.py (None: no test file); CI and the statistics-path variable unset, as on a
    developer's machine."""
    monkeypatch.delenv("CI", raising=False)
    monkeypatch.delenv("GPTTRACE_STATS_PATH", raising=False)
    pytester.makeini(NO_CALIBRATION)
    pytester.makeconftest(CONFTEST)
    if test_file is not None:
        pytester.makepyfile(test_model=test_file)
    return pytester


def run(pytester: pytest.Pytester, *args: str) -> pytest.RunResult:
    """pytest ARGS in the project, in this process."""
    return pytester.runpytest_inprocess("-p", "no:cacheprovider", *args)


def run_subprocess(pytester: pytest.Pytester, *args: str) -> pytest.RunResult:
    """pytest ARGS in the project, in a fresh process."""
    return pytester.runpytest_subprocess("-p", "no:cacheprovider", *args)
