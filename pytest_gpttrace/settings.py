"""The session's settings: command-line options, ini keys and environment variables, read once.

Plain Python (no pytest): ``read_settings`` gets the option and ini readers and returns a frozen
``Settings``, or raises ValueError whose message names the option, ini key or variable at fault
(the plugin turns it into a usage error).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .anomalies import check_rules, parse_thresholds
from .compare import AUTO, PROFILES, Override, overrides_from_lines
from .replay import replay_spec

STATS_PATH_VAR = "GPTTRACE_STATS_PATH"
STATS_PATHS = ("auto", "compiled", "eager")  # as stats.PATHS; stats imports torch, this module does not
GRANULARITIES = ("auto", "taps", "modules", "ops")  # as ops.GRANULARITIES (ops imports torch)


@dataclass(frozen=True)
class Settings:
    enabled: bool                       # trace tests run (else they are skipped)
    update: bool                        # --update-golden (or --gpt-trace-recalibrate)
    recalibrate: bool
    golden_dir: Path
    results_dir: Path
    report_dir: Path | None
    rootdir: Path
    profile: str                        # auto or a profile name
    tolerances: tuple[Override, ...]    # ini gpt_trace_tolerances
    iterations: int                     # ini gpt_trace_iterations: the marker's default
    calibration: bool
    dithers: int
    replay: Mapping[str, Any] | None    # this session is a calibration replay: its spec (JSON)
    allow: tuple[str, ...]              # ini gpt_trace_allow
    thresholds: Mapping[str, float]     # ini gpt_trace_thresholds
    granularity: str = "auto"           # --gpt-trace-granularity, else ini gpt_trace_granularity: the marker's default
    ops: tuple[str, ...] = ()           # ini gpt_trace_ops: changes to the op list (ops.resolve_ops)


def read_settings(option: Callable[[str], object], ini: Callable[[str], object], environ: Mapping[str, str], *,
                  golden_dir: Path, results_dir: Path, report_dir: Path | None, rootdir: Path) -> Settings:
    """The settings from ``option(name)`` (command line), ``ini(name)`` and ``environ``."""
    recalibrate = bool(option("gpt_trace_recalibrate"))
    update = bool(option("update_golden") or recalibrate)
    replay = replay_spec()
    if update and environ.get("CI", "").strip().lower() not in ("", "0", "false", "no"):
        raise ValueError(
            "--update-golden is refused because CI is set: CI never rewrites its own expectations. "
            "Update the goldens locally and commit them."
        )
    stats_path = environ.get(STATS_PATH_VAR, "").strip().lower() or "auto"
    if stats_path not in STATS_PATHS:
        raise ValueError(f"environment {STATS_PATH_VAR}={environ[STATS_PATH_VAR]!r} is not a statistics path: "
                         f"use one of {', '.join(STATS_PATHS)}")
    profile = option("gpt_trace_profile") or ini("gpt_trace_profile")
    if profile not in PROFILES and profile != AUTO:
        raise ValueError(f"--gpt-trace-profile / gpt_trace_profile: unknown profile {profile!r}; "
                         f"choose one of {', '.join([AUTO, *PROFILES])}")
    try:
        tolerances = tuple(overrides_from_lines(_lines(ini, "gpt_trace_tolerances")))
    except ValueError as exc:
        raise ValueError(f"ini gpt_trace_tolerances: {exc}") from None
    try:
        allow = tuple(check_rules(_lines(ini, "gpt_trace_allow")))
    except ValueError as exc:
        raise ValueError(f"ini gpt_trace_allow: {exc}") from None
    try:
        thresholds = parse_thresholds(_lines(ini, "gpt_trace_thresholds"))
    except ValueError as exc:
        raise ValueError(f"ini gpt_trace_thresholds: {exc}") from None
    given = option("gpt_trace_granularity")
    granularity = str(given or ini("gpt_trace_granularity") or "auto").strip().lower()
    if granularity not in GRANULARITIES:
        where = "--gpt-trace-granularity" if given else "ini gpt_trace_granularity"
        raise ValueError(f"{where}: unknown granularity {granularity!r}; choose one of {', '.join(GRANULARITIES)}")
    ops = tuple(line.strip() for line in _lines(ini, "gpt_trace_ops") if line.strip())
    if any(not line.lstrip("+!") for line in ops):
        raise ValueError(f"ini gpt_trace_ops: an empty op name in {list(ops)!r}")
    return Settings(
        enabled=bool(update or replay or option("gpt_trace") or ini("gpt_trace")),
        update=update,
        recalibrate=recalibrate,
        golden_dir=golden_dir,
        results_dir=results_dir,
        report_dir=report_dir,
        rootdir=rootdir,
        profile=profile,
        tolerances=tolerances,
        iterations=_ini_int(ini, "gpt_trace_iterations", minimum=1),
        calibration=bool(ini("gpt_trace_calibration")),
        dithers=_ini_int(ini, "gpt_trace_dithers", minimum=0),
        replay=replay,
        allow=allow,
        thresholds=thresholds,
        granularity=granularity,
        ops=ops,
    )


def _lines(ini: Callable[[str], object], name: str) -> list[str]:
    """A linelist ini value (pytest gives a list of strings)."""
    raw = ini(name)
    if isinstance(raw, str):
        return raw.splitlines()
    if not isinstance(raw, Iterable):
        raise ValueError(f"ini {name}: expected lines, got {raw!r}")
    return [str(line) for line in raw]


def _ini_int(ini: Callable[[str], object], name: str, minimum: int) -> int:
    raw = ini(name)
    try:
        value = int(raw) if isinstance(raw, (str, int)) else minimum - 1
    except ValueError:
        value = minimum - 1
    if value < minimum:
        what = "a positive integer" if minimum == 1 else "a non-negative integer"
        raise ValueError(f"ini {name}: expected {what}, got {raw!r}")
    return value
