"""Unpacking the shared data archives once into a cache (what the CIFAR-10 fixture needs)."""

from __future__ import annotations

import os
import pathlib
import shutil
import tarfile
import tempfile
import zipfile

ARCHIVE_SUFFIXES = (".tar.gz", ".tgz", ".tar.bz2", ".tbz2", ".tar.xz", ".txz", ".tar", ".zip")


class ArchiveError(ValueError):
    """An archive that cannot be unpacked, with a one-line message."""


def unpack_archive(archive_path: str | os.PathLike[str],
                   cache_dir: str | os.PathLike[str]) -> pathlib.Path:
    """Unpacks an archive once into ``cache_dir``, atomically; returns the unpacked folder.

    ``<name>.tar.gz`` (or another of ``ARCHIVE_SUFFIXES``) goes to ``cache_dir/<name>``; an
    existing folder of that name is returned as is. Otherwise the archive is extracted into a
    temporary folder inside ``cache_dir`` that is then renamed, so a half-extracted folder is
    never visible under the final name (a concurrent process that wins the race is fine: its
    copy is used).
    """
    archive = pathlib.Path(archive_path).expanduser()
    suffix = next((s for s in ARCHIVE_SUFFIXES if archive.name.lower().endswith(s)), None)
    if suffix is None:
        raise ArchiveError(f"unsupported archive type: {archive} (expected one of "
                           f"{', '.join(ARCHIVE_SUFFIXES)})")
    name = archive.name[: -len(suffix)]
    cache = pathlib.Path(cache_dir).expanduser()
    target = cache / name
    if target.is_dir():
        return target
    if not archive.is_file():
        raise ArchiveError(f"archive not found: {archive}")
    cache.mkdir(parents=True, exist_ok=True)
    tmp = pathlib.Path(tempfile.mkdtemp(prefix=f".{name}.partial-", dir=cache))
    try:
        os.chmod(tmp, 0o755)  # mkdtemp makes it private; the cache is not.
        try:
            if suffix == ".zip":
                with zipfile.ZipFile(archive) as zipped:
                    zipped.extractall(tmp)
            else:
                with tarfile.open(archive) as tarred:
                    tarred.extractall(tmp, filter="data")
        except (tarfile.TarError, zipfile.BadZipFile, EOFError, OSError) as err:
            raise ArchiveError(f"cannot unpack archive {archive}: {err}") from err
        try:
            os.rename(tmp, target)
        except OSError as err:
            if not target.is_dir():  # Not a lost race: a real failure.
                raise ArchiveError(f"cannot unpack archive {archive} to {target}: "
                                   f"{err.strerror}") from err
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return target
