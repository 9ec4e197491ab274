r"""Throughput of the STN training cycle against a plain network of the same architecture.

    .venv/bin/python benchmarks/throughput.py [--models=cifar_cnn,cifar_alexnet] [--steps=N]
        [--reps=R] [--nowrite]

Per model (`cifar_cnn`, `cifar_alexnet`), batch 128, CIFAR-shaped uint8 inputs: the library's
compiled `StnTrainer.weight_step` / `hyper_step` in the paper's cycle of 2 weight steps + 1 hyper
step (images of a cycle = those of its 3 steps) against the plain counterpart of
`plain_models.py` (fixed dropout 0.05, momentum-SGD, `tf.function`), also with Keras-style
`tf.nn.bias_add` biases. All run in one process on the same batches, interleaved unit by unit
(`harness.py`); figures are medians over repetitions, ratios medians of per-repetition ratios.
Peak memory is `memory.py`, float32 vs bfloat16 and XLA `precision.py`. About 5 minutes.

Rewrites the `throughput` section of BENCHMARKS.md.
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
from report import fmt_ratio, load_line, machine_line, replace_section, table  # noqa: E402

FLAGS = flags.FLAGS
harness.define_flags("throughput", reps=7)



def time_model(name: str, units: int, reps: int, batch_size: int) -> dict:
    """STN, plain and plain-with-bias_add in interleaved repetitions."""
    batches = harness.make_batches(batch_size)
    stn, plain = harness.build_stn(name), harness.build_plain(name)
    contenders = [harness.Contender("stn", stn.weight_step, stn.hyper_step),
                  harness.Contender("plain", plain.train_step),
                  harness.Contender("plain_bias_add",
                                    harness.build_plain(name, bias_add=True).train_step)]
    harness.warm_up_all(contenders, batches, name)
    repetitions = harness.time_interleaved(contenders, batches, units, reps, name)
    ratios = [r["stn"]["ips"] / r["plain"]["ips"] for r in repetitions]
    return {"units": units, "reps": reps,
            "stn_params": harness.param_count(stn.weights),
            "plain_params": harness.param_count(plain.weights),
            "cycle_ratio": harness.median_ratio(repetitions, "stn", "plain"),
            "cycle_ratio_range": [min(ratios), max(ratios)],
            "weight_ratio": harness.median_ratio(repetitions, "stn", "plain", "weight_ips"),
            "bias_add_ratio": harness.median_ratio(repetitions, "stn", "plain_bias_add"),
            "contenders": {c.label: c.summary() for c in contenders}}


def report(results: dict, batch_size: int, load_start, minutes: float) -> str:
    rows, notes = [], []
    for name, r in results.items():
        s, p = r["contenders"]["stn"], r["contenders"]["plain"]
        low, high = r["cycle_ratio_range"]
        rows.append([name, batch_size, f"{r['reps']} x {r['units']} cycles", f"{s['ips']:.0f}",
                     f"{s['weight_ips']:.0f}", f"{s['hyper_ips']:.0f}", f"{s['train_ips']:.0f}",
                     f"{p['ips']:.0f}",
                     f"{fmt_ratio(r['cycle_ratio'], 0.5)} [{low:.2f}-{high:.2f}]",
                     f"{r['weight_ratio']:.2f}x", f"{r['bias_add_ratio']:.2f}x"])
        notes.append(f"{name}: STN {r['stn_params'] / 1e6:.2f}M weights (two paths + gates), "
                     f"plain {r['plain_params'] / 1e6:.2f}M")
    return "\n".join([
        "## Throughput: STN training cycle vs a plain network", "",
        f"`.venv/bin/python benchmarks/throughput.py` ({machine_line()}; took {minutes:.1f} min). "
        f"{load_line(load_start)}: absolute figures are noisy, interleaved ratios less so.", "",
        "An STN cycle is 2 weight steps + 1 hyper step and counts the images of its 3 steps; a "
        "plain unit is 3 plain steps. `train img/s` counts only the 2 x batch training images "
        "per cycle. Ratios are STN / plain, medians of per-repetition ratios (STN and plain "
        "interleaved cycle by cycle). Target: cycle ratio >= 0.5.", "",
        table(["model", "batch", "timed", "STN cycle img/s", "STN weight-step", "STN hyper-step",
               "STN train img/s", "plain img/s", "cycle ratio [min-max]", "weight-step ratio",
               "cycle ratio vs bias_add plain"], rows), "",
        "Weights: " + "; ".join(notes) + ". `bias_add plain` adds biases with `tf.nn.bias_add` "
        "(Keras style): grappler then fuses each conv's filter and bias gradients into oneDNN's "
        "`Conv2DBackpropFilterWithBias`, slow for the 3-channel first conv, so that baseline is "
        "weaker.", "", NOTES.strip()])


NOTES = """
**What limits the STN step.** Every STN layer computes two paths, the elementary `x W_e` and the
response `x W_h`, so the forward, the input gradient and the filter gradient of each layer do
twice the multiply-adds of the plain layer; per-example gates make the paths impossible to fold
into one kernel during training (the serving export folds them at fixed hyperparameters). With
2x the work a weight step runs at about 0.5x the plain images/s; the cycle ratio is a little
higher because the hyper step is a forward plus the input-gradient half of a backward (about 0.6
of a weight step). The rest is the gated combine's element-wise work (visible in `cifar_cnn`,
whose convolutions are cheap) and, for AlexNet's 46.8M STN weights, the momentum update.

History: until the split of this benchmark (issue 12) it also profiled the steps op by op and
re-implemented the library's earlier forms by patching library classes at run time; those
tables (BENCHMARKS.md before that change, measured 2026-11-28) showed convolutions + matmuls at
68% (cnn) / 83% (alexnet) of the STN weight step's op time, and that the changes of f81dbee
(two convolutions on the kernel halves instead of one stacked convolution + split, the fused
momentum kernel, the summed non-finite guard) gave x1.19 (cnn) and x1.08 (alexnet) cycle
images/s. Benchmarks no longer patch the library; float32 vs bfloat16 and XLA are in the
precision section, peak memory in the memory section.
"""


def main(argv):
    del argv
    harness.check_models(FLAGS.models)
    load_start, clock = os.getloadavg(), time.time()
    print(f"{machine_line()}; started {datetime.datetime.now():%H:%M}", flush=True)
    results = {name: time_model(name, FLAGS.steps or harness.UNITS[name], FLAGS.reps,
                                FLAGS.batch_size) for name in FLAGS.models}
    text = report(results, FLAGS.batch_size, load_start, (time.time() - clock) / 60)
    print("\n" + text)
    if FLAGS.write:
        replace_section("throughput", text)


if __name__ == "__main__":
    app.run(main)
