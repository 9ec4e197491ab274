"""Tests for stn_pipeline.data."""

from __future__ import annotations

import collections
import pathlib
import time

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds

from stn_pipeline import data
from stn_pipeline.data import tfds_source
from stn_pipeline.models import CifarCnn, cifar_cnn_hparams

CIFAR_CLASSES = (
    "airplane", "automobile", "bird", "cat", "deer",
    "dog", "frog", "horse", "ship", "truck",
)
# Train mean measured on the shared copy (all 50,000 train images), README.
CIFAR_README_MEAN = (125.27, 122.93, 113.86)


def _examples(ds: tf.data.Dataset) -> list[tuple[np.ndarray, int]]:
    return [(image, int(label)) for image, label in ds.as_numpy_iterator()]


def _keys(examples) -> list[bytes]:
    return [image.tobytes() for image, _ in examples]


def _folder(folder) -> str:
    return f"{data.FOLDER_PREFIX}{folder.root}"


def _train_order(root: pathlib.Path, split: str = "train") -> list[pathlib.Path]:
    builder = tfds.folder_dataset.ImageFolder(str(root))
    skip = {"image": tfds.decode.SkipDecoding()}
    ordered = builder.as_dataset(split=split, decoders=skip).as_numpy_iterator()
    return [pathlib.Path(ex["image/filename"].decode()) for ex in ordered]



# --------------------------------------------------------------------------
# Tiny generated image folders
# --------------------------------------------------------------------------


def test_folder_rgb_specs_sizes_and_class_names(tiny_image_folder):
    splits = data.load_splits(_folder(tiny_image_folder), valid_fraction=0.25)

    image_spec, label_spec = splits.train.element_spec
    assert image_spec.dtype == tf.uint8 and image_spec.shape == (40, 24, 3)
    assert label_spec.dtype == tf.int64 and label_spec.shape == ()
    assert splits.valid.element_spec == splits.train.element_spec
    assert splits.test.element_spec == splits.train.element_spec

    info = splits.info
    assert info.image_shape == (40, 24, 3)
    assert info.class_names == ("cat", "dog", "frog")
    assert info.num_classes == 3
    assert (info.num_train, info.num_valid, info.num_test) == (27, 9, 12)
    assert len(_examples(splits.train)) == 27
    assert len(_examples(splits.valid)) == 9
    assert len(_examples(splits.test)) == 12


def test_folder_default_valid_fraction_sizes_add_up(tiny_image_folder):
    info = data.load_splits(_folder(tiny_image_folder)).info
    assert info.num_train + info.num_valid == 36
    assert info.num_valid == 7  # round(36 * 0.2)


def test_folder_labels_pixels_and_disjoint_parts(tiny_image_folder):
    splits = data.load_splits(_folder(tiny_image_folder), valid_fraction=0.25)
    written = {
        split: {image.tobytes(): label for image, label in examples}
        for split, examples in tiny_image_folder.examples.items()
    }
    train, valid, test = (
        _examples(splits.train), _examples(splits.valid), _examples(splits.test)
    )

    for image, label in train + valid:
        assert written["train"][image.tobytes()] == label
    for image, label in test:
        assert written["test"][image.tobytes()] == label
    assert not set(_keys(train)) & set(_keys(valid))
    assert sorted(_keys(train) + _keys(valid)) == sorted(written["train"])
    assert sorted(_keys(test)) == sorted(written["test"])


def test_split_is_contiguous_in_image_folder_order(tiny_image_folder):
    splits = data.load_splits(_folder(tiny_image_folder), valid_fraction=0.25)
    builder = tfds.folder_dataset.ImageFolder(str(tiny_image_folder.root))
    source = [
        ex["image"].tobytes()
        for ex in builder.as_dataset(split="train").as_numpy_iterator()
    ]
    assert _keys(_examples(splits.train)) == source[:27]
    assert _keys(_examples(splits.valid)) == source[27:]


def test_load_splits_is_deterministic(tiny_image_folder):
    first = data.load_splits(_folder(tiny_image_folder))
    second = data.load_splits(_folder(tiny_image_folder))
    for a, b in [(first.train, second.train), (first.valid, second.valid),
                 (first.test, second.test)]:
        ea, eb = _examples(a), _examples(b)
        assert _keys(ea) == _keys(eb)
        assert [l for _, l in ea] == [l for _, l in eb]
    assert first.info == second.info


