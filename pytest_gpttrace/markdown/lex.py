"""A GPT Component Debug Trace as a stream of typed records, one per construct, with line numbers.

The lexer knows the report's syntax only: headings, header fields, banners, stat blocks with their
bullet lines, tables, completion lines and other coloured lines. What they mean is ``parse``'s.
The scaling, anomalies and closing sections are skipped (the anomalies section may hold any
Markdown, so only the closing section's heading ends it). Lines are numbered from 1.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass

from ..errors import MarkdownParseError
from ..trace import PathLike
from .layout import ANOMALIES, COMPLETE, SCALING, TITLE, TRAINING

_COLOR = r'<span style="color: #[0-9a-fA-F]{6}">'
_SECTION_RE = re.compile(rf"^## {_COLOR}(.*)</span>\s*$")
_HEADING_RE = re.compile(rf"^#### (?:{_COLOR}(.*)</span>|(.*))\s*$")
_BANNER_RE = re.compile(rf"^<strong>{_COLOR}ITERATION (\d+)/(\d+)</span>")
_SPAN_RE = re.compile(rf"^\*?{_COLOR}(.*)</span>\*?\s*$")
_HEADER_RE = re.compile(r"^\*\*(Generated|Configuration|Model|Device|Iterations)\*\*:\s*(.*?)\s*$")
_COMPLETION_RE = re.compile(r"^✓ Iteration (\d+) complete - Loss: (\S+)(?: \((.+)\))?$")
BULLET_RE = re.compile(r"^- \*\*([^*]+)\*\*:\s*(.*?)\s*$")
VALUE_RE = re.compile(rf"^{_COLOR}(.*)</span>$")

_SKIPPED_SECTIONS = (SCALING, ANOMALIES, COMPLETE)
_MAX_DIGITS = 4300  # Python's default limit of int() on a string (sys.get_int_max_str_digits)
_LONG_NUMBER_RE = re.compile(rf"\d{{{_MAX_DIGITS + 1},}}")


@dataclass(frozen=True)
class SectionHeading:
    """``## <span>TITLE</span>``."""

    title: str
    line: int


@dataclass(frozen=True)
class HeaderField:
    """``**Key**: value`` above the first section."""

    key: str
    value: str
    line: int


@dataclass(frozen=True)
class Banner:
    """``ITERATION pos/total``."""

    pos: int
    total: int
    line: int


@dataclass(frozen=True)
class BulletLine:
    """A ``- `` line under a stat block heading, as written."""

    text: str
    line: int


@dataclass(frozen=True)
class StatBlock:
    """A ``#### `` heading and the bullet lines below it."""

    title: str
    line: int
    bullets: tuple[BulletLine, ...]


@dataclass(frozen=True)
class TableRow:
    cells: tuple[str, ...]
    line: int


@dataclass(frozen=True)
class Table:
    """A Markdown table: its header cells and its rows (the rule line left out)."""

    header: tuple[str, ...]
    rows: tuple[TableRow, ...]
    line: int


@dataclass(frozen=True)
class Completion:
    """``✓ Iteration k complete - Loss: x [(note)]``; loss and note as written."""

    pos: int
    loss: str
    note: str | None
    line: int


@dataclass(frozen=True)
class Text:
    """Any other coloured line, its text without the span."""

    text: str
    line: int


Record = SectionHeading | HeaderField | Banner | StatBlock | Table | Completion | Text


def cells(line: str) -> tuple[str, ...]:
    inner = line.strip()
    if inner.startswith("|"):
        inner = inner[1:]
    if inner.endswith("|"):
        inner = inner[:-1]
    return tuple(c.strip() for c in inner.split("|"))


def short(text: str) -> str:
    text = text.strip()
    return repr(text if len(text) <= 60 else text[:57] + "...")


def lex(text: str, file: PathLike | None = None) -> Iterator[Record]:
    """The records of a report, in order. Raises MarkdownParseError for what is not such a report."""
    normalized = text.replace("\r\n", "\n").replace("\r", "\n")
    lines = normalized.split("\n")
    if not text.strip():
        raise MarkdownParseError(file, 1, "the file is empty: expected a GPT Component Debug Trace")
    first = next(n for n, line in enumerate(lines) if line.strip())
    if lines[first].strip() != TITLE:
        raise MarkdownParseError(file, first + 1, f"not a GPT Component Debug Trace: expected the title '{TITLE}', "
                                                  f"got {short(lines[first])}")
    long_number = _LONG_NUMBER_RE.search(normalized)
    if long_number:  # int() refuses it; nothing a report prints is that long
        raise MarkdownParseError(file, normalized.count("\n", 0, long_number.start()) + 1,
                                 f"a number of {len(long_number.group())} digits "
                                 f"(a report prints none longer than {_MAX_DIGITS})")
    section: str | None = None
    n = first + 1
    while n < len(lines):
        line = lines[n]
        m = _SECTION_RE.match(line)
        if m and not (section == ANOMALIES and m.group(1).strip() != COMPLETE):
            section = m.group(1).strip()
            yield SectionHeading(section, n + 1)
            n += 1
            continue
        if section in _SKIPPED_SECTIONS:
            n += 1
            continue
        if section is None:
            m = _HEADER_RE.match(line)
            if m:
                yield HeaderField(m.group(1), m.group(2), n + 1)
                n += 1
                continue
        m = _BANNER_RE.match(line)
        if m:
            section = TRAINING
            yield Banner(int(m.group(1)), int(m.group(2)), n + 1)
            n += 1
            continue
        m = _HEADING_RE.match(line)
        if m:
            title = (m.group(1) if m.group(1) is not None else m.group(2)).strip()
            k = n + 1
            while k < len(lines) and not lines[k].strip():
                k += 1
            start = k
            while k < len(lines) and lines[k].startswith("- "):
                k += 1
            yield StatBlock(title, n + 1, tuple(BulletLine(lines[j], j + 1) for j in range(start, k)))
            n = k
            continue
        if line.startswith("|"):
            end = n
            while end < len(lines) and lines[end].startswith("|"):
                end += 1
            rows = tuple(TableRow(cells(lines[k]), k + 1) for k in range(n + 2, end))
            yield Table(cells(line), rows, n + 1)
            n = end
            continue
        m = _SPAN_RE.match(line)
        if m:
            inner = m.group(1).strip()
            c = _COMPLETION_RE.match(inner)
            yield Completion(int(c.group(1)), c.group(2), c.group(3), n + 1) if c else Text(inner, n + 1)
        elif BULLET_RE.match(line):
            raise MarkdownParseError(file, n + 1,
                                     "a statistic bullet outside of a stat block (no '#### ' heading above it)")
        n += 1
