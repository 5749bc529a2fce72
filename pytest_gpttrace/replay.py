"""Replaying a traced test under platform variants, in subprocesses, for its calibration band.

The variants of a CPU run (``plan_variants``):

- ``cap-default``, ``cap-avx2``, ``cap-avx512``: kernels capped at each ISA level below the CPU's
  own (``ATEN_CPU_CAPABILITY``, ``ONEDNN_MAX_CPU_ISA``, ``MKL_ENABLE_INSTRUCTIONS``, set before torch
  is imported, so only in a fresh process), and ``native`` with every cap removed when the recording
  run is itself capped. Each gets its own ``TORCHINDUCTOR_CACHE_DIR``: inductor's cache does not key
  on the cap, and a kernel built for a wider ISA must never run under a narrower one.
- ``threads-N``: the other thread count (1 when the recording run has more, else 2), and every
  capped platform above at that count too (``cap-default+threads-1``): how a reduction splits over
  threads and which kernel runs each part together decide its rounding, so neither bounds the other.
- All of them but ``threads-N`` run at the recording's thread count.
- ``dither-1`` ... ``dither-D``: every floating-point result perturbed by a random ulp
  (``dither.KernelDither``), each a draw of another machine's kernels. On a CPU that offers few ISA
  levels (AVX2 has one below it) these are what make the band wide enough for an unseen machine.

On CUDA the same plan holds with ``tf32-on``/``tf32-off`` (the opposite of the run's setting),
``sdpa-math`` (the math attention backend), ``deterministic`` (deterministic algorithms) and the
dithered replays.

A replay is the test itself: ``python -m pytest NODEID --gpt-trace`` with ``GPTTRACE_REPLAY`` naming
where the obtained trace goes and what the variant changes inside the process. The plugin then runs
the test as usual, writes the trace there and compares nothing.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .calibrate import Replay
from .trace import EnvKey

if TYPE_CHECKING:
    from .calibrate import Calibrated
    from .trace import Trace

REPLAY_ENV = "GPTTRACE_REPLAY"
CAP_VARIABLES = ("ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA", "DNNL_MAX_CPU_ISA", "MKL_ENABLE_INSTRUCTIONS")
# each ISA level: the variables that cap torch's own kernels, oneDNN's and MKL's at it
CAPS = {
    "default": {"ATEN_CPU_CAPABILITY": "default", "ONEDNN_MAX_CPU_ISA": "SSE41", "MKL_ENABLE_INSTRUCTIONS": "SSE4_2"},
    "avx2": {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2", "MKL_ENABLE_INSTRUCTIONS": "AVX2"},
    "avx512": {"ATEN_CPU_CAPABILITY": "avx512", "ONEDNN_MAX_CPU_ISA": "AVX512_CORE",
               "MKL_ENABLE_INSTRUCTIONS": "AVX512"},
}
DEFAULT_DITHERS = 2
# variables of the parent pytest that must not leak into a replay (it is a session of its own)
_PARENT_ONLY = ("PYTEST_XDIST_WORKER", "PYTEST_XDIST_WORKER_COUNT", "PYTEST_XDIST_TESTRUNUID",
                "PYTEST_CURRENT_TEST", "PYTEST_ADDOPTS", REPLAY_ENV)


@dataclass(frozen=True)
class Variant:
    name: str
    description: str
    env: Mapping[str, str | None] = field(default_factory=dict)  # None: remove the variable
    threads: int = 1  # torch threads in the replay
    settings: Mapping[str, object] = field(default_factory=dict)  # applied inside the replay


def cpu_flags() -> set[str]:
    """The CPU's feature flags (Linux /proc/cpuinfo); empty where they cannot be read."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def cpu_levels(flags: set[str]) -> list[str]:
    """The ISA caps below this CPU's own kernels, lowest first."""
    levels = ["default"]
    if "avx512f" in flags:
        levels.append("avx2")
        if flags & {"amx_tile", "amx_bf16", "avx512_bf16"}:
            levels.append("avx512")  # AVX-512 without the bf16 units the native kernels use
    return levels


def current_cap(environ: Mapping[str, str]) -> dict[str, str]:
    return {k: environ[k] for k in CAP_VARIABLES if environ.get(k)}


