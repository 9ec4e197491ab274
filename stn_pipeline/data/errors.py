"""The data package's error: a dataset that cannot be used, said in one line."""

from __future__ import annotations

__all__ = ["DataError", "first_line"]


class DataError(ValueError):
    """A dataset that cannot be used, with a one-line message a user can act on."""


def first_line(text: object) -> str:
    """First non-empty line of ``text`` (for one-line error messages)."""
    for line in str(text).splitlines():
        if line.strip():
            return line.strip()
    return ""
