"""The data package's error: a dataset that cannot be used, said in one line."""

from __future__ import annotations

import re

__all__ = ["DataError", "first_line", "op_error_text"]


class DataError(ValueError):
    """A dataset that cannot be used, with a one-line message a user can act on."""


def first_line(text: object) -> str:
    """First non-empty line of ``text`` (for one-line error messages)."""
    for line in str(text).splitlines():
        if line.strip():
            return line.strip()
    return ""


def op_error_text(message: str) -> str:
    """The first line of an eager TensorFlow op error without its ``{{function_node ...}}``
    prefix and ``[Op:...]`` suffix, e.g. ``Invalid PNG data, size 300``."""
    text = re.sub(r"\{\{function_node [^}]*\}\}\s*", "", first_line(message))
    return re.sub(r"\s*\[Op:[^\]]*\].*$", "", text)
