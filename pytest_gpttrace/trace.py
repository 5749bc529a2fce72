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

Two optional top-level objects say what the stages are (``kinds``): ``"stage_kinds"`` (stage name
-> kind: ``norm``, ``rotary``, ``residual``, ...) and ``"stage_inputs"`` (a rotary stage -> the
stage it rotates). Each is written only when it has entries; a file without them reads as having
none, and the rules then go by the reference model's names. They are metadata: the comparison
never reads them.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field, fields
from enum import Enum
from pathlib import Path
from typing import Any, Literal, NoReturn, TypeGuard, TypeVar, overload

from .coverage import Coverage
from .errors import TraceFormatError
from .kinds import KINDS

FORMAT_VERSION = 1  # an uncalibrated trace
CALIBRATED_FORMAT = 2  # a trace with its calibration band
SUPPORTED_FORMATS = (1, 2)

STAT_FIELDS = ("mean", "std", "min", "max", "rms", "zero_frac")
COUNT_FIELDS = ("nan", "inf")

# a value of a JSON document as ``json.loads`` returns it
JSONValue = Any  # dict[str, JSONValue] | list[JSONValue] | str | int | float | bool | None
JSONObject = Mapping[str, Any]


class Section(str, Enum):
    """The parts of an Iteration that map a name to its statistics, by their JSON keys.

    ``LOSS`` is the iteration's loss where a comparison or a diagnosis points at it (a number, not a
    map of stages). str-valued: a member equals, hashes and prints as its key (``"forward"``).
    """

    FORWARD = "forward"  # stage name -> TensorStats of its output, in execution order
    STAGE_GRADS = "stage_grads"  # stage name -> TensorStats of d(loss)/d(output), in backward order
    PARAM_GRADS = "param_grads"  # parameter name -> TensorStats of its .grad (None: no gradient)
    LOSS = "loss"

    def __str__(self) -> str:
        return self.value

    @property
    def label(self) -> str:
        """How a message names it: forward, stage gradient, parameter gradient, loss."""
        return _SECTION_LABELS[self.value]

    def __format__(self, spec: str) -> str:
        return format(self.value, spec)


_SECTION_LABELS = {"forward": "forward", "stage_grads": "stage gradient", "param_grads": "parameter gradient",
                   "loss": "loss"}
STAGE_SECTIONS = (Section.FORWARD, Section.STAGE_GRADS, Section.PARAM_GRADS)  # an Iteration's maps, in order


class EnvKey(str, Enum):
    """Keys of a trace's ``environment`` (a JSON object: a file may hold others, and any may be missing).

    str-valued: a member equals, hashes and prints as its key, so ``environment.get(EnvKey.DEVICE_TYPE)``
    reads the JSON as it is.
    """

    TORCH = "torch"  # torch version, without the local build suffix
    PYTHON = "python"
    PLATFORM = "platform"  # sys.platform-machine, e.g. linux-x86_64
    DEVICE_TYPE = "device_type"  # cpu, cuda, ...: part of a golden's file name
    DEVICE = "device"  # the full device, e.g. cuda:0
    DEVICE_NAME = "device_name"  # the CPU model or the GPU name
    CPU_CAPABILITY = "cpu_capability"  # the ISA torch dispatches to (AVX2, ...), or sm_XY on CUDA
    MATMUL_PRECISION = "matmul_precision"
    TF32 = "tf32"  # CUDA: TF32 matmuls allowed
    CUDNN_TF32 = "cudnn_tf32"
    DTYPE = "dtype"  # the dtype of the model's first floating parameter
    AUTOCAST = "autocast"  # autocast dtypes seen active, when any
    THREADS = "threads"  # torch threads
    STATS_PATH = "stats_path"  # the statistics path that ran: compiled or eager
    STATS_NOTE = "stats_note"  # why the statistics path is not the one asked for, when it is not
    GRANULARITY = "granularity"  # what a stage was: taps, modules or ops, and what auto left out
    SOURCE = "source"  # the format a trace was read from, when not JSON ("markdown")

    def __str__(self) -> str:
        return self.value

    def __format__(self, spec: str) -> str:
        return format(self.value, spec)


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

    def stat(self, name: str) -> float | None:
        """The statistic called name, one of STAT_FIELDS."""
        if name not in STAT_FIELDS:
            raise ValueError(f"unknown statistic {name!r}; expected one of {', '.join(STAT_FIELDS)}")
        value: float | None = getattr(self, name)
        return value

    @property
    def rms_estimate(self) -> float | None:
        """The rms, or where it was not recorded (a parsed report) the one mean and std imply:
        sqrt(mean² + population variance), the population variance being std²·(n-1)/n."""
        if self.rms is not None:
            return self.rms
        if self.mean is None or self.std is None or not self.numel:
            return None
        variance = self.std**2 * ((self.numel - 1) / self.numel if self.numel > 1 else 0.0)
        return math.sqrt(self.mean**2 + variance)

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

    def section(self, section: Section) -> Mapping[str, TensorStats | None]:
        """One of the STAGE_SECTIONS (``Section.LOSS`` is not a map: read ``loss``)."""
        if section == Section.FORWARD:
            return self.forward
        if section == Section.STAGE_GRADS:
            return self.stage_grads
        if section == Section.PARAM_GRADS:
            return self.param_grads
        raise ValueError(f"{section!s} is not a section of stages; expected one of {', '.join(STAGE_SECTIONS)}")


