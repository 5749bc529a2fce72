"""The errors pytest-gpttrace raises for bad input. Each message's first line says what broke and where."""

from __future__ import annotations

import os


class GptTraceError(Exception):
    """Base of every error pytest-gpttrace raises on purpose."""


class TraceFormatError(GptTraceError, ValueError):
    """A trace file cannot be read (missing, not text) or its JSON is malformed: names the file,
    the JSON path (empty when none applies) and what was expected."""

    def __init__(self, file: str | os.PathLike[str] | None, path: str, message: str):
        self.file, self.path, self.detail = file, path, message
        where = f"{file}: " if file else ""
        at = f"at {path}: " if path else ""
        super().__init__(f"{where}{at}{message}")


class MarkdownParseError(TraceFormatError):
    """A seed-format Markdown trace is malformed: names the file and the line."""

    def __init__(self, file: str | os.PathLike[str] | None, line: int | None, message: str):
        self.file, self.line, self.detail = file, line, message
        self.path = f"line {line}" if line is not None else ""
        where = f"{file}" if file else "<markdown>"
        if line is not None:
            where += f":{line}"
        ValueError.__init__(self, f"{where}: {message}")


class CaptureError(GptTraceError, RuntimeError):
    """Capture cannot run on this model (for example: it has no stages)."""


class TraceMismatchError(GptTraceError, ValueError):
    """Two traces cannot be compared (another config, another device type)."""
