"""Tests for stn_pipeline.augment (per-example, stateless, in-graph augmentations)."""

import numpy as np
import pytest
import tensorflow as tf

from stn_pipeline import augment

SEED = tf.constant([3, 7], tf.int32)
OTHER_SEED = tf.constant([4, 7], tf.int32)


def _images(batch=3, height=8, width=8, channels=3, seed=0):
    return np.random.default_rng(seed).uniform(size=(batch, height, width, channels)).astype(np.float32)


def _cutout(images, strength, seed):
    ones = tf.ones_like(tf.cast(strength, tf.float32))
    return augment.cutout(images, length=strength, holes=ones * 2.0, max_holes=2, seed=seed)


def _jitter(images, strength, seed):
    return augment.color_jitter(images, strength, strength, strength, strength, seed)


# name -> (op(images, strength, seed), identity strength, active strength)
OPS = {
    "brightness": (augment.adjust_brightness, 0.0, 0.5),
    "contrast": (augment.adjust_contrast, 0.0, 0.5),
    "saturation": (augment.adjust_saturation, 0.0, 0.5),
    "hue": (augment.adjust_hue, 0.0, 0.4),
    "color_jitter": (_jitter, 0.0, 0.4),
    "cutout": (_cutout, 0.0, 3.0),
    "input_dropout": (augment.input_dropout, 0.0, 0.3),
    "input_scale": (augment.input_scale, 0.0, 0.5),
    "pixel_drop": (augment.pixel_drop, 1.0, 0.5),
}
COLOUR_ONLY = {"saturation", "hue"}


def _strengths(value, batch=3):
    return tf.fill([batch], tf.constant(value, tf.float32))


@pytest.mark.parametrize("name", sorted(OPS))
def test_identity_strength_is_exact_identity(name):
    op, identity, _ = OPS[name]
    images = _images()
    out = op(images, _strengths(identity), SEED).numpy()
    np.testing.assert_array_equal(out, images)


@pytest.mark.parametrize("name", sorted(OPS))
def test_per_example_strengths(name):
    """Identity strength on example 0, active strengths on the others."""
    op, identity, active = OPS[name]
    images = _images(batch=3, height=16, width=16)
    strength = tf.constant([identity, active, active if name == "hue" else 2 * active - identity])
    if name == "pixel_drop":
        strength = tf.constant([1.0, 0.5, 0.1])
    out = op(images, strength, SEED).numpy()
    np.testing.assert_array_equal(out[0], images[0])
    for i in (1, 2):
        assert not np.allclose(out[i], images[i]), i


@pytest.mark.parametrize("name", sorted(OPS))
def test_determinism(name):
    op, _, active = OPS[name]
    images = _images(height=16, width=16)
    first = op(images, _strengths(active), SEED).numpy()
    again = op(images, _strengths(active), tf.constant([3, 7], tf.int64)).numpy()
    other = op(images, _strengths(active), OTHER_SEED).numpy()
    np.testing.assert_array_equal(first, again)
    assert not np.array_equal(first, other)


@pytest.mark.parametrize("name", sorted(OPS))
def test_grayscale_and_non_square(name):
    op, _, active = OPS[name]
    for channels in (1, 3):
        images = _images(batch=2, height=12, width=5, channels=channels)
        out = op(images, _strengths(active, 2), SEED).numpy()
        assert out.shape == images.shape and out.dtype == np.float32
        assert np.all(np.isfinite(out))
        if channels == 1 and name in COLOUR_ONLY:
            np.testing.assert_array_equal(out, images)
        else:
            assert not np.array_equal(out, images)


@pytest.mark.parametrize("name", sorted(OPS))
def test_tf_function_and_dataset_match_eager(name):
    op, _, active = OPS[name]
    images = _images(batch=4, height=10, width=6)
    strength = tf.constant([active, active / 2, active, 0.9 * active], tf.float32)
    if name == "pixel_drop":
        strength = tf.constant([0.5, 0.2, 0.9, 0.7])
    eager = op(images, strength, SEED).numpy()

    graph_op = tf.function(
        lambda x, s, seed: op(x, s, seed),
        input_signature=[
            tf.TensorSpec([None, None, None, 3], tf.float32),
            tf.TensorSpec([None], tf.float32),
            tf.TensorSpec([2], tf.int32),
        ],
    )
    np.testing.assert_allclose(graph_op(images, strength, SEED).numpy(), eager, atol=1e-6)

    dataset = tf.data.Dataset.from_tensor_slices((images, strength)).batch(4)
    dataset = dataset.map(lambda x, s: op(x, s, SEED))
    (batch_out,) = list(dataset.as_numpy_iterator())
    np.testing.assert_allclose(batch_out, eager, atol=1e-6)