@dataclass(frozen=True)
class Provenance:
    """How a Trace's numbers are known.

    quantum: the largest rounding error of a printed statistic (0.0: exact, as a JSON trace);
    complete: whether it lists every stage and section that was traced (a report shows a selection);
    source: the format it was read from. Not written to the JSON format.
    """

    quantum: float = 0.0
    complete: bool = True
    source: str = "json"  # "json" or "markdown"


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
    # stages missing from some iterations, selected stages that never fired, gradients not recorded
    coverage: Coverage = field(default_factory=Coverage)
    # stage name -> its kind (a kinds.StageKind value); empty when not recorded
    stage_kinds: Mapping[str, str] = field(default_factory=dict)
    # rotary stage -> the stage it rotates (found from the autograd graph); empty when not recorded
    stage_inputs: Mapping[str, str] = field(default_factory=dict)
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
PathLike = str | os.PathLike[str]


def _num(x: float | None) -> float | str | None:
    """A number as the JSON format writes it: non-finite floats as strings."""
    if x is None or isinstance(x, (bool, int)):
        return x
    x = float(x)
    if math.isnan(x):
        return "NaN"
    if math.isinf(x):
        return "Infinity" if x > 0 else "-Infinity"
    return x


def stats_to_dict(s: TensorStats | None) -> dict[str, Any] | None:
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


def _line(obj: object) -> str:
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
    if trace.stage_kinds:  # only when recorded: traces written before kinds stay as they were
        lines.append(f'  "stage_kinds": {_line(dict(trace.stage_kinds))},')
    if trace.stage_inputs:
        lines.append(f'  "stage_inputs": {_line(dict(trace.stage_inputs))},')
    if trace.calibrated:
        lines.append(f'  "calibration": {_line(_jsonable(trace.calibration))},')
    if trace.coverage:  # only when there is something to say: complete traces stay as they were
        lines.append(f'  "coverage": {_line(trace.coverage.to_json())},')
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


def _jsonable(obj: object) -> JSONValue:
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
_T = TypeVar("_T")


