"""Golden trace files: paths from test node ids, the golden check behind ``==``, updates.

``trace_path`` is the one place a test's trace file is named from its node id and the trace (its
golden, the obtained trace of a failure, its report). ``GoldenTrace`` stands for one test's golden
file; ``GoldenTrace.check(trace)`` compares (or, in update mode, writes the golden when it is
missing or no longer matches, so an unchanged golden is never rewritten; the written golden
carries its calibration band when a calibrator is given) and returns one frozen
``outcome.GoldenResult``. In a calibration replay it only writes the obtained trace where the
replay asked. ``trace == golden`` runs the check and keeps its result for the assertion message,
which ``report.failure_lines`` renders. Nothing here imports pytest.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

from . import report
from .calibrate import Calibrated
from .compare import Comparison, Override, check_same_config, compare, resolve_profile
from .errors import GptTraceError
from .outcome import Band, GoldenResult, GoldenStatus, shown
from .trace import EnvKey, Trace, dumps
from .traceio import WriteError, format_for, read_trace, write_text_atomic

_UNSAFE = re.compile(r"[^A-Za-z0-9._\[\]-]+")
MAX_NAME_BYTES = 120  # one path component, hash suffix and ".json" included: far below any file system's 255


def _hash(part: str) -> str:
    return hashlib.sha1(part.encode("utf-8", "surrogatepass")).hexdigest()[:8]


def _safe(part: str, limit: int = MAX_NAME_BYTES) -> str:
    """A file-name-safe part of at most ``limit`` bytes.

    A part that is already safe, lowercase and short is kept as it is (existing goldens never move).
    Any other part gets a short hash of the original appended: one with unsafe characters, one cut
    to length, and one with uppercase letters, so two ids that differ only in case still get two
    files on a case-insensitive file system (macOS, Windows).
    """
    clean = _UNSAFE.sub("_", part).strip("._") or "_"  # ASCII only: a byte per character
    if clean != part or clean != clean.lower() or len(clean) > limit:
        suffix = "-" + _hash(part)
        if len(clean) > limit - len(suffix):
            clean = clean[: limit - len(suffix)].rstrip("._") or "_"
        clean += suffix
    return clean


def golden_relpath(nodeid: str, device_type: str = "cpu") -> Path:
    """tests/test_m.py::TestC::test_f[p] -> tests/test_m/TestC-<hash>/test_f[p] as a sanitised relative path.

    The result always lies inside the folder it is joined to: every component is sanitised, none is
    "." or "..", and each is at most MAX_NAME_BYTES bytes. A ``..`` of a test file outside rootdir
    becomes a hashed component of its own, so ``../x/t.py`` and ``x/t.py`` get different goldens.
    Non-CPU runs get the device type in the name, so a CPU golden is never compared with a CUDA run.
    """
    path, _, rest = nodeid.partition("::")
    parts = [p for p in Path(path).parts if p not in ("", ".")]
    if parts and parts[-1] != "..":
        parts[-1] = Path(parts[-1]).stem or parts[-1]
    names = rest.split("::") if rest else ["module"]
    *classes, func = names
    device = f".{_safe(device_type, 32)}" if device_type != "cpu" else ""
    stem = _safe(func, MAX_NAME_BYTES - len(device) - len(".json")) + device
    return Path(*[_safe(p) for p in parts], *[_safe(c) for c in classes], stem + ".json")


def device_type(trace: Trace) -> str:
    """The device type a trace ran on (``cpu`` when not recorded)."""
    return str(trace.environment.get(EnvKey.DEVICE_TYPE, "cpu"))


def trace_path(folder: Path, nodeid: str, trace: Trace) -> Path:
    """Where the test ``nodeid``'s ``trace`` is filed under ``folder``: its golden under the golden
    folder, its obtained trace under the results folder, its report under the report folder. A run
    on another device type than the CPU gets its own file (see ``golden_relpath``)."""
    return Path(folder) / golden_relpath(nodeid, device_type(trace))


@dataclass(eq=False)
class GoldenTrace:
    """One test's golden trace; compare with ``assert trace == golden``.

    The fields say where the golden lives and how it is judged; ``check`` returns the outcome.
    ``==`` keeps the last outcome in ``result``, for the assertion message and the summary.
    """

    nodeid: str
    golden_dir: Path
    results_dir: Path
    rootdir: Path
    profile_name: str | None = None  # None or "auto": calibrated for a calibrated golden, else exact
    overrides: tuple[Override, ...] = ()
    update: bool = False
    recalibrate: bool = False  # update mode: calibrate and rewrite even a matching golden
    calibrator: Callable[[Trace], Calibrated] | None = None  # obtained -> obtained with its band
    replay_out: Path | None = None  # a calibration replay: write the obtained trace here, compare nothing
    named_path: Path | None = None  # the marker's golden=: this file, not one named from the node id
    command: str = "pytest --gpt-trace"
    result: GoldenResult | None = field(default=None, init=False, repr=False)  # the last ``==``

    def __repr__(self) -> str:
        return f"GoldenTrace({self.display(self.path) if self.path else self.nodeid})"

    def display(self, path: Path) -> str:
        return shown(path, self.rootdir)

    def path_for(self, trace: Trace) -> Path:
        if self.named_path is not None:
            return self.named_path
        return trace_path(self.golden_dir, self.nodeid, trace)

    def __eq__(self, other: object) -> bool:
        __tracebackhide__ = True
        if not isinstance(other, Trace):
            return NotImplemented
        self.result = self.check(other)
        return self.result.ok

    def __ne__(self, other: object) -> bool:
        result = self.__eq__(other)
        return result if result is NotImplemented else not result

    # ----------------------------------------------------------------- the check
    def check(self, obtained: Trace) -> GoldenResult:
        """Compare ``obtained`` with the golden, or record it (update mode, a replay); write the
        obtained trace of a failure under the results folder. Never raises for a file that cannot be
        written: that is a WRITE_ERROR naming it."""
        path = self.path_for(obtained)
        outcome = partial(GoldenResult, nodeid=self.nodeid, golden_path=path, rootdir=self.rootdir,
                          command=self.command)
        try:
            return self._check(obtained, path, outcome)
        except WriteError as exc:  # an unwritable folder, a file in the way: one line, the file and why
            return outcome(GoldenStatus.WRITE_ERROR, error=exc)

    def _check(self, obtained: Trace, path: Path, outcome: Callable[..., GoldenResult]) -> GoldenResult:
        if self.replay_out is not None:
            write_text_atomic(self.replay_out, dumps(obtained))
            return outcome(GoldenStatus.REPLAY_WRITTEN, obtained_path=self.replay_out)
        exists = path.exists()
        golden, error = _read(path) if exists else (None, None)
        if self.update:
            if self.named_path is not None and ((golden is not None and not golden.provenance.complete)
                                                or (golden is None and format_for(path) == "markdown")):
                return outcome(GoldenStatus.REPORT_KEPT)  # a report is written by a person, not by the tool
            return self._update(golden, obtained, path, exists, partial(outcome, error=error))
        if golden is None:
            status = GoldenStatus.MISSING if error is None else GoldenStatus.MALFORMED
            return outcome(status, error=error, **self._write_obtained(obtained))
        config_diff = check_same_config(golden, obtained)
        if config_diff:
            return outcome(GoldenStatus.OTHER_CONFIG, reason="; ".join(config_diff), **self._write_obtained(obtained))
        try:
            comparison = self._compare(golden, obtained)
        except ValueError as exc:
            return outcome(GoldenStatus.NOT_COMPARABLE, reason=str(exc), **self._write_obtained(obtained))
        if comparison.ok:
            return outcome(GoldenStatus.MATCH, comparison=comparison)
        return outcome(GoldenStatus.DIFFERS, comparison=comparison, **self._write_obtained(obtained))

    def _update(self, golden: Trace | None, obtained: Trace, path: Path, exists: bool,
                outcome: Callable[..., GoldenResult]) -> GoldenResult:
        comparison = None
        if golden is not None and not check_same_config(golden, obtained):
            try:
                comparison = self._compare(golden, obtained)
            except ValueError:
                comparison = None  # calibrated asked of an uncalibrated golden: rewrite it calibrated
        matches = comparison is not None and comparison.ok
        if matches and not self.recalibrate:
            return outcome(GoldenStatus.MATCH, comparison=comparison)  # within tolerance: no rewrite, no churn
        calibrated = self.calibrator(obtained) if self.calibrator is not None else Calibrated(obtained)
        new, band = calibrated.trace, None
        if new.calibration is not None:
            band = Band(new.calibration, calibrated.seconds, usable=bool(new.calibration.get("replays")))
            if not band.usable:
                new = obtained  # no replay could be used: a band of zero would be stricter than exact
        text = dumps(new)
        if exists and _read_or_none(path) == text:
            return outcome(GoldenStatus.MATCH, comparison=comparison, band=band)  # nothing to write
        write_text_atomic(path, text)
        if not exists:
            status = GoldenStatus.CREATED
        else:
            status = GoldenStatus.RECALIBRATED if matches else GoldenStatus.UPDATED
        return outcome(status, comparison=comparison, band=band)

    def _compare(self, golden: Trace, obtained: Trace) -> Comparison:
        return compare(golden, obtained, resolve_profile(self.profile_name, golden, self.overrides))

    def _write_obtained(self, obtained: Trace) -> dict[str, Path | WriteError]:
        """Write a failure's obtained trace under the results folder: ``obtained_path`` where it went,
        or ``obtained_error`` when it cannot be written (the failure it belongs to stands)."""
        path = trace_path(self.results_dir, self.nodeid, obtained)
        try:
            write_text_atomic(path, dumps(obtained))
        except WriteError as exc:
            return {"obtained_error": exc}
        return {"obtained_path": path}

    # ----------------------------------------------------------------- the last outcome, read-only
    @property
    def path(self) -> Path | None:
        return self.result.golden_path if self.result else None

    @property
    def comparison(self) -> Comparison | None:
        return self.result.comparison if self.result else None

    @property
    def obtained_path(self) -> Path | None:
        return self.result.obtained_path if self.result else None

    @property
    def written(self) -> str | None:
        return self.result.written if self.result else None

    @property
    def error(self) -> GptTraceError | None:
        return self.result.error if self.result else None

    @property
    def failure(self) -> list[str] | None:
        """The failure message's lines when the last ``==`` failed; else None."""
        return report.failure_lines(self.result) if self.result is not None and not self.result.ok else None

    @property
    def drift(self) -> list[str] | None:
        return (report.drift_lines(self.result) or None) if self.result else None

    @property
    def calibration_note(self) -> str | None:
        return report.calibration_note(self.result.band) if self.result else None

    def failure_lines(self) -> list[str]:
        return self.failure or ["the trace matches its golden"]


def _read(path: Path) -> tuple[Trace | None, GptTraceError | None]:
    """The golden at path, or the error that says why it cannot be read."""
    try:
        return read_trace(path), None
    except GptTraceError as exc:
        return None, exc


def _read_or_none(path: Path) -> str | None:
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        return None
