"""Image-classification input pipelines for the STN experiments.

A dataset is named by a *spec string*:

* ``folder:<dir>`` -- an image folder laid out as
  ``<dir>/<split>/<class>/<image>.{jpg,jpeg,png}``, read with
  ``tfds.folder_dataset.ImageFolder``. The ``train`` split is required and the
  ``test`` split is optional. This is the offline path (for example the shared
  CIFAR-10 JPEG copy).
* any other string -- a registered TFDS dataset (for example ``cifar10``) with
  ``image`` and ``label`` features, read with ``tfds.builder``. If it is not
  prepared yet, it is downloaded and prepared; when the download host cannot be
  reached this fails within seconds with a :class:`DataError`.

The ``train`` split of the source is cut into a training part (the first
``1 - valid_fraction`` of it) and a validation part (the rest), without any
reshuffling before the cut, as the original STN code does. All datasets returned
here are unbatched ``(image, label)`` pairs: ``image`` is a ``uint8`` tensor of
shape ``(H, W, C)`` and ``label`` an ``int64`` scalar. Decoded images are cached
in memory, so only the first pass over a dataset decodes the image files.

Every function is deterministic: the same arguments give the same examples in
the same order, and :func:`train_batches` gives the same batches for the same
``seed``.
"""

from __future__ import annotations

import dataclasses
import os
import pathlib
import shutil
import socket
import tarfile
import tempfile
import threading
import urllib.parse
import urllib.request
import zipfile
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

__all__ = [
    "DataError",
    "DatasetInfo",
    "Splits",
    "FOLDER_PREFIX",
    "load_splits",
    "train_batches",
    "eval_batches",
    "channel_stats",
    "check_batch_size",
    "unpack_archive",
]

FOLDER_PREFIX = "folder:"
"""Prefix of a dataset spec string that names a local image folder."""

_IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png")
_REACHABILITY_TIMEOUT_S = 3.0
_STATS_BATCH_SIZE = 1024
_ARCHIVE_SUFFIXES = (
    ".tar.gz", ".tgz", ".tar.bz2", ".tbz2", ".tar.xz", ".txz", ".tar", ".zip",
)


