"""Serving throughput of an exported STN: the folded network against the unfolded one.

  python benchmarks/serving.py                       # cifar_cnn and cifar_alexnet, batch 256
  python benchmarks/serving.py --models=cifar_cnn --reps=5 --write=false

For each model (untrained: throughput does not depend on the weights) the script writes an export
with `stn_pipeline.export.export_model` into a temporary folder, loads it back with
`tf.saved_model.load` (what a server runs) and times, on the same uint8 batch:

  folded    `serving_default`: every STN layer folded into one ordinary layer at the tuned values
  unfolded  `predict_with_hyperparameters` at the same values (one shared row): both paths of
            every layer plus the gates, i.e. the STN's own evaluation forward pass

Each timed repetition runs `--calls` calls; repetitions alternate between the two signatures (so
load changes hit both alike) and the figure is the median images/s over `--reps` repetitions,
after one warm-up call per signature. It also checks that both give the same logits.
The tables are printed and written between `<!-- serving:start -->` and `<!-- serving:end -->`
in BENCHMARKS.md (created if missing; the rest of the file is left alone).
"""

from __future__ import annotations

import os
import platform
import shutil
import statistics
import sys
import tempfile
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402
from absl import app, flags  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from report import replace_section  # noqa: E402

from stn_pipeline import export  # noqa: E402
from stn_pipeline.hparams import HyperParameters  # noqa: E402
from stn_pipeline.models import (CifarAlexNet, CifarCnn, alexnet_hparams,  # noqa: E402
                                 cifar_cnn_hparams)

FLAGS = flags.FLAGS
flags.DEFINE_list("models", ["cifar_cnn", "cifar_alexnet"], "Models to benchmark.")
flags.DEFINE_integer("batch_size", 256, "Images per call.")
flags.DEFINE_integer("reps", 7, "Timed repetitions per signature (the median is reported).")
flags.DEFINE_integer("calls", 0, "Calls per repetition; 0: 4 for cifar_cnn, 1 for cifar_alexnet.")
flags.DEFINE_bool("write", True, "Rewrite the serving section of BENCHMARKS.md.")
flags.DEFINE_string("output", os.path.join(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__))), "BENCHMARKS.md"), "The markdown file to update.")

IMAGE_SHAPE, NUM_CLASSES = (32, 32, 3), 10
_BUILDERS = {"cifar_cnn": (CifarCnn, cifar_cnn_hparams),
             "cifar_alexnet": (CifarAlexNet, alexnet_hparams)}
_CALLS = {"cifar_cnn": 4, "cifar_alexnet": 1}


def _export(name: str, folder: str) -> str:
    model_class, specs_fn = _BUILDERS[name]
    specs = specs_fn()
    hparams = HyperParameters(specs, seed=0)
    model = model_class(IMAGE_SHAPE, NUM_CLASSES, [125.0] * 3, [63.0] * 3, specs, seed=0)
    spec = tf.TensorSpec([None, *IMAGE_SHAPE], tf.uint8)
    return export.export_model(os.path.join(folder, name), model, hparams, spec)


def _interleaved_rates(functions: dict, calls: int, reps: int,
                       batch_size: int) -> dict[str, list[float]]:
    """images/s of each function per repetition; repetitions alternate between the functions so
    that a change in machine load hits all of them alike."""
    for function in functions.values():
        function()  # warm-up: first-call costs are not serving costs
    rates: dict[str, list[float]] = {name: [] for name in functions}
    for _ in range(reps):
        for name, function in functions.items():
            start = time.perf_counter()
            for _ in range(calls):
                function()
            rates[name].append(calls * batch_size / (time.perf_counter() - start))
    return rates


