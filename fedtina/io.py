"""Atomic file writes and the cache lock: every cache file, checkpoint and run input is written through
`atomic_write`, so a crash or a kill leaves either the old file or the new one, never half of one; every cache build
runs under `cache_lock`, so two processes building the same product end with one copy of it."""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Mapping

from fedtina.errors import FedtinaError


def _umask() -> int:
    mask = os.umask(0o022)  # the only way to read it is to set it; done once, at import
    os.umask(mask)
    return mask


# what open() gives a new file; writers such as safetensors' save_file create theirs 0600
FILE_MODE = 0o666 & ~_umask()


def atomic_write(path: str | os.PathLike, write: Callable[[Path], None], fsync: bool = False,
                 mode: int = FILE_MODE) -> Path:
    """Call `write(tmp)` on a temporary file beside `path`, then rename it onto `path` (os.replace is atomic on one
    filesystem). The file gets `mode` (default: the normal 0o666 & ~umask) whatever mode `write` created it with (a
    private file's writer creates it private: `write_private`). `fsync` also flushes the data to disk before the
    rename (checkpoints). A full disk is one FedtinaError naming the file; the old file stays as it was."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        write(tmp)
        os.chmod(tmp, mode)
        if fsync:
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        if e.errno in (errno.ENOSPC, errno.EDQUOT):
            raise FedtinaError(f"cannot write {path}: no space left on its device ({e.strerror}); free some space "
                               "and run again (the previous file, if any, is intact)") from None
        raise
    finally:
        tmp.unlink(missing_ok=True)
    return path


def write_private(path: str | os.PathLike, data: bytes) -> Path:
    """Atomically write `data` to a file only its owner may read (0600 from its creation on: keys)."""
    def write(tmp: Path) -> None:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(data)

    return atomic_write(path, write, mode=0o600)


def write_json_lists(path: str | os.PathLike, doc: Mapping[str, Any], lists: Mapping[str, Iterable[Any]],
                     item: Callable[[Any], Any] = lambda x: x, allow_nan: bool = True) -> Path:
    """Atomically write the JSON object `{**doc, **lists}`, encoding list items one at a time (`item(x)` each): a run
    of 100,000 clients has ~800,000 per-client records, and one `json.dumps` of them as dicts held them twice more
    (traced: 67 MB of transient at 3,000 clients)."""
    def write(tmp: Path) -> None:
        with open(tmp, "w") as f:
            f.write("{")
            sep = "\n"
            for key, value in doc.items():
                f.write(f"{sep}{json.dumps(key)}: {json.dumps(value, indent=1, allow_nan=allow_nan)}")
                sep = ",\n"
            for key, values in lists.items():
                f.write(f"{sep}{json.dumps(key)}: [")
                inner = "\n"
                for x in values:
                    f.write(inner + json.dumps(item(x), allow_nan=allow_nan))
                    inner = ",\n"
                f.write("\n]")
                sep = ",\n"
            f.write("\n}\n")

    return atomic_write(path, write)


@contextlib.contextmanager
def cache_lock(path: str | os.PathLike) -> Iterator[None]:
    """Hold an exclusive lock for building the cache product at `path` (a file or a directory): flock on the sibling
    `.<name>.lock`, which stays (deleting it would let a third process lock a fresh file while a second still holds
    the old one). The kernel drops the lock when its holder exits, however it exits. Callers re-check for the
    finished product after acquiring it: another process may have built it meanwhile."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path.with_name(f".{path.name}.lock"), os.O_RDWR | os.O_CREAT, 0o666)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing the last descriptor of the open file releases the lock
