r"""float32 vs mixed_bfloat16, with and without XLA, for the STN training cycle.

    .venv/bin/python benchmarks/precision.py [--models=cifar_cnn,cifar_alexnet] [--nojit]
        [--nomemory] [--nowrite]

Per model, batch 128, CIFAR-shaped uint8 inputs: the library's compiled STN cycle (2 weight +
1 hyper step) built with `precision.apply_precision(model, p)` for p in float32 and
mixed_bfloat16, and (unless --nojit) the same steps compiled with `jit_compile=True`, all in one
process, interleaved unit by unit (`harness.py`); ratios are medians of per-repetition ratios.
Peak RSS of each configuration comes from `memory.py` subprocesses. The CPU's bfloat16
instructions (avx512_bf16, amx_bf16 in /proc/cpuinfo) decide what bfloat16 can gain. Rewrites
the `precision` section of BENCHMARKS.md. About 10 minutes.
"""

from __future__ import annotations

import datetime
import os
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # before TensorFlow is imported

from absl import app, flags  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness  # noqa: E402
from report import (cpu_bf16_line, fmt_ratio, load_line, machine_line,  # noqa: E402
                    replace_section, table)

FLAGS = flags.FLAGS
harness.define_flags("precision", reps=5)
flags.DEFINE_bool("jit", True, "Also time jit_compile=True (XLA) at both precisions.")
flags.DEFINE_bool("memory", True, "Measure the peak RSS of each configuration (subprocesses).")

UNITS = {"cifar_cnn": 6, "cifar_alexnet": 1}  # four configurations share each repetition
PRECISIONS = ("float32", "mixed_bfloat16")
TARGET = {"cifar_alexnet": 1.5}  # bf16 / float32 cycle on a CPU with bfloat16 instructions


def configurations(jit: bool) -> list[tuple[str, bool]]:
    return [(p, False) for p in PRECISIONS] + ([(p, True) for p in PRECISIONS] if jit else [])


def label(precision: str, jit: bool) -> str:
    return precision + (" + XLA" if jit else "")


def time_model(name: str, units: int, reps: int, batch_size: int, jit: bool) -> dict:
    """Every configuration's cycle in interleaved repetitions, with ratios to float32."""
    batches = harness.make_batches(batch_size)
    contenders = []
    for precision, xla in configurations(jit):
        stn = harness.build_stn(name, precision)
        steps = harness.jit_steps(stn) if xla else (stn.weight_step, stn.hyper_step)
        contenders.append(harness.Contender(label(precision, xla), *steps))
    errors = harness.warm_up_all(contenders, batches, name)
    repetitions = harness.time_interleaved(contenders, batches, units, reps, name)
    base = label("float32", False)
    return {"units": units, "reps": reps, "errors": errors,
            "contenders": {c.label: c.summary() for c in contenders},
            "vs_float32": {c.label: harness.median_ratio(repetitions, c.label, base)
                           for c in contenders}}


def rows_of(name: str, result: dict, peaks: dict) -> list[list]:
    rows = []
    for precision, xla in configurations(FLAGS.jit):
        key = label(precision, xla)
        peak = peaks.get(key, "")
        peak = f"{peak:.0f}" if isinstance(peak, float) else peak
        if key in result["errors"]:
            rows.append([name, precision, "yes" if xla else "no", "failed", "", "", "",
                         result["errors"][key]])
            continue
        c = result["contenders"][key]
        target = TARGET.get(name) if key == label("mixed_bfloat16", False) else None
        rows.append([name, precision, "yes" if xla else "no", f"{c['ips']:.0f}",
                     f"{c['train_ips']:.0f}", fmt_ratio(result["vs_float32"][key], target),
                     f"{c['compile_seconds']:.1f}", peak])
    return rows


def report(results: dict, peaks: dict, load_start, minutes: float) -> str:
    rows = [row for name, r in results.items() for row in rows_of(name, r, peaks.get(name, {}))]
    return "\n".join([
        "## Precision and XLA: float32 vs mixed_bfloat16 STN cycles", "",
        f"`.venv/bin/python benchmarks/precision.py` ({machine_line()}; {cpu_bf16_line()}; took "
        f"{minutes:.1f} min). {load_line(load_start)}.", "",
        "Cycle = 2 weight + 1 hyper step of the library's `StnTrainer` (batch 128), its STN "
        "layers set by `precision.apply_precision`; `XLA` compiles the same steps with "
        "`jit_compile=True`. All configurations of a model are interleaved cycle by cycle in one "
        "process; `vs float32` is the median per-repetition ratio of cycle images/s to the "
        "float32 `tf.function` cycle. Peak RSS (MiB) from one `memory.py` subprocess per "
        "configuration. Target: cifar_alexnet mixed_bfloat16 >= 1.5x float32 on a CPU with "
        "bfloat16 instructions.", "",
        table(["model", "precision", "XLA", "cycle img/s", "train img/s", "vs float32",
               "first calls s", "peak RSS"], rows), "", NOTES.strip()])


NOTES = """
bfloat16 halves the bytes of the matmul and convolution operands, and oneDNN runs them with the
CPU's bfloat16 instructions; the casts (inputs and kernels once per layer call, products back to
float32) and the float32 gated combine do not speed up, which is why `cifar_cnn`, whose
convolutions are cheap, gains less than AlexNet. XLA's CPU backend generates its own kernels
instead of oneDNN's, so `jit_compile=True` does not pay off on this CPU at either precision.
Under bfloat16 the per-step bfloat16 copies of the kernels sit next to the float32 variables,
hence the slightly higher peak RSS. `first calls s` of the first configuration includes the
process's first TensorFlow work.
"""


def main(argv):
    del argv
    harness.check_models(FLAGS.models)
    load_start, clock = os.getloadavg(), time.time()
    print(f"{machine_line()}; {cpu_bf16_line()}; started {datetime.datetime.now():%H:%M}",
          flush=True)
    results = {name: time_model(name, FLAGS.steps or UNITS[name], FLAGS.reps, FLAGS.batch_size,
                                FLAGS.jit) for name in FLAGS.models}
    peaks = {}
    if FLAGS.memory:
        peaks = {name: {label(p, xla): harness.child_peak_rss("stn", name, p, xla,
                                                              FLAGS.batch_size)
                        for p, xla in configurations(FLAGS.jit)} for name in FLAGS.models}
    text = report(results, peaks, load_start, (time.time() - clock) / 60)
    print("\n" + text)
    if FLAGS.write:
        replace_section("precision", text)


if __name__ == "__main__":
    app.run(main)
