"""A GPT Component Debug Trace (the seed's, or one ``render`` wrote) read back into a Trace.

``lex`` turns the text into records; the assembler here gives them meaning. Parsing fills what
the report does not print with None, except zero_frac (1.0 when min == max == 0, 0.0 when
min > 0 or max < 0) and the NaN/Inf counts (at least 1 when mean, min or max prints ``nan`` /
min or max ``inf``); a one-element tensor's ``nan`` std is the seed's n/a and reads as 0.0.
The Trace's provenance says its numbers are rounded to %.6f and that it lists a selection of
stages. Malformed input raises MarkdownParseError naming the file and the line.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any, Literal, NoReturn, overload

from ..errors import MarkdownParseError
from ..trace import EnvKey, Iteration, PathLike, Provenance, Trace
from .draft import Counts, IterationDraft, Stats, Value
from .layout import (
    ANOMALIES,
    BACKWARD,
    BLOCK_MARKER,
    BULLET_BY_LABEL,
    BULLETS,
    COMPLETE,
    CONFIG_ALIASES,
    CONFIG_ORDER,
    FORWARD_SECTION,
    GRADIENT_ENTRIES,
    HALF_ULP,
    LAYOUT,
    NO_GRADIENT,
    PARAM_GRAD_COLUMNS,
    SCALING,
    STAGE_GRAD_COLUMNS,
    STAGES,
    STEP_NOTES,
    TRAINING,
    Section,
    as_int,
    stage_pattern,
)
from .lex import (
    BULLET_RE,
    VALUE_RE,
    Banner,
    Completion,
    HeaderField,
    Record,
    SectionHeading,
    StatBlock,
    Table,
    Text,
    lex,
    short,
)

Shape = tuple[int, ...]
Cell = Value | Shape | str  # what a bullet or a table cell holds once read

PROVENANCE = Provenance(quantum=HALF_ULP, complete=False, source="markdown")

_DEVICE_RE = re.compile(r"^(\S+) \((.*)\)$")
_NONFINITE_RE = re.compile(r"^NaN (\d+), Inf (\d+)$")
_CELL_NONFINITE_RE = re.compile(r"^(\d+)/(\d+)$")
_SPARSITY_RE = re.compile(r"^Sparsity: (\d+)/(\d+) \([^)]*\) zeros after ReLU²$")
_NEGATIVE_RE = re.compile(r"^Original negative values: (\d+)/(\d+)")
_MARKER_RE = stage_pattern(BLOCK_MARKER.strip())
_BODY_CONFIG = (
    (re.compile(r"^Embedding matrix shape: \(vocab_size=(\d+), n_embd=(\d+)\)$"), ("vocab_size", "n_embd"), int),
    (re.compile(r"^Batch size: \d+, Sequence length: (\d+)$"), ("sequence_len",), int),
    (re.compile(r"^Capped at ±(\S+) to prevent extreme values$"), ("softcap",), float),
)
_STEP_BY_NOTE = {v: k for k, v in STEP_NOTES.items()}
_SECTION_PATTERNS = [(section, stage_pattern(section.title)) for section in LAYOUT]
_ENTRY_PATTERNS = {section.title: [(e, stage_pattern(e.title.strip())) for e in section.entries] for section in LAYOUT}


class _Assembler:
    """Consumes the records in order; ``finish`` builds the Trace."""

    def __init__(self, file: PathLike | None):
        self.file = file
        self.header_config: dict[str, Any] = {}
        self.body_config: dict[str, Any] = {}
        self.device: tuple[str, str] | None = None
        self.model = ""
        self.declared_iterations: tuple[int, int] | None = None
        self.parameters: dict[str, tuple[int, ...]] = {}
        self.iterations: list[IterationDraft] = []
        self.section: str | None = None
        self.layout_section: Section | None = None
        self.block: int | None = None  # the block the last block-level line named

    def fail(self, line: int | None, message: str) -> NoReturn:
        raise MarkdownParseError(self.file, line, message)

    def feed(self, record: Record) -> None:
        if isinstance(record, SectionHeading):
            self.enter_section(record.title, record.line)
        elif isinstance(record, HeaderField):
            self.header(record.key, record.value, record.line)
        elif isinstance(record, Banner):
            self.banner(record.pos, record.total, record.line)
        elif isinstance(record, StatBlock):
            self.stat_block(record)
        elif isinstance(record, Table):
            self.table(record)
        elif isinstance(record, Completion):
            self.completion(record)
        elif isinstance(record, Text):
            self.text(record.text, record.line)

    # -- header and sections
    def header(self, key: str, value: str, line: int) -> None:
        if key == "Configuration":
            self.header_config = self.config_items(value, line)
        elif key == "Model":
            self.model = value
        elif key == "Device":
            m = _DEVICE_RE.match(value)
            self.device = (m.group(1), m.group(2)) if m else (value.split(":")[0], value)
        elif key == "Iterations":
            if not re.fullmatch(r"\d+", value):
                self.fail(line, f"Iterations: expected a count, got {short(value)}")
            self.declared_iterations = (int(value), line)

    def config_items(self, value: str, line: int) -> dict[str, Any]:
        if value == "n/a":
            return {}
        aliases = {alias: key for key, alias in CONFIG_ALIASES}
        out: dict[str, Any] = {}
        for item in value.split(", "):
            key, eq, raw = item.partition("=")
            if not eq or not key.strip():
                self.fail(line, f"Configuration: expected key=value items, got {short(item)}")
            out[aliases.get(key.strip(), key.strip())] = _config_scalar(raw.strip())
        return out

    def enter_section(self, title: str, line: int) -> None:
        self.layout_section = None
        if title in (SCALING, ANOMALIES, COMPLETE, TRAINING):
            self.section = title
            return
        self.current(line, f"section '{title}'")
        if title in (STAGES, BACKWARD):
            self.section = title
            return
        for section, pattern in _SECTION_PATTERNS:
            m = pattern.match(title)
            if m:
                self.section, self.layout_section = section.title, section
                if section is FORWARD_SECTION:
                    self.iterations[-1].index = int(m.group("index"))
                return
        self.fail(line, f"unknown section '{title}'")

    def banner(self, pos: int, total: int, line: int) -> None:
        expected = len(self.iterations) + 1
        if pos != expected:
            self.fail(line, f"ITERATION {pos}/{total}: expected iteration {expected}")
        self.iterations.append(IterationDraft(pos))
        self.section, self.layout_section, self.block = TRAINING, None, None

    def current(self, line: int, what: str) -> IterationDraft:
        if not self.iterations:
            self.fail(line, f"{what} outside of an iteration (no 'ITERATION k/N' banner before it)")
        return self.iterations[-1]

    # -- stat blocks
    def stat_block(self, block: StatBlock) -> None:
        title, line = block.title, block.line
        it = self.current(line, f"stat block '{title}'")
        bullets: dict[str, Cell] = {}
        for bullet in block.bullets:
            label, value = self.bullet(bullet.text, bullet.line)
            if label in bullets:
                self.fail(bullet.line, f"stat block '{title}': a second {label} bullet")
            bullets[label] = value
        if not bullets:
            self.fail(line, f"stat block '{title}' has no statistics (expected '- **Shape**: ...' bullets below it)")
        missing = [b.label for b in BULLETS if b.required and b.label not in bullets]
        if missing:
            self.fail(line, f"stat block '{title}' lacks the {', '.join(missing)} bullet{'s' * (len(missing) > 1)}")
        shape, dtype, device = bullets["Shape"], bullets["Dtype"], bullets["Device"]
        assert isinstance(shape, tuple) and isinstance(dtype, str) and isinstance(device, str)  # their kinds
        stats = Stats(shape, dtype, device)
        for label, value in bullets.items():
            field = BULLET_BY_LABEL[label].field
            if field not in ("shape", "dtype", "device"):
                stats.set(field, _statistic(value))
        self.place(it, title, stats, line)

    def bullet(self, text: str, line: int) -> tuple[str, Cell]:
        m = BULLET_RE.match(text)
        if not m:
            self.fail(line, f"expected a statistic bullet '- **Name**: value', got {short(text)}")
        label, raw = m.group(1).strip(), m.group(2)
        spec = BULLET_BY_LABEL.get(label)
        if spec is None:
            self.fail(line, f"unknown statistic '{label}' (expected one of {', '.join(BULLET_BY_LABEL)})")
        span = VALUE_RE.match(raw)
        value = (span.group(1) if span else raw).strip()
        if not value:
            self.fail(line, f"{label}: missing value")
        return label, self.value(spec.kind, value, label, line)

    @overload
    def value(self, kind: Literal["shape"], value: str, label: str, line: int) -> Shape: ...

    @overload
    def value(self, kind: Literal["text"], value: str, label: str, line: int) -> str: ...

    @overload
    def value(self, kind: Literal["nonfinite"], value: str, label: str, line: int) -> Counts: ...

    @overload
    def value(self, kind: str, value: str, label: str, line: int) -> Cell: ...

    def value(self, kind: str, value: str, label: str, line: int) -> Cell:
        if kind in ("shape", "text"):
            value = value.strip("`").strip()
            if not value:
                self.fail(line, f"{label}: missing value")
        if kind == "shape":
            shape = _parse_shape(value)
            if shape is None:
                self.fail(line, f"{label}: expected a shape such as (1, 1024), got {short(value)}")
            return shape
        if kind == "nonfinite":
            m = _NONFINITE_RE.match(value) or _CELL_NONFINITE_RE.match(value)
            if not m:
                self.fail(line, f"{label}: expected 'NaN n, Inf m', got {short(value)}")
            return Counts(int(m.group(1)), int(m.group(2)))
        if kind == "number":
            return self.number(value, label, line)
        return value

    def number(self, value: str, label: str, line: int) -> float | None:
        if value == "n/a":
            return None
        try:
            return float(value)
        except ValueError:
            self.fail(line, f"{label}: expected a number (or nan, inf, n/a), got {short(value)}")

    def place(self, it: IterationDraft, title: str, stats: Stats, line: int) -> None:
        if self.section == STAGES:
            it.forward.setdefault(title, stats)
        elif self.section == BACKWARD:
            entry = next((e for e in GRADIENT_ENTRIES if e.title == title), None)
            if entry is None:
                known = " or ".join(f"'{e.title}'" for e in GRADIENT_ENTRIES)
                self.fail(line, f"unknown gradient block '{title}' (expected {known})")
            it.param_grads.setdefault(entry.stage, stats)
            self.parameters.setdefault(entry.stage, stats.shape)
        elif self.layout_section is not None:
            stage, transposed = self.layout_stage(self.layout_section, title, line)
            if transposed and len(stats.shape) >= 3:
                s = stats.shape
                stats.shape = (s[0], s[2], s[1], *s[3:])
            it.forward.setdefault(stage, stats)
        else:
            self.fail(line, f"stat block '{title}' outside of a FORWARD PASS, STAGES or BACKWARD PASS section")

    def layout_stage(self, section: Section, title: str, line: int) -> tuple[str, bool]:
        for entry, pattern in _ENTRY_PATTERNS[section.title]:
            m = pattern.match(title)
            if not m:
                continue
            ctx = {k: int(v) for k, v in m.groupdict().items()}
            if "i" in ctx:
                self.block = ctx["i"]
            elif section.per_block:
                if self.block is None:
                    self.fail(line, f"stat block '{title}' before any 'Input to Block i' heading")
                ctx["i"] = self.block
            if "{last}" in entry.stage:
                ctx["last"] = self.last_block(line)
            return entry.stage.format_map(ctx), entry.transposed
        self.fail(line, f"unknown stat block '{title}' in section '{section.title}'")

    def last_block(self, line: int) -> int:
        n_layer = self.header_config.get("n_layer")
        depth = as_int(n_layer)
        if depth:
            return depth - 1
        if self.block is None:
            self.fail(line, "'Before final norm' needs the depth (Configuration: depth=L) or the blocks above it")
        return self.block

    # -- other lines
    def text(self, text: str, line: int) -> None:
        if self.section is None:
            return
        for pattern, keys, convert in _BODY_CONFIG:
            m = pattern.match(text)
            if m:
                for key, raw in zip(keys, m.groups(), strict=True):
                    try:
                        self.body_config.setdefault(key, convert(raw))
                    except ValueError:
                        self.fail(line, f"{key}: expected a number, got {short(raw)}")
                return
        m = _MARKER_RE.match(text)
        if m:
            self.block = int(m.group("i"))
            return
        for regex, stage in ((_SPARSITY_RE, "relu2"), (_NEGATIVE_RE, "relu")):
            m = regex.match(text)
            if m and self.iterations and self.block is not None:
                stats = self.iterations[-1].forward.get(f"blocks.{self.block}.mlp.{stage}")
                if stats is not None:
                    stats.zero_count(int(m.group(1)))

    def completion(self, record: Completion) -> None:
        line = record.line
        it = self.current(line, "completion line")
        if record.pos != it.pos:
            self.fail(line, f"'Iteration {record.pos} complete' inside ITERATION {it.pos}")
        it.loss = self.number(record.loss, "Loss", line)
        note = record.note
        if note is not None:
            if note not in _STEP_BY_NOTE:
                known = " or ".join(f"'({n})'" for n in STEP_NOTES.values())
                self.fail(line, f"unknown step note '({note})' (expected {known})")
            it.stepped = _STEP_BY_NOTE[note]
        it.completed = True

    # -- gradient tables
    def table(self, table: Table) -> None:
        header = list(table.header)
        columns = next((c for c in (STAGE_GRAD_COLUMNS, PARAM_GRAD_COLUMNS) if [h for h, _ in c] == header), None)
        if columns is None or self.section != BACKWARD:
            return
        it = self.current(table.line, "gradient table")
        for row in table.rows:
            cells = list(row.cells)
            if len(cells) != len(columns):
                self.fail(row.line, f"gradient table row: expected {len(columns)} cells, got {len(cells)}")
            if columns is STAGE_GRAD_COLUMNS:
                name, stats = self.row(columns, cells, row.line)
                it.stage_grads.setdefault(name, stats)
            else:
                self.param_row(it, cells, row.line)

    def row(self, columns: Sequence[tuple[str, str]], cells: Sequence[str], line: int,
            stats: Stats | None = None) -> tuple[str, Stats]:
        values: dict[str, Cell] = {}
        for (header, kind), cell in zip(columns, cells, strict=True):
            if kind == "name":
                if not cell:
                    self.fail(line, f"gradient table row: missing {header}")
                values[kind] = cell
            elif kind == "shape":
                values[kind] = self.value("shape", cell, header, line)
            elif kind == "dtype":
                values[kind] = self.value("text", cell, header, line)
            elif kind == "nonfinite":
                values[kind] = self.value("nonfinite", cell, header, line)
            else:
                values[kind] = self.number(cell, header, line)
        name, shape, dtype = values["name"], values["shape"], values["dtype"]
        assert isinstance(name, str) and isinstance(shape, tuple) and isinstance(dtype, str)  # their kinds
        if stats is None:
            stats = Stats(shape, dtype, self.default_device())
        for kind, value in values.items():
            if kind not in ("name", "shape", "dtype"):
                stats.set(kind, _statistic(value))
        return name, stats

    def param_row(self, it: IterationDraft, cells: list[str], line: int) -> None:
        """A parameter row; the table's order wins over the gradient blocks above it."""
        name = cells[0]
        if len(cells) > 2 and cells[2] == NO_GRADIENT:
            shape = None if cells[1] == "n/a" else self.value("shape", cells[1], "shape", line)
            stats = None
        else:
            name, stats = self.row(PARAM_GRAD_COLUMNS, cells, line, it.param_grads.get(name))
            shape = stats.shape
        it.param_grads[name] = it.param_grads.pop(name, stats)
        if shape is not None:
            self.parameters[name] = self.parameters.pop(name, shape)

    def default_device(self) -> str:
        it = self.iterations[-1]
        for stats in (*it.forward.values(), *(s for s in it.param_grads.values() if s is not None)):
            return stats.device
        return self.device[1] if self.device else ""

    # -- the Trace
    def finish(self) -> Trace:
        if self.declared_iterations is not None and self.declared_iterations[0] != len(self.iterations):
            count, line = self.declared_iterations
            self.fail(line, f"the header declares {count} iterations, the report holds {len(self.iterations)}")
        iterations: list[Iteration] = []
        previous: int | None = None
        for draft in self.iterations:
            index = draft.index
            if index is None:  # a loss-only iteration: one past the previous one
                index = previous + 1 if previous is not None else draft.pos - 1
            forward = {k: s.build() for k, s in draft.forward.items()}
            loss = draft.loss if draft.completed else (forward["loss"].mean if "loss" in forward else None)
            iterations.append(Iteration(
                index=index, loss=loss, stepped=draft.stepped, lr={}, forward=forward,
                stage_grads={k: s.build() for k, s in draft.stage_grads.items()},
                param_grads={k: (s.build() if s is not None else None) for k, s in draft.param_grads.items()},
            ))
            previous = index
        environment: dict[str, str] = {EnvKey.SOURCE: PROVENANCE.source}
        if self.device:
            environment = {EnvKey.DEVICE: self.device[1], EnvKey.DEVICE_TYPE: self.device[0], **environment}
        return Trace(config=self.config(iterations), environment=environment, iterations=tuple(iterations),
                     parameters=dict(self.parameters), model=self.model, provenance=PROVENANCE)

    def config(self, iterations: list[Iteration]) -> dict[str, Any]:
        found = {**self.body_config, **self.header_config}
        for it in iterations:
            for name, stats in it.forward.items():
                if re.fullmatch(r"blocks\.\d+\.attn\.k", name) and len(stats.shape) == 4:
                    found.setdefault("n_kv_head", stats.shape[2])
        ordered = {k: found[k] for k in CONFIG_ORDER if k in found}
        return {**ordered, **{k: v for k, v in found.items() if k not in ordered}}


def _parse_shape(text: str) -> tuple[int, ...] | None:
    m = re.fullmatch(r"\(\s*((?:\d+\s*,\s*)*\d*)\s*,?\s*\)", text)
    if not m:
        return None
    return tuple(int(p) for p in re.split(r"\s*,\s*", m.group(1)) if p)


def _statistic(cell: Cell) -> Value:
    """A cell of a statistic's kind (number or nonfinite), as ``Stats.set`` takes it."""
    if cell is None or isinstance(cell, (float, Counts)):
        return cell
    raise TypeError(f"{cell!r} is a shape or a text, not a statistic")


def _config_scalar(raw: str) -> int | float | bool | str | None:
    if re.fullmatch(r"-?\d+", raw):
        return int(raw)
    if raw in ("True", "False", "None"):
        return {"True": True, "False": False, "None": None}[raw]
    try:
        return float(raw)
    except ValueError:
        return raw


def parse(text: str, file: PathLike | None = None) -> Trace:
    """Read a GPT Component Debug Trace into a Trace.

    Raises MarkdownParseError naming the file and line when the text is not such a report.
    """
    assembler = _Assembler(file)
    for record in lex(text, file):
        assembler.feed(record)
    return assembler.finish()