class _Reader:
    """Validating accessors that raise TraceFormatError naming the file and the JSON path."""

    def __init__(self, file: PathLike | None):
        self.file = file

    def fail(self, path: str, message: str) -> NoReturn:
        raise TraceFormatError(self.file, path, message)

    @overload
    def get(self, obj: object, key: str, path: str, kinds: tuple[type[_T], ...], what: str,
            optional: Literal[False] = False) -> _T: ...

    @overload
    def get(self, obj: object, key: str, path: str, kinds: tuple[type[_T], ...], what: str,
            optional: Literal[True]) -> _T | None: ...

    def get(self, obj: object, key: str, path: str, kinds: tuple[type[_T], ...], what: str,
            optional: bool = False) -> _T | None:
        """obj[key], checked to be one of kinds (a bool is not an int unless bool is a kind)."""
        if not isinstance(obj, dict):
            self.fail(path, f"expected an object, got {_typename(obj)}")
        if key not in obj:
            if optional:
                return None
            self.fail(path, f'missing field "{key}" ({what})')
        value: object = obj[key]
        if not _is(value, kinds):
            self.fail(f"{path}.{key}", f"expected {what}, got {_typename(value)} {_short(value)}")
        return value

    @overload
    def number(self, value: object, path: str, nullable: Literal[False]) -> float: ...

    @overload
    def number(self, value: object, path: str, nullable: bool = True) -> float | None: ...

    def number(self, value: object, path: str, nullable: bool = True) -> float | None:
        if value is None and nullable:
            return None
        if isinstance(value, str) and value in ("NaN", "Infinity", "-Infinity"):
            return float(value.replace("Infinity", "inf"))
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            self.fail(path, f"expected a number{' or null' if nullable else ''}, got {_typename(value)} {_short(value)}")
        try:
            return float(value)
        except OverflowError:
            self.fail(path, f"expected a number, got an integer too large for a float ({len(str(value))} digits)")

    def stats(self, d: object, path: str) -> TensorStats | None:
        if d is None:
            return None
        if not isinstance(d, dict):
            self.fail(path, f"expected a stats object or null, got {_typename(d)} {_short(d)}")
        shape: list[object] = self.get(d, "shape", path, (list,), "a list of dimension sizes")
        dims = [n for n in shape if isinstance(n, int) and not isinstance(n, bool) and n >= 0]
        if len(dims) != len(shape):
            self.fail(f"{path}.shape", f"expected non-negative integers, got {_short(shape)}")
        numel = self.get(d, "numel", path, (int,), "an integer element count")
        dtype = self.get(d, "dtype", path, (str,), 'a dtype string such as "torch.float32"')
        device = self.get(d, "device", path, (str,), 'a device string such as "cpu"')
        mean, std, lo, hi, rms, zero_frac = (self.number(d.get(k), f"{path}.{k}") for k in STAT_FIELDS)
        nan, inf = (self.get(d, k, path, (int,), "an integer count") for k in COUNT_FIELDS)
        return TensorStats(
            shape=tuple(dims), dtype=dtype, device=device, numel=numel,
            mean=mean, std=std, min=lo, max=hi, rms=rms, zero_frac=zero_frac,
            nan=nan, inf=inf,
            band=self.band(d, path),
        )

    def band(self, d: JSONObject, path: str) -> dict[str, float] | None:
        band = self.get(d, "band", path, (dict,), "an object of statistic -> noise", optional=True)
        if band is None:
            return None
        out = {}
        for k, v in band.items():
            if k not in STAT_FIELDS:
                self.fail(f"{path}.band", f"unknown statistic {k!r}; expected one of {', '.join(STAT_FIELDS)}")
            out[k] = self.band_value(v, f"{path}.band.{k}", nullable=False)
        return out

    @overload
    def band_value(self, v: object, path: str, nullable: Literal[False]) -> float: ...

    @overload
    def band_value(self, v: object, path: str, nullable: bool = True) -> float | None: ...

    def band_value(self, v: object, path: str, nullable: bool = True) -> float | None:
        value = self.number(v, path, nullable=nullable)
        if value is not None and not (value >= 0 and math.isfinite(value)):
            self.fail(path, f"expected a non-negative finite number, got {_short(v)}")
        return value

    def stage_map(self, obj: object, key: Section, path: str, allow_none: bool = False) -> dict[str, TensorStats | None]:
        entries = self.get(obj, key, path, (dict,), "an object of stage name -> stats")
        out = {}
        for name, d in entries.items():
            p = f'{path}.{key}["{name}"]'
            if d is None and not allow_none:
                self.fail(p, "expected a stats object, got null")
            out[name] = self.stats(d, p)
        return out

    def stages(self, obj: object, key: Section, path: str) -> dict[str, TensorStats]:
        """A section whose every entry is a stats object (forward, stage_grads)."""
        return {name: s for name, s in self.stage_map(obj, key, path).items() if s is not None}

    def names(self, obj: object, key: str, path: str, nullable: bool) -> tuple[str, ...] | None:
        """A list of parameter names (null, when nullable); None when the field is absent (or null)."""
        kinds: tuple[type[Any], ...] = (list, type(None)) if nullable else (list,)
        what = "a list of parameter names" + (" or null" if nullable else "")
        value = self.get(obj, key, path, kinds, what, optional=True)
        if value is None:
            return None
        names = [n for n in value if isinstance(n, str)]
        if len(names) != len(value):
            self.fail(f"{path}.{key}", "expected a list of parameter names (strings)")
        return tuple(names)

    def string_map(self, obj: object, key: str, path: str, what: str,
                   allowed: tuple[str, ...] | None = None) -> dict[str, str]:
        """An optional object of stage name -> string (``allowed``: the values it may hold); {} when absent."""
        entries = self.get(obj, key, path, (dict,), f"an object of stage name -> {what}", optional=True)
        if entries is None:
            return {}
        for name, value in entries.items():
            p = f'{path}.{key}["{name}"]'
            if not isinstance(value, str):
                self.fail(p, f"expected {what} (a string), got {_typename(value)} {_short(value)}")
            if allowed is not None and value not in allowed:
                self.fail(p, f"unknown {what} {value!r}; expected one of {', '.join(allowed)}")
        return dict(entries)


