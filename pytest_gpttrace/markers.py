"""The ``gpt_trace`` marker's arguments, read once per test into a frozen ``Run``.

Plain Python (no pytest): ``parse_marker`` raises ValueError with a message that starts with the
marker and names the argument at fault ("@pytest.mark.gpt_trace(iterations=2.7): expected ...");
the plugin fails that test with it, prefixed by the test's node id.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeGuard

from .anomalies import Thresholds, check_rules
from .compare import AUTO, PROFILES, Override, parse_override
from .settings import GRANULARITIES, Settings

if TYPE_CHECKING:  # torch is imported only when a model is traced
    from .usermodel import LossFn

MARKER = "gpt_trace"
KEYS = ("iterations", "seed", "profile", "tolerances", "stages", "micro_steps", "allow", "thresholds",
        "golden", "loss", "granularity", "ops")
DEFAULT_SEED = 42
SEED_LIMIT = 2**64  # torch.manual_seed takes 0 .. 2**64 - 1 (a negative seed aliases a large one)


@dataclass(frozen=True)
class Run:
    """How one traced test runs and is judged: its marker over the session's settings."""

    iterations: int
    seed: int
    micro_steps: int
    stages: tuple[str, ...] | None      # stage patterns; None: the default stages
    profile: str                        # auto or a profile name
    overrides: tuple[Override, ...]     # ini gpt_trace_tolerances, then the marker's tolerances=
    allow: tuple[str, ...]              # ini gpt_trace_allow, then the marker's allow=
    thresholds: Thresholds              # defaults, ini gpt_trace_thresholds, then the marker's thresholds=
    golden: str | None = None           # the golden file named by golden=, relative to rootdir; None: from the node id
    loss: LossFn | None = None          # loss(model, batch) -> loss tensor; None: the gpt_loss_fn fixture's
    granularity: str = "auto"           # taps, modules, ops or auto: the marker's granularity=, else the session's
    ops: tuple[str, ...] = ()           # changes to the op list: ini gpt_trace_ops, then the marker's ops=


def parse_marker(args: Sequence[object], kwargs: Mapping[str, object], settings: Settings) -> Run:
    """The marker's ``args`` and ``kwargs`` (none when the test has no marker) over ``settings``."""
    unknown = set(kwargs) - set(KEYS)
    if unknown or args:
        raise ValueError(f"@pytest.mark.{MARKER} takes keyword arguments {', '.join(KEYS)}; "
                         f"got {', '.join(sorted(unknown)) or 'positional arguments'}")
    return Run(
        iterations=_count(kwargs, "iterations", settings.iterations),
        seed=_seed(kwargs.get("seed", DEFAULT_SEED)),
        micro_steps=_count(kwargs, "micro_steps", 1),
        stages=_stages(kwargs.get("stages")),
        profile=_profile(kwargs.get("profile"), settings.profile),
        overrides=settings.tolerances + _tolerances(kwargs.get("tolerances")),
        allow=settings.allow + _allow(kwargs.get("allow")),
        thresholds=_thresholds(kwargs.get("thresholds"), settings.thresholds),
        golden=_golden(kwargs.get("golden"), settings),
        loss=_loss(kwargs.get("loss")),
        granularity=_granularity(kwargs.get("granularity"), settings.granularity),
        ops=_ops(kwargs.get("ops"), settings.ops),
    )


def _ops(value: object, ini: tuple[str, ...]) -> tuple[str, ...]:
    """The marker's op-list changes after the ini's; plain names replace the list, so a marker with
    a plain name replaces the ini's changes too. Names are checked where torch is loaded."""
    lines = tuple(line.strip() for line in _lines("ops", value) if line.strip())
    if any(not line.lstrip("+!") for line in lines) or (value is not None and not lines):
        raise _bad("ops", value, "an empty op name: give op names (rms_norm), +name to add or !name to drop")
    if any(not line.startswith(("+", "!")) for line in lines):
        return lines
    return ini + lines


def _granularity(value: object, default: str) -> str:
    if value is None:
        return default
    if not isinstance(value, str) or value not in GRANULARITIES:
        raise _bad("granularity", value, f"unknown granularity: choose one of {', '.join(GRANULARITIES)}")
    return value


