"""Vectorised, stateless, per-example image augmentations for Self-Tuning Networks.

Conventions shared by every op:
  * ``images``: a batch [B, H, W, C] (float; computed in float32). B may be
    unknown (None) in graph mode; ops that need the channel count (contrast,
    saturation, hue) require C to be static. C=1 is grayscale, C=3 is RGB.
  * Strengths have shape [B] (a scalar is broadcast), one value per example,
    so a hypernetwork can tune each example's augmentation. Nothing loops over
    examples: per-example values are broadcast against the batch.
  * ``seed``: a shape-[2] int32/int64 tensor. All randomness is stateless
    (``tf.random.stateless_*``); independent streams come from
    ``stateless_split``. Same seed -> same output, eagerly, in ``tf.function``
    and in ``tf.data.Dataset.map``.
  * A strength of 0 (keep probability 1 for ``pixel_drop``) is the exact
    identity. Strengths are used as given (no squashing into (e, 1 - e)).
"""

from typing import Callable

import tensorflow as tf

TensorLike = tf.types.experimental.TensorLike

__all__ = [
    "adjust_brightness", "adjust_contrast", "adjust_saturation", "adjust_hue", "shift_hue",
    "color_jitter", "cutout", "input_dropout", "input_scale", "pixel_drop",
]

_RGB_TO_GRAY = (0.299, 0.587, 0.114)  # ITU-R 601 luma weights.


def _as_images(images: TensorLike) -> tf.Tensor:
    """Converts ``images`` to a float32 tensor; rejects non-float inputs."""
    images = tf.convert_to_tensor(images)
    if not images.dtype.is_floating:
        raise TypeError(f"images must be floating point, got {images.dtype}")
    return tf.cast(images, tf.float32)


def _per_example(values: TensorLike, images: tf.Tensor) -> tf.Tensor:
    """Casts ``values`` to float32 and broadcasts it to shape [B]."""
    return tf.broadcast_to(tf.cast(values, tf.float32), tf.shape(images)[:1])


def _expand(values: tf.Tensor, images: tf.Tensor) -> tf.Tensor:
    """Reshapes a [B] tensor to [B, 1, ..., 1] so it broadcasts over ``images``."""
    return tf.reshape(values, [-1] + [1] * (images.shape.rank - 1))


def _channels(images: tf.Tensor) -> int:
    """Returns the static channel count (it must be known)."""
    if images.shape[-1] is None:
        raise ValueError("the channel dimension of images must be static")
    return images.shape[-1]


def _grayscale(images: tf.Tensor) -> tf.Tensor:
    """[B, H, W, C] -> [B, H, W, 1]: 0.299 R + 0.587 G + 0.114 B if C=3, else channel mean."""
    if _channels(images) == 3:
        return tf.tensordot(images, tf.constant(_RGB_TO_GRAY), axes=[[3], [0]])[..., None]
    return tf.reduce_mean(images, axis=-1, keepdims=True)  # C=1: the channel itself.


def _split(seed: TensorLike, num: int) -> tf.Tensor:
    """[num, 2] independent seeds (cast to int64 first so int32/int64 seeds agree)."""
    return tf.random.experimental.stateless_split(tf.cast(seed, tf.int64), num=num)


def _uniform_factor(strength: tf.Tensor, seed: TensorLike,
                    low_fn: Callable[[tf.Tensor], tf.Tensor],
                    high_fn: Callable[[tf.Tensor], tf.Tensor]) -> tf.Tensor:
    """v = max(strength, 0); factor_i = low(v_i) + (high(v_i) - low(v_i)) * u_i, u_i ~ U[0, 1)."""
    strength = tf.maximum(strength, 0.0)
    low, high = low_fn(strength), high_fn(strength)
    u = tf.random.stateless_uniform(tf.shape(strength), seed, dtype=tf.float32)
    return low + (high - low) * u  # Exactly 1 when low == high == 1.


def _jitter_factor(strength: tf.Tensor, seed: TensorLike) -> tf.Tensor:
    """factor_i ~ U[max(0, 1 - v_i), 1 + v_i] (torchvision ColorJitter)."""
    return _uniform_factor(strength, seed, lambda v: tf.maximum(0.0, 1.0 - v), lambda v: 1.0 + v)


def _blend(images: tf.Tensor, factor: tf.Tensor, other: tf.Tensor) -> tf.Tensor:
    """clip(factor * images + (1 - factor) * other, 0, 1) with factor of shape [B]."""
    factor = _expand(factor, images)
    return tf.clip_by_value(factor * images + (1.0 - factor) * other, 0.0, 1.0)


