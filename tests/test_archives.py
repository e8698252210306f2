"""Hostile archives and images: every member of a CIFAR-100 tar.gz or a class-folder zip is checked before anything
is written or decoded (fedtina.data.archive), one error line naming the archive and the member; 16-bit greyscale
PNGs and control characters in folder names are read correctly."""

from __future__ import annotations

import io
import stat
import tarfile
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from fedtina.config import DatasetConfig
from fedtina.data import cifar, folder, load_dataset
from fedtina.data.archive import SizeLimits
from fedtina.data.folder import load_class_folder
from fedtina.errors import DatasetUnavailableError, FedtinaError


def _png(colour=(200, 10, 10)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), colour).save(buf, "PNG")
    return buf.getvalue()


def _tar(path: Path, members: list[tuple[str, bytes | None, bytes]]) -> Path:
    """A tar.gz of (name, link target or None, data) members."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w:gz") as tar:
        for name, link, data in members:
            info = tarfile.TarInfo(name)
            if link is not None:
                info.type, info.linkname = tarfile.SYMTYPE, link.decode()
                tar.addfile(info)
            else:
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return path


def _files(root: Path) -> list[str]:
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*"))


# --------------------------------------------------------------------------------------------------------------------
# CIFAR-100's tar.gz


@pytest.mark.parametrize("member, link, why", [
    ("../../x", None, r"has a '\.\.' component"),
    ("cifar-100-python/../../x", None, r"has a '\.\.' component"),
    ("/tmp/x", None, "has an absolute path"),
    ("cifar-100-python/meta", b"/etc/passwd", "is a link or a special file"),
])
def test_a_crafted_cifar_archive_is_refused_before_anything_is_written(tmp_path, member, link, why):
    root = tmp_path / "a" / "b"
    archive = _tar(root / cifar.ARCHIVE, [("cifar-100-python/train", None, b"ok"), (member, link, b"evil")])
    with pytest.raises(FedtinaError, match=rf"^{archive}: member {member!r} {why}.*nothing was extracted\)$"):
        load_dataset(DatasetConfig(name="cifar100", path=str(root), download=False), tmp_path / "cache")
    assert _files(tmp_path / "a") == ["b", f"b/{cifar.ARCHIVE}"]     # nothing extracted, nothing outside


def test_cifar_archive_sizes_are_bounded(tmp_path, monkeypatch):
    monkeypatch.setattr(cifar, "CIFAR_LIMITS", SizeLimits(member=100, total=150))
    big = _tar(tmp_path / "big" / cifar.ARCHIVE, [("cifar-100-python/train", None, b"0" * 101)])
    with pytest.raises(FedtinaError, match=r"member 'cifar-100-python/train' declares 101 bytes, more than the 100"):
        cifar.load_cifar100(big.parent, download=False, cache_dir=None)
    many = _tar(tmp_path / "many" / cifar.ARCHIVE, [(f"cifar-100-python/{i}", None, b"0" * 60) for i in range(3)])
    with pytest.raises(FedtinaError, match=r"member 'cifar-100-python/2' brings the declared total to 180 bytes"):
        cifar.load_cifar100(many.parent, download=False, cache_dir=None)
    assert _files(tmp_path / "many") == [cifar.ARCHIVE]


def test_a_safe_cifar_archive_is_extracted_then_read(tmp_path):
    root = tmp_path / "c"
    _tar(root / cifar.ARCHIVE, [("cifar-100-python/train", None, b"not a pickle")])
    with pytest.raises(DatasetUnavailableError, match="is incomplete or corrupted"):   # torchvision's md5 check
        cifar.load_cifar100(root, download=False, cache_dir=None)
    assert set(_files(root)) == {cifar.ARCHIVE, "cifar-100-python", "cifar-100-python/train"}


# --------------------------------------------------------------------------------------------------------------------
# class-folder zips


def _zip(path: Path, members: dict[str, bytes], links: tuple[str, ...] = ()) -> Path:
    with zipfile.ZipFile(path, "w") as zf:
        for name, data in members.items():
            info = zipfile.ZipInfo(name)
            if name in links:
                info.external_attr = (stat.S_IFLNK | 0o777) << 16
            zf.writestr(info, data, compress_type=zipfile.ZIP_DEFLATED)
    return path


GOOD = {"cat/a.png": _png(), "dog/b.png": _png((10, 10, 200))}


@pytest.mark.parametrize("member, why", [
    ("/abs/x.png", "has an absolute path"),
    ("cat/../../x.png", r"has a '\.\.' component \(it would land outside the archive's folder\)"),
    ("C:/x.png", "has an absolute path"),
])
def test_a_zip_member_outside_the_archive_is_one_error_line(tmp_path, member, why):
    path = _zip(tmp_path / "d.zip", {**GOOD, member: _png()})
    with pytest.raises(FedtinaError, match=rf"^{path}: member {member!r} {why}; the archive is refused"):
        load_class_folder(path)


def test_a_zip_link_is_refused(tmp_path):
    path = _zip(tmp_path / "d.zip", {**GOOD, "cat/l.png": b"/etc/passwd"}, links=("cat/l.png",))
    with pytest.raises(FedtinaError, match=r"member 'cat/l.png' is a link or a special file"):
        load_class_folder(path)


def test_a_zip_bomb_is_refused_before_it_is_read(tmp_path, monkeypatch):
    """A member of zeros far larger than an image may be (600 MB in the issue; 2 MiB against a 1 MiB limit here) is
    refused from its declared size: nothing is decompressed."""
    monkeypatch.setattr(folder, "IMAGE_LIMITS", SizeLimits(member=1 << 20, total=1 << 30))
    path = _zip(tmp_path / "d.zip", {**GOOD, "cat/bomb.png": bytes(2 << 20)})
    assert path.stat().st_size < 20_000
    monkeypatch.setattr(zipfile.ZipFile, "open", lambda *a, **k: pytest.fail("a member was read"))
    with pytest.raises(FedtinaError, match=r"member 'cat/bomb.png' declares 2,097,152 bytes, more than the "
                                           r"1,048,576 a member may have"):
        load_class_folder(path)


def test_a_directory_image_that_is_a_device_is_refused(tmp_path):
    root = tmp_path / "d"
    for name, data in GOOD.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(data)
    (root / "cat" / "zero.png").symlink_to("/dev/zero")
    with pytest.raises(FedtinaError, match=r"'cat/zero.png' is not a regular file"):
        load_class_folder(root)


# --------------------------------------------------------------------------------------------------------------------
# images and names


def test_a_16_bit_greyscale_png_is_scaled_not_clipped(tmp_path):
    buf = io.BytesIO()
    Image.fromarray(np.full((8, 8), 32896, np.uint16)).save(buf, "PNG")   # mid grey: 128 * 257
    assert Image.open(io.BytesIO(buf.getvalue())).mode.startswith("I")
    assert np.all(folder.decode_image(buf.getvalue(), "x") == 128)


def test_control_characters_in_folder_names_never_reach_a_name(tmp_path):
    path = _zip(tmp_path / "d.zip", {"evil\x1b[2J\x07cat/a.png": _png(), "dog\u200b/b.png": _png()})
    assert load_class_folder(path).class_names == ["dog", "evil [2j cat"]


def test_a_class_name_past_the_limit_is_refused(tmp_path):
    path = _zip(tmp_path / "d.zip", {**GOOD, "x" * 201 + "/a.png": _png()})
    with pytest.raises(FedtinaError, match=r"a class name of 201 characters, more than limits.max_name_chars=200"):
        load_class_folder(path)