def benchmark(name: str, folder: str) -> dict:
    path = _export(name, folder)
    size_mb = sum(os.path.getsize(os.path.join(root, f)) for root, _, files in os.walk(path)
                  for f in files) / 2 ** 20
    loaded = tf.saved_model.load(path)
    serve = loaded.signatures["serving_default"]
    respond = loaded.signatures["predict_with_hyperparameters"]
    values = loaded.signatures["hyperparameters"]()["continuous_values"][None]
    images = tf.constant(np.random.default_rng(0).integers(
        0, 256, (FLAGS.batch_size, *IMAGE_SHAPE), dtype=np.uint8))
    folded_logits = serve(images=images)["logits"].numpy()
    unfolded_logits = respond(images=images, hyperparameters=values)["logits"].numpy()
    error = float(np.max(np.abs(folded_logits - unfolded_logits))
                  / np.max(np.abs(unfolded_logits)))
    calls = FLAGS.calls or _CALLS.get(name, 1)
    rates = _interleaved_rates(
        {"folded": lambda: serve(images=images)["logits"].numpy(),
         "unfolded": lambda: respond(images=images, hyperparameters=values)["logits"].numpy()},
        calls, FLAGS.reps, FLAGS.batch_size)
    folded, unfolded = (statistics.median(rates[k]) for k in ("folded", "unfolded"))
    return {"model": name, "folded": folded, "unfolded": unfolded, "speedup": folded / unfolded,
            "error": error, "size_mb": size_mb, "calls": calls,
            "spread": (min(rates["folded"]), max(rates["folded"]), min(rates["unfolded"]),
                       max(rates["unfolded"]))}


def _table(rows: list[dict]) -> str:
    cpu = platform.processor() or platform.machine()
    lines = [
        "## Serving: folded vs unfolded SavedModel",
        "",
        f"`python benchmarks/serving.py` (TensorFlow {tf.__version__}, {os.cpu_count()} CPU "
        f"cores, {cpu}); untrained models on {IMAGE_SHAPE[0]}x{IMAGE_SHAPE[1]}x{IMAGE_SHAPE[2]} "
        f"uint8 images, batch {FLAGS.batch_size}, median images/s of {FLAGS.reps} repetitions "
        "through `tf.saved_model.load`. *Folded* is `serving_default` (each STN layer folded "
        "into one kernel and bias at the tuned values); *unfolded* is "
        "`predict_with_hyperparameters` at the same values (both paths and the gates).",
        "",
        "| model | folded img/s | unfolded img/s | speed-up | max rel. logit diff | "
        "export size |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for row in rows:
        lines.append(f"| {row['model']} | {row['folded']:.0f} | {row['unfolded']:.0f} | "
                     f"{row['speedup']:.2f}x | {row['error']:.1e} | {row['size_mb']:.0f} MB |")
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    lines += ["", f"Load average at the end (1, 5, 15 min): {load}; other jobs on the machine "
              "slow both signatures alike (repetitions alternate between them).",
              "", "Range over repetitions (folded min-max / unfolded min-max): " + "; ".join(
        f"{r['model']} {r['spread'][0]:.0f}-{r['spread'][1]:.0f} / "
        f"{r['spread'][2]:.0f}-{r['spread'][3]:.0f}" for r in rows) + "."]
    return "\n".join(lines)


def main(argv):
    del argv  # Unused.
    unknown = [m for m in FLAGS.models if m not in _BUILDERS]
    if unknown:
        raise app.UsageError(f"--models: unknown {unknown}; choose from {sorted(_BUILDERS)}.")
    folder = tempfile.mkdtemp(prefix="stn-serving-")
    try:
        rows = []
        for name in FLAGS.models:
            row = benchmark(name, folder)
            print(f"{name}: folded {row['folded']:.0f} img/s, unfolded {row['unfolded']:.0f} "
                  f"img/s ({row['speedup']:.2f}x), max relative logit difference "
                  f"{row['error']:.1e}", flush=True)
            rows.append(row)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    body = _table(rows)
    print(body)
    if FLAGS.write:
        replace_section("serving", body, FLAGS.output)
        print(f"updated {FLAGS.output}")


if __name__ == "__main__":
    app.run(main)
