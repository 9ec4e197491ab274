"""The earlier TF port's CIFAR network (the Keras tutorial CNN) as an STN.

conv 32 -> pool -> conv 64 -> pool -> conv 64 -> dense 64 -> dense K, 3x3 VALID convs, with a
channel-wise dropout hyperparameter after each conv block and a per-example pixel-drop rate.
"""

from __future__ import annotations

from typing import Sequence

import tensorflow as tf

from stn_pipeline.hparams import HParam, HParamSample
from stn_pipeline.layers import dropout
from stn_pipeline.models.image import StnImageClassifier, augmentation_hparams, dropout_hparam
from stn_pipeline.plain_layers import LayerFactory

__all__ = ["CifarCnn", "cifar_cnn_hparams"]

_FILTERS = (32, 64, 64)
_DROPOUTS = tuple(f"dropout{i}" for i in range(len(_FILTERS)))


def cifar_cnn_hparams() -> list[HParam]:
    """dropout0..2 after the conv blocks, and pixel_drop on the input."""
    return [dropout_hparam(name) for name in _DROPOUTS] + augmentation_hparams(["pixel_drop"])


class CifarCnn(StnImageClassifier):
    """The Keras-tutorial CNN (STN or plain layers); any image size >= 18 pixels, any channels."""

    def __init__(self, image_shape: Sequence[int], num_classes: int, mean: Sequence[float],
                 std: Sequence[float], hparams: Sequence[HParam], seed: int = 0,
                 layers: LayerFactory | None = None, name: str | None = None):
        super().__init__(image_shape, mean, std, hparams, _DROPOUTS, layers, name=name)
        height, width, channels = self.image_shape
        self.convs = []
        for index, filters in enumerate(_FILTERS):
            self.convs.append(self.layers.conv(channels, filters, 3, padding="VALID",
                                               seed=seed + index, name=f"conv{index}"))
            channels = filters
            height, width = height - 2, width - 2
            if index < 2:
                height, width = height // 2, width // 2
        if height < 1 or width < 1:
            raise ValueError(f"CifarCnn: images of {self.image_shape[:2]} are too small "
                             "(at least 18x18 is needed).")
        self.flat_size = height * width * channels
        self.dense = self.layers.dense(self.flat_size, 64, seed=seed + 3, name="dense")
        self.logits = self.layers.dense(64, num_classes, seed=seed + 4, name="logits")

    def __call__(self, inputs, sample: HParamSample, training: bool, seed=None):
        h = sample.hnet_input
        seeds = tf.random.experimental.stateless_split(seed, 3) if training else [None] * 3
        x = inputs
        for index, conv in enumerate(self.convs):
            x = tf.nn.relu(conv(x, h))
            if index < 2:
                x = tf.nn.max_pool2d(x, 2, 2, "VALID")
            x = dropout(x, sample[f"dropout{index}"], seeds[index], training, channelwise=True)
        x = tf.reshape(x, [-1, self.flat_size])
        return self.logits(tf.nn.relu(self.dense(x, h)), h)