class DataError(ValueError):
    """A dataset that cannot be used, with a one-line message a user can act on."""


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
    """Static facts about a loaded dataset.

    Attributes:
        name: The dataset spec string it was loaded from.
        image_shape: ``(H, W, C)`` of every image.
        class_names: Class names; label ``i`` is ``class_names[i]``.
        num_train: Number of examples in the training part.
        num_valid: Number of examples in the validation part.
        num_test: Number of test examples (0 if the source has no test split).
        mean: Per-channel pixel mean in ``[0, 255]`` units, from the training
            part only (or as given by the caller).
        std: Per-channel pixel standard deviation, same units and origin.
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


@dataclasses.dataclass(frozen=True)
class Splits:
    """The three parts of a dataset plus its :class:`DatasetInfo`.

    Attributes:
        train: Unbatched ``(image uint8 [H, W, C], label int64)`` pairs, cached
            in memory.
        valid: Same for the validation part.
        test: Same for the test split, or ``None`` if the source has none.
        info: Facts about the dataset.
    """

    train: tf.data.Dataset
    valid: tf.data.Dataset
    test: tf.data.Dataset | None
    info: DatasetInfo


# --------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------


def load_splits(
    dataset: str,
    *,
    data_dir: str | None = None,
    valid_fraction: float = 0.2,
    max_examples: int | None = None,
    normalization: tuple[Sequence[float], Sequence[float]] | None = None,
) -> Splits:
    """Loads a dataset and cuts its train split into train and valid parts.

    For ``folder:`` datasets the image shape ``(H, W, C)`` is that of the first
    train image in ImageFolder's (deterministically shuffled) order. Every
    image is decoded with ``C`` channels (grayscale <-> RGB converted by the
    decoder), and images of another size are resized to ``(H, W)`` with
    bilinear ``tf.image.resize``, then rounded, clipped to ``[0, 255]`` and
    cast back to uint8. Labels are class-folder indices in sorted order. TFDS
    datasets with a fixed image shape are used as they are; variable-size ones
    are fitted the same way.

    The validation part has ``round(n * valid_fraction)`` examples, where ``n``
    is the (possibly ``max_examples``-capped) size of the source train split.

    Args:
        dataset: ``folder:<dir>`` for an image folder, or a registered TFDS
            dataset name such as ``cifar10``.
        data_dir: TFDS data directory (ignored for ``folder:`` datasets).
        valid_fraction: Fraction of the source train split that becomes the
            validation part, taken from its end. Must be in (0, 1).
        max_examples: If given, only the first ``max_examples`` examples of the
            train split (before the cut) and of the test split are used.
        normalization: Optional ``(mean, std)`` per channel in ``[0, 255]``
            units; if omitted they are computed from the training part with
            :func:`channel_stats`.

    Returns:
        The train / valid / test datasets and their :class:`DatasetInfo`.

    Raises:
        DataError: If the dataset cannot be found, read, downloaded or split as
            asked.
    """
    if not isinstance(dataset, str) or not dataset.strip():
        raise DataError(
            f"empty dataset name {dataset!r}; give a TFDS name such as "
            f"'cifar10' or '{FOLDER_PREFIX}<dir>'"
        )
    valid_fraction = float(valid_fraction)
    if not 0.0 < valid_fraction < 1.0:
        raise DataError(
            f"valid_fraction must be strictly between 0 and 1, got {valid_fraction}"
        )
    if max_examples is not None and int(max_examples) < 1:
        raise DataError(f"max_examples must be at least 1, got {max_examples}")

    if dataset.startswith(FOLDER_PREFIX):
        source = _folder_source(dataset[len(FOLDER_PREFIX):])
    else:
        source = _tfds_source(dataset, data_dir)

    raw_train = source.raw_train
    num_total = _num_examples(raw_train)
    if max_examples is not None and num_total > max_examples:
        raw_train = raw_train.take(max_examples)
        num_total = int(max_examples)
    num_valid = int(round(num_total * valid_fraction))
    num_train = num_total - num_valid
    if num_train < 1 or num_valid < 1:
        raise DataError(
            f"dataset {dataset!r}: {num_total} train examples cannot be split "
            f"with valid_fraction={valid_fraction} into non-empty train "
            f"({num_train}) and valid ({num_valid}) parts"
        )

    decode = source.decode_fn
    train = _decoded(raw_train.take(num_train), decode)
    valid = _decoded(raw_train.skip(num_train), decode)
    test = None
    num_test = 0
    if source.raw_test is not None:
        raw_test = source.raw_test
        num_test = _num_examples(raw_test)
        if max_examples is not None and num_test > max_examples:
            raw_test = raw_test.take(max_examples)
            num_test = int(max_examples)
        test = _decoded(raw_test, decode)

    channels = source.image_shape[-1]
    if normalization is None:
        try:
            mean, std = channel_stats(train)
        except tf.errors.OpError as err:
            raise DataError(
                f"dataset {dataset!r}: cannot decode its images: "
                f"{_first_line(err.message)}"
            ) from err
    else:
        mean, std = _checked_normalization(normalization, channels, dataset)

    info = DatasetInfo(
        name=dataset,
        image_shape=source.image_shape,
        class_names=source.class_names,
        num_train=num_train,
        num_valid=num_valid,
        num_test=num_test,
        mean=mean,
        std=std,
    )
    return Splits(train=train, valid=valid, test=test, info=info)


def train_batches(ds: tf.data.Dataset, batch_size: int, *, seed: int) -> tf.data.Dataset:
    """Endless stream of shuffled training batches.

    The whole dataset is held in the shuffle buffer (a full shuffle), reshuffled
    on every epoch, repeated forever and batched with incomplete batches
    dropped.

    Args:
        ds: Unbatched, finite dataset (for example ``Splits.train``).
        batch_size: Examples per batch.
        seed: Shuffle seed; the same seed gives the same batches.

    Returns:
        An infinite, prefetched dataset of batches.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    buffer_size = _num_examples(ds)
    return (
        ds.shuffle(buffer_size, seed=seed, reshuffle_each_iteration=True)
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


def channel_stats(ds: tf.data.Dataset) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel pixel mean and (population) standard deviation.

    Makes one pass over the dataset in large batches; sums are accumulated in
    float64.

    Args:
        ds: Unbatched dataset of ``uint8`` images ``[H, W, C]``, or of tuples
            whose first component is such an image.

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
        return (
            tf.reduce_sum(pixels, axis=0),
            tf.reduce_sum(tf.square(pixels), axis=0),
            tf.cast(tf.shape(pixels)[0], tf.float64),
        )

    batched = ds.batch(_STATS_BATCH_SIZE).map(
        batch_sums, num_parallel_calls=tf.data.AUTOTUNE
    )
    total = total_sq = None
    count = 0.0
    for s, sq, n in batched.as_numpy_iterator():
        total = s if total is None else total + s
        total_sq = sq if total_sq is None else total_sq + sq
        count += float(n)
    if total is None or count == 0:
        raise DataError("cannot compute channel statistics of an empty dataset")
    mean = total / count
    var = np.maximum(total_sq / count - mean**2, 0.0)
    std = np.sqrt(var)
    return tuple(float(m) for m in mean), tuple(float(s) for s in std)


def check_batch_size(info: DatasetInfo, batch_size: int) -> None:
    """Checks that the train and valid parts hold at least one full batch.

    Args:
        info: The dataset's info.
        batch_size: The batch size to be used for training and validation.

    Raises:
        DataError: If ``batch_size`` is not positive or larger than the
            training or validation part.
    """
    if batch_size < 1:
        raise DataError(f"batch size must be positive, got {batch_size}")
    if info.num_train < batch_size or info.num_valid < batch_size:
        raise DataError(
            f"dataset {info.name!r} is too small for batch size {batch_size}: "
            f"{info.num_train} train and {info.num_valid} valid examples "
            "(use a smaller batch size, a different valid_fraction or more data)"
        )


def unpack_archive(archive_path: str | os.PathLike[str], cache_dir: str | os.PathLike[str]) -> pathlib.Path:
    """Unpacks an archive once into ``cache_dir``, atomically.

    The archive ``<name>.tar.gz`` (or ``.tgz``, ``.tar``, ``.tar.bz2``,
    ``.tar.xz``, ``.zip``) is unpacked to ``cache_dir/<name>``. If that folder
    already exists it is returned as is. Otherwise the archive is extracted
    into a temporary folder inside ``cache_dir`` which is then renamed, so a
    half-extracted folder is never visible under the final name (a concurrent
    process that wins the race is fine: its copy is used).

    Args:
        archive_path: The archive file.
        cache_dir: Folder that holds unpacked archives; created if missing.

    Returns:
        The folder holding the archive's contents.

    Raises:
        DataError: If the archive does not exist or cannot be read.
    """
    archive = pathlib.Path(archive_path).expanduser()
    name = archive.name
    for suffix in _ARCHIVE_SUFFIXES:
        if name.lower().endswith(suffix):
            name = name[: -len(suffix)]
            break
    else:
        raise DataError(
            f"unsupported archive type: {archive} (expected one of "
            f"{', '.join(_ARCHIVE_SUFFIXES)})"
        )
    cache = pathlib.Path(cache_dir).expanduser()
    target = cache / name
    if target.is_dir():
        return target
    if not archive.is_file():
        raise DataError(f"archive not found: {archive}")
    cache.mkdir(parents=True, exist_ok=True)
    tmp = pathlib.Path(tempfile.mkdtemp(prefix=f".{name}.partial-", dir=cache))
    try:
        os.chmod(tmp, 0o755)  # mkdtemp makes it private; the cache is not.
        try:
            if archive.name.lower().endswith(".zip"):
                with zipfile.ZipFile(archive) as zf:
                    zf.extractall(tmp)
            else:
                with tarfile.open(archive) as tf_archive:
                    tf_archive.extractall(tmp, filter="data")
        except (tarfile.TarError, zipfile.BadZipFile, EOFError, OSError) as err:
            raise DataError(
                f"cannot unpack archive {archive}: {_first_line(str(err))}"
            ) from err
        try:
            os.rename(tmp, target)
        except OSError as err:
            if not target.is_dir():  # Not a lost race: a real failure.
                raise DataError(
                    f"cannot unpack archive {archive} to {target}: {err.strerror}"
                ) from err
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return target


# --------------------------------------------------------------------------
# Sources
# --------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _Source:
    """Undecoded splits of a dataset and how to decode them.

    ``raw_*`` yield ``(encoded, label)`` pairs in the source's order;
    ``decode_fn`` maps ``encoded`` to a ``uint8`` image of ``image_shape``.
    """

    raw_train: tf.data.Dataset
    raw_test: tf.data.Dataset | None
    decode_fn: Any
    image_shape: tuple[int, int, int]
    class_names: tuple[str, ...]


def _folder_source(folder: str) -> _Source:
    """Builds the source for ``folder:<dir>``."""
    if not folder.strip():
        raise DataError(
            f"empty folder in dataset spec '{FOLDER_PREFIX}'; use "
            f"'{FOLDER_PREFIX}<dir>' with <dir>/train/<class>/<image>"
        )
    root = pathlib.Path(folder).expanduser()
    if not root.is_dir():
        raise DataError(f"dataset folder does not exist or is not a folder: {root}")
    if not (root / "train").is_dir():
        raise DataError(
            f"dataset folder {root} has no 'train' subfolder "
            "(expected <dir>/train/<class>/<image>)"
        )
    builder = tfds.folder_dataset.ImageFolder(str(root))
    splits = builder.info.splits
    if "train" not in splits or splits["train"].num_examples == 0:
        raise DataError(
            f"no images in {root / 'train'} (expected "
            f"{root / 'train'}/<class>/<image> with extension "
            f"{', '.join(_IMAGE_EXTENSIONS)})"
        )
    skip = {"image": tfds.decode.SkipDecoding()}

    def raw(split: str) -> tf.data.Dataset:
        ds = builder.as_dataset(split=split, decoders=skip, shuffle_files=False)
        return ds.map(lambda ex: (ex["image"], tf.cast(ex["label"], tf.int64)))

    raw_train = raw("train")
    has_test = "test" in splits and splits["test"].num_examples > 0
    raw_test = raw("test") if has_test else None

    first = next(iter(builder.as_dataset(split="train", decoders=skip).take(1)))
    first_path = first["image/filename"].numpy().decode("utf-8", "replace")
    try:
        first_image = tf.io.decode_image(first["image"], expand_animations=False)
    except tf.errors.OpError as err:
        raise DataError(
            f"cannot decode image {first_path}: {_first_line(err.message)}"
        ) from err
    height, width, channels = (int(d) for d in first_image.shape)
    if channels not in (1, 3, 4):
        raise DataError(
            f"unsupported channel count {channels} in {first_path} "
            "(images must be grayscale, RGB or RGBA)"
        )
    shape = (height, width, channels)

    def decode(encoded: tf.Tensor) -> tf.Tensor:
        image = tf.io.decode_image(encoded, channels=channels, expand_animations=False)
        return _fit_to_shape(image, shape)

    return _Source(
        raw_train=raw_train,
        raw_test=raw_test,
        decode_fn=decode,
        image_shape=shape,
        class_names=tuple(builder.info.features["label"].names),
    )


def _tfds_source(name: str, data_dir: str | None) -> _Source:
    """Builds the source for a registered TFDS dataset."""
    folder_hint = f"use --dataset={FOLDER_PREFIX}<dir> for a local image folder"
    try:
        builder = tfds.builder(name, data_dir=data_dir)
    except tfds.core.DatasetNotFoundError as err:
        raise DataError(
            f"unknown dataset {name!r}: not a registered TFDS dataset; "
            f"{folder_hint}"
        ) from err
    except Exception as err:  # noqa: BLE001 - bad name, config, version, ...
        raise DataError(
            f"cannot open TFDS dataset {name!r}: "
            f"{type(err).__name__}: {_first_line(str(err))}; {folder_hint}"
        ) from err
    features = builder.info.features
    if not (
        "image" in features
        and "label" in features
        and isinstance(features["image"], tfds.features.Image)
        and isinstance(features["label"], tfds.features.ClassLabel)
    ):
        raise DataError(
            f"TFDS dataset {name!r} is not an image classification dataset "
            "(needs an 'image' Image feature and a 'label' ClassLabel feature)"
        )
    image_feature = features["image"]
    if np.dtype(image_feature.np_dtype) != np.uint8:
        raise DataError(
            f"TFDS dataset {name!r} has {np.dtype(image_feature.np_dtype)} "
            "images; only uint8 images are supported"
        )
    skip = {"image": tfds.decode.SkipDecoding()}

    def read(split: str) -> tf.data.Dataset:
        ds = builder.as_dataset(split=split, decoders=skip, shuffle_files=False)
        return ds.map(lambda ex: (ex["image"], tf.cast(ex["label"], tf.int64)))

    try:
        raw_train = read("train")
    except AssertionError:  # TFDS raises this when the data is not prepared.
        _download_and_prepare(builder, name, folder_hint)
        raw_train = read("train")

    split_names = set(builder.info.splits.keys())
    if split_names and "train" not in split_names:
        raise DataError(f"TFDS dataset {name!r} has no 'train' split")
    raw_test = None
    if not split_names or "test" in split_names:
        try:
            raw_test = read("test")
        except (KeyError, ValueError):
            raw_test = None

    static_shape = tuple(image_feature.shape)
    if all(d is not None for d in static_shape):
        shape = tuple(int(d) for d in static_shape)
    else:
        first_encoded = next(iter(raw_train.take(1)))[0]
        first = image_feature.decode_example(first_encoded)
        shape = tuple(int(d) for d in first.shape)
    if len(shape) != 3:
        raise DataError(f"TFDS dataset {name!r} has images of rank {len(shape)}, not 3")

    def decode(encoded: tf.Tensor) -> tf.Tensor:
        return _fit_to_shape(image_feature.decode_example(encoded), shape)

    return _Source(
        raw_train=raw_train,
        raw_test=raw_test,
        decode_fn=decode,
        image_shape=shape,  # type: ignore[arg-type]
        class_names=tuple(features["label"].names),
    )


def _download_and_prepare(builder: Any, name: str, folder_hint: str) -> None:
    """Downloads and prepares a TFDS dataset, failing fast when offline.

    TFDS retries an unreachable host for minutes (measured: about 200 s for
    ``cifar10`` when DNS fails), so the download hosts are first probed with a
    short TCP connect; if one cannot be reached the download is not started.
    """
    urls = list((builder.url_infos or {}).keys())
    if not urls and builder.info.homepage:
        urls = [builder.info.homepage]  # Best available connectivity probe.
    unreachable = _unreachable_endpoints(_endpoints(urls), _REACHABILITY_TIMEOUT_S)
    if unreachable:
        hosts = ", ".join(f"{h}:{p}" for h, p in unreachable)
        raise DataError(
            f"TFDS dataset {name!r} is not prepared in {builder.data_dir_root} "
            f"and its download failed: cannot reach {hosts} (offline?); "
            f"{folder_hint}"
        )
    try:
        builder.download_and_prepare()
    except Exception as err:  # noqa: BLE001 - any failure means "cannot use it".
        raise DataError(
            f"TFDS dataset {name!r}: download failed: "
            f"{type(err).__name__}: {_first_line(str(err))}; {folder_hint}"
        ) from err


def _endpoints(urls: Iterable[str]) -> list[tuple[str, int]]:
    """``(host, port)`` to connect to for each URL, honouring proxy settings."""
    proxies = urllib.request.getproxies()
    result: list[tuple[str, int]] = []
    for url in urls:
        parsed = urllib.parse.urlsplit(url)
        if not parsed.hostname:
            continue
        proxy = proxies.get(parsed.scheme)
        if proxy and not urllib.request.proxy_bypass(parsed.hostname):
            proxied = urllib.parse.urlsplit(proxy if "//" in proxy else f"//{proxy}")
            if proxied.hostname:
                parsed = proxied
        default_port = 443 if parsed.scheme == "https" else 80
        endpoint = (parsed.hostname, parsed.port or default_port)
        if endpoint not in result:
            result.append(endpoint)
    return result


def _unreachable_endpoints(
    endpoints: Sequence[tuple[str, int]], timeout: float
) -> list[tuple[str, int]]:
    """Endpoints that do not accept a TCP connection within ``timeout`` seconds.

    Name resolution has no timeout of its own, so each probe runs in a daemon
    thread that is abandoned if it does not finish in time.
    """
    reachable: dict[tuple[str, int], bool] = {}

    def probe(endpoint: tuple[str, int]) -> None:
        try:
            with socket.create_connection(endpoint, timeout=timeout):
                reachable[endpoint] = True
        except OSError:
            reachable[endpoint] = False

    threads = [
        threading.Thread(target=probe, args=(e,), daemon=True) for e in endpoints
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout + 1.0)
    return [e for e in endpoints if not reachable.get(e, False)]


# --------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------


def _decoded(raw: tf.data.Dataset, decode: Any) -> tf.data.Dataset:
    """Decodes ``(encoded, label)`` pairs in order and caches them in memory."""
    return raw.map(
        lambda encoded, label: (decode(encoded), label),
        num_parallel_calls=tf.data.AUTOTUNE,
        deterministic=True,
    ).cache()


def _fit_to_shape(image: tf.Tensor, shape: tuple[int, int, int]) -> tf.Tensor:
    """Resizes ``image`` to ``shape[:2]`` if needed and returns it as uint8.

    Images of another size are resized bilinearly with ``tf.image.resize``;
    the result is rounded, clipped to ``[0, 255]`` and cast back to uint8.
    Images of the right size pass through unchanged.
    """
    height, width, channels = shape
    size = tf.shape(image)

    def resize() -> tf.Tensor:
        resized = tf.image.resize(image, (height, width))
        return tf.cast(tf.clip_by_value(tf.round(resized), 0.0, 255.0), tf.uint8)

    same = tf.logical_and(tf.equal(size[0], height), tf.equal(size[1], width))
    image = tf.cond(same, lambda: tf.cast(image, tf.uint8), resize)
    return tf.ensure_shape(image, (height, width, channels))


def _num_examples(ds: tf.data.Dataset) -> int:
    """Number of elements of a finite dataset (counted if not known)."""
    cardinality = int(ds.cardinality())
    if cardinality == tf.data.INFINITE_CARDINALITY:
        raise ValueError("expected a finite dataset, got an infinite one")
    if cardinality >= 0:
        return cardinality
    return int(ds.reduce(np.int64(0), lambda count, _: count + 1))


def _checked_normalization(
    normalization: tuple[Sequence[float], Sequence[float]],
    channels: int,
    dataset: str,
) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Validates caller-given ``(mean, std)`` against the channel count."""
    try:
        mean_in, std_in = normalization
        mean = tuple(float(m) for m in mean_in)
        std = tuple(float(s) for s in std_in)
    except (TypeError, ValueError) as err:
        raise DataError(
            f"normalization must be (mean, std) sequences of floats, got {normalization!r}"
        ) from err
    if len(mean) != channels or len(std) != channels:
        raise DataError(
            f"dataset {dataset!r} has {channels} channels but normalization has "
            f"{len(mean)} means and {len(std)} stds"
        )
    if any(not s > 0 for s in std):
        raise DataError(f"normalization std must be positive, got {std}")
    return mean, std


def _first_line(text: str) -> str:
    """First non-empty line of ``text`` (for one-line error messages)."""
    for line in str(text).splitlines():
        if line.strip():
            return line.strip()
    return ""
