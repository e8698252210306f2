"""Atomic writes: a writer that fails half way leaves the old file untouched and no temporary file behind."""

import pytest

from fedtina.io import atomic_write


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
