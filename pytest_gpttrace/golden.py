"""Golden trace files: paths from test node ids, comparison on ``==``, updates, obtained results.

``GoldenTrace`` stands for one test's golden file. ``trace == golden`` compares (or, in update
mode, writes the golden when it is missing or no longer matches, so an unchanged golden is never
rewritten; the written golden carries its calibration band when a calibrator is given) and keeps
what a failure report needs. In a calibration replay it only writes the obtained trace where the
replay asked. Nothing here imports pytest: the plugin turns ``failure_lines()`` into the assertion
message.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from .calibrate import Calibrated
from .compare import Comparison, Override, check_same_config, compare, resolve_profile
from .errors import GptTraceError
from .trace import Trace, dumps
from .traceio import WriteError, read_trace, write_text_atomic

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


@dataclass
class GoldenTrace:
    """One test's golden trace; compare with ``assert trace == golden``."""

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
    # filled by the comparison
    path: Path | None = None
    comparison: Comparison | None = None
    failure: list[str] | None = None
    obtained_path: Path | None = None
    written: str | None = None  # "created" | "updated" | "recalibrated" when update mode wrote the file
    drift: list[str] | None = None  # update mode: how far the old golden lay from the new run
    calibration_note: str | None = None  # update mode: what the written band is made of
    error: GptTraceError | None = None
    obtained: Trace | None = field(default=None, repr=False)

    def __repr__(self) -> str:
        return f"GoldenTrace({self.display(self.path) if self.path else self.nodeid})"

    def display(self, path: Path) -> str:
        try:
            return str(Path(path).resolve().relative_to(self.rootdir.resolve()))
        except ValueError:
            return str(path)

    def path_for(self, trace: Trace) -> Path:
        if self.named_path is not None:
            return self.named_path
        return self.golden_dir / golden_relpath(self.nodeid, str(trace.environment.get("device_type", "cpu")))

    @property
    def update_command(self) -> str:
        return f"{self.command} --update-golden '{self.nodeid}'"

    def __eq__(self, other) -> bool:
        __tracebackhide__ = True
        if not isinstance(other, Trace):
            return NotImplemented
        return self.matches(other)

    def __ne__(self, other):
        result = self.__eq__(other)
        return result if result is NotImplemented else not result

    __hash__ = None

    def _compare(self, golden: Trace, obtained: Trace) -> Comparison:
        return compare(golden, obtained, resolve_profile(self.profile_name, golden, self.overrides))

    def matches(self, obtained: Trace) -> bool:
        try:
            return self._matches(obtained)
        except WriteError as exc:  # an unwritable folder, a file in the way: one line, the file and why
            target = Path(exc.filename)
            what = "golden trace" if self.golden_dir in target.parents else "trace"
            self.failure = [f"cannot write {what} {self.display(target)}: {exc.strerror}"]
            return False

    def _matches(self, obtained: Trace) -> bool:
        self.obtained = obtained
        self.path = self.path_for(obtained)
        self.failure = None
        if self.replay_out is not None:
            write_text_atomic(self.replay_out, dumps(obtained))
            return True
        golden = None
        if self.path.exists():
            try:
                golden = read_trace(self.path)
            except GptTraceError as exc:
                self.error = exc
        if self.update and self.named_path is not None and golden is not None \
                and not golden.provenance.complete:
            self.failure = [
                f"golden {self.display(self.path)} is a report that lists a selection of the trace (named by "
                "golden=): --update-golden does not overwrite it",
                "to record a golden for this test, drop golden= or name a .json file",
            ]
            return False
        if self.update:
            return self._update(golden, obtained)
        if golden is None:
            self.obtained_path = self._write_obtained(obtained)
            if self.error is not None:
                where = f"at {self.error.path}: " if getattr(self.error, "path", "") else ""
                detail = getattr(self.error, "detail", str(self.error))
                self.failure = [
                    f"malformed golden trace {self.display(self.path)}: {where}{detail}",
                    f"obtained trace written to {self.display(self.obtained_path)}",
                    f"fix the file, or regenerate it: {self.update_command}",
                ]
            else:
                self.failure = [
                    f"golden trace missing: {self.display(self.path)}",
                    f"obtained trace written to {self.display(self.obtained_path)}",
                    f"create it: {self.update_command}",
                ]
            return False
        config_diff = check_same_config(golden, obtained)
        if config_diff:
            self.obtained_path = self._write_obtained(obtained)
            self.failure = [
                f"golden trace {self.display(self.path)} is of another model config: {'; '.join(config_diff)}",
                f"obtained trace written to {self.display(self.obtained_path)}",
                f"if the config change is intended: {self.update_command}",
            ]
            return False
        try:
            self.comparison = self._compare(golden, obtained)
        except ValueError as exc:
            self.obtained_path = self._write_obtained(obtained)
            self.failure = [f"golden trace {self.display(self.path)} cannot be compared: {exc}",
                            f"obtained trace written to {self.display(self.obtained_path)}"]
            return False
        if self.comparison.ok:
            return True
        self.obtained_path = self._write_obtained(obtained)
        from .report import render_comparison

        self.failure = render_comparison(
            self.comparison,
            golden_name=self.display(self.path),
            obtained_name=self.display(self.obtained_path),
            accept_command=self.update_command,
        )
        return False

    def _update(self, golden: Trace | None, obtained: Trace) -> bool:
        comparable = golden is not None and not check_same_config(golden, obtained)
        comparison = None
        if comparable:
            try:
                comparison = self._compare(golden, obtained)
            except ValueError:
                comparison = None  # calibrated asked of an uncalibrated golden: rewrite it calibrated
        if comparison is not None and comparison.ok and not self.recalibrate:
            self.comparison = comparison
            return True  # unchanged within tolerance: no rewrite, no churn
        if comparison is not None and not comparison.ok:
            from .report import render_drift

            self.drift = render_drift(comparison)
        calibrated = self.calibrator(obtained) if self.calibrator is not None else Calibrated(obtained)
        new = calibrated.trace
        if new.calibration is not None and not new.calibration.get("replays"):
            # no replay could be used: a band of zero would be stricter than exact; write no band
            from .calibrate import summary

            self.calibration_note = "NOT calibrated, no usable replay: " + summary(new.calibration) + \
                "; written without a band (compared under exact)"
            new = obtained
        elif new.calibration is not None:
            from .calibrate import summary

            self.calibration_note = summary(new.calibration) + (
                f", measured in {calibrated.seconds:.1f} s" if calibrated.seconds is not None else "")
        existed = self.path.exists()
        text = dumps(new)
        if existed and _read_or_none(self.path) == text:
            self.comparison = comparison
            return True  # byte for byte what is there: nothing to write
        write_text_atomic(self.path, text)
        if not existed:
            self.written = "created"
        else:
            self.written = "recalibrated" if comparison is not None and comparison.ok else "updated"
        return True

    def _write_obtained(self, obtained: Trace) -> Path:
        path = self.results_dir / golden_relpath(self.nodeid, str(obtained.environment.get("device_type", "cpu")))
        write_text_atomic(path, dumps(obtained))
        return path

    def failure_lines(self) -> list[str]:
        return list(self.failure or ["the trace matches its golden"])


def _read_or_none(path: Path) -> str | None:
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        return None