def _loss(value: object) -> LossFn | None:
    """A loss function (model, batch) -> loss tensor, in place of the gpt_loss_fn fixture's."""
    if value is None:
        return None
    if not callable(value) or isinstance(value, type):
        raise _bad("loss", value, "expected a function (model, batch) -> scalar loss tensor")
    loss: Callable[[Any, Any], Any] = value
    return loss


def _golden(value: object, settings: Settings) -> str | None:
    """A golden file the test names itself (a JSON trace or a Markdown report), relative to rootdir.

    It must stay inside rootdir and apart from the results and report folders: an obtained trace
    written over its own golden would make the next run pass whatever changed.
    """
    if value is None:
        return None
    if isinstance(value, os.PathLike):
        value = os.fspath(value)
    if not isinstance(value, str) or not value.strip():
        raise _bad("golden", value, "expected the path of a trace file, relative to rootdir")
    root = Path(os.path.realpath(settings.rootdir))
    path = Path(os.path.realpath(root / value))
    if path == root or root not in path.parents:
        raise _bad("golden", value, f"the golden file must lie inside rootdir ({root.name}/); this path leaves it")
    for option, folder in (("--gpt-trace-results-dir", settings.results_dir), ("--gpt-trace-report", settings.report_dir)):
        if folder is not None:
            folder = Path(os.path.realpath(folder))
            if path == folder or folder in path.parents:
                raise _bad("golden", value, f"lies inside the {option} folder, where obtained traces are written "
                                            "over it; name a file apart from that folder")
    return value


def _bad(argument: str, value: object, what: str) -> ValueError:
    return ValueError(f"@pytest.mark.{MARKER}({argument}={value!r}): {what}")


def _is_int(value: object) -> TypeGuard[int]:
    return isinstance(value, int) and not isinstance(value, bool)


def _count(kwargs: Mapping[str, object], name: str, default: int) -> int:
    value = kwargs.get(name, default)
    if not _is_int(value) or value < 1:
        raise _bad(name, value, "expected a positive integer")
    return value


def _seed(value: object) -> int:
    if not _is_int(value):
        raise _bad("seed", value, "expected an integer")
    if not 0 <= value < SEED_LIMIT:
        raise _bad("seed", value, "expected an integer from 0 to 2**64 - 1 (the range of torch.manual_seed)")
    return value


def _lines(name: str, value: object) -> tuple[str, ...]:
    """A string (one entry) or a list or tuple of strings."""
    if value is None:
        return ()
    if isinstance(value, str):
        return (value,)
    if isinstance(value, (list, tuple)):
        lines = tuple(v for v in value if isinstance(v, str))
        if len(lines) == len(value):
            return lines
    raise _bad(name, value, "expected a string or a list of strings")


def _stages(value: object) -> tuple[str, ...] | None:
    patterns = _lines("stages", value)
    if any(not p.strip("+!") for p in patterns):
        raise _bad("stages", value, "an empty stage pattern")
    return patterns or None


def _profile(value: object, default: str) -> str:
    if value is None or value == "":
        return default
    if not isinstance(value, str) or (value != AUTO and value not in PROFILES):
        raise _bad("profile", value, f"unknown tolerance profile: choose one of {', '.join([AUTO, *PROFILES])}")
    return value


def _tolerances(value: object) -> tuple[Override, ...]:
    if isinstance(value, dict):
        raise _bad("tolerances", value, "expected override lines ('STAGE_GLOB STAT_GLOB atol=X rtol=Y' or "
                                        "'STAGE_GLOB STAT_GLOB skip'), a string or a list of strings, not a dict")
    lines = _lines("tolerances", value)
    try:
        return tuple(parse_override(line) for line in lines)
    except ValueError as exc:
        raise ValueError(f"@pytest.mark.{MARKER}(tolerances=...): {exc}") from None


def _allow(value: object) -> tuple[str, ...]:
    rules = _lines("allow", value)
    try:
        return tuple(check_rules(rules, show=repr))
    except ValueError as exc:
        raise ValueError(f"@pytest.mark.{MARKER}: allow=: {exc}") from None


def _thresholds(value: object, ini: Mapping[str, float]) -> Thresholds:
    if value is None:
        value = {}
    if not isinstance(value, dict):
        raise _bad("thresholds", value, f"expected a dict of name -> number, got {type(value).__name__}")
    try:
        return Thresholds().updated({**ini, **value})
    except ValueError as exc:
        raise ValueError(f"@pytest.mark.{MARKER}: {exc}") from None
