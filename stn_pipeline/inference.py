"""Batch inference with an exported STN (a SavedModel): reading the export, the inputs, and
writing predictions -- what `stn-predict` runs.

The export is loaded with `tf.saved_model.load` alone (no model code is imported). Inputs are
what `serving_default` takes: uint8 images of the training shape. Image files are decoded to
uint8 and never resized or converted between grey and colour; `.npy` arrays must already be
uint8. `folder:<dir>` datasets are read in the order `stn-train` uses (`stn_pipeline.data`), with
labels matched to the exported class names by name.
"""

from __future__ import annotations

import csv
import glob
import json
import os
from typing import Callable, Iterator, Sequence

import numpy as np
import tensorflow as tf

from stn_pipeline import data, files
from stn_pipeline.data.errors import first_line

__all__ = ["ExportedModel", "PredictError", "dataset_examples", "expand_images",
           "parse_hyperparameters", "predict", "read_images", "resolve_saved_model",
           "tf_error_text"]

_SERVING = "serving_default"
_WITH_HPARAMS = "predict_with_hyperparameters"
_INFO = "hyperparameters"
_CSV_FIELDS = ("file", "label", "predicted_class", "probability")


class PredictError(Exception):
    """Bad input or a bad export, reported as one line."""


def tf_error_text(error: tf.errors.OpError) -> str:
    """The informative line of a TensorFlow runtime error (assertion text or shape message)."""
    for line in str(error.message).splitlines():
        line = line.strip()
        if line.startswith("assertion failed:"):
            return line.split("] [Condition")[0].replace("assertion failed: [", "")
        if line and not line.startswith(("Graph execution error", "Detected at node", "<stack",
                                         "[[")):
            return line
    return first_line(error.message)


class ExportedModel:
    """A loaded export: its signatures, input spec, class names and hyperparameter names."""

    def __init__(self, path: str):
        self.path = resolve_saved_model(path)
        try:
            self.loaded = tf.saved_model.load(self.path)
        except Exception as error:  # noqa: BLE001 - any failure means "cannot use it".
            raise PredictError(f"cannot load the SavedModel in {self.path}: "
                               f"{first_line(error)}") from None
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
            raise PredictError(tf_error_text(error)) from None
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


def dataset_examples(spec: str, split: str, class_names: Sequence[str],
                     max_examples: int = 0) -> list[tuple[str, int]]:
    """(file, label index in `class_names`) of a `folder:<dir>` split, in stn-train's order.

    `max_examples=N` (0: all) keeps the first N, as stn-train's `--max_examples` does.
    """
    if not spec.startswith(data.FOLDER_PREFIX) or not spec[len(data.FOLDER_PREFIX):].strip():
        raise PredictError(f"--dataset={spec} is not supported; use --dataset=folder:<dir>")
    try:
        examples, folder_classes = data.folder_files(spec, split, max_examples or None)
    except data.DataError as error:
        raise PredictError(str(error)) from None
    unknown = sorted({folder_classes[label] for _, label in examples} - set(class_names))
    if unknown:
        raise PredictError(f"class folders {unknown} of {spec} split {split} are not classes of "
                           f"the model ({', '.join(class_names)})")
    return [(path, list(class_names).index(folder_classes[label])) for path, label in examples]


def expand_images(patterns: Sequence[str]) -> list[str]:
    """Files named by `patterns` (files or globs), in order, each once."""
    found: list[str] = []
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
        found.extend(m for m in matches if m not in found)
    if not found:
        raise PredictError("--images names no file")
    return found


def read_images(path: str) -> list[tuple[str, np.ndarray]]:
    """(name, [1, H, W, C] array) per image in the file: one for an image, N for a .npy batch."""
    if path.lower().endswith(".npy"):
        try:
            array = np.load(path, allow_pickle=False)
        except (OSError, ValueError) as error:
            raise PredictError(f"cannot read image file {path}: {first_line(error)}") from None
        if array.ndim == 3:
            return [(path, array[None])]
        if array.ndim == 4:
            return [(f"{path}[{i}]", array[i:i + 1]) for i in range(array.shape[0])]
        raise PredictError(f"image {path} has rank {array.ndim} (shape {array.shape}); an "
                           "image must have rank 3 (height, width, channels), a batch rank 4")
    try:
        image = tf.io.decode_image(tf.io.read_file(path), expand_animations=False)
    except tf.errors.OpError as error:
        raise PredictError(f"cannot read image file {path}: "
                           f"{first_line(error.message)}") from None
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


def _write_record(handle, record: dict, as_csv: bool) -> None:
    """One prediction line: a CSV row or a JSON object."""
    if as_csv:
        label = "" if record["label"] is None else record["label"]
        csv.writer(handle).writerow([record["file"], label, record["predicted_class"],
                                     f"{record['probability']:.6f}"])
    else:
        handle.write(json.dumps(record) + "\n")


def _check_output(path: str) -> None:
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise PredictError(f"--output folder does not exist: {folder}")
    if not os.access(folder, os.W_OK):
        raise PredictError(f"cannot write --output={path}: its folder is not writable")


def predict(saved_model: str, *, dataset: str | None = None, split: str = "test",
            images: Sequence[str] | None = None, output: str | None = None,
            batch_size: int = 256, max_examples: int = 0, hyperparameters: str | None = None,
            on_record: Callable[[dict], None] | None = None) -> dict:
    """Runs batch inference on a `folder:<dir>` split or on image files.

    Writes one record per image (file, label, predicted_class, probability) to `output` (CSV if
    it ends in .csv, JSON lines otherwise), atomically: a failure midway leaves no file. Calls
    `on_record(record)` for each image, if given.

    Returns:
      {"count", "correct", "accuracy" (None without labels), "saved_model"}.

    Raises:
      PredictError: bad arguments, inputs or export, in one line.
    """
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
        sources = dataset_examples(dataset, split, model.class_names, max_examples)
    else:
        sources = [(path, None) for path in expand_images(images)]
    records = _records(model, sources, batch_size, values)
    if output:
        _check_output(output)
        as_csv = output.lower().endswith(".csv")
        with files.atomic_write(output, newline="") as handle:
            if as_csv:
                csv.writer(handle).writerow(_CSV_FIELDS)
            summary = _summarise(records, on_record, lambda r: _write_record(handle, r, as_csv))
    else:
        summary = _summarise(records, on_record, None)
    return dict(summary, saved_model=model.path)


def _records(model: ExportedModel, sources: Sequence[tuple[str, int | None]], batch_size: int,
             values: np.ndarray | None) -> Iterator[tuple[dict, int | None, int]]:
    """(record, true label index or None, predicted index) per image."""
    for names, labels, batch in _batches(sources, batch_size, model):
        probabilities = model.predict(batch, values)
        for name, label, row in zip(names, labels, probabilities):
            index = int(row.argmax())
            record = {"file": name, "label": None if label is None else model.class_names[label],
                      "predicted_class": model.class_names[index],
                      "probability": float(row[index])}
            yield record, label, index


def _summarise(records: Iterator[tuple[dict, int | None, int]],
               *sinks: Callable[[dict], None] | None) -> dict:
    """Passes every record to the sinks; counts images and correct predictions."""
    count = correct = 0
    labelled = True
    for record, label, index in records:
        count += 1
        if label is None:
            labelled = False
        else:
            correct += int(index == label)
        for sink in sinks:
            if sink is not None:
                sink(record)
    accuracy = correct / count if labelled and count else None
    return {"count": count, "correct": correct, "accuracy": accuracy}
