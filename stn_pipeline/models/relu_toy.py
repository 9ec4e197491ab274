"""The deep-ReLU toy of the STN paper: fit y = x^2 where the tuned hyperparameter is the half-width
r of the training input range, x ~ U(-r, r). Validation inputs cover [-2, 2], so the validation
loss, seen through the best-response gates, pulls r towards 2.
"""

from __future__ import annotations

import tensorflow as tf

from stn_pipeline.hparams import POSITIVE, HParam, HParamSample
from stn_pipeline.models.base import StnRegressor
from stn_pipeline.plain_layers import LayerFactory

__all__ = ["ReluToy", "input_range_hparam"]


def input_range_hparam(init: float = 1.0, scale_init: float = 0.5) -> HParam:
    """The toy's one hyperparameter: the training input half-width r > 0."""
    return HParam("input_range", minimum=0.0, maximum=None, init=init, scale_init=scale_init,
                  kind=POSITIVE)


class ReluToy(StnRegressor):
    """A ReLU network of `depth` hidden dense layers of `width` units, 1 input, 1 output.

    Its layers are STN layers gated by `num_hparams` inputs, or `layers` (`LayerFactory`)'s.

    Weight-step inputs are u ~ U(-1, 1); `augment` turns them into x = r_i u with target x^2, so
    each example's input range is its own perturbed r_i.
    """

    def __init__(self, depth: int = 3, width: int = 32, num_hparams: int = 1, seed: int = 0,
                 layers: LayerFactory | None = None, name: str | None = None):
        super().__init__(name=name)
        if depth < 1 or width < 1:
            raise ValueError(f"ReluToy: depth and width must be >= 1, received {depth}, {width}.")
        layers = layers or LayerFactory(num_hparams=num_hparams)
        sizes = [1] + [width] * depth
        self.hidden = [layers.dense(i, o, seed=seed + k, name=f"hidden{k}")
                       for k, (i, o) in enumerate(zip(sizes[:-1], sizes[1:]))]
        self.head = layers.dense(width, 1, seed=seed + depth, name="head")

    def augment(self, inputs, targets, sample: HParamSample, seed):
        del targets, seed  # Unused: the target follows from the stretched input.
        x = self.preprocess(inputs) * sample["input_range"][:, None]
        return x, tf.square(x)

    def __call__(self, inputs, sample: HParamSample, training: bool, seed=None):
        del training, seed  # Unused: the toy has no dropout.
        x = inputs
        for layer in self.hidden:
            x = tf.nn.relu(layer(x, sample.hnet_input))
        return self.head(x, sample.hnet_input)
