"""The trainer SavedModel: its size, and seconds per weight step of the reloaded trainer against
the library trainer (same process, same state, same batches).

  python benchmarks/trainer_export.py [--models=cifar_cnn,cifar_alexnet] [--steps=10]

Rewrites the `trainer_export` section of BENCHMARKS.md.
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

from stn_pipeline.hparams import HyperParameters  # noqa: E402
from stn_pipeline.models import CifarAlexNet, CifarCnn, alexnet_hparams, cifar_cnn_hparams  # noqa: E402
from stn_pipeline.trainer import StnTrainer  # noqa: E402
from stn_pipeline.trainer_export import save_trainer  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_list("models", ["cifar_cnn", "cifar_alexnet"], "Models to measure.")
flags.DEFINE_integer("steps", 10, "Timed weight steps per repetition.")
flags.DEFINE_integer("reps", 3, "Repetitions, alternating library and reloaded (median).")

_MODELS = {"cifar_cnn": (CifarCnn, cifar_cnn_hparams), "cifar_alexnet": (CifarAlexNet, alexnet_hparams)}


def measure(name: str) -> dict:
    model_class, make_specs = _MODELS[name]
    specs = make_specs()
    model = model_class((32, 32, 3), 10, (125.0,) * 3, (63.0,) * 3, specs)
    trainer = StnTrainer(model, HyperParameters(specs), tf.TensorSpec([None, 32, 32, 3], tf.uint8),
                         tf.TensorSpec([None], tf.int64))
    rng = np.random.default_rng(0)
    images = tf.constant(rng.integers(0, 256, [128, 32, 32, 3]).astype(np.uint8))
    labels = tf.constant(rng.integers(0, 10, [128]).astype(np.int64))
    with tempfile.TemporaryDirectory() as root:
        path = save_trainer(trainer, root)
        size = sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(path)
                   for f in files)
        reloaded = tf.saved_model.load(path)
        timings = {"library": [], "reloaded": []}
        for step in (trainer.weight_step, reloaded.weight_step):
            step(images, labels)["loss"].numpy()  # warm up
        for _ in range(FLAGS.reps):
            for kind, step in (("library", trainer.weight_step), ("reloaded", reloaded.weight_step)):
                start = time.perf_counter()
                for _ in range(FLAGS.steps):
                    out = step(images, labels)
                out["loss"].numpy()
                timings[kind].append((time.perf_counter() - start) / FLAGS.steps)
    return {"size_mb": size / 2**20, **{k: statistics.median(v) for k, v in timings.items()}}


def main(argv):
    del argv  # Unused.
    rows = []
    for name in FLAGS.models:
        f = measure(name)
        print(f"{name}: {f['size_mb']:.0f} MB, library {f['library']:.3f} s/step, "
              f"reloaded {f['reloaded']:.3f} s/step")
        rows.append(f"| {name} | {f['size_mb']:.0f} | {f['library']:.3f} | {f['reloaded']:.3f} | "
                    f"{f['reloaded'] / f['library']:.2f} |")
    replace_section("trainer_export", "\n".join([
        "## Trainer export: size and speed of the reloaded trainer",
        "",
        f"`python benchmarks/trainer_export.py` ({machine_line()}); weight steps of batch 128 on "
        f"32x32x3 uint8 images, median over {FLAGS.reps} alternating repetitions of "
        f"{FLAGS.steps} steps, library `StnTrainer.weight_step` vs the same trainer saved and "
        "reloaded with `tf.saved_model.load`, in one process.",
        "",
        "| model | export size (MB) | library s/step | reloaded s/step | reloaded / library |",
        "|---|---:|---:|---:|---:|",
        *rows,
    ]))


if __name__ == "__main__":
    app.run(main)
