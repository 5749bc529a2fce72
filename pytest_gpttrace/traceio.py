"""Reading and writing trace files in either format, JSON or seed-format Markdown.

``read_trace`` is the one reader of a trace file.

Writes are atomic (a temporary file in the same folder, then a rename) and happen only when the
content changes, so an unchanged golden keeps its mtime and makes no churn in git.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import secrets
import time
from pathlib import Path
from typing import Any

from .errors import GptTraceError, TraceFormatError
from .trace import PathLike, Trace, dumps, loads, read_text

MARKDOWN_SUFFIXES = (".md", ".markdown", ".txt")


def read_trace(path: PathLike) -> Trace:
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


def format_for(path: PathLike) -> str:
    return "markdown" if Path(path).suffix.lower() in MARKDOWN_SUFFIXES else "json"


def render_trace(trace: Trace, fmt: str, **markdown_options: Any) -> str:
    if fmt != "markdown":
        return dumps(trace)
    from . import markdown

    return markdown.render(trace, **markdown_options)


STALE_TEMP_SECONDS = 60.0  # a temporary file older than this is left over from a killed writer


def _open_temp(path: Path) -> tuple[int, str]:
    """A new temporary file beside ``path``, open for writing: (descriptor, name).

    A new golden gets the mode ``open()`` would give it (0666 less the umask, applied by the system:
    the process umask is never read or set); a rewritten one keeps the mode it had.
    """
    try:
        mode = path.stat().st_mode & 0o777
    except OSError:
        mode = None
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0)
    for _ in range(100):
        name = str(path.parent / f".{path.name}.{secrets.token_hex(4)}.tmp")
        try:
            fd = os.open(name, flags, 0o666 if mode is None else 0o600)
        except FileExistsError:
            continue
        if mode is not None:
            os.chmod(name, mode)
        return fd, name
    raise FileExistsError(errno.EEXIST, "no free temporary file name", str(path))


def check_writable(path: PathLike, what: str) -> None:
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


class WriteError(GptTraceError, OSError):
    """A trace file that could not be written: its first line names the file and the cause."""

    def __str__(self) -> str:
        return f"cannot write {self.filename}: {self.strerror}"


def _write_error(path: Path, exc: OSError) -> WriteError:
    cause = exc.strerror or str(exc)
    if exc.errno in (errno.ENOTDIR, errno.EEXIST) or (exc.errno == errno.ENOENT and _file_in_the_way(path)):
        blocker = _file_in_the_way(path)
        if blocker is not None:
            cause = f"{blocker.name!r} on its path is a file, not a folder"
    elif exc.errno == errno.EISDIR or path.is_dir():
        cause = "it is a folder; give a file path"
    elif exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        cause = f"its folder is not writable ({exc.strerror})"
    return WriteError(exc.errno or errno.EIO, cause, str(path))


def _file_in_the_way(path: Path) -> Path | None:
    for parent in path.parents:
        if parent.exists():
            return None if parent.is_dir() else parent
    return None


def sweep_stale_temps(folder: PathLike, now: float | None = None, age: float = STALE_TEMP_SECONDS) -> list[Path]:
    """Remove ``.NAME.*.tmp`` files older than ``age`` seconds that a killed writer left; returns them."""
    now = time.time() if now is None else now
    removed: list[Path] = []
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return removed
    for entry in entries:
        if not _TEMP.fullmatch(entry.name):
            continue
        try:
            if entry.is_file(follow_symlinks=False) and now - entry.stat(follow_symlinks=False).st_mtime > age:
                os.unlink(entry.path)
                removed.append(Path(entry.path))
        except OSError:
            pass  # another writer's, or gone already
    return removed


def sweep_stale_temps_under(folder: PathLike, now: float | None = None) -> list[Path]:
    """``sweep_stale_temps`` in ``folder`` and every folder below it (a session's start: the goldens)."""
    removed: list[Path] = []
    for dirpath, _, _ in os.walk(folder):
        removed += sweep_stale_temps(dirpath, now)
    return removed


_TEMP = re.compile(r"\..+\.[A-Za-z0-9_]{8}\.tmp")


def _fsync_folder(folder: Path) -> None:
    """Make a rename durable; some systems cannot open or sync a folder, which is fine."""
    try:
        fd = os.open(folder, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError as exc:
        if exc.errno not in (errno.EINVAL, errno.EBADF, errno.ENOTSUP, errno.EPERM, errno.EACCES):
            raise
    finally:
        os.close(fd)


def write_text_atomic(path: PathLike, text: str) -> bool:
    """Write text to path atomically and durably; returns False (and leaves the file alone) when unchanged.

    The text goes to a temporary file in the same folder, which is synced to disk and renamed over
    path; the folder is synced after the rename. A failure raises WriteError naming path and the cause.
    """
    path = Path(path)
    try:
        if path.read_text(encoding="utf-8") == text:
            return False
    except (FileNotFoundError, UnicodeDecodeError, IsADirectoryError, NotADirectoryError):
        pass
    except OSError as exc:
        raise _write_error(path, exc) from None
    if path.is_dir():
        raise WriteError(errno.EISDIR, "it is a folder; give a file path", str(path))
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        sweep_stale_temps(path.parent)
        fd, tmp = _open_temp(path)
        with os.fdopen(fd, "w", encoding="utf-8", newline="\n") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        tmp = None
        _fsync_folder(path.parent)
    except OSError as exc:
        raise _write_error(path, exc) from None
    finally:
        if tmp is not None:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
    return True


def write_trace(path: PathLike, trace: Trace, fmt: str | None = None, **markdown_options: Any) -> bool:
    """Write a trace (format from the suffix unless given); False when the file was already identical."""
    return write_text_atomic(path, render_trace(trace, fmt or format_for(path), **markdown_options))
