"""Atomic file writes: the one home of temp-file-then-rename, so a crash never leaves a partial file."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path


def write_atomic(path: str | Path, write: Callable[[str], None]) -> Path:
    """`write(tmp)` into a temp file beside `path`, then rename it over `path`: a crash leaves the old
    file (or none), never a partial one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def write_text_atomic(path: str | Path, text: str) -> Path:
    """`text` (UTF-8) into `path` through `write_atomic`."""
    return write_atomic(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))
