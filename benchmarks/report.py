"""Shared by the benchmark scripts: the machine line and section rewriting of BENCHMARKS.md."""

from __future__ import annotations

import datetime
import os
import platform

import tensorflow as tf

BENCHMARKS_MD = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                             "BENCHMARKS.md")


def machine_line() -> str:
    """Date, TensorFlow version, cores and CPU model, for the record next to the figures."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as handle:
            cpu = next(l.split(":", 1)[1].strip() for l in handle if l.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return (f"{datetime.date.today()}, TensorFlow {tf.__version__}, {os.cpu_count()} CPU cores, "
            f"{cpu}")


def replace_section(name: str, body: str, path: str = BENCHMARKS_MD) -> None:
    """Rewrites `<!-- name:start -->`..`<!-- name:end -->` in BENCHMARKS.md (appends if absent)."""
    start, end = f"<!-- {name}:start -->", f"<!-- {name}:end -->"
    text = open(path).read() if os.path.exists(path) else "# Benchmarks\n"
    block = f"{start}\n{body.rstrip()}\n{end}"
    if start in text and end in text:
        text = text[:text.index(start)] + block + text[text.index(end) + len(end):]
    else:
        text = text.rstrip() + "\n\n" + block + "\n"
    with open(path, "w") as handle:
        handle.write(text)
