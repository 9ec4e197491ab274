r"""Cycle throughput of Delta-STN against STN (same model, same process, interleaved).

    .venv/bin/python benchmarks/delta_stn.py [--model=cifar_cnn] [--reps=5] [--nowrite]

Each method runs its own default cycle on the same random uint8 [128, 32, 32, 3] batches: STN
2 weight steps + 1 hyper step, Delta-STN 5 weight steps (each a general update at the current
hyperparameters and a linearised response update) + 1 hyper step. Reported: images/s of a whole
cycle (images of all its steps / its time) and ms per weight step, medians over repetitions,
and the per-repetition ratio Delta-STN / STN. Writes the `delta_stn` section of BENCHMARKS.md.
"""

from __future__ import annotations

import os
import sys
import time

import numpy as np
import tensorflow as tf
from absl import app, flags

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import report  # noqa: E402
from stn_pipeline import experiments
from stn_pipeline.trainer import StnTrainer

flags.DEFINE_string("model", "cifar_cnn", "cifar_cnn or cifar_alexnet.")
flags.DEFINE_integer("reps", 5, "Timed repetitions (one cycle of each method per repetition).")
flags.DEFINE_boolean("write", True, "Rewrite the delta_stn section of BENCHMARKS.md.")
FLAGS = flags.FLAGS
BATCH = 128
METADATA = {"image_shape": [32, 32, 3], "class_names": [str(i) for i in range(10)],
            "mean": [0.5] * 3, "std": [0.25] * 3}


def build(model_name: str, method: str) -> tuple[StnTrainer, int]:
    """A trainer of `model_name` with `method` and the method's weight steps per cycle."""
    config = experiments.default_config(model_name, method=method)
    model, hparams = experiments.build_model(config, METADATA)
    trainer = StnTrainer(model, hparams, tf.TensorSpec([None, 32, 32, 3], tf.uint8),
                         tf.TensorSpec([None], tf.int64), config.trainer)
    return trainer, config.schedule.train_steps


def cycle_seconds(trainer: StnTrainer, weight_steps: int, batch) -> float:
    start = time.perf_counter()
    for _ in range(weight_steps):
        trainer.weight_step(*batch)
    float(trainer.hyper_step(*batch)["loss"])
    return time.perf_counter() - start


def main(argv):
    del argv
    tf.config.threading.set_intra_op_parallelism_threads(1)
    rng = np.random.default_rng(0)
    batch = (tf.constant(rng.integers(0, 256, (BATCH, 32, 32, 3), dtype=np.uint8)),
             tf.constant(rng.integers(0, 10, BATCH)))
    methods = {name: build(FLAGS.model, name) for name in ("stn", "delta_stn")}
    for trainer, steps in methods.values():
        cycle_seconds(trainer, steps, batch)  # compile and warm up
    times = {name: [] for name in methods}
    for rep in range(FLAGS.reps):
        for name in (list(methods) if rep % 2 else list(methods)[::-1]):
            times[name].append(cycle_seconds(*methods[name], batch))
    rows, rates = [], {}
    for name, (_, steps) in methods.items():
        seconds = np.array(times[name])
        rates[name] = (steps + 1) * BATCH / seconds
        rows.append(f"| {name} | {steps}:1 | {np.median(rates[name]):.0f} | "
                    f"{1000 * np.median(seconds):.0f} |")
    ratio = np.median(rates["delta_stn"] / rates["stn"])
    body = "\n".join([
        f"Delta-STN vs STN cycle throughput, {FLAGS.model}, batch {BATCH}, "
        f"{FLAGS.reps} interleaved repetitions, 1 thread ({report.machine_line()}); "
        "`python benchmarks/delta_stn.py`.", "",
        "| method | cycle | images/s (cycle) | ms/cycle |", "|---|---|---|---|", *rows, "",
        f"Delta-STN / STN images/s of a cycle: **{ratio:.2f}x** (median of per-repetition "
        "ratios). A Delta-STN weight step runs two updates, the second with a forward-mode JVP."])
    print(body)
    if FLAGS.write:
        report.replace_section("delta_stn", body)


if __name__ == "__main__":
    app.run(main)