def test_color_jitter_order_and_streams():
    """Each jitter op uses its own stream stateless_split(int64 seed, 4)[k], in fixed order."""
    images = _images(batch=4)
    seeds = tf.random.experimental.stateless_split(tf.cast(SEED, tf.int64), 4)
    ops = [augment.adjust_brightness, augment.adjust_contrast, augment.adjust_saturation,
           augment.adjust_hue]
    zero, strength = _strengths(0.0, 4), _strengths(0.4, 4)
    for k, op in enumerate(ops):
        args = [strength if j == k else zero for j in range(4)]
        out = augment.color_jitter(images, *args, seed=SEED).numpy()
        np.testing.assert_allclose(out, op(images, strength, seeds[k]).numpy(), atol=1e-6)
    # Fixed order: brightness then contrast then saturation then hue.
    full = augment.color_jitter(images, strength, strength, strength, strength, SEED)
    expected = images
    for k, op in enumerate(ops):
        expected = op(expected, strength, seeds[k])
    np.testing.assert_allclose(full.numpy(), expected.numpy(), atol=1e-6)


def test_brightness_factor_range():
    images = np.full((64, 4, 4, 3), 0.25, np.float32)
    v = 0.6
    out = augment.adjust_brightness(images, _strengths(v, 64), SEED).numpy()
    ratio = out / images
    # One factor per example: constant within an example.
    np.testing.assert_allclose(ratio, ratio[:, :1, :1, :1] * np.ones_like(ratio), rtol=1e-6)
    factors = ratio[:, 0, 0, 0]
    assert np.all(factors >= 1 - v - 1e-6) and np.all(factors <= 1 + v + 1e-6)
    assert len(np.unique(factors)) > 50
    assert factors.min() < 0.7 and factors.max() > 1.3  # covers the range


def test_brightness_clips_to_unit_interval():
    images = np.full((8, 2, 2, 1), 0.9, np.float32)
    out = augment.adjust_brightness(images, _strengths(1.0, 8), SEED).numpy()
    assert out.min() >= 0.0 and out.max() <= 1.0 and np.any(out == 1.0)


GRAY_WEIGHTS = np.array([0.299, 0.587, 0.114], np.float32)


def _check_blend(images, out, other, low, high):
    """out_i == f_i * img_i + (1 - f_i) * other_i for one f_i in [low, high] per example."""
    factors = []
    for i in range(images.shape[0]):
        diff = images[i] - other[i]
        j = np.argmax(np.abs(diff))
        factor = (out[i] - other[i]).flat[j] / diff.flat[j]
        assert low - 1e-4 <= factor <= high + 1e-4
        np.testing.assert_allclose(out[i], factor * images[i] + (1 - factor) * other[i], atol=1e-5)
        factors.append(factor)
    assert len(set(np.round(factors, 5))) == len(factors)  # one factor per example


def test_contrast_matches_numpy_reference():
    # Values in [0.4, 0.6] never clip for factors in [0, 2].
    images = 0.4 + 0.2 * _images(batch=4, height=6, width=6)
    out = augment.adjust_contrast(images, _strengths(0.5, 4), SEED).numpy()
    mean_gray = (images @ GRAY_WEIGHTS).mean(axis=(1, 2))[:, None, None, None]
    _check_blend(images, out, np.broadcast_to(mean_gray, images.shape), 0.5, 1.5)


def test_contrast_grayscale_uses_channel_mean():
    images = 0.4 + 0.2 * _images(batch=4, channels=1)
    out = augment.adjust_contrast(images, _strengths(1.0, 4), SEED).numpy()
    mean = np.broadcast_to(images.mean(axis=(1, 2, 3), keepdims=True), images.shape)
    _check_blend(images, out, mean, 0.0, 2.0)


