"""Per-channel normalisation statistics of a training set, kept finite for constant channels.

A channel whose pixels are all equal (the opaque alpha channel of RGBA PNGs is the common case)
has standard deviation 0, and ``(pixel - mean) / std`` would be NaN. As
``tf.image.per_image_standardization`` floors its standard deviation, the dataset's is floored at
:data:`STD_FLOOR` = 1 grey level (the step between two uint8 values), with a one-line warning:
the constant channel then normalises to 0, and any other value of it stays within +-255.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import tensorflow as tf
from absl import logging

from stn_pipeline.data.errors import DataError

__all__ = ["STD_FLOOR", "channel_stats", "checked_normalization", "floored_std"]

STD_FLOOR = 1.0
"""Smallest per-channel standard deviation used for normalisation, in [0, 255] pixel units."""

_STATS_BATCH_SIZE = 1024
_CHANNEL_NAMES = {1: ("grey",), 3: ("red", "green", "blue"), 4: ("red", "green", "blue", "alpha")}


def channel_stats(ds: tf.data.Dataset) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel pixel mean and (population) standard deviation, as measured (not floored).

    Makes one pass over the dataset in large batches; sums are accumulated in float64.

    Args:
        ds: Unbatched dataset of ``uint8`` images ``[H, W, C]``, or of tuples whose first
            component is such an image.

    Returns:
        ``(mean, std)``, each a tuple of ``C`` floats in ``[0, 255]`` units.

    Raises:
        DataError: If the dataset is empty.
    """
    if isinstance(ds.element_spec, tuple):
        ds = ds.map(lambda image, *rest: image)

    def batch_sums(images: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor, tf.Tensor]:
        # float64: summed squares of 40,000 images reach ~1e12, past float32's exact range.
        pixels = tf.cast(images, tf.float64)
        pixels = tf.reshape(pixels, [-1, tf.shape(pixels)[-1]])
        return (tf.reduce_sum(pixels, axis=0), tf.reduce_sum(tf.square(pixels), axis=0),
                tf.cast(tf.shape(pixels)[0], tf.float64))

    batched = ds.batch(_STATS_BATCH_SIZE).map(batch_sums, num_parallel_calls=tf.data.AUTOTUNE)
    total = total_sq = None
    count = 0.0
    for s, sq, n in batched.as_numpy_iterator():
        total = s if total is None else total + s
        total_sq = sq if total_sq is None else total_sq + sq
        count += float(n)
    if total is None or count == 0:
        raise DataError("cannot compute channel statistics of an empty dataset")
    mean = total / count
    std = np.sqrt(np.maximum(total_sq / count - mean**2, 0.0))
    return tuple(float(m) for m in mean), tuple(float(s) for s in std)


def floored_std(std: Sequence[float], dataset: str) -> tuple[float, ...]:
    """``max(std, STD_FLOOR)`` per channel, warning once per (near-)constant channel."""
    names = _CHANNEL_NAMES.get(len(std), ())
    floored = []
    for index, value in enumerate(std):
        if value < STD_FLOOR:
            label = f"channel {index} ({names[index]})" if names else f"channel {index}"
            logging.warning("dataset %r: %s is (nearly) constant (std %.3g < %g grey level); "
                            "normalising it with std %g", dataset, label, value, STD_FLOOR,
                            STD_FLOOR)
        floored.append(max(float(value), STD_FLOOR))
    return tuple(floored)


def checked_normalization(normalization: tuple[Sequence[float], Sequence[float]],
                          channels: int, dataset: str,
                          ) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Validates caller-given ``(mean, std)`` against the channel count."""
    try:
        mean_in, std_in = normalization
        mean = tuple(float(m) for m in mean_in)
        std = tuple(float(s) for s in std_in)
    except (TypeError, ValueError) as err:
        raise DataError("normalization must be (mean, std) sequences of floats, got "
                        f"{normalization!r}") from err
    if len(mean) != channels or len(std) != channels:
        raise DataError(f"dataset {dataset!r} has {channels} channels but normalization has "
                        f"{len(mean)} means and {len(std)} stds")
    if any(not s > 0 for s in std):
        raise DataError(f"normalization std must be positive, got {std}")
    return mean, std