def test_max_examples_keeps_first_examples(tiny_image_folder):
    full = data.load_splits(_folder(tiny_image_folder), valid_fraction=0.25)
    part = data.load_splits(_folder(tiny_image_folder), valid_fraction=0.25, max_examples=10)
    assert (part.info.num_train, part.info.num_valid, part.info.num_test) == (8, 2, 10)
    full_order = _keys(_examples(full.train)) + _keys(_examples(full.valid))
    assert _keys(_examples(part.train)) + _keys(_examples(part.valid)) == full_order[:10]
    assert _keys(_examples(part.test)) == _keys(_examples(full.test))[:10]


def test_folder_grayscale(image_folder_factory):
    folder = image_folder_factory("tiny_gray", shape=(28, 28, 1), seed=1)
    splits = data.load_splits(_folder(folder), valid_fraction=0.25)
    assert splits.train.element_spec[0].shape == (28, 28, 1)
    assert splits.info.image_shape == (28, 28, 1)
    assert len(splits.info.mean) == 1 and len(splits.info.std) == 1
    written = {image.tobytes(): label for image, label in folder.examples["train"]}
    loaded = _examples(splits.train) + _examples(splits.valid)
    assert sorted(_keys(loaded)) == sorted(written)
    assert all(written[image.tobytes()] == label for image, label in loaded)


def test_folder_without_test_split(image_folder_factory):
    folder = image_folder_factory("no_test", shape=(8, 8, 3), per_class={"train": 5})
    splits = data.load_splits(_folder(folder))
    assert splits.test is None
    assert splits.info.num_test == 0
    assert splits.info.num_train + splits.info.num_valid == 15


def _expected_fit(path: pathlib.Path, shape) -> np.ndarray:
    """What the loader should produce for one file: channels, then size."""
    image = tf.io.decode_png(path.read_bytes(), channels=shape[2])
    if tuple(image.shape[:2]) != tuple(shape[:2]):
        image = tf.image.resize(image, shape[:2])
        image = tf.cast(tf.clip_by_value(tf.round(image), 0, 255), tf.uint8)
    return image.numpy()


def test_folder_mixed_sizes_and_channels_are_fitted(image_folder_factory):
    variants = [(32, 32, 3), (20, 36, 3), (32, 32, 1), (45, 17, 3), (13, 50, 1)]
    folder = image_folder_factory(
        "tiny_mixed", seed=2, sizes=lambda split, label, k: variants[k % len(variants)]
    )
    # The first train image (in ImageFolder order) sets the shape: make it RGB 32x32.
    first = _train_order(folder.root)[0]
    first.write_bytes(
        tf.io.encode_png(np.full((32, 32, 3), 7, dtype=np.uint8)).numpy()
    )
    splits = data.load_splits(_folder(folder), valid_fraction=0.25)
    assert splits.info.image_shape == (32, 32, 3)
    assert splits.train.element_spec[0].shape == (32, 32, 3)

    for split, parts in [("train", [splits.train, splits.valid]), ("test", [splits.test])]:
        loaded = [e for ds in parts for e in _examples(ds)]
        assert all(image.shape == (32, 32, 3) and image.dtype == np.uint8
                   for image, _ in loaded)
        expected = [
            _expected_fit(path, (32, 32, 3)).tobytes()
            for path in sorted((folder.root / split).glob("*/*.png"))
        ]
        assert collections.Counter(_keys(loaded)) == collections.Counter(expected)


# --------------------------------------------------------------------------
# Batching
# --------------------------------------------------------------------------


def _take_batches(ds, count):
    return [(x, y) for x, y in ds.take(count).as_numpy_iterator()]


def test_train_batches_deterministic_under_seed(tiny_image_folder):
    splits = data.load_splits(_folder(tiny_image_folder), valid_fraction=0.25)
    a = _take_batches(data.train_batches(splits.train, 8, seed=3), 7)
    b = _take_batches(data.train_batches(splits.train, 8, seed=3), 7)
    c = _take_batches(data.train_batches(splits.train, 8, seed=4), 7)

    assert len(a) == 7  # Infinite: 7 batches of 8 > 27 examples.
    for (xa, ya), (xb, yb) in zip(a, b):
        np.testing.assert_array_equal(xa, xb)
        np.testing.assert_array_equal(ya, yb)
    assert any(not np.array_equal(xa, xc) for (xa, _), (xc, _) in zip(a, c))
    for x, y in a:
        assert x.dtype == np.uint8 and x.shape == (8, 40, 24, 3)
        assert y.dtype == np.int64 and y.shape == (8,)