def test_saturation_matches_numpy_reference():
    images = 0.4 + 0.2 * _images(batch=4)
    out = augment.adjust_saturation(images, _strengths(1.0, 4), SEED).numpy()
    gray = np.broadcast_to((images @ GRAY_WEIGHTS)[..., None], images.shape)
    _check_blend(images, out, gray, 0.0, 2.0)


def test_shift_hue_half_twice_is_identity():
    images = _images(batch=4, height=8, width=8)
    shifted = augment.shift_hue(images, tf.fill([4], 0.5))
    assert np.abs(shifted.numpy() - images).max() > 0.1  # a colourful image changes
    back = augment.shift_hue(shifted, tf.fill([4], 0.5)).numpy()
    np.testing.assert_allclose(back, images, atol=1e-5)


def test_shift_hue_full_turn_and_red_to_green():
    red = np.zeros((1, 1, 1, 3), np.float32)
    red[..., 0] = 1.0
    green = augment.shift_hue(red, tf.constant([1.0 / 3.0])).numpy()
    np.testing.assert_allclose(green[0, 0, 0], [0.0, 1.0, 0.0], atol=1e-5)
    images = _images()
    np.testing.assert_allclose(augment.shift_hue(images, tf.fill([3], 1.0)).numpy(), images, atol=1e-5)


def test_hue_shift_range_is_bounded():
    red = np.zeros((200, 1, 1, 3), np.float32)
    red[..., 0] = 1.0
    out = augment.adjust_hue(red, _strengths(0.1, 200), SEED)
    hue = tf.image.rgb_to_hsv(out).numpy()[:, 0, 0, 0]
    hue = np.where(hue > 0.5, hue - 1.0, hue)  # signed shift from red (hue 0)
    assert np.all(np.abs(hue) <= 0.1 + 1e-5)
    assert hue.min() < -0.05 and hue.max() > 0.05


def _zero_mask(out):
    return np.all(out == 0.0, axis=-1)


def test_cutout_single_square_inside():
    batch, size = 16, 40
    images = np.ones((batch, size, size, 2), np.float32)
    length = np.array([5.0, 7.0, 4.0, 6.0] * 4, np.float32)
    out = augment.cutout(images, length, tf.ones([batch]), max_holes=3, seed=SEED).numpy()
    assert set(np.unique(out)) <= {0.0, 1.0}
    np.testing.assert_array_equal(out[..., 0] == 0, out[..., 1] == 0)  # all channels cut
    corners = set()
    inside = 0
    for i in range(batch):
        mask = _zero_mask(out[i])
        rows, cols = np.nonzero(mask)
        side = int(length[i])
        # Contiguous rectangle: zero count equals bounding-box area, at most L x L.
        height, width = rows.max() - rows.min() + 1, cols.max() - cols.min() + 1
        assert mask.sum() == height * width
        assert height <= side and width <= side
        touches_border = rows.min() == 0 or cols.min() == 0 or rows.max() == size - 1 or cols.max() == size - 1
        if not touches_border:
            assert height == side and width == side
            inside += 1
        corners.add((rows.min(), cols.min()))
    assert inside >= 8
    assert len(corners) > 8  # different examples get different positions


def test_cutout_zero_counts_follow_length():
    images = np.ones((3, 64, 64, 1), np.float32)
    out = augment.cutout(images, [2.0, 4.0, 6.9], [1.0, 1.0, 1.0], max_holes=1, seed=tf.constant([1, 2])).numpy()
    # With this seed every square lies fully inside, so counts are exactly floor(L)^2.
    np.testing.assert_array_equal((out == 0).sum(axis=(1, 2, 3)), [4, 16, 36])


