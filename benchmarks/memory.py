r"""Peak memory (RSS) of STN training against a plain network, one subprocess per configuration.

    .venv/bin/python benchmarks/memory.py [--models=cifar_cnn,cifar_alexnet] [--nowrite]

Each configuration runs in a fresh process (`harness.run_child`): an idle process that imported
TensorFlow and the library and ran one op, the STN cycle and the plain step, each after warm-up
and as many units as a throughput repetition. `precision.py` uses the same children for its
bfloat16 and XLA columns (`--kind=stn --precision=mixed_bfloat16 --jit`). Rewrites the `memory`
section of BENCHMARKS.md.
"""

from __future__ import annotations

import os
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # before TensorFlow is imported

from absl import app, flags  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness  # noqa: E402
from report import load_line, machine_line, replace_section, table  # noqa: E402

FLAGS = flags.FLAGS
harness.define_flags("memory", reps=1)
flags.DEFINE_string("kind", "", "Child mode: measure one configuration (idle, stn or plain) "
                    "and print its peak RSS.")
flags.DEFINE_string("model", "cifar_cnn", "Child mode: the model.")
flags.DEFINE_string("precision", "float32", "Child mode: the STN's precision.")
flags.DEFINE_bool("jit", False, "Child mode: compile the steps with jit_compile=True (XLA).")


def measure(kind: str, name: str, precision: str, jit: bool, batch_size: int) -> dict:
    """Peak RSS of one configuration in this (fresh) process."""
    contender = None
    if kind == "stn":
        stn = harness.build_stn(name, precision)
        steps = harness.jit_steps(stn) if jit else (stn.weight_step, stn.hyper_step)
        contender = harness.Contender(kind, *steps)
    elif kind == "plain":
        plain = harness.build_plain(name)
        contender = harness.Contender(kind, harness.plain_jit_step(plain) if jit
                                      else plain.train_step)
    elif kind != "idle":
        raise app.UsageError(f"--kind must be idle, stn or plain, received {kind!r}.")
    return harness.peak_rss_after(contender, harness.make_batches(batch_size),
                                  harness.UNITS[name])


def report(peaks: dict, load_start, minutes: float) -> str:
    rows = []
    for name, p in peaks.items():
        ratio = p["stn"] / p["plain"]
        above = (p["stn"] - p["idle"]) / (p["plain"] - p["idle"])
        rows.append([name, f"{p['idle']:.0f}", f"{p['stn']:.0f}", f"{p['plain']:.0f}",
                     f"{ratio:.2f}x ({'meets' if ratio <= 2.5 else 'MISSES'})", f"{above:.2f}x"])
    return "\n".join([
        "## Memory: peak RSS of STN training vs a plain network", "",
        f"`.venv/bin/python benchmarks/memory.py` ({machine_line()}; took {minutes:.1f} min). "
        f"{load_line(load_start)}.", "",
        "`ru_maxrss` in MiB, one subprocess per configuration, after warm-up and the units of "
        "one throughput repetition (batch 128, float32). Target: peak ratio <= 2.5.", "",
        table(["model", "idle TF process", "STN peak", "plain peak", "peak ratio",
               "ratio above idle"], rows), "",
        "The STN holds twice the weights, momentum slots and gradients of the plain net and "
        "computes both paths' activations; the idle process (TensorFlow and `stn_pipeline` "
        "imported, one op run) is most of a small model's footprint, so `ratio above idle` "
        "compares the models' own shares."])


def main(argv):
    del argv
    if FLAGS.kind:
        harness.print_result(measure(FLAGS.kind, FLAGS.model, FLAGS.precision, FLAGS.jit,
                                     FLAGS.batch_size))
        return
    load_start, clock = os.getloadavg(), time.time()
    peaks = {name: {kind: harness.child_peak_rss(kind, name, batch_size=FLAGS.batch_size)
                    for kind in ("idle", "stn", "plain")} for name in FLAGS.models}
    failed = [f"{n} {k}: {v}" for n, p in peaks.items() for k, v in p.items()
              if isinstance(v, str)]
    if failed:
        sys.exit("memory.py: error: " + "; ".join(failed))
    text = report(peaks, load_start, (time.time() - clock) / 60)
    print("\n" + text)
    if FLAGS.write:
        replace_section("memory", text)


if __name__ == "__main__":
    app.run(main)