def test_train_batches_shuffle_is_real_and_covers_epoch(tiny_image_folder):
    splits = data.load_splits(_folder(tiny_image_folder), valid_fraction=0.25)
    in_order = _keys(_examples(splits.train))
    batches = _take_batches(data.train_batches(splits.train, 8, seed=0), 3)
    first_batch = [image.tobytes() for image in batches[0][0]]
    assert first_batch != in_order[:8]
    # The full-size buffer draws from the whole epoch: a buffer of only 8 could
    # not put any of the examples 15..26 into the first batch of 8.
    positions = [in_order.index(key) for key in first_batch]
    assert max(positions) >= 15, positions
    # The first 24 examples of an epoch are distinct examples of the dataset.
    drawn = [image.tobytes() for x, _ in batches for image in x]
    assert len(set(drawn)) == 24 and set(drawn) <= set(in_order)


def test_eval_batches_in_order_with_remainder(tiny_image_folder):
    splits = data.load_splits(_folder(tiny_image_folder), valid_fraction=0.25)
    batches = list(data.eval_batches(splits.train, 8).as_numpy_iterator())
    assert [len(y) for _, y in batches] == [8, 8, 8, 3]
    flat = [image.tobytes() for x, _ in batches for image in x]
    assert flat == _keys(_examples(splits.train))
    assert batches[0][0].dtype == np.uint8


# --------------------------------------------------------------------------
# Statistics
# --------------------------------------------------------------------------


def test_channel_stats_matches_numpy(tiny_image_folder):
    splits = data.load_splits(_folder(tiny_image_folder), valid_fraction=0.25)
    images = np.stack([image for image, _ in _examples(splits.train)]).astype(np.float64)
    mean, std = data.channel_stats(splits.train)
    np.testing.assert_allclose(mean, images.mean(axis=(0, 1, 2)), rtol=1e-10)
    np.testing.assert_allclose(std, images.std(axis=(0, 1, 2)), rtol=1e-10)
    # load_splits uses the training part only.
    np.testing.assert_allclose(splits.info.mean, mean, rtol=1e-10)
    np.testing.assert_allclose(splits.info.std, std, rtol=1e-10)


def test_channel_stats_images_only_across_batches():
    rng = np.random.default_rng(5)
    images = rng.integers(0, 256, size=(2500, 4, 5, 2), dtype=np.uint8)
    images[:, :, :, 1] //= 4  # Make channels differ.
    mean, std = data.channel_stats(tf.data.Dataset.from_tensor_slices(images))
    as_float = images.astype(np.float64)
    np.testing.assert_allclose(mean, as_float.mean(axis=(0, 1, 2)), rtol=1e-10)
    np.testing.assert_allclose(std, as_float.std(axis=(0, 1, 2)), rtol=1e-10)
    assert len(mean) == 2


def test_channel_stats_empty_dataset():
    empty = tf.data.Dataset.from_tensor_slices(np.zeros((0, 2, 2, 3), np.uint8))
    with pytest.raises(data.DataError, match="empty"):
        data.channel_stats(empty)


def test_normalization_given_is_used(tiny_image_folder):
    splits = data.load_splits(
        _folder(tiny_image_folder), normalization=([1, 2, 3], [4, 5, 6])
    )
    assert splits.info.mean == (1.0, 2.0, 3.0)
    assert splits.info.std == (4.0, 5.0, 6.0)


def test_normalization_wrong_length(tiny_image_folder):
    with pytest.raises(data.DataError, match="3 channels"):
        data.load_splits(_folder(tiny_image_folder), normalization=([1], [2]))


# --------------------------------------------------------------------------
# Errors
# --------------------------------------------------------------------------


def test_missing_folder(tmp_path):
    missing = tmp_path / "nowhere"
    with pytest.raises(data.DataError, match="does not exist") as err:
        data.load_splits(f"folder:{missing}")
    assert str(missing) in str(err.value)


