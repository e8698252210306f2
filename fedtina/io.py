"""Atomic file writes: every cache file, checkpoint and run input is written through this, so a crash or a kill
leaves either the old file or the new one, never half of one."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable


def atomic_write(path: str | os.PathLike, write: Callable[[Path], None], fsync: bool = False) -> Path:
    """Call `write(tmp)` on a temporary file beside `path`, then rename it onto `path` (os.replace is atomic on one
    filesystem). `fsync` also flushes the data to disk before the rename (checkpoints)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        write(tmp)
        if fsync:
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path
