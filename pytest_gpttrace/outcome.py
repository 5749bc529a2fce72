"""The outcome of one golden check: a status and what its report needs, as one frozen value.

``golden.GoldenTrace.check`` decides it; ``report`` renders it (the failure message, the summary's
words); the plugin and the terminal summary read its status. Plain data: no I/O, no pytest.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Any

from .compare import Comparison
from .errors import GptTraceError


class GoldenStatus(Enum):
    """What a golden check found, and what it did about it."""

    MATCH = "match"                  # within tolerance of the golden (in update mode: nothing written)
    CREATED = "created"              # update mode: the golden was missing and is written
    UPDATED = "updated"              # update mode: a golden that differed (or could not be read) is rewritten
    RECALIBRATED = "recalibrated"    # update mode, recalibrating: a matching golden written with a new band
    REPLAY_WRITTEN = "replay_written"  # a calibration replay: the obtained trace written, nothing compared
    MISSING = "missing"              # no golden file
    MALFORMED = "malformed"          # the golden file cannot be read
    OTHER_CONFIG = "other_config"    # the golden is of another model config
    NOT_COMPARABLE = "not_comparable"  # the profile cannot compare the two (calibrated of an unbanded golden)
    DIFFERS = "differs"              # out of tolerance
    REPORT_KEPT = "report_kept"      # update mode: a golden named by golden= lists a selection; never overwritten
    WRITE_ERROR = "write_error"      # the golden or the obtained trace could not be written


PASSING = frozenset({GoldenStatus.MATCH, GoldenStatus.CREATED, GoldenStatus.UPDATED, GoldenStatus.RECALIBRATED,
                     GoldenStatus.REPLAY_WRITTEN})
WRITTEN = frozenset({GoldenStatus.CREATED, GoldenStatus.UPDATED, GoldenStatus.RECALIBRATED})


@dataclass(frozen=True)
class Band:
    """What the band of a golden recorded in update mode is made of."""

    calibration: Mapping[str, Any]  # the calibration the replays measured (``Trace.calibration``)
    seconds: float | None           # the replays' wall time; None when not measured
    usable: bool                    # False: no replay could be used, the golden is written without a band


@dataclass(frozen=True)
class GoldenResult:
    """One golden check's outcome.

    ``comparison`` is the golden file as it was, compared with the obtained trace (in update mode
    too, where it says how far the old golden lay from the new run); ``obtained_path`` is where the
    obtained trace was written (for a failure to inspect, or where a replay asked); ``reason`` why the
    two could not be compared (other config, not comparable); ``error`` the read error of a malformed
    golden (kept when update mode rewrote it) or, for WRITE_ERROR, the write error naming its file;
    ``obtained_error`` why the obtained trace of a failure is not on disk (the failure stands as it is).
    """

    status: GoldenStatus
    nodeid: str
    golden_path: Path
    rootdir: Path
    command: str = "pytest --gpt-trace"  # how the user runs the traced tests: the update command builds on it
    obtained_path: Path | None = None
    comparison: Comparison | None = None
    reason: str = ""
    error: GptTraceError | None = None
    band: Band | None = None
    obtained_error: GptTraceError | None = None  # the obtained trace of a failure could not be written

    @property
    def ok(self) -> bool:
        return self.status in PASSING

    @property
    def written(self) -> str | None:
        """``created``, ``updated`` or ``recalibrated`` when the check wrote the golden; else None."""
        return self.status.value if self.status in WRITTEN else None

    @property
    def write_target(self) -> Path | None:
        """WRITE_ERROR: the file that could not be written."""
        filename = getattr(self.error, "filename", None) if self.status is GoldenStatus.WRITE_ERROR else None
        return Path(filename) if filename else None

    def shown(self, path: Path) -> str:
        """A path as the user reads it: relative to rootdir when it lies inside, else as it is."""
        return shown(path, self.rootdir)


def shown(path: Path, rootdir: Path) -> str:
    """``path`` relative to ``rootdir`` when it lies inside, else as it is."""
    try:
        return str(Path(path).resolve().relative_to(Path(rootdir).resolve()))
    except ValueError:
        return str(path)