def adjust_brightness(images: TensorLike, strength: TensorLike, seed: TensorLike) -> tf.Tensor:
    """Per-example brightness: factor_i ~ U[max(0, 1 - v_i), 1 + v_i]; out = clip(img * factor_i, 0, 1).

    Args:
        images: [B, H, W, C] images in [0, 1].
        strength: [B] strengths v_i >= 0 (negative values act as 0).
        seed: shape-[2] int seed.
    Returns:
        [B, H, W, C] float32 images.
    """
    images = _as_images(images)
    factor = _jitter_factor(_per_example(strength, images), seed)
    return tf.clip_by_value(images * _expand(factor, images), 0.0, 1.0)


def adjust_contrast(images: TensorLike, strength: TensorLike, seed: TensorLike) -> tf.Tensor:
    """Per-example contrast: out = clip(factor_i * img + (1 - factor_i) * mean_gray_i, 0, 1).

    factor_i ~ U[max(0, 1 - v_i), 1 + v_i]; mean_gray_i is one scalar per example,
    the mean of its grayscale (0.299 R + 0.587 G + 0.114 B for C=3, the channel
    itself for C=1, the channel mean for other C).

    Args:
        images: [B, H, W, C] images in [0, 1], static C.
        strength: [B] strengths v_i >= 0.
        seed: shape-[2] int seed.
    Returns:
        [B, H, W, C] float32 images.
    """
    images = _as_images(images)
    factor = _jitter_factor(_per_example(strength, images), seed)
    mean_gray = tf.reduce_mean(_grayscale(images), axis=[1, 2, 3], keepdims=True)
    return _blend(images, factor, mean_gray)


def adjust_saturation(images: TensorLike, strength: TensorLike, seed: TensorLike) -> tf.Tensor:
    """Per-example saturation: out = clip(factor_i * img + (1 - factor_i) * gray, 0, 1).

    factor_i ~ U[max(0, 1 - v_i), 1 + v_i]; gray is the per-pixel ITU-R 601 luma.
    The identity when C != 3 (as torchvision does for grayscale images).

    Args:
        images: [B, H, W, C] images in [0, 1], static C.
        strength: [B] strengths v_i >= 0.
        seed: shape-[2] int seed.
    Returns:
        [B, H, W, C] float32 images.
    """
    images = _as_images(images)
    if _channels(images) != 3:
        return images
    factor = _jitter_factor(_per_example(strength, images), seed)
    return _blend(images, factor, _grayscale(images))


def shift_hue(images: TensorLike, shift: TensorLike) -> tf.Tensor:
    """Deterministic hue rotation: RGB -> HSV, hue = (hue + shift_i) mod 1, HSV -> RGB, clip to [0, 1].

    Examples with shift_i == 0 are returned exactly unchanged; the identity when C != 3.

    Args:
        images: [B, H, W, C] images in [0, 1], static C.
        shift: [B] hue shifts in turns (1.0 is a full rotation).
    Returns:
        [B, H, W, C] float32 images.
    """
    images = _as_images(images)
    if _channels(images) != 3:
        return images
    shift = _expand(_per_example(shift, images), images)
    hsv = tf.image.rgb_to_hsv(images)
    hue = tf.math.floormod(hsv[..., :1] + shift, 1.0)
    rgb = tf.clip_by_value(tf.image.hsv_to_rgb(tf.concat([hue, hsv[..., 1:]], -1)), 0.0, 1.0)
    return tf.where(tf.equal(shift, 0.0), images, rgb)


def adjust_hue(images: TensorLike, strength: TensorLike, seed: TensorLike) -> tf.Tensor:
    """Per-example hue: h_i = clip(v_i, 0, 0.5), shift_i ~ U[-h_i, h_i], out = shift_hue(img, shift).

    Args:
        images: [B, H, W, C] images in [0, 1], static C (identity when C != 3).
        strength: [B] strengths v_i, clipped to [0, 0.5].
        seed: shape-[2] int seed.
    Returns:
        [B, H, W, C] float32 images.
    """
    images = _as_images(images)
    if _channels(images) != 3:
        return images
    h = tf.clip_by_value(_per_example(strength, images), 0.0, 0.5)
    return shift_hue(images, _uniform_factor(h, seed, lambda v: -v, lambda v: v))


def color_jitter(images: TensorLike, brightness: TensorLike, contrast: TensorLike,
                 saturation: TensorLike, hue: TensorLike, seed: TensorLike) -> tf.Tensor:
    """Per-example ColorJitter: hue(saturation(contrast(brightness(img)))).

    torchvision permutes the four ops randomly on every call; here the order is
    FIXED: brightness, contrast, saturation, hue. Each op gets its own stream
    from ``stateless_split(seed, 4)``; all-zero strengths are the identity.

    Args:
        images: [B, H, W, C] images in [0, 1], static C.
        brightness, contrast, saturation, hue: [B] strengths of the four ops.
        seed: shape-[2] int seed.
    Returns:
        [B, H, W, C] float32 images.
    """
    seeds = _split(seed, 4)
    images = adjust_brightness(images, brightness, seeds[0])
    images = adjust_contrast(images, contrast, seeds[1])
    images = adjust_saturation(images, saturation, seeds[2])
    return adjust_hue(images, hue, seeds[3])


