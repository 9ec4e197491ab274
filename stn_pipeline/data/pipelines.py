"""Batched input pipelines: endless shuffled training batches and in-order evaluation passes."""

from __future__ import annotations

import tensorflow as tf

from stn_pipeline.data.source import num_examples

__all__ = ["train_batches", "eval_batches"]


def train_batches(ds: tf.data.Dataset, batch_size: int, *, seed: int) -> tf.data.Dataset:
    """Endless stream of shuffled training batches.

    The whole dataset is held in the shuffle buffer (a full shuffle), reshuffled on every epoch,
    repeated forever and batched with incomplete batches dropped.

    Args:
        ds: Unbatched, finite dataset (for example ``Splits.train``).
        batch_size: Examples per batch.
        seed: Shuffle seed; the same seed gives the same batches.

    Returns:
        An infinite, prefetched dataset of batches.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    return (
        ds.shuffle(num_examples(ds), seed=seed, reshuffle_each_iteration=True)
        .repeat()
        .batch(batch_size, drop_remainder=True)
        .prefetch(tf.data.AUTOTUNE)
    )


def eval_batches(ds: tf.data.Dataset, batch_size: int) -> tf.data.Dataset:
    """One in-order pass over ``ds`` in batches, keeping the last short batch.

    Args:
        ds: Unbatched, finite dataset.
        batch_size: Examples per batch.

    Returns:
        A finite, prefetched dataset of batches.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    return ds.batch(batch_size, drop_remainder=False).prefetch(tf.data.AUTOTUNE)
