"""Shared pytest fixtures about data: tiny generated image folders and CIFAR-10."""

from __future__ import annotations

import dataclasses
import os
import pathlib
from collections.abc import Callable, Mapping, Sequence

import numpy as np
import pytest
import tensorflow as tf

from archives import unpack_archive

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
# The shared copy next to the repo; $STN_CIFAR_ARCHIVE names another (e.g. from a git worktree).
CIFAR_ARCHIVE = pathlib.Path(os.environ.get("STN_CIFAR_ARCHIVE") or
                             REPO_ROOT.parent / "shared/data/cifar10_jpg_q75.tar.gz")


@dataclasses.dataclass(frozen=True)
class GeneratedImageFolder:
    """An image folder written by ``image_folder_factory``.

    Attributes:
        root: The folder (``root/<split>/<class>/<nnnn>.png``).
        class_names: Class folder names, sorted.
        examples: ``split -> [(image uint8 [H, W, C], label)]`` as written.
    """

    root: pathlib.Path
    class_names: tuple[str, ...]
    examples: dict[str, list[tuple[np.ndarray, int]]]


MakeImageFolder = Callable[..., GeneratedImageFolder]


def _write_png(path: pathlib.Path, image: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(tf.io.encode_png(image).numpy())


@pytest.fixture(scope="session")
def image_folder_factory(tmp_path_factory: pytest.TempPathFactory) -> MakeImageFolder:
    """Returns ``make(name, *, shape=(H, W, C), ...)`` writing a PNG image folder.

    ``make`` accepts ``classes`` (names), ``per_class`` (``split -> count``),
    ``seed``, ``sizes`` (an optional function ``(split, class_index, k) ->
    (H, W, C)`` overriding ``shape`` per image) and ``constant_channels``
    (``channel -> value`` for channels every image holds constant, e.g.
    ``{3: 255}`` for the opaque alpha of RGBA PNGs). Every other channel is
    random noise, so images are distinct and can be matched by their pixels.
    """

    def make(
        name: str,
        *,
        shape: tuple[int, int, int] = (40, 24, 3),
        classes: Sequence[str] = ("cat", "dog", "frog"),
        per_class: dict[str, int] | None = None,
        seed: int = 0,
        sizes: Callable[[str, int, int], tuple[int, int, int]] | None = None,
        constant_channels: Mapping[int, int] | None = None,
    ) -> GeneratedImageFolder:
        per_class = {"train": 12, "test": 4} if per_class is None else per_class
        rng = np.random.default_rng(seed)
        root = tmp_path_factory.mktemp(name)
        class_names = tuple(sorted(classes))
        examples: dict[str, list[tuple[np.ndarray, int]]] = {}
        for split, count in per_class.items():
            examples[split] = []
            for label, cls in enumerate(class_names):
                for k in range(count):
                    image_shape = sizes(split, label, k) if sizes else shape
                    image = rng.integers(0, 256, size=image_shape, dtype=np.uint8)
                    for channel, value in (constant_channels or {}).items():
                        image[..., channel] = value
                    _write_png(root / split / cls / f"{k:04d}.png", image)
                    examples[split].append((image, label))
        return GeneratedImageFolder(root=root, class_names=class_names, examples=examples)

    return make


@pytest.fixture(scope="session")
def tiny_image_folder(image_folder_factory: MakeImageFolder) -> GeneratedImageFolder:
    """RGB 40x24 PNG folder: 3 classes, 12 train and 4 test images per class."""
    return image_folder_factory("tiny_rgb", shape=(40, 24, 3))


@pytest.fixture(scope="session")
def cifar_folder() -> pathlib.Path:
    """The shared CIFAR-10 JPEG copy, unpacked once into a cache outside the repo.

    The cache is ``$STN_DATA_CACHE`` or ``~/.cache/stn_pipeline``; the folder
    holds ``train/<class>/*.jpg`` and ``test/<class>/*.jpg``.
    """
    if not CIFAR_ARCHIVE.is_file():
        pytest.fail(f"shared CIFAR-10 archive missing: {CIFAR_ARCHIVE}")
    cache = os.environ.get("STN_DATA_CACHE") or os.path.expanduser("~/.cache/stn_pipeline")
    return unpack_archive(CIFAR_ARCHIVE, cache)
