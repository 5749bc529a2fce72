"""Reading and writing trace files in either format, JSON or seed-format Markdown.

``read_trace`` is the one reader of a trace file.

Writes are atomic (a temporary file in the same folder, then a rename) and happen only when the
content changes, so an unchanged golden keeps its mtime and makes no churn in git.
"""

from __future__ import annotations

import errno
import os
import tempfile
from pathlib import Path

from .errors import TraceFormatError
from .trace import Trace, dumps, loads, read_text

MARKDOWN_SUFFIXES = (".md", ".markdown", ".txt")


def read_trace(path) -> Trace:
    """The trace file at path, JSON or a seed-format Markdown report, told apart by content.

    A file whose first non-blank character is ``{`` (or ``[``, to say a JSON list is no trace)
    is JSON, any other a report, whatever its suffix. Every failure is a TraceFormatError naming
    the file: a missing, empty or unreadable file, malformed JSON (with the JSON path) or a
    malformed report (a MarkdownParseError, with the line).
    """
    path = Path(path)
    text = read_text(path)
    if not text.strip():
        raise TraceFormatError(path, "", "the file is empty: expected a JSON trace or a Markdown report")
    if text.lstrip()[:1] in ("{", "["):
        return loads(text, file=path)
    from .markdown import parse

    return parse(text, file=path)


def format_for(path) -> str:
    return "markdown" if Path(path).suffix.lower() in MARKDOWN_SUFFIXES else "json"


def render_trace(trace: Trace, fmt: str, **markdown_options) -> str:
    if fmt != "markdown":
        return dumps(trace)
    from . import markdown

    return markdown.render(trace, **markdown_options)


def _mode_for(path: Path) -> int:
    """The existing file's permissions, else what open() would give under the umask."""
    try:
        return path.stat().st_mode & 0o777
    except OSError:
        umask = os.umask(0)
        os.umask(umask)
        return 0o666 & ~umask


def check_writable(path, what: str) -> None:
    """Fail early (before a long run) when a trace cannot be written to path."""
    path = Path(path)
    if path.is_dir():
        raise OSError(errno.EISDIR, f"{what} {path}: is a folder; give a file path", str(path))
    parent = path.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise OSError(errno.ENOTDIR, f"{what} {path}: {parent} is not a folder", str(path))
    if not os.access(parent, os.W_OK):
        raise OSError(errno.EACCES, f"{what} {path}: folder {parent} is not writable", str(path))


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
        os.chmod(tmp, _mode_for(path))  # mkstemp makes 0600; a golden is an ordinary file
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
