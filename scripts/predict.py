"""stn-predict: batch inference with an exported Self-Tuning Network (a SavedModel).

  stn-predict --saved_model=runs/cnn/export --dataset=folder:$HOME/data/cifar10 --split=test
  stn-predict --saved_model=runs/cnn/export/2 --images='photos/*.png,extra.jpg' --output=out.csv
  stn-predict --saved_model=runs/cnn/export --images=batch.npy \
      --hyperparameters=dropout0=0.1,dropout1=0.2,dropout2=0.3,pixel_drop=0.05

`--saved_model` is a version folder (`export/1`) or the folder of versions (`export`, whose highest
version is used, as TF Serving does). The model is loaded with `tf.saved_model.load` alone (no
model code is imported); the work is done by `stn_pipeline.inference`.

Inputs are what `serving_default` takes: uint8 images of the training image shape (H, W, C).
  --images      comma-separated files or globs: JPEG/PNG/GIF/BMP files (decoded to uint8, never
                resized or converted between grey and colour), or .npy arrays of uint8, [H, W, C]
                for one image or [N, H, W, C] for N. Float arrays are rejected: convert them first
                (e.g. np.round(x * 255).astype(np.uint8) for values in [0, 1]).
  --dataset     folder:<dir> reads <dir>/<split>/<class>/<image> (.jpg, .jpeg, .png) with labels
                from the class folders, matched to the exported class names by name, in the
                order stn-train uses (tfds ImageFolder's), so `--max_examples=N` takes the same
                first N examples as `stn-train --max_examples=N` does for its test split.
With `--hyperparameters` the outputs come from `predict_with_hyperparameters` at those values (the
learned best-response family) instead of the folded network at the tuned values.

Prints the accuracy when labels are known. `--output=FILE` writes one prediction per image:
CSV if FILE ends in .csv, JSON lines otherwise (fields: file, label, predicted_class, probability).
The file is written to a temporary name and renamed when complete, so a failed run leaves none.
Bad input ends the run with exit status 1 and one line naming the problem.
"""

from __future__ import annotations

import os
import sys


def _silence_native_logs() -> None:
    """As the `stn-predict` command, sends TensorFlow's C++ log lines to /dev/null.

    Errors are reported as one line of ours, but TensorFlow's native code writes start-up lines
    to file descriptor 2 whatever TF_CPP_MIN_LOG_LEVEL says. So the command points descriptor 2
    at /dev/null and keeps Python's `sys.stderr` (our messages, warnings and any traceback of a
    bug) on the real stderr. Runs before TensorFlow is imported; set STN_TF_LOGS=1 to keep the
    native lines. Importing this module from Python changes nothing.
    """
    if os.path.basename(sys.argv[0]) != "stn-predict" or os.environ.get("STN_TF_LOGS") == "1":
        return
    sys.stderr.flush()
    real_stderr = os.dup(2)
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 2)
    os.close(devnull)
    sys.stderr = os.fdopen(real_stderr, "w", buffering=1)


os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
_silence_native_logs()

import tensorflow as tf  # noqa: E402
from absl import app, flags  # noqa: E402

from stn_pipeline import inference  # noqa: E402

FLAGS = flags.FLAGS


def define_flags() -> None:
    """Defines the flags; called by `run` only, so importing this module defines none (its names,
    e.g. --dataset, would clash with stn-train's in a process that imports both)."""
    flags.DEFINE_string("saved_model", None, "Export folder: a version (export/1) or the folder "
                        "of versions (export), whose highest version is used.")
    flags.DEFINE_string("dataset", None, "folder:<dir> with <dir>/<split>/<class>/<image>.")
    flags.DEFINE_string("split", "test", "Split folder of --dataset.")
    flags.DEFINE_list("images", None, "Image files, globs or .npy arrays (comma-separated).")
    flags.DEFINE_string("output", None, "Predictions file: .csv, else JSON lines.")
    flags.DEFINE_integer("batch_size", 256, "Images per call of the model.")
    flags.DEFINE_integer("max_examples", 0, "Use only the first N examples of --dataset (0: all), "
                         "in the order stn-train's --max_examples uses.")
    flags.DEFINE_string("hyperparameters", None, "Predict at these constrained hyperparameter "
                        "values instead of the tuned ones: name=value,... (all names) or "
                        "value,... in the exported order.")


def _print_record(record: dict) -> None:
    print(f"{record['file']}\t{record['predicted_class']}\t{record['probability']:.4f}")


def main(argv):
    if len(argv) > 1:
        sys.exit(f"stn-predict: error: unexpected arguments {argv[1:]}; flags take the form "
                 "--name=value.")
    # Without --output, image predictions are printed; a dataset prints only its accuracy.
    echo = _print_record if not FLAGS.output and not FLAGS.dataset else None
    try:
        summary = inference.predict(
            FLAGS.saved_model, dataset=FLAGS.dataset, split=FLAGS.split, images=FLAGS.images,
            output=FLAGS.output, batch_size=FLAGS.batch_size, max_examples=FLAGS.max_examples,
            hyperparameters=FLAGS.hyperparameters, on_record=echo)
    except inference.PredictError as error:
        sys.exit(f"stn-predict: error: {error}")
    except tf.errors.OpError as error:  # an input TensorFlow rejects in a way not checked above
        sys.exit(f"stn-predict: error: {inference.tf_error_text(error)}")
    where = f" on {FLAGS.dataset} split {FLAGS.split}" if FLAGS.dataset else ""
    if summary["accuracy"] is not None:
        print(f"accuracy {summary['accuracy']:.4f} ({summary['correct']}/{summary['count']})"
              f"{where} with {summary['saved_model']}")
    else:
        print(f"predicted {summary['count']} images with {summary['saved_model']}")
    if FLAGS.output:
        print(f"predictions written to {FLAGS.output}")


def run():
    define_flags()
    app.run(main)


if __name__ == "__main__":
    run()  # pragma: no cover - `python -m stn_pipeline_scripts.predict` keeps TF's native logs