def _is(value: object, kinds: tuple[type[_T], ...]) -> TypeGuard[_T]:
    if bool in kinds:
        return isinstance(value, kinds)
    return isinstance(value, kinds) and not isinstance(value, bool)


def _typename(v: object) -> str:
    return {dict: "an object", list: "a list", str: "a string", bool: "a boolean",
            int: "an integer", float: "a number", type(None): "null"}.get(type(v), type(v).__name__)


def _short(v: object) -> str:
    text = json.dumps(v) if not isinstance(v, str) else repr(v)
    return text if len(text) <= 40 else text[:37] + "..."


MAX_DEPTH = 64  # of the free-form objects (config, environment, calibration); a trace is about 6 deep
_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")  # how JSON text spells a UTF-16 surrogate


def _json_document(text: str, r: _Reader) -> JSONValue:
    """json.loads, with every way it can fail as one TraceFormatError; every string valid Unicode."""
    try:
        doc = json.loads(text)
    except json.JSONDecodeError as exc:
        r.fail("", f"not valid JSON (line {exc.lineno}, column {exc.colno}: {exc.msg})")
    except RecursionError:
        r.fail("", "not a JSON trace: nested too deeply to read")
    except ValueError as exc:  # an integer of more digits than int() reads
        r.fail("", f"not a JSON trace: {str(exc).split(';')[0]}")
    if _SURROGATE_ESCAPE.search(text):  # a lone surrogate cannot be printed or written as UTF-8
        for value, path in _walk(doc, "$"):
            if isinstance(value, str) and not _encodable(value):
                r.fail(path, f"a string holds a lone UTF-16 surrogate, not a character: {ascii(value)[:40]}")
    return doc


def _walk(value: object, path: str) -> Iterator[tuple[object, str]]:
    """Every value and dictionary key under value with its JSON path, in document order, without recursion."""
    stack = [(value, path)]
    while stack:
        value, path = stack.pop()
        yield value, path
        if isinstance(value, dict):
            children = []
            for key, item in value.items():
                yield key, path
                children.append((item, _member(path, key)))
            stack += reversed(children)
        elif isinstance(value, list):
            stack += reversed([(item, f"{path}[{i}]") for i, item in enumerate(value)])


def _member(path: str, key: str) -> str:
    return f"{path}.{key}" if key.isidentifier() else f"{path}[{json.dumps(key)}]"


