"""Shared by the benchmark scripts: machine lines, tables and sections of BENCHMARKS.md."""

from __future__ import annotations

import datetime
import os
import platform

import tensorflow as tf

from stn_pipeline.files import atomic_write

BENCHMARKS_MD = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                             "BENCHMARKS.md")


def machine_line(date: bool = True) -> str:
    """Date, TensorFlow version, cores and CPU model, for the record next to the figures."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as handle:
            cpu = next(l.split(":", 1)[1].strip() for l in handle if l.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return (f"{datetime.date.today()}, " * date + f"TensorFlow {tf.__version__}, "
            f"{os.cpu_count()} CPU cores, {cpu}")


def replace_section(name: str, body: str, path: str = BENCHMARKS_MD) -> None:
    """Rewrites `<!-- name:start -->`..`<!-- name:end -->` in BENCHMARKS.md (appends if absent)."""
    start, end = f"<!-- {name}:start -->", f"<!-- {name}:end -->"
    text = open(path).read() if os.path.exists(path) else "# Benchmarks\n"
    block = f"{start}\n{body.rstrip()}\n{end}"
    if start in text and end in text:
        text = text[:text.index(start)] + block + text[text.index(end) + len(end):]
    else:
        text = text.rstrip() + "\n\n" + block + "\n"
    with atomic_write(path) as handle:
        handle.write(text)


def cpu_bf16_line() -> str:
    """Whether this CPU has bfloat16 instructions (what decides `--precision=mixed_bfloat16`)."""
    from stn_pipeline.precision import cpu_bf16_flags  # pylint: disable=import-outside-toplevel
    flags = cpu_bf16_flags()
    if flags is None:
        return "CPU flags unreadable (no /proc/cpuinfo)"
    return ("bfloat16 instructions: " + ", ".join(flags) if flags
            else "no bfloat16 instructions (neither avx512_bf16 nor amx_bf16)")


def load_line(start: tuple[float, float, float]) -> str:
    """Load averages at the start and the end of a run (the machine is shared)."""
    end = os.getloadavg()
    return ("Load average (1, 5, 15 min) at start / end: "
            + ", ".join(f"{v:.1f}" for v in start) + " / " + ", ".join(f"{v:.1f}" for v in end))


def table(header: list[str], rows: list[list]) -> str:
    """A markdown table."""
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def fmt_ratio(value: float, target: float | None = None) -> str:
    """`0.55x`, with `(meets)` / `(MISSES)` against a lower bound `target`."""
    text = f"{value:.2f}x"
    if target is not None:
        text += " (meets)" if value >= target else " (MISSES)"
    return text
