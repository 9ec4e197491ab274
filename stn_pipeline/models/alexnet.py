"""The STN paper's CIFAR-10 AlexNet with its 15 hyperparameters.

Five 3x3 convs (64, 192, 384, 256, 256 filters; the first with stride 2), 2x2 max-pools after
convs 0, 1 and 4, channel-wise dropout after each conv block, then fc 4096 - fc 4096 - fc K with
element-wise dropout before each of the first two. Every conv and fc layer is an STN layer.
"""

from __future__ import annotations

from typing import Sequence

import tensorflow as tf

from stn_pipeline.hparams import HParam, HParamSample
from stn_pipeline.layers import dropout
from stn_pipeline.models.image import StnImageClassifier, augmentation_hparams, dropout_hparam
from stn_pipeline.plain_layers import LayerFactory

__all__ = ["CifarAlexNet", "alexnet_hparams"]

_CONVS = ((64, 2), (192, 1), (384, 1), (256, 1), (256, 1))  # (filters, stride)
_POOL_AFTER = (0, 1, 4)
_DROPOUTS = tuple(f"dropout{i}" for i in range(len(_CONVS))) + ("fc_dropout0", "fc_dropout1")
_AUGMENTATIONS = ("hue", "contrast", "saturation", "brightness", "input_dropout", "input_scale",
                  "cutout_length", "cutout_holes")


def alexnet_hparams() -> list[HParam]:
    """The 15 hyperparameters of the paper, in ORIG's order, with its ranges and inits."""
    return ([dropout_hparam(name) for name in _DROPOUTS[:-2]]
            + augmentation_hparams(_AUGMENTATIONS)
            + [dropout_hparam(name) for name in _DROPOUTS[-2:]])


class CifarAlexNet(StnImageClassifier):
    """The paper's CIFAR AlexNet; images of any size whose feature map survives the pooling."""

    def __init__(self, image_shape: Sequence[int], num_classes: int, mean: Sequence[float],
                 std: Sequence[float], hparams: Sequence[HParam], seed: int = 0,
                 fc_width: int = 4096, layers: LayerFactory | None = None,
                 name: str | None = None):
        super().__init__(image_shape, mean, std, hparams, _DROPOUTS, layers, name=name)
        height, width, channels = self.image_shape
        self.convs = []
        for index, (filters, stride) in enumerate(_CONVS):
            self.convs.append(self.layers.conv(channels, filters, 3, stride=stride,
                                               seed=seed + index, name=f"conv{index}"))
            channels = filters
            height, width = -(-height // stride), -(-width // stride)  # SAME padding: ceil
            if index in _POOL_AFTER:
                height, width = height // 2, width // 2
        if height < 1 or width < 1:
            raise ValueError(f"CifarAlexNet: images of {self.image_shape[:2]} are too small "
                             "(at least 16x16 is needed).")
        self.flat_size = height * width * channels
        self.fc1 = self.layers.dense(self.flat_size, fc_width, seed=seed + 5, name="fc1")
        self.fc2 = self.layers.dense(fc_width, fc_width, seed=seed + 6, name="fc2")
        self.fc3 = self.layers.dense(fc_width, num_classes, seed=seed + 7, name="fc3")

    def __call__(self, inputs, sample: HParamSample, training: bool, seed=None):
        h = sample.hnet_input
        seeds = tf.random.experimental.stateless_split(seed, 7) if training else [None] * 7
        x = inputs
        for index, conv in enumerate(self.convs):
            x = tf.nn.relu(conv(x, h))
            if index in _POOL_AFTER:
                x = tf.nn.max_pool2d(x, 2, 2, "VALID")
            x = dropout(x, sample[f"dropout{index}"], seeds[index], training, channelwise=True)
        x = tf.reshape(x, [-1, self.flat_size])
        x = dropout(x, sample["fc_dropout0"], seeds[5], training)
        x = tf.nn.relu(self.fc1(x, h))
        x = dropout(x, sample["fc_dropout1"], seeds[6], training)
        x = tf.nn.relu(self.fc2(x, h))
        return self.fc3(x, h)
