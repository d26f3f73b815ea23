"""Archive checks and safe extraction: tar / tar.gz read to the end (gzip CRC), members that would escape the
target folder refused, links and devices never written."""

from __future__ import annotations

import gzip
import re
import shutil
import tarfile
import zlib
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

from delg.download.errors import BadArchiveError, _one_line
from delg.download.fetch import CHUNK

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png"}


@dataclass
class ArchiveStats:
    """What :func:`scan_archive` read (and wrote): regular files, images among them, and members left out."""

    files: int = 0
    images: int = 0
    skipped: list[str] = field(default_factory=list)  # links, devices, non-images when only images are kept


def _member_path(member: tarfile.TarInfo, archive: Path) -> PurePosixPath:
    """The member's path relative to the target folder; refuses absolute paths and ``..`` (path traversal)."""
    name = member.name.replace("\\", "/")
    p = PurePosixPath(name)
    if p.is_absolute() or ".." in p.parts or re.match(r"^[A-Za-z]:", name):
        raise BadArchiveError(f"{archive}: member '{member.name}' would be written outside the target folder")
    return PurePosixPath(*[x for x in p.parts if x not in ("", ".")])


def scan_archive(path: Path, dest: Path | None = None, flatten: bool = False, only_images: bool = False) -> ArchiveStats:
    """Read a tar / tar.gz completely; with ``dest``, write its regular files under ``dest``.

    Args:
        path: the archive (compression detected from the content).
        dest: target folder, or None to only check that the archive reads completely.
        flatten: write ``dest/<basename>`` instead of keeping the member's folders (Oxford/Paris ``jpg/``).
        only_images: skip members that are not images (counted in ``skipped``).

    Symlinks, hard links and devices are never written (counted in ``skipped``).  The stream is read to its end
    so that gzip checks its CRC and length trailer: a truncated or corrupted ``.tar.gz`` raises here.

    Raises:
        BadArchiveError: damaged / truncated archive, or a member escaping ``dest`` (nothing more is written).
    """
    stats = ArchiveStats()
    try:
        tar = tarfile.open(path, "r:*")
    except (tarfile.TarError, EOFError, zlib.error, gzip.BadGzipFile) as e:
        raise BadArchiveError(f"{path}: not a readable tar archive ({_one_line(e)})") from None
    with tar:
        try:
            for member in tar:
                rel = _member_path(member, path)
                if member.isdir() or not rel.parts:
                    continue
                if not member.isfile():
                    stats.skipped.append(member.name)
                    continue
                is_image = rel.suffix.lower() in IMAGE_SUFFIXES
                if only_images and not is_image:
                    stats.skipped.append(member.name)
                    continue
                src = tar.extractfile(member)
                if src is None:  # cannot happen for a regular file; keeps the type checker honest
                    raise BadArchiveError(f"{path}: member '{member.name}' has no data")
                if dest is None:
                    while src.read(CHUNK):
                        pass
                else:
                    target = dest / (rel.name if flatten else Path(*rel.parts))
                    target.parent.mkdir(parents=True, exist_ok=True)
                    with target.open("wb") as f:
                        shutil.copyfileobj(src, f, CHUNK)
                stats.files += 1
                stats.images += is_image
            while tar.fileobj is not None and tar.fileobj.read(CHUNK):
                pass
        except (tarfile.TarError, EOFError, zlib.error, gzip.BadGzipFile) as e:
            raise BadArchiveError(f"{path}: damaged or truncated archive ({_one_line(e)})") from None
    return stats


def _archive_problem(path: Path) -> str | None:
    """Verification of archives that have no published checksum: they must read completely and hold images."""
    try:
        stats = scan_archive(path)
    except BadArchiveError as e:
        return str(e)
    if stats.images == 0:
        return f"{path}: archive holds no images"
    return None