def plan_variants(device_type: str, threads: int, *, dithers: int = DEFAULT_DITHERS,
                  environ: Mapping[str, str] | None = None, flags: set[str] | None = None,
                  tf32: bool | None = None) -> list[Variant]:
    """The variants to replay for a run on ``device_type`` with ``threads`` torch threads."""
    environ = os.environ if environ is None else environ
    dither = [Variant(f"dither-{d}", f"every floating-point result perturbed by a random ulp (seed {d})",
                      threads=threads, settings={"dither": d}) for d in range(1, dithers + 1)]
    if device_type == "cuda":
        return [
            Variant("tf32-off" if tf32 else "tf32-on", f"TF32 matmuls {'off' if tf32 else 'on'}",
                    threads=threads, settings={"tf32": not tf32}),
            Variant("sdpa-math", "the math scaled_dot_product_attention backend", threads=threads,
                    settings={"sdpa": "math"}),
            Variant("deterministic", "deterministic algorithms", env={"CUBLAS_WORKSPACE_CONFIG": ":4096:8"},
                    threads=threads, settings={"deterministic": True}),
            *dither,
        ]
    own = current_cap(environ)
    other = 1 if threads > 1 else 2
    at_other = f"threads-{other}"
    other_text = f"{other} torch thread{'s' if other > 1 else ''}"
    # the platforms this run is not on: no cap (when it is capped) and every ISA level below the CPU's
    platforms: list[tuple[str, str, dict[str, str | None]]] = []
    if own:
        platforms.append(("native", "every kernel cap removed", dict.fromkeys(CAP_VARIABLES)))
    for level in cpu_levels(cpu_flags() if flags is None else flags):
        cap = CAPS[level]
        if {k: v for k, v in own.items() if k in cap} == cap:
            continue  # the recording run is capped there already
        platforms.append((f"cap-{level}", f"kernels capped at {level}", {**dict.fromkeys(CAP_VARIABLES), **cap}))
    # each platform at both thread counts: a reduction's order depends on the ISA and the split
    # together, so a kernel level measured at one thread count does not bound it at the other
    variants = [Variant(name, text, env=env, threads=threads) for name, text, env in platforms]
    variants.append(Variant(at_other, other_text, threads=other))
    variants += [Variant(f"{name}+{at_other}", f"{text}, {other_text}", env=env, threads=other)
                 for name, text, env in platforms]
    return variants + dither


@dataclass(frozen=True)
class Session:
    """How to start the recording test again: its node id, rootdir, ini file, plugin flags."""

    nodeid: str
    rootdir: Path
    inifile: Path | None = None
    extra_args: Sequence[str] = ()


def command(session: Session) -> list[str]:
    args = [sys.executable, "-m", "pytest", session.nodeid, "--gpt-trace", "-q", "--no-header",
            "-p", "no:cacheprovider", "--rootdir", str(session.rootdir)]
    if session.inifile is not None:
        args += ["-c", str(session.inifile)]
    return args + list(session.extra_args)


def _environment(variant: Variant, spec: Mapping[str, object], cache_root: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in _PARENT_ONLY}
    for key, value in variant.env.items():
        if value is None:
            env.pop(key, None)
        else:
            env[key] = value
    env[REPLAY_ENV] = json.dumps(spec)
    env["OMP_NUM_THREADS"] = str(variant.threads)
    # the eager statistics path: no kernel to compile in every fresh process, and a machine that
    # falls back to it is one more platform the band should hold (the paths agree to ~1e-8)
    env["GPTTRACE_STATS_PATH"] = "eager"
    cap = "-".join(f"{k}={env[k]}" for k in CAP_VARIABLES if env.get(k)) or "native"
    env["TORCHINDUCTOR_CACHE_DIR"] = str(cache_root / f"inductor-{abs(hash(cap)):x}")
    return env


