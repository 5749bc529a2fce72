"""What a calibrated golden costs: recording the tiny reference golden with and without its band,
and comparing against it, side by side on this machine.

    python benchmarks/calibration.py [--repeats 3]

Each figure is a median over the repeats of a fresh `python -m pytest` process in a temporary
project (so it includes starting Python, importing torch and, on the first run of each kind,
compiling the statistics kernel); the in-process comparison is a median over 50 calls. The last
line is machine-readable: `calibration record_s=.. plain_record_s=.. compare_ratio=..`.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.platforms import TINY_TEST as TEST  # noqa: E402  the tiny golden test a user's project holds


def pytest_run(project: Path, *args: str, calibration: bool = True) -> float:
    env = {k: v for k, v in os.environ.items() if k != "CI"}
    env["PYTHONPATH"] = str(ROOT)
    (project / "pytest.ini").write_text(f"[pytest]\ngpt_trace = true\ngpt_trace_calibration = {str(calibration).lower()}\n")
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *args], cwd=project,
                          env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(f"pytest {' '.join(args)} failed in {project}:\n{done.stdout[-2000:]}{done.stderr[-2000:]}")
    return seconds


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3, help="fresh processes per figure (default 3)")
    args = parser.parse_args(argv)
    if args.repeats < 1:
        parser.error("--repeats must be at least 1")
    from pytest_gpttrace.compare import EXACT, compare
    from pytest_gpttrace.trace import load

    with tempfile.TemporaryDirectory() as tmp:
        project = Path(tmp)
        (project / "test_tiny.py").write_text(TEST)
        plain, calibrated, compare_plain, compare_calibrated = [], [], [], []
        for _ in range(args.repeats):
            for path in project.rglob("*.json"):
                path.unlink()
            plain.append(pytest_run(project, "--update-golden", calibration=False))
            compare_plain.append(pytest_run(project, "--gpt-trace", calibration=False))
            for path in (project / "golden").rglob("*.json"):
                path.unlink()
            calibrated.append(pytest_run(project, "--update-golden"))
            compare_calibrated.append(pytest_run(project, "--gpt-trace"))
        golden = load(next((project / "golden").rglob("*.json")))
    if golden.calibration is None:
        raise SystemExit("the golden recorded with its band has no calibration record")
    timings = {}
    for name, profile in (("exact", EXACT), ("calibrated", None)):
        runs = []
        for _ in range(50):
            start = time.perf_counter()
            compare(golden, golden, profile)
            runs.append(time.perf_counter() - start)
        timings[name] = statistics.median(runs)
    med = statistics.median
    import torch

    from pytest_gpttrace.trace import EnvKey
    from pytest_gpttrace.tracer import device_provenance

    cpu = device_provenance(torch.device("cpu"))
    print(f"machine: {cpu[EnvKey.DEVICE_NAME]} ({cpu[EnvKey.CPU_CAPABILITY]}), {os.cpu_count()} cores, "
          f"torch {torch.__version__}")
    print(f"record the tiny golden: {med(plain):.1f} s plain, {med(calibrated):.1f} s with its band "
          f"({len(golden.calibration['variants'])} replays: "
          f"{', '.join(v['variant'] for v in golden.calibration['variants'])})")
    print(f"compare against it (a pytest process): {med(compare_plain):.1f} s plain golden, "
          f"{med(compare_calibrated):.1f} s calibrated golden")
    print(f"compare() in process: {timings['exact'] * 1e3:.2f} ms exact, {timings['calibrated'] * 1e3:.2f} ms calibrated")
    print(f"calibration record_s={med(calibrated):.1f} plain_record_s={med(plain):.1f} "
          f"compare_ratio={med(compare_calibrated) / med(compare_plain):.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
