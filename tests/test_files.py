"""Tests for stn_pipeline.files: atomic writes leave the old file or the complete new one."""

from __future__ import annotations

import json
import os

import pytest

from stn_pipeline import files


def test_atomic_write_replaces_the_file_only_when_complete(tmp_path):
    path = tmp_path / "out.txt"
    path.write_text("old\n")
    with pytest.raises(RuntimeError):
        with files.atomic_write(str(path)) as handle:
            handle.write("half of the new")
            raise RuntimeError("crash midway")
    assert path.read_text() == "old\n"
    assert os.listdir(tmp_path) == ["out.txt"]  # no temporary file left behind
    with files.atomic_write(str(path)) as handle:
        handle.write("new\n")
    assert path.read_text() == "new\n"
    assert os.listdir(tmp_path) == ["out.txt"]
    assert oct(path.stat().st_mode & 0o777) == oct(0o644)


def test_write_json_is_sorted_and_indented(tmp_path):
    path = tmp_path / "a.json"
    files.write_json(str(path), {"b": 1, "a": [1.5, "x"]})
    assert path.read_text() == '{\n  "a": [\n    1.5,\n    "x"\n  ],\n  "b": 1\n}\n'
    with pytest.raises(TypeError):
        files.write_json(str(path), {"c": object()})  # not JSON: the old file stays
    assert json.loads(path.read_text()) == {"a": [1.5, "x"], "b": 1}
    assert os.listdir(tmp_path) == ["a.json"]


def test_staging_folder_is_removed_with_its_leftovers(tmp_path):
    with files.staging_folder(str(tmp_path)) as staging:
        os.makedirs(os.path.join(staging, "model"))
        os.rename(os.path.join(staging, "model"), tmp_path / "1")
        (tmp_path / staging / "leftover").write_text("x")
    assert os.listdir(tmp_path) == ["1"]
