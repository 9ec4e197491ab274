"""stn-predict: batch inference with an exported Self-Tuning Network (a SavedModel).

  stn-predict --saved_model=runs/cnn/export --dataset=folder:$HOME/data/cifar10 --split=test
  stn-predict --saved_model=runs/cnn/export/2 --images='photos/*.png,extra.jpg' --output=out.csv
  stn-predict --saved_model=runs/cnn/export --images=batch.npy \
      --hyperparameters=dropout0=0.1,dropout1=0.2,dropout2=0.3,pixel_drop=0.05

`--saved_model` is a version folder (`export/1`) or the folder of versions (`export`, whose highest
version is used, as TF Serving does). The model is loaded with `tf.saved_model.load` alone; this
script does not import `stn_pipeline`.

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

import csv
import glob
import json
import os
import random
import sys
import tempfile
from typing import Iterator, Sequence


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

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402
from absl import app, flags  # noqa: E402

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


_FOLDER_PREFIX = "folder:"
_FOLDER_EXTENSIONS = (".jpg", ".jpeg", ".png")  # what tfds ImageFolder (and stn-train) reads
_SERVING = "serving_default"
_WITH_HPARAMS = "predict_with_hyperparameters"
_INFO = "hyperparameters"


class PredictError(Exception):
    """Bad input or a bad export, reported as one line."""


def _first_line(text: str) -> str:
    lines = [line.strip() for line in str(text).splitlines() if line.strip()]
    return lines[0] if lines else ""


def _tf_error_text(error: tf.errors.OpError) -> str:
    """The informative line of a TensorFlow runtime error (assertion text or shape message)."""
    for line in str(error.message).splitlines():
        line = line.strip()
        if line.startswith("assertion failed:"):
            return line.split("] [Condition")[0].replace("assertion failed: [", "")
        if line and not line.startswith(("Graph execution error", "Detected at node", "<stack",
                                         "[[")):
            return line
    return _first_line(error.message)


# ------------------------------------------------------------------------------------------------
# The model
# ------------------------------------------------------------------------------------------------


class ExportedModel:
    """A loaded export: its signatures, input spec, class names and hyperparameter names."""

    def __init__(self, path: str):
        self.path = resolve_saved_model(path)
        try:
            self.loaded = tf.saved_model.load(self.path)
        except Exception as error:  # noqa: BLE001 - any failure means "cannot use it".
            raise PredictError(f"cannot load the SavedModel in {self.path}: "
                               f"{_first_line(error)}") from None
        missing = [s for s in (_SERVING, _WITH_HPARAMS, _INFO) if s not in self.loaded.signatures]
        if missing:
            raise PredictError(f"{self.path} is a SavedModel but not an stn_pipeline export: it "
                               f"lacks the signatures {missing}")
        serving = self.loaded.signatures[_SERVING]
        (self.input_name, spec), = serving.structured_input_signature[1].items()
        self.image_shape = tuple(spec.shape[1:].as_list())
        self.dtype = spec.dtype
        info = self.loaded.signatures[_INFO]()
        self.class_names = [c.decode() for c in info["class_names"].numpy()]
        self.hparam_names = [n.decode() for n in info["names"].numpy()]
        if not self.class_names:
            raise PredictError(f"{self.path} is not a classifier export (it has no class names)")

    def check_images(self, images: np.ndarray, source: str) -> None:
        """Raises `PredictError` unless `images` is a [B, H, W, C] batch the model takes."""
        height, width, channels = self.image_shape
        if images.dtype != self.dtype.as_numpy_dtype:
            hint = (" (convert float pixels first, e.g. np.round(x * 255).astype(np.uint8) for "
                    "values in [0, 1])" if np.issubdtype(images.dtype, np.floating) else "")
            raise PredictError(f"{source} holds {images.dtype} pixels; the model takes "
                               f"{self.dtype.name}{hint}")
        if images.ndim != 4:
            raise PredictError(f"{source} has rank {images.ndim - 1} (shape {images.shape[1:]}); "
                               f"an image must have rank 3 (height, width, channels)")
        if images.shape[-1] != channels:
            raise PredictError(f"{source} has {images.shape[-1]} channel(s); the model takes "
                               f"{channels}")
        if images.shape[1:3] != (height, width):
            raise PredictError(f"{source} is {images.shape[1]}x{images.shape[2]} pixels; the "
                               f"model takes {height}x{width} (resize it first)")

    def predict(self, images: np.ndarray, hyperparameters: np.ndarray | None) -> np.ndarray:
        """Class probabilities [B, K] of a checked batch."""
        try:
            if hyperparameters is None:
                outputs = self.loaded.signatures[_SERVING](**{self.input_name: images})
            else:
                outputs = self.loaded.signatures[_WITH_HPARAMS](
                    **{self.input_name: images, "hyperparameters": hyperparameters})
        except tf.errors.OpError as error:
            raise PredictError(_tf_error_text(error)) from None
        return outputs["probabilities"].numpy()


def resolve_saved_model(path: str) -> str:
    """The SavedModel folder for `path`: itself, or its highest numbered version."""
    if not path:
        raise PredictError("--saved_model is required")
    if not os.path.exists(path):
        raise PredictError(f"--saved_model={path} does not exist")
    if not os.path.isdir(path):
        raise PredictError(f"--saved_model={path} is not a folder")
    if os.path.isfile(os.path.join(path, "saved_model.pb")):
        return path
    versions = sorted(int(d) for d in os.listdir(path) if d.isdigit() and os.path.isfile(
        os.path.join(path, d, "saved_model.pb")))
    if not versions:
        raise PredictError(f"--saved_model={path} is not a SavedModel: it holds no "
                           "saved_model.pb and no numbered version folders with one")
    return os.path.join(path, str(versions[-1]))


def parse_hyperparameters(text: str, names: Sequence[str]) -> np.ndarray:
    """`name=value,...` (every name once) or `value,...` (exported order) -> float32 [1, H]."""
    items = [item.strip() for item in text.split(",") if item.strip()]
    expected = f"the model has {len(names)} hyperparameters: {', '.join(names)}"
    try:
        if items and all("=" in item for item in items):
            given = {}
            for item in items:
                key, value = item.split("=", 1)
                given[key.strip()] = float(value)
            unknown = sorted(set(given) - set(names))
            absent = [n for n in names if n not in given]
            if unknown or absent or len(given) != len(items):
                raise PredictError(f"--hyperparameters names {sorted(given)} do not match: "
                                   f"{expected}")
            values = [given[n] for n in names]
        else:
            values = [float(item) for item in items]
    except ValueError:
        raise PredictError(f"--hyperparameters={text!r} is not a list of numbers or "
                           "name=number pairs") from None
    if len(values) != len(names):
        raise PredictError(f"--hyperparameters has {len(values)} values; {expected}")
    return np.asarray([values], np.float32)


# ------------------------------------------------------------------------------------------------
# Inputs
# ------------------------------------------------------------------------------------------------


def folder_examples(spec: str, split: str, class_names: Sequence[str],
                    max_examples: int = 0) -> list[tuple[str, int]]:
    """(file, label index in `class_names`) of `<dir>/<split>/<class>/<image>`, in stn-train order.

    The order is tfds ImageFolder's: class folders and file paths sorted, then shuffled with
    `random.Random(split)`; stn-train's `--max_examples` keeps the first N of it.
    """
    if not spec.startswith(_FOLDER_PREFIX) or not spec[len(_FOLDER_PREFIX):].strip():
        raise PredictError(f"--dataset={spec} is not supported; use --dataset=folder:<dir>")
    root = os.path.expanduser(spec[len(_FOLDER_PREFIX):])
    split_dir = os.path.join(root, split)
    if not os.path.isdir(root):
        raise PredictError(f"dataset folder does not exist: {root}")
    if not os.path.isdir(split_dir):
        raise PredictError(f"dataset folder {root} has no '{split}' split folder")
    classes = sorted(d for d in os.listdir(split_dir) if os.path.isdir(os.path.join(split_dir, d)))
    unknown = [c for c in classes if c not in class_names]
    if unknown:
        raise PredictError(f"class folders {unknown} of {split_dir} are not classes of the "
                           f"model ({', '.join(class_names)})")
    examples = []
    for name in classes:
        folder = os.path.join(split_dir, name)
        files = sorted(os.path.join(folder, f) for f in os.listdir(folder)
                       if f.lower().endswith(_FOLDER_EXTENSIONS))
        examples.extend((path, class_names.index(name)) for path in files)
    if not examples:
        raise PredictError(f"no images in {split_dir} (expected {split_dir}/<class>/<image> with "
                           f"extension {', '.join(_FOLDER_EXTENSIONS)})")
    random.Random(split).shuffle(examples)
    if max_examples:
        examples = examples[:max_examples]
    return examples


def expand_images(patterns: Sequence[str]) -> list[str]:
    """Files named by `patterns` (files or globs), in order, each once."""
    files: list[str] = []
    for pattern in patterns:
        pattern = os.path.expanduser(pattern)
        if glob.has_magic(pattern):
            matches = sorted(p for p in glob.glob(pattern) if os.path.isfile(p))
            if not matches:
                raise PredictError(f"--images pattern {pattern} matches no file")
        elif os.path.isfile(pattern):
            matches = [pattern]
        elif os.path.exists(pattern):
            raise PredictError(f"--images entry {pattern} is not a file")
        else:
            raise PredictError(f"image file does not exist: {pattern}")
        files.extend(m for m in matches if m not in files)
    if not files:
        raise PredictError("--images names no file")
    return files


def read_images(path: str) -> list[tuple[str, np.ndarray]]:
    """(name, [1, H, W, C] array) per image in the file: one for an image, N for a .npy batch."""
    if path.lower().endswith(".npy"):
        try:
            array = np.load(path, allow_pickle=False)
        except (OSError, ValueError) as error:
            raise PredictError(f"cannot read image file {path}: {_first_line(error)}") from None
        if array.ndim == 3:
            return [(path, array[None])]
        if array.ndim == 4:
            return [(f"{path}[{i}]", array[i:i + 1]) for i in range(array.shape[0])]
        raise PredictError(f"image {path} has rank {array.ndim} (shape {array.shape}); an "
                           "image must have rank 3 (height, width, channels), a batch rank 4")
    try:
        encoded = tf.io.read_file(path)
        image = tf.io.decode_image(encoded, expand_animations=False)
    except tf.errors.OpError as error:
        raise PredictError(f"cannot read image file {path}: {_first_line(error.message)}") from None
    return [(path, image.numpy()[None])]


def _batches(sources: Sequence[tuple[str, int | None]], batch_size: int,
             model: ExportedModel) -> Iterator[tuple[list[str], list, np.ndarray]]:
    """Checked [B, H, W, C] batches of (names, labels, images) read from the source files."""
    names: list[str] = []
    labels: list = []
    arrays: list[np.ndarray] = []
    for path, label in sources:
        for name, array in read_images(path):
            model.check_images(array, f"image {name}")
            names.append(name)
            labels.append(label)
            arrays.append(array)
            if len(arrays) == batch_size:
                yield names, labels, np.concatenate(arrays)
                names, labels, arrays = [], [], []
    if arrays:
        yield names, labels, np.concatenate(arrays)


# ------------------------------------------------------------------------------------------------
# The run
# ------------------------------------------------------------------------------------------------


class _AtomicWriter:
    """Writes predictions to a temporary file next to `path`; `commit` renames it into place."""

    def __init__(self, path: str):
        self.path = path
        self.csv = path.lower().endswith(".csv")
        folder = os.path.dirname(os.path.abspath(path))
        if not os.path.isdir(folder):
            raise PredictError(f"--output folder does not exist: {folder}")
        try:
            handle, self.temporary = tempfile.mkstemp(
                prefix=f".{os.path.basename(path)}.", suffix=".partial", dir=folder)
        except OSError as error:
            raise PredictError(f"cannot write --output={path}: {error.strerror}") from None
        self.file = os.fdopen(handle, "w", newline="")
        self.writer = csv.writer(self.file) if self.csv else None
        if self.writer:
            self.writer.writerow(["file", "label", "predicted_class", "probability"])

    def write(self, row: dict) -> None:
        if self.writer:
            self.writer.writerow([row["file"], "" if row["label"] is None else row["label"],
                                  row["predicted_class"], f"{row['probability']:.6f}"])
        else:
            self.file.write(json.dumps(row) + "\n")

    def commit(self) -> None:
        self.file.close()
        os.replace(self.temporary, self.path)

    def discard(self) -> None:
        self.file.close()
        if os.path.exists(self.temporary):
            os.remove(self.temporary)


def predict(saved_model: str, *, dataset: str | None = None, split: str = "test",
            images: Sequence[str] | None = None, output: str | None = None,
            batch_size: int = 256, max_examples: int = 0,
            hyperparameters: str | None = None, echo: bool = True) -> dict:
    """Runs batch inference; returns {"count", "correct", "accuracy" (None without labels)}."""
    if bool(dataset) == bool(images):
        raise PredictError("give exactly one of --dataset=folder:<dir> or --images=<files>")
    if batch_size < 1:
        raise PredictError(f"--batch_size must be >= 1, received {batch_size}")
    if max_examples < 0:
        raise PredictError(f"--max_examples must be >= 0, received {max_examples}")
    model = ExportedModel(saved_model)
    values = None
    if hyperparameters is not None:
        values = parse_hyperparameters(hyperparameters, model.hparam_names)
    if dataset:
        sources = folder_examples(dataset, split, model.class_names, max_examples)
    else:
        sources = [(path, None) for path in expand_images(images)]
    writer = _AtomicWriter(output) if output else None
    count = correct = 0
    labelled = True
    try:
        for names, labels, batch in _batches(sources, batch_size, model):
            probabilities = model.predict(batch, values)
            predicted = probabilities.argmax(axis=-1)
            for name, label, index, row in zip(names, labels, predicted, probabilities):
                record = {"file": name,
                          "label": None if label is None else model.class_names[label],
                          "predicted_class": model.class_names[index],
                          "probability": float(row[index])}
                count += 1
                if label is None:
                    labelled = False
                else:
                    correct += int(index == label)
                if writer:
                    writer.write(record)
                elif echo and not dataset:
                    print(f"{name}\t{record['predicted_class']}\t{record['probability']:.4f}")
        if writer:
            writer.commit()
    except BaseException:
        if writer:
            writer.discard()
        raise
    accuracy = correct / count if labelled and count else None
    return {"count": count, "correct": correct, "accuracy": accuracy, "saved_model": model.path}


def main(argv):
    if len(argv) > 1:
        sys.exit(f"stn-predict: error: unexpected arguments {argv[1:]}; flags take the form "
                 "--name=value.")
    try:
        summary = predict(FLAGS.saved_model, dataset=FLAGS.dataset, split=FLAGS.split,
                          images=FLAGS.images, output=FLAGS.output, batch_size=FLAGS.batch_size,
                          max_examples=FLAGS.max_examples, hyperparameters=FLAGS.hyperparameters)
    except PredictError as error:
        sys.exit(f"stn-predict: error: {error}")
    except tf.errors.OpError as error:  # an input TensorFlow rejects in a way not checked above
        sys.exit(f"stn-predict: error: {_tf_error_text(error)}")
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
