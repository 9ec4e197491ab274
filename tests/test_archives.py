"""Tests for the tests' archive helper (tests/archives.py): unpacking once, atomically."""

from __future__ import annotations

import pathlib
import tarfile
import zipfile

import pytest

from archives import ArchiveError, unpack_archive


def _make_tree(root: pathlib.Path) -> None:
    (root / "train" / "a").mkdir(parents=True)
    (root / "train" / "a" / "x.txt").write_text("hello")


def test_unpack_archive_tar_once(tmp_path):
    src = tmp_path / "src"
    _make_tree(src)
    archive = tmp_path / "demo.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(src / "train", arcname="train")
    cache = tmp_path / "cache"

    target = unpack_archive(archive, cache)
    assert target == cache / "demo"
    assert (target / "train" / "a" / "x.txt").read_text() == "hello"
    (target / "marker").write_text("kept")
    assert unpack_archive(archive, cache) == target
    assert (target / "marker").read_text() == "kept"  # Not extracted again.
    assert sorted(p.name for p in cache.iterdir()) == ["demo"]  # No partial dirs.


def test_unpack_archive_zip(tmp_path):
    archive = tmp_path / "demo.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr("train/a/x.txt", "zipped")
    target = unpack_archive(archive, tmp_path / "cache")
    assert (target / "train" / "a" / "x.txt").read_text() == "zipped"


def test_unpack_archive_errors(tmp_path):
    cache = tmp_path / "cache"
    with pytest.raises(ArchiveError, match="archive not found"):
        unpack_archive(tmp_path / "missing.tar.gz", cache)
    broken = tmp_path / "broken.tar.gz"
    broken.write_bytes(b"this is not a tarball")
    with pytest.raises(ArchiveError, match="cannot unpack archive"):
        unpack_archive(broken, cache)
    assert not (cache / "broken").exists()
    assert list(cache.iterdir()) == []
    with pytest.raises(ArchiveError, match="unsupported archive type"):
        unpack_archive(tmp_path / "file.rar", cache)
