"""Atomic writes: a writer that fails half way leaves the old file untouched and no temporary file behind; written
files get the normal mode. JSON written list item by list item reads back as the whole object. The cache lock: one
holder at a time."""

import fcntl
import json
import math
import os
import threading

import pytest

from fedtina.io import atomic_write, cache_lock, write_json_lists


def normal_mode() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return 0o666 & ~mask


def test_atomic_write_replaces_the_file(tmp_path):
    path = tmp_path / "sub" / "file.bin"
    atomic_write(path, lambda tmp: tmp.write_bytes(b"old"))
    atomic_write(path, lambda tmp: tmp.write_bytes(b"new"), fsync=True)
    assert path.read_bytes() == b"new"
    assert sorted(p.name for p in path.parent.iterdir()) == ["file.bin"]


def test_a_failed_write_keeps_the_old_file(tmp_path):
    path = tmp_path / "file.bin"
    atomic_write(path, lambda tmp: tmp.write_bytes(b"old"))

    def crash(tmp):
        tmp.write_bytes(b"half")
        raise RuntimeError("killed mid-write")

    with pytest.raises(RuntimeError, match="mid-write"):
        atomic_write(path, crash)
    assert path.read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file.bin"]


def test_json_written_item_by_item_reads_back_whole(tmp_path):
    path = tmp_path / "doc.json"
    doc = {"progress": {"done": ["tina"], "round": 2}, "note": "a \"quoted\"\nline"}
    lists = {"rows": [{"a": i, "b": [i, i / 3]} for i in range(5)], "empty": [], "gen": (x * 2 for x in range(3))}
    write_json_lists(path, doc, lists, item=lambda x: {"v": x} if isinstance(x, int) else x)
    assert json.loads(path.read_text()) == {**doc, "rows": [{"a": i, "b": [i, i / 3]} for i in range(5)],
                                            "empty": [], "gen": [{"v": 0}, {"v": 2}, {"v": 4}]}
    write_json_lists(path, {}, {"rows": [{"x": 1}]})
    assert json.loads(path.read_text()) == {"rows": [{"x": 1}]}
    with pytest.raises(ValueError):   # strict JSON refuses NaN, and the old file stays
        write_json_lists(path, {}, {"rows": [{"x": math.nan}]}, allow_nan=False)
    assert json.loads(path.read_text()) == {"rows": [{"x": 1}]}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["doc.json"]


def test_written_files_get_the_normal_mode(tmp_path):
    """safetensors' save_file creates its file 0600 (as a writer that opens its file private would)."""
    import numpy as np
    from safetensors.numpy import save_file

    def private(tmp):
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        os.write(fd, b"data")
        os.close(fd)

    a = atomic_write(tmp_path / "a.bin", private)
    b = atomic_write(tmp_path / "b.safetensors", lambda tmp: save_file({"x": np.zeros(3)}, str(tmp)))
    assert [oct(p.stat().st_mode & 0o777) for p in (a, b)] == [oct(normal_mode())] * 2


def test_cache_lock_has_one_holder_at_a_time(tmp_path):
    target = tmp_path / "zoo" / "some-key"
    lock_file = tmp_path / "zoo" / ".some-key.lock"
    held, release = threading.Event(), threading.Event()

    def hold():
        with cache_lock(target):
            held.set()
            release.wait(10)

    thread = threading.Thread(target=hold)
    thread.start()
    assert held.wait(10) and lock_file.is_file() and not target.exists()
    with open(lock_file, "a") as f:   # a second holder (its own open file, as another process has) must wait
        with pytest.raises(BlockingIOError):
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        release.set()
        thread.join(10)
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)  # free once the first holder left
    with cache_lock(target):          # free again for the next build; the lock file stays
        assert lock_file.is_file()


def test_a_full_disk_is_one_error_line_and_the_old_file_stays(tmp_path):
    import errno

    from fedtina.errors import FedtinaError

    path = tmp_path / "cache.npz"
    atomic_write(path, lambda tmp: tmp.write_bytes(b"old"))

    def full(tmp):
        with open(tmp, "wb") as f:
            f.write(b"ha")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))   # what write(2) says on a full disk

    with pytest.raises(FedtinaError, match=rf"^cannot write {path}: no space left on its device \(No space left on "
                                           r"device\); free some space and run again \(the previous file, if any, is "
                                           r"intact\)$"):
        atomic_write(path, full)
    assert path.read_bytes() == b"old" and sorted(p.name for p in tmp_path.iterdir()) == ["cache.npz"]
    with pytest.raises(PermissionError):   # other OS errors are not dressed up
        atomic_write(path, lambda tmp: (_ for _ in ()).throw(PermissionError(errno.EACCES, "denied")))


def test_a_private_file_is_never_readable_by_others(tmp_path, monkeypatch):
    from fedtina.io import write_private

    seen, real_open = [], os.open
    monkeypatch.setattr(os, "open", lambda p, flags, mode=0o777: (seen.append(oct(mode)), real_open(p, flags, mode))[1])
    path = write_private(tmp_path / "key", b"secret")
    monkeypatch.undo()
    assert seen == [oct(0o600)] and os.stat(path).st_mode & 0o777 == 0o600 and path.read_bytes() == b"secret"