def _encodable(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _check_depth(value: object, path: str, r: _Reader) -> None:
    """A free-form object nested no deeper than MAX_DEPTH (writing it again recurses)."""
    stack = [(value, 1)]
    while stack:
        value, depth = stack.pop()
        if isinstance(value, (dict, list)) and depth > MAX_DEPTH:
            r.fail(path, f"nested deeper than {MAX_DEPTH} levels: not a trace's value")
        if isinstance(value, dict):
            stack += [(item, depth + 1) for item in value.values()]
        elif isinstance(value, list):
            stack += [(item, depth + 1) for item in value]


def loads(text: str, file: PathLike | None = None) -> Trace:
    """Parse and validate a JSON trace; errors name the file, the JSON path and what was expected."""
    r = _Reader(file)
    if not text.strip():
        r.fail("", "the file is empty: expected a JSON trace")
    doc = _json_document(text, r)
    if not isinstance(doc, dict):
        r.fail("$", f"expected a JSON object, got {_typename(doc)}")
    version = r.get(doc, "format", "$", (int,), "the trace format version (an integer)")
    if version not in SUPPORTED_FORMATS:
        r.fail("$.format", f"unknown trace format version {version}; this pytest-gpttrace reads "
                           f"{', '.join(map(str, SUPPORTED_FORMATS))} (upgrade pytest-gpttrace, or regenerate the file)")
    parameters = r.get(doc, "parameters", "$", (dict,), "an object of parameter name -> shape", optional=True) or {}
    zero_params = r.names(doc, "zero_params", "$", nullable=True)
    frozen = r.names(doc, "frozen_params", "$", nullable=False) or ()
    stage_kinds = r.string_map(doc, "stage_kinds", "$", "stage kind", KINDS)
    stage_inputs = r.string_map(doc, "stage_inputs", "$", "stage name")
    calibration = r.get(doc, "calibration", "$", (dict,), "an object (where the bands came from)", optional=True)
    if version >= CALIBRATED_FORMAT and calibration is None:
        r.fail("$", 'missing field "calibration" (a format 2 trace records where its bands came from)')
    if version < CALIBRATED_FORMAT and calibration is not None:
        r.fail("$.calibration", f"a format {version} trace has no calibration: write \"format\": 2 with its bands")
    coverage_doc = r.get(doc, "coverage", "$", (dict,), "an object (what fired where)", optional=True)
    try:
        coverage = Coverage.from_json(coverage_doc or {})
    except ValueError as exc:
        r.fail("$.coverage", str(exc))
    iterations = []
    number_or_null = (int, float, str, type(None))
    for i, it in enumerate(r.get(doc, "iterations", "$", (list,), "a list of iterations")):
        p = f"$.iterations[{i}]"
        lr = r.get(it, "lr", p, (dict,), "an object of param group -> learning rate")
        iterations.append(Iteration(
            index=r.get(it, "index", p, (int,), "an integer iteration index"),
            loss=r.number(r.get(it, "loss", p, number_or_null, "a number or null"), f"{p}.loss"),
            stepped=r.get(it, "stepped", p, (bool, type(None)), "true, false or null"),
            lr={k: r.number(v, f'{p}.lr["{k}"]', nullable=False) for k, v in lr.items()},
            forward=r.stages(it, Section.FORWARD, p),
            stage_grads=r.stages(it, Section.STAGE_GRADS, p),
            param_grads=r.stage_map(it, Section.PARAM_GRADS, p, allow_none=True),
            loss_band=r.band_value(r.get(it, "loss_band", p, number_or_null, "a number or null", optional=True),
                                   f"{p}.loss_band"),
        ))
    config = r.get(doc, "config", "$", (dict,), "an object (the model config)")
    environment = r.get(doc, "environment", "$", (dict,), "an object (the environment)")
    for key, value in (("config", config), ("environment", environment), ("calibration", calibration)):
        _check_depth(value, f"$.{key}", r)
    return Trace(
        config=config,
        environment=environment,
        iterations=tuple(iterations),
        parameters={k: tuple(v) for k, v in parameters.items()},
        model=r.get(doc, "model", "$", (str,), "the model class name", optional=True) or "",
        zero_params=zero_params,
        frozen_params=frozen,
        calibration=calibration,
        coverage=coverage,
        stage_kinds=stage_kinds,
        stage_inputs=stage_inputs,
    )


def read_text(path: PathLike) -> str:
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


def load(path: PathLike) -> Trace:
    """The trace file at path, JSON or Markdown: ``traceio.read_trace``."""
    from .traceio import read_trace

    return read_trace(path)


def replace_stats(s: TensorStats, **changes: Any) -> TensorStats:
    """A copy of s with some statistics changed (handy to nudge a golden in tests)."""
    values = {f.name: getattr(s, f.name) for f in fields(s)}
    values.update(changes)
    return TensorStats(**values)
