"""Writing files and folders atomically: readers see the old version or the complete new one.

Every file the project writes for others to read (results.json, config.json, prediction files,
export metadata, checkpoint specs) goes through :func:`atomic_write`; folders that appear at
once (export versions) are built in a :func:`staging_folder` and renamed into place. Both live
next to their target, so the final rename stays on one filesystem and is atomic.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from typing import IO, Any, Iterator

__all__ = ["atomic_write", "staging_folder", "write_json"]


@contextlib.contextmanager
def atomic_write(path: str, newline: str | None = None) -> Iterator[IO[str]]:
    """Opens a hidden temporary text file next to `path`; renames it to `path` when the block ends.

    If the block raises, the temporary file is removed and `path` is left as it was, so a crash
    or an error midway never leaves a truncated or partial file under the final name.

    Args:
      path: the file to write; its folder must exist.
      newline: passed to `open` (the csv module wants "").
    """
    folder = os.path.dirname(os.path.abspath(path))
    handle, temporary = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".partial",
                                         dir=folder)
    try:
        with os.fdopen(handle, "w", newline=newline) as file:
            yield file
        os.chmod(temporary, 0o644)  # mkstemp makes it private; the final file is not.
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(temporary)
        raise


def write_json(path: str, payload: Any) -> None:
    """Writes `payload` as indented, key-sorted JSON, atomically."""
    with atomic_write(path) as file:
        json.dump(payload, file, indent=2, sort_keys=True)
        file.write("\n")


@contextlib.contextmanager
def staging_folder(parent: str, prefix: str = ".staging-") -> Iterator[str]:
    """A hidden temporary folder inside `parent`, removed with whatever is left in it on exit.

    Build a folder's contents in it, then `os.rename` the result into place inside the block.
    """
    folder = tempfile.mkdtemp(prefix=prefix, dir=parent)
    try:
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)
