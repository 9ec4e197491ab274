"""Loading a dataset as train / validation / test parts, with the facts a model needs.

The source's ``train`` split is cut into a training part (its first ``1 - valid_fraction``) and
a validation part (the rest), contiguous in the source's own fixed order, with no reshuffling
before the cut. That order is *not* the original STN's (which keeps CIFAR-10's file order: the
first 40,000 images train, the last 10,000 validate): ImageFolder shuffles a folder's sorted file
list with a fixed seed, and TFDS stores examples in an order it shuffled when it prepared the
dataset. Both orders are fixed and mix the classes, so the validation part is as representative
as the original's, but it holds other images.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import tensorflow as tf

from stn_pipeline.data.errors import DataError
from stn_pipeline.data.folder import FOLDER_PREFIX, folder_source
from stn_pipeline.data.source import Source, decoded, num_examples, require_decodable
from stn_pipeline.data.statistics import channel_stats, checked_normalization, floored_std
from stn_pipeline.data.tfds_source import tfds_source

__all__ = ["DatasetInfo", "Splits", "check_batch_size", "load_splits"]


@dataclasses.dataclass(frozen=True, kw_only=True)
class DatasetInfo:
    """Static facts about a loaded dataset.

    Attributes:
        name: The dataset spec string it was loaded from.
        image_shape: ``(H, W, C)`` of every image.
        class_names: Class names; label ``i`` is ``class_names[i]``.
        num_train: Number of examples in the training part.
        num_valid: Number of examples in the validation part.
        num_test: Number of test examples (0 if the source has no test split).
        mean: Per-channel pixel mean in ``[0, 255]`` units, from the training part only (or as
            given by the caller).
        std: Per-channel pixel standard deviation, same units and origin, floored at
            ``statistics.STD_FLOOR`` when measured.
    """

    name: str
    image_shape: tuple[int, int, int]
    class_names: tuple[str, ...]
    num_train: int
    num_valid: int
    num_test: int
    mean: tuple[float, ...]
    std: tuple[float, ...]

    @property
    def num_classes(self) -> int:
        """Number of classes."""
        return len(self.class_names)


@dataclasses.dataclass(frozen=True, kw_only=True)
class Splits:
    """The three parts of a dataset plus its :class:`DatasetInfo`.

    Attributes:
        train: Unbatched ``(image uint8 [H, W, C], label int64)`` pairs, cached in memory.
        valid: Same for the validation part.
        test: Same for the test split, or ``None`` if the source has none.
        info: Facts about the dataset.
    """

    train: tf.data.Dataset
    valid: tf.data.Dataset
    test: tf.data.Dataset | None
    info: DatasetInfo


def load_splits(
    dataset: str,
    *,
    data_dir: str | None = None,
    valid_fraction: float = 0.2,
    max_examples: int | None = None,
    normalization: tuple[Sequence[float], Sequence[float]] | None = None,
) -> Splits:
    """Loads a dataset and cuts its train split into train and valid parts.

    For ``folder:`` datasets the image shape ``(H, W, C)`` is that of the first train image in
    ImageFolder's order. Every image is decoded with ``C`` channels (grayscale <-> RGB converted
    by the decoder), and images of another size are resized to ``(H, W)`` with bilinear
    ``tf.image.resize``, then rounded, clipped to ``[0, 255]`` and cast back to uint8. Labels are
    class-folder indices in sorted order. TFDS datasets with a fixed image shape are used as they
    are; variable-size ones are fitted the same way. Every image is decoded here, once (the
    decoded parts are cached in memory), so a file that cannot be decoded stops the load with
    its name.

    The validation part has ``round(n * valid_fraction)`` examples, where ``n`` is the (possibly
    ``max_examples``-capped) size of the source train split.

    Args:
        dataset: ``folder:<dir>`` for an image folder, or a registered TFDS dataset name such as
            ``cifar10``.
        data_dir: TFDS data directory (ignored for ``folder:`` datasets).
        valid_fraction: Fraction of the source train split that becomes the validation part,
            taken from its end. Must be in (0, 1).
        max_examples: If given, only the first ``max_examples`` examples of the train split
            (before the cut) and of the test split are used.
        normalization: Optional ``(mean, std)`` per channel in ``[0, 255]`` units; if omitted
            they are computed from the training part with :func:`channel_stats` (std floored).

    Returns:
        The train / valid / test datasets and their :class:`DatasetInfo`.

    Raises:
        DataError: If the dataset cannot be found, read, decoded, downloaded or split as asked.
    """
    if not isinstance(dataset, str) or not dataset.strip():
        raise DataError(f"empty dataset name {dataset!r}; give a TFDS name such as 'cifar10' or "
                        f"'{FOLDER_PREFIX}<dir>'")
    valid_fraction = float(valid_fraction)
    if not 0.0 < valid_fraction < 1.0:
        raise DataError(f"valid_fraction must be strictly between 0 and 1, got {valid_fraction}")
    if max_examples is not None and int(max_examples) < 1:
        raise DataError(f"max_examples must be at least 1, got {max_examples}")

    if dataset.startswith(FOLDER_PREFIX):
        source = folder_source(dataset)
    else:
        source = tfds_source(dataset, data_dir)
    parts = _cut(source, valid_fraction, max_examples)
    for split, (part, raw) in parts.items():
        require_decodable(part, raw, source, split)

    train = parts["train"][0]
    if normalization is None:
        mean, std = channel_stats(train)
        std = floored_std(std, dataset)
    else:
        mean, std = checked_normalization(normalization, source.image_shape[-1], dataset)
    test = parts["test"][0] if "test" in parts else None
    info = DatasetInfo(name=dataset, image_shape=source.image_shape,
                       class_names=source.class_names, num_train=num_examples(train),
                       num_valid=num_examples(parts["valid"][0]),
                       num_test=0 if test is None else num_examples(test), mean=mean, std=std)
    return Splits(train=train, valid=parts["valid"][0], test=test, info=info)


def _cut(source: Source, valid_fraction: float, max_examples: int | None,
         ) -> dict[str, tuple[tf.data.Dataset, tf.data.Dataset]]:
    """``split -> (decoded part, its raw triples)`` for train, valid and (if any) test."""
    raw_train = _first(source.raw_train, max_examples)
    num_total = num_examples(raw_train)
    num_valid = int(round(num_total * valid_fraction))
    num_train = num_total - num_valid
    if num_train < 1 or num_valid < 1:
        raise DataError(f"dataset {source.name!r}: {num_total} train examples cannot be split "
                        f"with valid_fraction={valid_fraction} into non-empty train "
                        f"({num_train}) and valid ({num_valid}) parts")
    raws = {"train": raw_train.take(num_train), "valid": raw_train.skip(num_train)}
    if source.raw_test is not None:
        raws["test"] = _first(source.raw_test, max_examples)
    return {split: (decoded(raw, source.decode_fn), raw) for split, raw in raws.items()}


def _first(raw: tf.data.Dataset, max_examples: int | None) -> tf.data.Dataset:
    """The first ``max_examples`` elements of ``raw`` (all if None)."""
    return raw if max_examples is None else raw.take(int(max_examples))


def check_batch_size(info: DatasetInfo, batch_size: int) -> None:
    """Checks that the train and valid parts hold at least one full batch.

    Args:
        info: The dataset's info.
        batch_size: The batch size to be used for training and validation.

    Raises:
        DataError: If ``batch_size`` is not positive or larger than the training or validation
            part.
    """
    if batch_size < 1:
        raise DataError(f"batch size must be positive, got {batch_size}")
    if info.num_train < batch_size or info.num_valid < batch_size:
        raise DataError(
            f"dataset {info.name!r} is too small for batch size {batch_size}: "
            f"{info.num_train} train and {info.num_valid} valid examples "
            "(use a smaller batch size, a different valid_fraction or more data)")