def cutout(images: TensorLike, length: TensorLike, holes: TensorLike, max_holes: int,
           seed: TensorLike) -> tf.Tensor:
    """Per-example Cutout of holes_i squares of side L_i; cut pixels are 0 in all channels.

    holes_i = clip(floor(holes_i), 0, max_holes), L_i = max(floor(length_i), 0).
    Each square has its own centre (cy, cx), uniform over the pixels, and covers
    rows [cy - L_i // 2, cy - L_i // 2 + L_i) and columns
    [cx - L_i // 2, cx - L_i // 2 + L_i), intersected with the image. Masks come
    from broadcast comparisons with coordinate grids (no per-example slicing).
    Centres depend only on the seed, B and max_holes, not on length or holes.

    Args:
        images: [B, H, W, C] (normalised, any real values).
        length: [B] square sides (floats holding integers are fine).
        holes: [B] numbers of squares (floats holding integers are fine).
        max_holes: static upper bound on the number of squares.
        seed: shape-[2] int seed.
    Returns:
        [B, H, W, C] float32 images.
    """
    images = _as_images(images)
    batch, height, width = tf.unstack(tf.shape(images)[:3])
    side = tf.cast(tf.maximum(tf.floor(_per_example(length, images)), 0.0), tf.int32)
    count = tf.clip_by_value(tf.floor(_per_example(holes, images)), 0.0, float(max_holes))
    seed_y, seed_x = tf.unstack(_split(seed, 2))
    cy = tf.random.stateless_uniform([max_holes, batch], seed_y, 0, height, dtype=tf.int32)
    cx = tf.random.stateless_uniform([max_holes, batch], seed_x, 0, width, dtype=tf.int32)
    top, left = cy - side // 2, cx - side // 2  # [K, B] with K = max_holes.
    rows, cols = tf.range(height), tf.range(width)
    in_rows = (rows >= top[..., None]) & (rows < (top + side)[..., None])  # [K, B, H]
    in_cols = (cols >= left[..., None]) & (cols < (left + side)[..., None])  # [K, B, W]
    active = tf.range(max_holes, dtype=tf.float32)[:, None] < count  # [K, B]
    cut = tf.reduce_any(in_rows[..., :, None] & in_cols[..., None, :] & active[..., None, None], 0)
    return tf.where(cut[..., None], tf.zeros_like(images), images)


def input_dropout(images: TensorLike, rate: TensorLike, seed: TensorLike) -> tf.Tensor:
    """Per-example inverted dropout: out = x / (1 - p_i) with prob. 1 - p_i, else 0.

    p_i = clip(stop_gradient(rate_i), 0, 1), drawn element-wise; p_i = 1 gives zeros.

    Args:
        images: [B, ...] tensor.
        rate: [B] dropout rates in [0, 1).
        seed: shape-[2] int seed.
    Returns:
        float32 tensor shaped like ``images``.
    """
    images = _as_images(images)
    rate = _expand(tf.clip_by_value(tf.stop_gradient(_per_example(rate, images)), 0.0, 1.0), images)
    keep = tf.random.stateless_uniform(tf.shape(images), seed, dtype=tf.float32) >= rate
    return tf.where(keep, images * tf.math.divide_no_nan(1.0, 1.0 - rate), tf.zeros_like(images))


def input_scale(images: TensorLike, strength: TensorLike, seed: TensorLike) -> tf.Tensor:
    """Per-example scaling: factor_i ~ U[1 / (1 + v_i), 1 + v_i] (plain uniform); out = img * factor_i.

    Args:
        images: [B, ...] tensor (not clipped).
        strength: [B] strengths v_i >= 0.
        seed: shape-[2] int seed.
    Returns:
        float32 tensor shaped like ``images``.
    """
    images = _as_images(images)
    factor = _uniform_factor(_per_example(strength, images), seed,
                             lambda v: 1.0 / (1.0 + v), lambda v: 1.0 + v)
    return images * _expand(factor, images)


def pixel_drop(images: TensorLike, keep_probability: TensorLike, seed: TensorLike) -> tf.Tensor:
    """Per-example pixel drop: each pixel (all channels together) kept w.p. k_i, else 0.

    Kept pixels are NOT rescaled: the semantics of the earlier TF port's
    pixel-drop augmentation.

    Args:
        images: [B, H, W, C] images.
        keep_probability: [B] keep probabilities k_i in [0, 1].
        seed: shape-[2] int seed.
    Returns:
        [B, H, W, C] float32 images.
    """
    images = _as_images(images)
    keep_probability = _expand(_per_example(keep_probability, images), images)
    u = tf.random.stateless_uniform(tf.concat([tf.shape(images)[:3], [1]], 0), seed)
    return tf.where(u < keep_probability, images, tf.zeros_like(images))