def test_folder_without_train(tmp_path):
    (tmp_path / "test" / "cat").mkdir(parents=True)
    (tmp_path / "test" / "cat" / "a.png").write_bytes(
        tf.io.encode_png(np.zeros((4, 4, 3), np.uint8)).numpy()
    )
    with pytest.raises(data.DataError, match="no 'train' subfolder") as err:
        data.load_splits(f"folder:{tmp_path}")
    assert str(tmp_path) in str(err.value)


def test_train_without_images(tmp_path):
    (tmp_path / "train" / "cat").mkdir(parents=True)
    (tmp_path / "train" / "cat" / "notes.txt").write_text("not an image")
    with pytest.raises(data.DataError, match="no images in"):
        data.load_splits(f"folder:{tmp_path}")


def test_empty_folder_spec():
    with pytest.raises(data.DataError, match="empty folder"):
        data.load_splits("folder:")


def test_too_few_examples_to_split(image_folder_factory):
    folder = image_folder_factory(
        "single", shape=(4, 4, 3), classes=("a",), per_class={"train": 1}
    )
    with pytest.raises(data.DataError, match="cannot be split"):
        data.load_splits(_folder(folder))


def _truncate(path: pathlib.Path) -> None:
    path.write_bytes(path.read_bytes()[: len(path.read_bytes()) // 2])


def _as_text_jpg(path: pathlib.Path) -> None:
    path.unlink()
    path.with_suffix(".jpg").write_text("this is a text file, not a JPEG")


# (split folder, position in ImageFolder's order, damage): the train part, the valid part (the
# end of the train split) and the test split are all decoded before training starts.
@pytest.mark.parametrize("split,position,damage", [
    ("train", 1, _truncate),
    ("train", -1, _truncate),
    ("test", 2, _as_text_jpg),
    ("train", 3, _as_text_jpg),
])
def test_undecodable_image_is_named(image_folder_factory, split, position, damage):
    folder = image_folder_factory(f"bad_{split}_{position}_{damage.__name__}", shape=(6, 6, 3),
                                  per_class={"train": 4, "test": 2})
    bad = _train_order(folder.root, split)[position]
    damage(bad)
    named = bad if damage is _truncate else bad.with_suffix(".jpg")
    with pytest.raises(data.DataError, match="cannot decode image") as err:
        data.load_splits(_folder(folder), valid_fraction=0.25)
    message = str(err.value)
    assert str(named) in message
    assert "\n" not in message and "function_node" not in message and "[Op:" not in message


def test_rgba_with_opaque_alpha_normalises_finitely(image_folder_factory, caplog):
    folder = image_folder_factory("rgba_opaque", shape=(20, 20, 4), classes=("a", "b"),
                                  per_class={"train": 4}, constant_channels={3: 255})
    splits = data.load_splits(_folder(folder), valid_fraction=0.25)
    images = np.stack([image for image, _ in _examples(splits.train)]).astype(np.float64)
    # Colour channels keep their measured statistics; the constant alpha gets the floor.
    np.testing.assert_allclose(splits.info.mean, images.mean(axis=(0, 1, 2)), rtol=1e-10)
    np.testing.assert_allclose(splits.info.std[:3], images[..., :3].std(axis=(0, 1, 2)),
                               rtol=1e-10)
    assert splits.info.mean[3] == 255.0 and splits.info.std[3] == data.STD_FLOOR == 1.0
    warnings = [r.getMessage() for r in caplog.records if "constant" in r.getMessage()]
    assert len(warnings) == 1 and "channel 3 (alpha)" in warnings[0]

    model = CifarCnn(splits.info.image_shape, 2, splits.info.mean, splits.info.std,
                     cifar_cnn_hparams())
    normalised = model.preprocess(tf.constant(images.astype(np.uint8))).numpy()
    assert np.isfinite(normalised).all()
    np.testing.assert_array_equal(normalised[..., 3], 0.0)


def test_unknown_tfds_name():
    with pytest.raises(data.DataError, match="unknown dataset 'no_such_dataset_xyz'") as err:
        data.load_splits("no_such_dataset_xyz")
    assert "folder:" in str(err.value)


@pytest.mark.parametrize("spec", ["cifar10:9.9.9", "cifar10/no_such_config", "a b c"])
def test_bad_tfds_spec(spec):
    with pytest.raises(data.DataError, match="cannot open TFDS dataset") as err:
        data.load_splits(spec)
    assert spec in str(err.value) and "\n" not in str(err.value)


@pytest.mark.parametrize("fraction", [0.0, 1.0, -0.5, 1.5])
def test_bad_valid_fraction(tiny_image_folder, fraction):
    with pytest.raises(data.DataError, match="valid_fraction"):
        data.load_splits(_folder(tiny_image_folder), valid_fraction=fraction)


def test_check_batch_size(tiny_image_folder):
    info = data.load_splits(_folder(tiny_image_folder), valid_fraction=0.25).info
    data.check_batch_size(info, 9)  # 27 train, 9 valid: fits.
    with pytest.raises(data.DataError, match="27 train and 9 valid"):
        data.check_batch_size(info, 10)
    with pytest.raises(data.DataError, match="positive"):
        data.check_batch_size(info, 0)


def test_error_messages_are_one_line(tmp_path):
    for spec in [f"folder:{tmp_path / 'x'}", "no_such_dataset_xyz", "folder:"]:
        with pytest.raises(data.DataError) as err:
            data.load_splits(spec)
        assert "\n" not in str(err.value)


# --------------------------------------------------------------------------
# TFDS registered datasets
# --------------------------------------------------------------------------


def test_tfds_cifar10_mocked(tmp_path):
    with tfds.testing.mock_data(num_examples=50):
        splits = data.load_splits("cifar10", data_dir=str(tmp_path), valid_fraction=0.2)
        image_spec, label_spec = splits.train.element_spec
        assert image_spec.shape == (32, 32, 3) and image_spec.dtype == tf.uint8
        assert label_spec.dtype == tf.int64
        info = splits.info
        assert info.image_shape == (32, 32, 3) and info.num_classes == 10
        assert (info.num_train, info.num_valid, info.num_test) == (40, 10, 50)
        train, valid = _examples(splits.train), _examples(splits.valid)
        assert len(train) == 40 and len(valid) == 10
        assert len(_examples(splits.test)) == 50
        assert all(0 <= label < 10 for _, label in train + valid)

        part = data.load_splits("cifar10", data_dir=str(tmp_path), max_examples=20)
        assert (part.info.num_train, part.info.num_valid, part.info.num_test) == (16, 4, 20)


def test_tfds_cifar10_offline_fails_fast(tmp_path):
    builder = tfds.builder("cifar10", data_dir=str(tmp_path))
    endpoints = tfds_source.endpoints(builder.url_infos)
    if not tfds_source.unreachable_endpoints(endpoints, 3.0):
        pytest.skip("the CIFAR-10 download host is reachable: this machine is online")
    start = time.monotonic()
    with pytest.raises(data.DataError) as err:
        data.load_splits("cifar10", data_dir=str(tmp_path / "tfds"))
    elapsed = time.monotonic() - start
    message = str(err.value)
    assert elapsed < 30, f"took {elapsed:.1f}s"
    assert "download failed" in message and "--dataset=folder:<dir>" in message
    assert "\n" not in message


# --------------------------------------------------------------------------
# The shared CIFAR-10 copy
# --------------------------------------------------------------------------


def test_cifar_folder_slice(cifar_folder):
    splits = data.load_splits(f"folder:{cifar_folder}", max_examples=2000)
    info = splits.info
    assert info.image_shape == (32, 32, 3)
    assert info.class_names == CIFAR_CLASSES
    assert (info.num_train, info.num_valid, info.num_test) == (1600, 400, 2000)
    assert splits.train.element_spec[0].shape == (32, 32, 3)
    # 1,600 images: within a few grey levels of the full train mean.
    np.testing.assert_allclose(info.mean, CIFAR_README_MEAN, atol=3.0)
    assert all(55 < s < 72 for s in info.std)
    labels = [label for _, label in _examples(splits.valid)]
    assert set(labels) == set(range(10))  # ImageFolder order mixes classes.


@pytest.mark.slow
def test_cifar_folder_full_sizes(cifar_folder):
    # Decodes the 40,000 training images once (for the statistics): ~5 s on 2 cores.
    info = data.load_splits(f"folder:{cifar_folder}").info
    assert (info.num_train, info.num_valid, info.num_test) == (40000, 10000, 10000)
    # 40,000 of the 50,000 train images: close to the README's full mean.
    np.testing.assert_allclose(info.mean, CIFAR_README_MEAN, atol=2.0)
    np.testing.assert_allclose(info.std, (62.53, 61.91, 66.46), atol=1.0)