def test_cutout_centre_convention():
    """Centres do not depend on L: L=1 marks (cy, cx); L covers [c - L//2, c - L//2 + L)."""
    images = np.ones((6, 32, 32, 1), np.float32)
    ones = tf.ones([6])

    def mask(side):
        out = augment.cutout(images, tf.fill([6], float(side)), ones, max_holes=1, seed=SEED)
        return _zero_mask(out.numpy())

    centres = [np.argwhere(m)[0] for m in mask(1)]
    for side in (2, 3, 4):
        expected = np.zeros((6, 32, 32), bool)
        for i, (cy, cx) in enumerate(centres):
            y0, x0 = max(cy - side // 2, 0), max(cx - side // 2, 0)
            expected[i, y0:cy - side // 2 + side, x0:cx - side // 2 + side] = True
        np.testing.assert_array_equal(mask(side), expected)


def test_cutout_centres_are_uniform():
    images = np.ones((4000, 8, 4, 1), np.float32)
    cut = _zero_mask(augment.cutout(images, 1.0, 1.0, max_holes=1, seed=SEED).numpy())
    assert np.all(cut.sum(axis=(1, 2)) == 1)
    np.testing.assert_allclose(cut.any(axis=2).mean(axis=0) * 8, np.ones(8), atol=0.2)
    np.testing.assert_allclose(cut.any(axis=1).mean(axis=0) * 4, np.ones(4), atol=0.15)


def test_cutout_border_and_many_holes():
    images = -np.ones((8, 5, 7, 3), np.float32)  # normalised (negative) values
    length = tf.constant([50.0] * 4 + [3.0] * 4)
    holes = tf.constant([1.0, 2.0, 9.0, 0.0, 3.0, 3.0, 1.0, 0.0])
    out = augment.cutout(images, length, holes, max_holes=3, seed=SEED).numpy()
    assert np.all(out[:3] == 0.0)  # huge squares clipped to the whole image
    np.testing.assert_array_equal(out[3], images[3])  # zero holes
    np.testing.assert_array_equal(out[7], images[7])
    assert set(np.unique(out)) <= {-1.0, 0.0}
    assert all(_zero_mask(out[i]).sum() <= 27 for i in (4, 5))
    assert _zero_mask(out[6]).sum() <= 9 and _zero_mask(out[6]).sum() >= 4


def test_cutout_holes_add_area():
    images = np.ones((64, 32, 32, 1), np.float32)
    one = augment.cutout(images, _strengths(6.0, 64), _strengths(1.0, 64), max_holes=4, seed=SEED)
    four = augment.cutout(images, _strengths(6.0, 64), _strengths(4.0, 64), max_holes=4, seed=SEED)
    assert (four.numpy() == 0).sum() > 2.5 * (one.numpy() == 0).sum()


def test_input_dropout_rate_and_mean():
    images = np.ones((4, 64, 64, 3), np.float32)
    out = augment.input_dropout(images, _strengths(0.3, 4), SEED).numpy()
    kept = out != 0
    assert abs(kept.mean() - 0.7) < 0.01
    np.testing.assert_allclose(out[kept], 1.0 / 0.7, rtol=1e-6)
    assert abs(out.mean() - 1.0) < 0.03


def test_input_dropout_per_example_rates_and_no_rate_gradient():
    images = tf.ones((3, 32, 32, 3))
    rate = tf.constant([0.0, 0.5, 0.9])
    with tf.GradientTape(persistent=True) as tape:
        tape.watch(rate)
        tape.watch(images)
        out = augment.input_dropout(images, rate, SEED)
        total = tf.reduce_sum(out)
    keep = (out.numpy() != 0).reshape(3, -1).mean(axis=1)
    np.testing.assert_allclose(keep, [1.0, 0.5, 0.1], atol=0.04)
    assert tape.gradient(total, rate) is None
    assert np.all(np.isfinite(tape.gradient(total, images).numpy()))


def test_input_scale_factor_range():
    images = np.ones((128, 2, 2, 1), np.float32)
    v = 1.0
    factors = augment.input_scale(images, _strengths(v, 128), SEED).numpy()[:, 0, 0, 0]
    assert np.all(factors >= 1 / (1 + v) - 1e-6) and np.all(factors <= 1 + v + 1e-6)
    # Plain uniform on [0.5, 2]: mean about 1.25 (a log-uniform would give ~1.08).
    assert abs(factors.mean() - 1.25) < 0.1


def test_pixel_drop_drops_whole_pixels():
    images = _images(batch=2, height=64, width=64) + 0.1
    out = augment.pixel_drop(images, tf.constant([0.8, 0.3]), SEED).numpy()
    zero = out == 0
    np.testing.assert_array_equal(zero.any(axis=-1), zero.all(axis=-1))
    np.testing.assert_allclose(zero[..., 0].mean(axis=(1, 2)), [0.2, 0.7], atol=0.03)
    np.testing.assert_array_equal(out[~zero], images[~zero])  # no rescaling
