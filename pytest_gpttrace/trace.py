"""The Trace data model and its JSON format (golden files are these files).

A Trace holds the model config, the environment it ran in, the shapes of the model's parameters and
one Iteration per traced forward/backward. An Iteration holds, in order:

- ``forward``: stage name -> TensorStats, in execution order
- ``stage_grads``: stage name -> TensorStats of d(loss)/d(stage output), in backward order
- ``param_grads``: parameter name -> TensorStats of its .grad after backward (None: no gradient)

plus the loss, whether an optimizer step followed (``stepped``: None when unknown, as in a parsed
seed report) and the learning rate of every param group.

A Trace's ``provenance`` says how precisely its numbers are known and whether it lists every
stage: exact and complete for a JSON trace, rounded and a selection for a parsed report. The
comparison reads it; the JSON format does not carry it.

The JSON format writes keys in a fixed order, one stage per line, and floats as Python's shortest
round-trip repr, so a file reads back bit for bit and a golden change reads well in review.
Non-finite floats are written as the strings "NaN", "Infinity" and "-Infinity".

Format 2 is format 1 plus a calibration (see ``calibrate``): a top-level ``"calibration"`` object
(where the band came from: variants replayed, their environments, what was left out), a
``"band"`` object at the end of each stage's line (per statistic, the largest deviation of the
replays from this trace) and a ``"loss_band"`` per iteration. A trace without a calibration is
still written as format 1, and format 1 files read as before.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Mapping

from .errors import TraceFormatError

FORMAT_VERSION = 1  # an uncalibrated trace
CALIBRATED_FORMAT = 2  # a trace with its calibration band
SUPPORTED_FORMATS = (1, 2)

STAT_FIELDS = ("mean", "std", "min", "max", "rms", "zero_frac")
COUNT_FIELDS = ("nan", "inf")


@dataclass(frozen=True)
class TensorStats:
    """Statistics of one tensor.

    mean, std, min, max, rms and zero_frac cover every element (a NaN makes them NaN; the counts
    say how many). std is the sample standard deviation (Bessel-corrected, as torch.std): 0.0 for a
    one-element tensor. An empty tensor has numel 0 and None for every statistic.
    """

    shape: tuple[int, ...]
    dtype: str
    device: str
    numel: int
    mean: float | None = None
    std: float | None = None
    min: float | None = None
    max: float | None = None
    rms: float | None = None
    zero_frac: float | None = None
    nan: int = 0
    inf: int = 0
    # statistic -> measured noise: the largest |replay - this| over the calibration replays
    band: Mapping[str, float] | None = field(default=None, compare=False)

    @property
    def l2_norm(self) -> float | None:
        return None if self.rms is None else self.rms * math.sqrt(self.numel)

    @property
    def zeros(self) -> int | None:
        return None if self.zero_frac is None else round(self.zero_frac * self.numel)

    @property
    def all_zero(self) -> bool:
        """Every element is exactly zero (the zero-init pattern)."""
        return self.numel > 0 and self.zero_frac == 1.0

    @property
    def finite(self) -> bool:
        return self.nan == 0 and self.inf == 0


@dataclass(frozen=True)
class Iteration:
    index: int
    loss: float | None
    stepped: bool | None
    lr: Mapping[str, float] = field(default_factory=dict)
    forward: Mapping[str, TensorStats] = field(default_factory=dict)
    stage_grads: Mapping[str, TensorStats] = field(default_factory=dict)
    param_grads: Mapping[str, TensorStats | None] = field(default_factory=dict)
    loss_band: float | None = None  # the loss's calibration band (None: not calibrated)


@dataclass(frozen=True)
class Provenance:
    """How a Trace's numbers are known.

    quantum: the largest rounding error of a printed statistic (0.0: exact, as a JSON trace);
    complete: whether it lists every stage and section that was traced (a report shows a selection);
    source: the format it was read from. Not written to the JSON format.
    """

    quantum: float = 0.0
    complete: bool = True
    source: str = "json"


@dataclass(frozen=True)
class Trace:
    config: Mapping[str, Any]
    environment: Mapping[str, Any]
    iterations: tuple[Iteration, ...]
    parameters: Mapping[str, tuple[int, ...]] = field(default_factory=dict)
    model: str = ""
    # parameters that were exactly zero when the capture began (None: not recorded)
    zero_params: tuple[str, ...] | None = None
    # parameters with requires_grad=False: no gradient by design, so none is recorded for them
    frozen_params: tuple[str, ...] = ()
    # where the bands came from (format 2); None for an uncalibrated trace
    calibration: Mapping[str, Any] | None = None
    # how precisely the numbers are known and whether every stage is listed; not part of the JSON
    provenance: Provenance = field(default_factory=Provenance, compare=False)

    @property
    def calibrated(self) -> bool:
        return self.calibration is not None

    def __repr__(self) -> str:
        stages = len(self.stage_names)
        return f"Trace(model={self.model or '?'}, {len(self.iterations)} iterations, {stages} stages)"

    @property
    def stage_names(self) -> list[str]:
        return list(self.iterations[0].forward) if self.iterations else []


# ----------------------------------------------------------------------------- writing
def _num(x):
    if x is None or isinstance(x, (bool, int)):
        return x
    x = float(x)
    if math.isnan(x):
        return "NaN"
    if math.isinf(x):
        return "Infinity" if x > 0 else "-Infinity"
    return x


def stats_to_dict(s: TensorStats | None) -> dict | None:
    if s is None:
        return None
    return {
        "shape": list(s.shape),
        "dtype": s.dtype,
        "device": s.device,
        "numel": s.numel,
        **{k: _num(getattr(s, k)) for k in STAT_FIELDS},
        **{k: getattr(s, k) for k in COUNT_FIELDS},
        **({"band": {k: _num(v) for k, v in s.band.items()}} if s.band is not None else {}),
    }


def _line(obj) -> str:
    return json.dumps(obj, ensure_ascii=False, allow_nan=False)


def _block(name: str, entries: Mapping[str, Any], indent: str, last: bool) -> list[str]:
    if not entries:
        return [f'{indent}"{name}": {{}}' + ("" if last else ",")]
    out = [f'{indent}"{name}": {{']
    items = list(entries.items())
    for i, (k, v) in enumerate(items):
        out.append(f"{indent}  {_line(k)}: {_line(v)}" + ("," if i < len(items) - 1 else ""))
    out.append(f"{indent}}}" + ("" if last else ","))
    return out


def dumps(trace: Trace) -> str:
    """Serialise a Trace: stable key order, one stage per line, floats that read back bit for bit."""
    lines = ["{"]
    lines.append(f'  "format": {CALIBRATED_FORMAT if trace.calibrated else FORMAT_VERSION},')
    lines.append(f'  "model": {_line(trace.model)},')
    lines.append(f'  "config": {_line(_jsonable(trace.config))},')
    lines.append(f'  "environment": {_line(_jsonable(trace.environment))},')
    lines += _block("parameters", {k: list(v) for k, v in trace.parameters.items()}, "  ", False)
    lines.append(f'  "zero_params": {_line(None if trace.zero_params is None else list(trace.zero_params))},')
    if trace.frozen_params:  # only when there are any: traces without frozen parameters stay as they were
        lines.append(f'  "frozen_params": {_line(list(trace.frozen_params))},')
    if trace.calibrated:
        lines.append(f'  "calibration": {_line(_jsonable(trace.calibration))},')
    lines.append('  "iterations": [')
    for n, it in enumerate(trace.iterations):
        lines.append("    {")
        lines.append(f'      "index": {it.index},')
        lines.append(f'      "loss": {_line(_num(it.loss))},')
        lines.append(f'      "stepped": {_line(it.stepped)},')
        lines.append(f'      "lr": {_line({k: _num(v) for k, v in it.lr.items()})},')
        if trace.calibrated:
            lines.append(f'      "loss_band": {_line(_num(it.loss_band))},')
        lines += _block("forward", {k: stats_to_dict(v) for k, v in it.forward.items()}, "      ", False)
        lines += _block("stage_grads", {k: stats_to_dict(v) for k, v in it.stage_grads.items()}, "      ", False)
        lines += _block("param_grads", {k: stats_to_dict(v) for k, v in it.param_grads.items()}, "      ", True)
        lines.append("    }" + ("," if n < len(trace.iterations) - 1 else ""))
    lines.append("  ]")
    lines.append("}")
    return "\n".join(lines) + "\n"


def _jsonable(obj):
    if isinstance(obj, Mapping):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, float):
        return _num(obj)
    if obj is None or isinstance(obj, (bool, int, str)):
        return obj
    return str(obj)


# ----------------------------------------------------------------------------- reading
class _Reader:
    """Validating accessors that raise TraceFormatError naming the file and the JSON path."""

    def __init__(self, file):
        self.file = file

    def fail(self, path, message):
        raise TraceFormatError(self.file, path, message)

    def get(self, obj, key, path, kinds, what, optional=False):
        if not isinstance(obj, dict):
            self.fail(path, f"expected an object, got {_typename(obj)}")
        if key not in obj:
            if optional:
                return None
            self.fail(path, f'missing field "{key}" ({what})')
        value = obj[key]
        if not _is(value, kinds):
            self.fail(f"{path}.{key}", f"expected {what}, got {_typename(value)} {_short(value)}")
        return value

    def number(self, value, path, nullable=True):
        if value is None and nullable:
            return None
        if isinstance(value, str) and value in ("NaN", "Infinity", "-Infinity"):
            return float(value.replace("Infinity", "inf"))
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            self.fail(path, f"expected a number{' or null' if nullable else ''}, got {_typename(value)} {_short(value)}")
        return float(value)

    def stats(self, d, path) -> TensorStats | None:
        if d is None:
            return None
        if not isinstance(d, dict):
            self.fail(path, f"expected a stats object or null, got {_typename(d)} {_short(d)}")
        shape = self.get(d, "shape", path, (list,), "a list of dimension sizes")
        if not all(isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in shape):
            self.fail(f"{path}.shape", f"expected non-negative integers, got {_short(shape)}")
        numel = self.get(d, "numel", path, (int,), "an integer element count")
        return TensorStats(
            shape=tuple(shape),
            dtype=self.get(d, "dtype", path, (str,), 'a dtype string such as "torch.float32"'),
            device=self.get(d, "device", path, (str,), 'a device string such as "cpu"'),
            numel=numel,
            **{k: self.number(d.get(k), f"{path}.{k}") for k in STAT_FIELDS},
            **{k: self.get(d, k, path, (int,), "an integer count") for k in COUNT_FIELDS},
            band=self.band(d, path),
        )

    def band(self, d, path):
        band = self.get(d, "band", path, (dict,), "an object of statistic -> noise", optional=True)
        if band is None:
            return None
        out = {}
        for k, v in band.items():
            if k not in STAT_FIELDS:
                self.fail(f"{path}.band", f"unknown statistic {k!r}; expected one of {', '.join(STAT_FIELDS)}")
            out[k] = self.band_value(v, f"{path}.band.{k}", nullable=False)
        return out

    def band_value(self, v, path, nullable=True):
        value = self.number(v, path, nullable=nullable)
        if value is not None and not (value >= 0 and math.isfinite(value)):
            self.fail(path, f"expected a non-negative finite number, got {_short(v)}")
        return value

    def stage_map(self, obj, key, path, allow_none=False):
        entries = self.get(obj, key, path, (dict,), "an object of stage name -> stats")
        out = {}
        for name, d in entries.items():
            p = f'{path}.{key}["{name}"]'
            if d is None and not allow_none:
                self.fail(p, "expected a stats object, got null")
            out[name] = self.stats(d, p)
        return out


def _is(value, kinds):
    if bool in kinds:
        return isinstance(value, kinds)
    return isinstance(value, kinds) and not isinstance(value, bool)


def _typename(v):
    return {dict: "an object", list: "a list", str: "a string", bool: "a boolean",
            int: "an integer", float: "a number", type(None): "null"}.get(type(v), type(v).__name__)


def _short(v):
    text = json.dumps(v) if not isinstance(v, str) else repr(v)
    return text if len(text) <= 40 else text[:37] + "..."


def loads(text: str, file=None) -> Trace:
    """Parse and validate a JSON trace; errors name the file, the JSON path and what was expected."""
    r = _Reader(file)
    if not text.strip():
        r.fail("", "the file is empty: expected a JSON trace")
    try:
        doc = json.loads(text)
    except json.JSONDecodeError as exc:
        r.fail("", f"not valid JSON (line {exc.lineno}, column {exc.colno}: {exc.msg})")
    if not isinstance(doc, dict):
        r.fail("$", f"expected a JSON object, got {_typename(doc)}")
    version = r.get(doc, "format", "$", (int,), "the trace format version (an integer)")
    if version not in SUPPORTED_FORMATS:
        r.fail("$.format", f"unknown trace format version {version}; this pytest-gpttrace reads "
                           f"{', '.join(map(str, SUPPORTED_FORMATS))} (upgrade pytest-gpttrace, or regenerate the file)")
    parameters = r.get(doc, "parameters", "$", (dict,), "an object of parameter name -> shape", optional=True) or {}
    zero_params = r.get(doc, "zero_params", "$", (list, type(None)), "a list of parameter names or null", optional=True)
    if zero_params is not None and not all(isinstance(n, str) for n in zero_params):
        r.fail("$.zero_params", "expected a list of parameter names (strings)")
    frozen = r.get(doc, "frozen_params", "$", (list,), "a list of parameter names", optional=True) or []
    if not all(isinstance(n, str) for n in frozen):
        r.fail("$.frozen_params", "expected a list of parameter names (strings)")
    calibration = r.get(doc, "calibration", "$", (dict,), "an object (where the bands came from)", optional=True)
    if version >= CALIBRATED_FORMAT and calibration is None:
        r.fail("$", 'missing field "calibration" (a format 2 trace records where its bands came from)')
    if version < CALIBRATED_FORMAT and calibration is not None:
        r.fail("$.calibration", f"a format {version} trace has no calibration: write \"format\": 2 with its bands")
    iterations = []
    for i, it in enumerate(r.get(doc, "iterations", "$", (list,), "a list of iterations")):
        p = f"$.iterations[{i}]"
        lr = r.get(it, "lr", p, (dict,), "an object of param group -> learning rate")
        iterations.append(Iteration(
            index=r.get(it, "index", p, (int,), "an integer iteration index"),
            loss=r.number(r.get(it, "loss", p, (int, float, str, type(None)), "a number or null"), f"{p}.loss"),
            stepped=r.get(it, "stepped", p, (bool, type(None)), "true, false or null"),
            lr={k: r.number(v, f'{p}.lr["{k}"]', nullable=False) for k, v in lr.items()},
            forward=r.stage_map(it, "forward", p),
            stage_grads=r.stage_map(it, "stage_grads", p),
            param_grads=r.stage_map(it, "param_grads", p, allow_none=True),
            loss_band=r.band_value(r.get(it, "loss_band", p, (int, float, str, type(None)), "a number or null",
                                         optional=True), f"{p}.loss_band"),
        ))
    return Trace(
        config=r.get(doc, "config", "$", (dict,), "an object (the model config)"),
        environment=r.get(doc, "environment", "$", (dict,), "an object (the environment)"),
        iterations=tuple(iterations),
        parameters={k: tuple(v) for k, v in parameters.items()},
        model=r.get(doc, "model", "$", (str,), "the model class name", optional=True) or "",
        zero_params=None if zero_params is None else tuple(zero_params),
        frozen_params=tuple(frozen),
        calibration=calibration,
    )


def read_text(path) -> str:
    """A trace file's text; a missing file, a folder or binary content is a TraceFormatError."""
    path = Path(path)
    try:
        return path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise TraceFormatError(path, "", "no such file") from None
    except IsADirectoryError:
        raise TraceFormatError(path, "", "is a directory, not a trace file") from None
    except UnicodeDecodeError:
        raise TraceFormatError(path, "", "not a text file (expected a JSON trace or a Markdown report)") from None
    except OSError as exc:
        raise TraceFormatError(path, "", f"cannot be read: {exc.strerror or exc}") from None


def load(path) -> Trace:
    """The trace file at path, JSON or Markdown: ``traceio.read_trace``."""
    from .traceio import read_trace

    return read_trace(path)


def replace_stats(s: TensorStats, **changes) -> TensorStats:
    """A copy of s with some statistics changed (handy to nudge a golden in tests)."""
    values = {f.name: getattr(s, f.name) for f in fields(s)}
    values.update(changes)
    return TensorStats(**values)
