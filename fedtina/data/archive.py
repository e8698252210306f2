"""Archive members checked before anything is written or decoded: a crafted archive must not write outside its
folder (`../../x`, `/etc/x`, a link), fill the disk, or make us read gigabytes (a 600 MB entry of zeros compresses
to 600 KB). Every archive fedtina opens is checked member by member: CIFAR-100's tar.gz by `extract_tar` (paths,
types, declared sizes, before anything is written), a class-folder .zip by `check_zip_member` and `SizeCheck` in
fedtina.data.folder before any member is read, each read bounded by `read_bounded`. A refusal is one FedtinaError
naming the archive and the member."""

from __future__ import annotations

import gzip
import shutil
import stat
import tarfile
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import BinaryIO

from fedtina.errors import FedtinaError


@dataclass(frozen=True)
class SizeLimits:
    """Declared uncompressed bytes: per member, and over all members checked."""
    member: int
    total: int


MiB, GiB = 1 << 20, 1 << 30
IMAGE_LIMITS = SizeLimits(member=64 * MiB, total=64 * GiB)      # one image file; a whole class-folder zip
CIFAR_LIMITS = SizeLimits(member=256 * MiB, total=512 * MiB)    # CIFAR-100: a 155 MB train file, 178 MB in all


def _refuse(archive: Path, name: str, why: str) -> FedtinaError:
    return FedtinaError(f"{archive}: member {name!r} {why}; the archive is refused (nothing was extracted)")


def member_path(archive: Path, name: str) -> PurePosixPath:
    """`name` as a relative POSIX path inside the archive, or a FedtinaError: absolute paths, drive letters and
    `..` components could point outside the folder the archive is read into."""
    p = PurePosixPath(name.replace("\\", "/"))
    if p.is_absolute() or (p.parts and p.parts[0].endswith(":")):
        raise _refuse(archive, name, "has an absolute path")
    if ".." in p.parts:
        raise _refuse(archive, name, "has a '..' component (it would land outside the archive's folder)")
    return p


class SizeCheck:
    """Running total of members' declared sizes against `limits`."""

    def __init__(self, archive: Path, limits: SizeLimits) -> None:
        self.archive, self.limits, self.total = archive, limits, 0

    def add(self, name: str, size: int) -> None:
        if size > self.limits.member:
            raise _refuse(self.archive, name, f"declares {size:,} bytes, more than the {self.limits.member:,} a "
                                              "member may have")
        self.total += size
        if self.total > self.limits.total:
            raise _refuse(self.archive, name, f"brings the declared total to {self.total:,} bytes, more than the "
                                              f"{self.limits.total:,} an archive may have")


def check_tar(archive: Path, tar: tarfile.TarFile, limits: SizeLimits) -> list[tarfile.TarInfo]:
    """Every member of `tar`: a safe path, a regular file or a folder (no links, devices, fifos), sizes within
    `limits`. Each header is checked as it is read, before the stream is decompressed past its data. Returns the
    members, to extract exactly those."""
    sizes, members = SizeCheck(archive, limits), []
    for m in tar:
        member_path(archive, m.name)
        if not (m.isreg() or m.isdir()):
            raise _refuse(archive, m.name, "is a link or a special file, not a regular file or folder")
        sizes.add(m.name, m.size)
        members.append(m)
    return members


def check_zip_member(archive: Path, info: zipfile.ZipInfo) -> PurePosixPath:
    """A zip member's safe relative path; links and special files (a Unix mode in the external attributes) are
    refused."""
    p = member_path(archive, info.filename)
    kind = stat.S_IFMT(info.external_attr >> 16)     # 0: no Unix file type recorded (a plain file)
    if kind not in (0, stat.S_IFREG, stat.S_IFDIR):
        raise _refuse(archive, info.filename, "is a link or a special file, not a regular file or folder")
    return p


def read_bounded(f: BinaryIO, limit: int, archive: Path, name: str) -> bytes:
    """At most `limit` bytes of `f`; a member that holds more than it declared is refused after `limit + 1` bytes,
    never read whole."""
    data = f.read(limit + 1)
    if len(data) > limit:
        raise _refuse(archive, name, f"holds more than {limit:,} bytes")
    return data


def extract_tar(archive: Path, dest: Path, limits: SizeLimits) -> None:
    """Extract a (compressed) tar into the new folder `dest` after checking every member (`check_tar`; tarfile's
    `data` filter guards the extraction as well). A refused or broken archive leaves no `dest` behind."""
    try:
        with tarfile.open(archive) as tar:
            members = check_tar(archive, tar, limits)
            tar.extractall(dest, members=members, filter="data")
    except (tarfile.TarError, EOFError, gzip.BadGzipFile, zlib.error) as e:
        shutil.rmtree(dest, ignore_errors=True)
        raise FedtinaError(f"{archive} is not a readable tar archive ({type(e).__name__}: {e})") from None
    except BaseException:
        shutil.rmtree(dest, ignore_errors=True)
        raise
