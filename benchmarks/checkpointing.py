"""Seconds per resume checkpoint (and its size) for the paper's models.

  python benchmarks/checkpointing.py [--models=cifar_cnn,cifar_alexnet] [--saves=5]

Saves the full resume state (weights of both paths, gates, hyperparameters, scales, all optimizer
slots, generators, loop state) through `RunCheckpoints`, as a run does, and reports the median
time of a save next to the median time of one STN training cycle (2 weight + 1 hyper step, batch
128), so the overhead of `--checkpoint_every` can be read as cycles per save. Rewrites the
`checkpointing` section of BENCHMARKS.md.
"""

from __future__ import annotations

import os
import statistics
import sys
import tempfile
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402
from absl import app, flags  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from report import machine_line, replace_section  # noqa: E402

from stn_pipeline.checkpoints import RunCheckpoints  # noqa: E402
from stn_pipeline.hparams import HyperParameters  # noqa: E402
from stn_pipeline.models import CifarAlexNet, CifarCnn, alexnet_hparams, cifar_cnn_hparams  # noqa: E402
from stn_pipeline.trainer import StnTrainer  # noqa: E402
from stn_pipeline.training import LoopState  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_list("models", ["cifar_cnn", "cifar_alexnet"], "Models to measure.")
flags.DEFINE_integer("saves", 5, "Checkpoints saved per model (median reported).")

_MODELS = {"cifar_cnn": (CifarCnn, cifar_cnn_hparams), "cifar_alexnet": (CifarAlexNet, alexnet_hparams)}


def measure(name: str, saves: int) -> dict:
    model_class, make_specs = _MODELS[name]
    specs = make_specs()
    hparams = HyperParameters(specs)
    model = model_class((32, 32, 3), 10, (125.0,) * 3, (63.0,) * 3, specs)
    trainer = StnTrainer(model, hparams, tf.TensorSpec([None, 32, 32, 3], tf.uint8),
                         tf.TensorSpec([None], tf.int64))
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, [128, 32, 32, 3]).astype(np.uint8)
    labels = rng.integers(0, 10, [128]).astype(np.int64)

    def cycle():
        trainer.weight_step(images, labels)
        trainer.weight_step(images, labels)
        trainer.hyper_step(images, labels)["loss"].numpy()

    cycle()  # compile, and create every optimizer slot value
    cycle_seconds = []
    for _ in range(3):
        start = time.perf_counter()
        cycle()
        cycle_seconds.append(time.perf_counter() - start)
    with tempfile.TemporaryDirectory() as logdir:
        checkpoints = RunCheckpoints(logdir, trainer, LoopState(), keep=2)
        save_seconds = []
        for step in range(saves):
            start = time.perf_counter()
            path = checkpoints.save(step + 1)
            save_seconds.append(time.perf_counter() - start)
        size = sum(os.path.getsize(p) for p in tf.io.gfile.glob(path + "*"))
    return {"save_s": statistics.median(save_seconds), "cycle_s": statistics.median(cycle_seconds),
            "size_mb": size / 2**20}


def main(argv):
    del argv  # Unused.
    rows = []
    for name in FLAGS.models:
        figures = measure(name, FLAGS.saves)
        print(f"{name}: {figures['save_s']:.2f} s per save, {figures['size_mb']:.0f} MB, "
              f"{figures['cycle_s']:.2f} s per cycle")
        rows.append(f"| {name} | {figures['save_s']:.2f} | {figures['size_mb']:.0f} | "
                    f"{figures['cycle_s']:.2f} | {figures['save_s'] / figures['cycle_s']:.1f} |")
    body = "\n".join([
        "## Checkpointing: seconds per resume checkpoint",
        "",
        f"`python benchmarks/checkpointing.py` ({machine_line()}); median of {FLAGS.saves} saves "
        "of the full resume state through `RunCheckpoints` (weights of both paths and gates, "
        "hyperparameters and scales, all optimizer slots, generators, loop state), against the "
        "median STN cycle (2 weight + 1 hyper step, batch 128).",
        "",
        "| model | s per save | checkpoint size (MB) | s per cycle | cycles per save |",
        "|---|---:|---:|---:|---:|",
        *rows,
    ])
    replace_section("checkpointing", body)


if __name__ == "__main__":
    app.run(main)
