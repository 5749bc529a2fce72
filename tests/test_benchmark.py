"""The overhead benchmark runs end to end (a tiny config; it measures, nothing here is timed)."""

import re
import subprocess
import sys

from tests.paths import ROOT


def test_overhead_benchmark_prints_its_summary_line():
    done = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "overhead.py"), "--depths", "1", "2", "--pairs", "2",
         "--sequence-len", "32", "--vocab-size", "256"],
        capture_output=True, text=True, timeout=600, cwd=ROOT,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    lines = done.stdout.strip().splitlines()
    assert re.fullmatch(r"overhead depth1=\d+\.\d\d depth2=\d+\.\d\d mem=(\d+\.\d\d|n/a)", lines[-1]), lines[-1]
    assert sum("pair " in line for line in lines) == 4
    assert any(re.search(r"depth 2: overhead \d+\.\d+ \(median of 2 pairs, spread .*statistics path: (compiled|eager)",
                         line) for line in lines)


def test_overhead_benchmark_puts_granularities_side_by_side():
    done = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "overhead.py"), "--depths", "1", "--pairs", "1",
         "--sequence-len", "32", "--vocab-size", "256", "--granularity", "taps", "ops"],
        capture_output=True, text=True, timeout=600, cwd=ROOT,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    lines = done.stdout.strip().splitlines()
    assert re.fullmatch(r"overhead depth1=\d+\.\d\d depth1\.ops=\d+\.\d\d mem=(\d+\.\d\d|n/a)", lines[-1]), lines[-1]
    assert sum("granularity ops" in line for line in lines) == 1


def test_overhead_benchmark_rejects_bad_arguments():
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "overhead.py"), "--pairs", "0"],
                          capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert done.returncode == 2 and "--pairs and --warmup must be at least 1" in done.stderr