def run_one(session: Session, variant: Variant, folder: Path, timeout: float) -> Replay:
    from .errors import GptTraceError
    from .trace import load

    out = folder / f"{variant.name}.json"
    spec = {"out": str(out), "threads": variant.threads, **variant.settings}
    try:
        done = subprocess.run(command(session), cwd=session.rootdir, env=_environment(variant, spec, folder),
                              capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired:
        return Replay(variant.name, variant.description, None, f"did not finish in {timeout:.0f} s")
    if not out.exists():
        lines = [line for line in (done.stdout + done.stderr).splitlines() if line.strip() and "DEBUG" not in line]
        last = re.sub(r" in [0-9.]+s( \([0-9:]+\))?", "", lines[-1].strip("= ")) if lines else "no output"
        return Replay(variant.name, variant.description, None, f"exit {done.returncode} without a trace: {last}")
    try:
        trace = load(out)
    except GptTraceError as exc:
        return Replay(variant.name, variant.description, None, f"unreadable trace: {exc}")
    return Replay(variant.name, variant.description, trace, environment=trace.environment)


def run_replays(session: Session, variants: Sequence[Variant], *, parallel: int | None = None,
                timeout: float = 1800.0) -> tuple[list[Replay], float]:
    """Every variant's replay (in order) and the wall time they took together.

    ``parallel`` replays (the CPU count by default) run side by side even where their threads add
    up to more than the cores: the thread count is fixed inside each, so the numbers do not change,
    and most of a small replay is single-threaded start-up (two 2-thread replays of the tiny golden
    on 2 AVX2 cores: 11.9 s side by side, 17.5 s one after the other).
    """
    parallel = parallel or max(1, min(len(variants), os.cpu_count() or 1))
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="gpttrace-replay-") as tmp, ThreadPoolExecutor(max_workers=parallel) as pool:
        replays = list(pool.map(lambda v: run_one(session, v, Path(tmp), timeout), variants))
    return replays, time.perf_counter() - start


def calibrator(session: Session, *, dithers: int = DEFAULT_DITHERS) -> Callable[[Trace], Calibrated]:
    """obtained trace -> the same trace with its noise band, measured from replays of ``session``'s
    test under every variant ``plan_variants`` gives for the obtained trace's device and threads."""
    from .calibrate import Calibrated, measure
    from .compare import CALIBRATED_FLOOR, CALIBRATED_K

    def calibrate(obtained: Trace) -> Calibrated:
        env = obtained.environment
        device = str(env.get(EnvKey.DEVICE_TYPE, "cpu"))
        variants = plan_variants(device, int(env.get(EnvKey.THREADS, 1)), dithers=dithers, tf32=env.get(EnvKey.TF32))
        replays, seconds = run_replays(session, variants)
        return Calibrated(measure(obtained, replays, k=CALIBRATED_K, floor=CALIBRATED_FLOOR), seconds)

    return calibrate


# ----------------------------------------------------------------------------- inside a replay
def replay_spec(environ: Mapping[str, str] | None = None) -> dict[str, Any] | None:
    """The replay this process is (from GPTTRACE_REPLAY), or None in an ordinary run."""
    raw = (os.environ if environ is None else environ).get(REPLAY_ENV)
    if not raw:
        return None
    spec = json.loads(raw)
    if not isinstance(spec, dict) or "out" not in spec:
        raise ValueError(f"{REPLAY_ENV} must be a JSON object with an 'out' path, got {raw!r}")
    return spec


@contextlib.contextmanager
def variant_applied(spec: Mapping[str, Any]) -> Iterator[None]:
    """Apply a replay's in-process settings (threads, dither, CUDA flags) around the traced run."""
    import torch

    threads_before = torch.get_num_threads()
    tf32_before = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    deterministic_before = torch.are_deterministic_algorithms_enabled()
    with contextlib.ExitStack() as stack:
        if spec.get("threads"):
            torch.set_num_threads(int(spec["threads"]))
        if "tf32" in spec:
            torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = bool(spec["tf32"])
        if spec.get("deterministic"):
            torch.use_deterministic_algorithms(True)
        if spec.get("sdpa") == "math":
            from torch.nn.attention import SDPBackend, sdpa_kernel

            stack.enter_context(sdpa_kernel(SDPBackend.MATH))
        if spec.get("dither"):
            from .dither import KernelDither

            stack.enter_context(KernelDither(int(spec["dither"])))
        try:
            yield
        finally:
            torch.set_num_threads(threads_before)
            torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = tf32_before
            torch.use_deterministic_algorithms(deterministic_before)
