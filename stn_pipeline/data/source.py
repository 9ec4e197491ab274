"""What every dataset source provides: undecoded splits, a decoder, and the decoded examples.

A source (an image folder or a TFDS dataset) yields ``(encoded, label, name)`` triples in its own
fixed order; ``name`` is the image's file for folders (empty for TFDS) so that an image that
cannot be decoded is reported by file.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import numpy as np
import tensorflow as tf

from stn_pipeline.data.errors import DataError, first_line, op_error_text

__all__ = ["Source", "decoded", "fit_to_shape", "num_examples", "require_decodable"]

_CHECK_BATCH_SIZE = 1024


@dataclasses.dataclass(frozen=True, kw_only=True)
class Source:
    """Undecoded splits of a dataset and how to decode them.

    Attributes:
        name: The dataset spec string.
        raw_train: ``(encoded, label int64, name string)`` triples of the train split, in the
            source's order.
        raw_test: The same for the test split, or ``None``.
        decode_fn: Maps ``encoded`` to a ``uint8`` image of ``image_shape``.
        image_shape: ``(H, W, C)`` of every decoded image.
        class_names: Label ``i`` is ``class_names[i]``.
    """

    name: str
    raw_train: tf.data.Dataset
    raw_test: tf.data.Dataset | None
    decode_fn: Callable[[tf.Tensor], tf.Tensor]
    image_shape: tuple[int, int, int]
    class_names: tuple[str, ...]


def decoded(raw: tf.data.Dataset, decode: Callable[[tf.Tensor], tf.Tensor]) -> tf.data.Dataset:
    """Decodes ``(encoded, label, name)`` triples, in order, to ``(image, label)``; cached."""
    return raw.map(
        lambda encoded, label, name: (decode(encoded), label),
        num_parallel_calls=tf.data.AUTOTUNE,
        deterministic=True,
    ).cache()


def require_decodable(part: tf.data.Dataset, raw: tf.data.Dataset, source: Source,
                      split: str) -> None:
    """Decodes all of ``part`` once (filling its cache), naming the file of a bad image.

    Raises:
        DataError: naming the first image of ``raw`` that cannot be decoded (its file for
            folders, its position otherwise).
    """
    try:
        part.batch(_CHECK_BATCH_SIZE).reduce(np.int64(0), lambda count, *_: count + 1)
    except tf.errors.OpError as err:
        raise DataError(_undecodable(raw, source, split) or
                        f"dataset {source.name!r}: cannot decode its {split} images: "
                        f"{first_line(err.message)}") from None


def _undecodable(raw: tf.data.Dataset, source: Source, split: str) -> str | None:
    """The message for the first example of ``raw`` that fails to decode, or None.

    Decodes one example at a time (slow, so only run after a batched pass failed).
    """
    for index, (encoded, _, name) in enumerate(raw):
        try:
            source.decode_fn(encoded)
        except tf.errors.OpError as err:
            file = name.numpy().decode("utf-8", "replace")
            where = file or f"example {index} of the {split} split of {source.name!r}"
            return f"cannot decode image {where}: {op_error_text(err.message)}"
    return None


def fit_to_shape(image: tf.Tensor, shape: tuple[int, int, int]) -> tf.Tensor:
    """Resizes ``image`` to ``shape[:2]`` if needed and returns it as uint8.

    Images of another size are resized bilinearly with ``tf.image.resize``; the result is
    rounded, clipped to ``[0, 255]`` and cast back to uint8. Images of the right size pass
    through unchanged.
    """
    height, width, channels = shape
    size = tf.shape(image)

    def resize() -> tf.Tensor:
        resized = tf.image.resize(image, (height, width))
        return tf.cast(tf.clip_by_value(tf.round(resized), 0.0, 255.0), tf.uint8)

    same = tf.logical_and(tf.equal(size[0], height), tf.equal(size[1], width))
    image = tf.cond(same, lambda: tf.cast(image, tf.uint8), resize)
    return tf.ensure_shape(image, (height, width, channels))


def num_examples(ds: tf.data.Dataset) -> int:
    """Number of elements of a finite dataset (counted if not known)."""
    cardinality = int(ds.cardinality())
    if cardinality == tf.data.INFINITE_CARDINALITY:
        raise ValueError("expected a finite dataset, got an infinite one")
    if cardinality >= 0:
        return cardinality
    return int(ds.reduce(np.int64(0), lambda count, _: count + 1))
