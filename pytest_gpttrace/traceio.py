"""Reading and writing trace files in either format, JSON or seed-format Markdown.

Writes are atomic (a temporary file in the same folder, then a rename) and happen only when the
content changes, so an unchanged golden keeps its mtime and makes no churn in git.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from .trace import Trace, dumps, loads, read_text

MARKDOWN_SUFFIXES = (".md", ".markdown", ".txt")


def read_trace(path) -> Trace:
    """A Trace from a JSON trace or a seed-format Markdown report (told apart by content)."""
    path = Path(path)
    text = read_text(path)
    if text.lstrip().startswith("{") or path.suffix == ".json":
        return loads(text, file=path)
    from . import markdown

    return markdown.parse(text, file=path)


def format_for(path) -> str:
    return "markdown" if Path(path).suffix.lower() in MARKDOWN_SUFFIXES else "json"


def render_trace(trace: Trace, fmt: str, **markdown_options) -> str:
    if fmt != "markdown":
        return dumps(trace)
    from . import markdown

    return markdown.render(trace, **markdown_options)


def write_text_atomic(path, text: str) -> bool:
    """Write text to path atomically; returns False (and leaves the file alone) when unchanged."""
    path = Path(path)
    try:
        if path.read_text(encoding="utf-8") == text:
            return False
    except (FileNotFoundError, UnicodeDecodeError, IsADirectoryError):
        pass
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="\n") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    return True


def write_trace(path, trace: Trace, fmt: str | None = None, **markdown_options) -> bool:
    """Write a trace (format from the suffix unless given); False when the file was already identical."""
    return write_text_atomic(path, render_trace(trace, fmt or format_for(path), **markdown_options))
