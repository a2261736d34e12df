"""Files that survive a crash: written to a temporary name, fsynced, renamed, the folder fsynced.

After a crash at any moment, a path written by `atomic_write_text` holds either its old or
its new content, never a torn one. Used for checkpoint markers and pointers, ``summary.json``,
``ds_config.json``, evaluation results and exports.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Optional


def atomic_write_text(path: Path, text: str) -> None:
    """Write ``text`` so that ``path`` holds either its old or its new content after any crash."""
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)


def fsync_dir(folder: Path) -> None:
    """Make a rename or a new file in ``folder`` durable (no-op where folders cannot be opened)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # pragma: no cover - platforms without directory fds
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_problem(folder: Path) -> Optional[str]:
    """Why ``folder`` cannot be written, in a few words, or None when it can: creates it (and its
    parents) and writes, fsyncs and removes a small probe file."""
    folder = Path(folder)
    probe = folder / f".write-check-{os.getpid()}"
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with open(probe, "wb") as f:
            f.write(b"sfrik-scale\n")
            f.flush()
            os.fsync(f.fileno())
        probe.unlink()
    except OSError as err:
        where = Path(err.filename) if err.filename else folder
        cause = err.strerror or type(err).__name__
        blocker = next((p for p in [where, *where.parents] if p.exists() and not p.is_dir()), None)
        return f"cannot write to {folder}: {cause}" + (f" ({blocker} is a file)" if blocker else "")
    return None
