"""The project's files the tests read: the checkout, the shipped goldens, the seed report.

The golden paths are written out here; tests/test_golden_paths.py checks that the node ids of
tests/test_traces.py map to them.
"""

from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
GOLDEN_DIR = ROOT / "golden"
# the reference model at the seed config (tests/test_traces.py::test_reference_model_at_the_seed_config)
SEED_GOLDEN = GOLDEN_DIR / "tests" / "test_traces" / "test_reference_model_at_the_seed_config.json"
# the reference model at TINY_GOLDEN_CONFIG (tests/test_traces.py::test_reference_model_tiny[tiny])
TINY_GOLDEN = GOLDEN_DIR / "tests" / "test_traces" / "test_reference_model_tiny[tiny].json"
# the Markdown report of the run the project started from (depth 4, V 65536, 3 iterations)
SEED_REPORT = ROOT / "tests" / "data" / "seed_trace.md"
