"""Checks on the plugin's folders, made before any test runs; nothing here imports torch."""

from __future__ import annotations

import os
from pathlib import Path


def _overlap(a: Path, b: Path) -> bool:
    a, b = Path(os.path.realpath(a)), Path(os.path.realpath(b))
    return a == b or a in b.parents or b in a.parents


def _shown(path: Path, rootdir: Path | None) -> str:
    if rootdir is not None:
        try:
            return str(Path(os.path.realpath(path)).relative_to(os.path.realpath(rootdir))) + "/"
        except ValueError:
            pass
    return str(path)


def folder_conflict(golden_dir: Path, golden_name: str, others: list[tuple[str, Path | None]],
                    rootdir: Path | None = None) -> str | None:
    """One line saying which output folder is, lies inside, or contains the golden folder; else None.

    ``others`` pairs each output folder with how the user names it (an option or ini key). Writing an
    obtained trace or a report there would replace goldens, and a changed trace would then pass.
    """
    for name, folder in others:
        if folder is not None and _overlap(folder, golden_dir):
            return (f"{name} {_shown(folder, rootdir)} and the golden folder {_shown(golden_dir, rootdir)} "
                    f"({golden_name}) overlap: "
                    f"obtained traces and reports written there would replace goldens; give {name} a folder "
                    f"apart from the goldens")
    return None
