"""Image folders, ``<dir>/<split>/<class>/<image>``, read with ``tfds.folder_dataset.ImageFolder``.

ImageFolder fixes the order of a split: class folders and file paths sorted, then shuffled with a
seed derived from the split's name. Every reader here (training and ``stn-predict``) uses that
order, so ``max_examples=N`` means the same first N images everywhere.
"""

from __future__ import annotations

import pathlib

import tensorflow as tf
import tensorflow_datasets as tfds

from stn_pipeline.data.errors import DataError, op_error_text
from stn_pipeline.data.source import Source, fit_to_shape

__all__ = ["FOLDER_PREFIX", "IMAGE_EXTENSIONS", "folder_files", "folder_source"]

FOLDER_PREFIX = "folder:"
"""Prefix of a dataset spec string that names a local image folder."""

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png")
"""File extensions ImageFolder reads."""

_SKIP_DECODING = {"image": tfds.decode.SkipDecoding()}


def _builder(folder: str, split: str) -> tfds.folder_dataset.ImageFolder:
    """ImageFolder of ``folder`` after checking that it has images in ``split``."""
    if not folder.strip():
        raise DataError(f"empty folder in dataset spec '{FOLDER_PREFIX}'; use "
                        f"'{FOLDER_PREFIX}<dir>' with <dir>/{split}/<class>/<image>")
    root = pathlib.Path(folder).expanduser()
    if not root.is_dir():
        raise DataError(f"dataset folder does not exist or is not a folder: {root}")
    if not (root / split).is_dir():
        raise DataError(f"dataset folder {root} has no '{split}' subfolder "
                        f"(expected <dir>/{split}/<class>/<image>)")
    builder = tfds.folder_dataset.ImageFolder(str(root))
    splits = builder.info.splits
    if split not in splits or splits[split].num_examples == 0:
        raise DataError(f"no images in {root / split} (expected {root / split}/<class>/<image> "
                        f"with extension {', '.join(IMAGE_EXTENSIONS)})")
    return builder


def _raw(builder: tfds.folder_dataset.ImageFolder, split: str) -> tf.data.Dataset:
    """``(encoded, label, file)`` triples of ``split`` in ImageFolder's order."""
    ds = builder.as_dataset(split=split, decoders=_SKIP_DECODING, shuffle_files=False)
    return ds.map(lambda ex: (ex["image"], tf.cast(ex["label"], tf.int64), ex["image/filename"]))


def folder_source(spec: str) -> Source:
    """The source of ``folder:<dir>``: the first train image fixes the shape of all images."""
    builder = _builder(spec[len(FOLDER_PREFIX):], "train")
    raw_train = _raw(builder, "train")
    splits = builder.info.splits
    has_test = "test" in splits and splits["test"].num_examples > 0

    encoded, _, file = next(iter(raw_train.take(1)))
    first_path = file.numpy().decode("utf-8", "replace")
    try:
        first_image = tf.io.decode_image(encoded, expand_animations=False)
    except tf.errors.OpError as err:
        raise DataError(f"cannot decode image {first_path}: {op_error_text(err.message)}") from None
    height, width, channels = (int(d) for d in first_image.shape)
    if channels not in (1, 3, 4):
        raise DataError(f"unsupported channel count {channels} in {first_path} "
                        "(images must be grayscale, RGB or RGBA)")
    shape = (height, width, channels)

    def decode(image: tf.Tensor) -> tf.Tensor:
        image = tf.io.decode_image(image, channels=channels, expand_animations=False)
        return fit_to_shape(image, shape)

    return Source(name=spec, raw_train=raw_train,
                  raw_test=_raw(builder, "test") if has_test else None, decode_fn=decode,
                  image_shape=shape, class_names=tuple(builder.info.features["label"].names))


def folder_files(spec: str, split: str, max_examples: int | None = None,
                 ) -> tuple[list[tuple[str, int]], tuple[str, ...]]:
    """The image files of one split of ``folder:<dir>`` and their labels, in ImageFolder's order.

    Args:
        spec: ``folder:<dir>``.
        split: The split folder, e.g. ``test``.
        max_examples: If given, only the first ``max_examples`` files.

    Returns:
        ``([(file, label), ...], class_names)``; label ``i`` is ``class_names[i]``.
    """
    if not spec.startswith(FOLDER_PREFIX):
        raise DataError(f"dataset {spec!r} is not an image folder; use {FOLDER_PREFIX}<dir>")
    builder = _builder(spec[len(FOLDER_PREFIX):], split)
    raw = _raw(builder, split).map(lambda encoded, label, file: (file, label))
    if max_examples:
        raw = raw.take(max_examples)
    files = [(file.decode("utf-8", "replace"), int(label))
             for file, label in raw.as_numpy_iterator()]
    return files, tuple(builder.info.features["label"].names)
