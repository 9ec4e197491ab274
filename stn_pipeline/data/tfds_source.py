"""Registered TFDS image-classification datasets (``image`` and ``label`` features).

A dataset that is not prepared yet is downloaded and prepared; when the download host cannot be
reached this fails within seconds with a :class:`DataError` instead of TFDS's minutes of retries.
"""

from __future__ import annotations

import socket
import threading
import urllib.parse
import urllib.request
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

from stn_pipeline.data.errors import DataError, first_line
from stn_pipeline.data.folder import FOLDER_PREFIX
from stn_pipeline.data.source import Source, fit_to_shape

__all__ = ["tfds_source", "endpoints", "unreachable_endpoints"]

_REACHABILITY_TIMEOUT_S = 3.0
_FOLDER_HINT = f"use --dataset={FOLDER_PREFIX}<dir> for a local image folder"


def _open_builder(name: str, data_dir: str | None) -> Any:
    """The TFDS builder of ``name``, checked to be an image classification dataset of uint8."""
    try:
        builder = tfds.builder(name, data_dir=data_dir)
    except tfds.core.DatasetNotFoundError as err:
        raise DataError(f"unknown dataset {name!r}: not a registered TFDS dataset; "
                        f"{_FOLDER_HINT}") from err
    except Exception as err:  # noqa: BLE001 - bad name, config, version, ...
        raise DataError(f"cannot open TFDS dataset {name!r}: "
                        f"{type(err).__name__}: {first_line(err)}; {_FOLDER_HINT}") from err
    features = builder.info.features
    if not ("image" in features and "label" in features
            and isinstance(features["image"], tfds.features.Image)
            and isinstance(features["label"], tfds.features.ClassLabel)):
        raise DataError(f"TFDS dataset {name!r} is not an image classification dataset "
                        "(needs an 'image' Image feature and a 'label' ClassLabel feature)")
    dtype = np.dtype(features["image"].np_dtype)
    if dtype != np.uint8:
        raise DataError(f"TFDS dataset {name!r} has {dtype} images; only uint8 images are "
                        "supported")
    return builder


def tfds_source(name: str, data_dir: str | None) -> Source:
    """The source of a registered TFDS dataset, downloaded and prepared if needed."""
    builder = _open_builder(name, data_dir)
    skip = {"image": tfds.decode.SkipDecoding()}

    def read(split: str) -> tf.data.Dataset:
        ds = builder.as_dataset(split=split, decoders=skip, shuffle_files=False)
        return ds.map(lambda ex: (ex["image"], tf.cast(ex["label"], tf.int64), tf.constant("")))

    try:
        raw_train = read("train")
    except AssertionError:  # TFDS raises this when the data is not prepared.
        _download_and_prepare(builder, name)
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

    image_feature = builder.info.features["image"]
    shape = tuple(image_feature.shape)
    if any(d is None for d in shape):  # Variable-size images: the first one fixes the shape.
        shape = tuple(image_feature.decode_example(next(iter(raw_train.take(1)))[0]).shape)
    if len(shape) != 3:
        raise DataError(f"TFDS dataset {name!r} has images of rank {len(shape)}, not 3")
    shape = tuple(int(d) for d in shape)

    def decode(encoded: tf.Tensor) -> tf.Tensor:
        return fit_to_shape(image_feature.decode_example(encoded), shape)

    return Source(name=name, raw_train=raw_train, raw_test=raw_test, decode_fn=decode,
                  image_shape=shape, class_names=tuple(builder.info.features["label"].names))


def _download_and_prepare(builder: Any, name: str) -> None:
    """Downloads and prepares a TFDS dataset, failing fast when offline.

    TFDS retries an unreachable host for minutes (measured: about 200 s for ``cifar10`` when DNS
    fails), so the download hosts are first probed with a short TCP connect; if one cannot be
    reached the download is not started.
    """
    urls = list((builder.url_infos or {}).keys())
    if not urls and builder.info.homepage:
        urls = [builder.info.homepage]  # Best available connectivity probe.
    unreachable = unreachable_endpoints(endpoints(urls), _REACHABILITY_TIMEOUT_S)
    if unreachable:
        hosts = ", ".join(f"{h}:{p}" for h, p in unreachable)
        raise DataError(f"TFDS dataset {name!r} is not prepared in {builder.data_dir_root} "
                        f"and its download failed: cannot reach {hosts} (offline?); "
                        f"{_FOLDER_HINT}")
    try:
        builder.download_and_prepare()
    except Exception as err:  # noqa: BLE001 - any failure means "cannot use it".
        raise DataError(f"TFDS dataset {name!r}: download failed: "
                        f"{type(err).__name__}: {first_line(err)}; {_FOLDER_HINT}") from err


def endpoints(urls: Iterable[str]) -> list[tuple[str, int]]:
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


def unreachable_endpoints(targets: Sequence[tuple[str, int]], timeout: float,
                          ) -> list[tuple[str, int]]:
    """Endpoints that do not accept a TCP connection within ``timeout`` seconds.

    Name resolution has no timeout of its own, so each probe runs in a daemon thread that is
    abandoned if it does not finish in time.
    """
    reachable: dict[tuple[str, int], bool] = {}

    def probe(endpoint: tuple[str, int]) -> None:
        try:
            with socket.create_connection(endpoint, timeout=timeout):
                reachable[endpoint] = True
        except OSError:
            reachable[endpoint] = False

    threads = [threading.Thread(target=probe, args=(e,), daemon=True) for e in targets]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout + 1.0)
    return [e for e in targets if not reachable.get(e, False)]
