"""Running pytest in a fresh process as another machine would: kernels capped at an ISA level.

The caps must be set before torch is imported, so every run here is a subprocess, each with its
own inductor cache (the cache does not key on the cap).
"""

import atexit
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from pytest_gpttrace.replay import CAP_VARIABLES, CAPS, cpu_flags
from tests.models import TINY_GOLDEN_CONFIG
from tests.paths import ROOT

# the reference model's tiny golden test (tests/test_traces.py), as a user's project would hold it
TINY_TEST = f'''
import pytest
from reference_model import GPTConfig

TINY_GOLDEN_CONFIG = {TINY_GOLDEN_CONFIG!r}

@pytest.mark.gpt_trace(iterations=3, seed=42)
@pytest.mark.parametrize("gpt_config", [TINY_GOLDEN_CONFIG], ids=["tiny"])
def test_tiny(gpt_trace, gpt_golden):
    assert gpt_trace == gpt_golden
'''
# cap name -> the CPU flag it needs; "native" removes every cap
NEEDS = {"default": None, "avx2": "avx2", "avx512": "avx512f", "native": None}


def make_project(folder: Path, ini: str = "[pytest]\ngpt_trace = true\n", **files: str) -> Path:
    """A user's project: a pytest.ini and the given files (name without .py -> source)."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "pytest.ini").write_text(ini)
    for name, text in files.items():
        (folder / f"{name}.py").write_text(text)
    return folder


def cap_param(name):
    """A pytest param for a cap, skipped with the reason on a CPU that lacks it."""
    flag = NEEDS[name]
    marks = []
    if flag and flag not in cpu_flags():
        marks.append(pytest.mark.skip(reason=f"this CPU has no {flag}: cap {name} cannot run here"))
    return pytest.param(name, id=name, marks=marks)


def supported_caps() -> list[str]:
    flags = cpu_flags()
    return [name for name, flag in NEEDS.items() if flag is None or flag in flags]


_CACHES: list[Path] = []


def inductor_cache(cap: str) -> Path:
    """One inductor cache per cap for this test process: kernels compile once per cap, and a kernel
    built under one cap never runs under another."""
    if not _CACHES:
        _CACHES.append(Path(tempfile.mkdtemp(prefix="gpttrace-test-inductor-")))
        atexit.register(shutil.rmtree, _CACHES[0], True)
    return _CACHES[0] / cap


def environment(cap: str, **extra: object) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if k not in CAP_VARIABLES and not k.startswith(("PYTEST_", "GPTTRACE_")) and k != "CI"}
    env.update(CAPS.get(cap, {}))
    env["TORCHINDUCTOR_CACHE_DIR"] = str(inductor_cache(cap))
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env.update({k: str(v) for k, v in extra.items()})
    return env


def run_pytest(project: Path, cap: str, *args: str, timeout: float = 900, **extra: object) -> subprocess.CompletedProcess[str]:
    """python -m pytest ARGS in ``project`` under ``cap``; CI is unset, as on a developer's machine."""
    return subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-q", *args],
        cwd=project, env=environment(cap, **extra), capture_output=True, text=True, timeout=timeout,
    )


def output(done: subprocess.CompletedProcess[str]) -> str:
    return "\n".join(line for line in (done.stdout + done.stderr).splitlines() if "DEBUG" not in line)
