"""Ordinary layers for `--network=plain`, and the factory through which models build layers.

`PlainDense` and `PlainConv2D` are the layers an STN layer would be without its hypernetwork: one
kernel and one bias, initialised as the STN layers' elementary path (U(+-1/sqrt(fan_in))). They
take the STN call signature `(inputs, hnet_input)` and ignore the hypernet input, so a model's
`__call__` is the same code for both networks; `LayerFactory` decides which layers it gets.

Precision: variables are always float32. `compute_dtype` (float32 unless set, as
`precision.apply_precision` sets it on STN layers) is the dtype of the matmul/convolution; the
product is cast back to float32 before the bias.
"""

from __future__ import annotations

import dataclasses
import math

import tensorflow as tf

from stn_pipeline.layers import StnConv2D, StnDense

__all__ = ["NETWORKS", "LayerFactory", "PlainConv2D", "PlainDense"]

NETWORKS = ("stn", "plain")


class _PlainLayer(tf.Module):
    """A kernel and a bias, U(+-1/sqrt(fan_in)) as the STN layers' elementary path."""

    def __init__(self, kernel_shape, fan_in: int, output_size: int, seed: int | None,
                 name: str | None):
        super().__init__(name=name)
        if output_size < 1 or fan_in < 1:
            raise ValueError(f"{type(self).__name__}: sizes must be >= 1, received "
                             f"fan_in={fan_in}, output_size={output_size}.")
        self.output_size = output_size
        # The dtype of the matmul/convolution; set it before the first call is traced.
        self.compute_dtype = tf.float32
        bound = 1.0 / math.sqrt(fan_in)
        init = (tf.random.Generator.from_non_deterministic_state() if seed is None
                else tf.random.Generator.from_seed(seed))
        with self.name_scope:
            self.kernel = tf.Variable(init.uniform(kernel_shape, -bound, bound), name="kernel")
            self.bias = tf.Variable(init.uniform([output_size], -bound, bound), name="bias")

    def _to_compute(self, tensor: tf.Tensor) -> tf.Tensor:
        return tf.cast(tensor, self.compute_dtype)


class PlainDense(_PlainLayer):
    """y = x K + b, called as `(inputs, hnet_input)` with `hnet_input` ignored."""

    def __init__(self, input_size: int, output_size: int, seed: int | None = None,
                 name: str | None = None):
        super().__init__([input_size, output_size], input_size, output_size, seed, name)
        self.input_size = input_size

    def __call__(self, inputs: tf.Tensor, hnet_input: tf.Tensor | None = None) -> tf.Tensor:
        """[B, D_in] inputs -> [B, D_out]."""
        del hnet_input  # No hypernetwork.
        product = tf.matmul(self._to_compute(inputs), self._to_compute(self.kernel))
        return tf.cast(product, tf.float32) + self.bias


class PlainConv2D(_PlainLayer):
    """2-D convolution (NHWC), called as `(inputs, hnet_input)` with `hnet_input` ignored."""

    def __init__(self, input_channels: int, output_channels: int, kernel_size: int,
                 stride: int = 1, padding: str = "SAME", seed: int | None = None,
                 name: str | None = None):
        if padding not in ("SAME", "VALID"):
            raise ValueError(f"PlainConv2D: padding must be 'SAME' or 'VALID', received "
                             f"{padding!r}.")
        super().__init__([kernel_size, kernel_size, input_channels, output_channels],
                         input_channels * kernel_size * kernel_size, output_channels, seed, name)
        self.stride = stride
        self.padding = padding

    def __call__(self, inputs: tf.Tensor, hnet_input: tf.Tensor | None = None) -> tf.Tensor:
        """[B, H, W, C_in] inputs -> [B, H', W', C_out]."""
        del hnet_input  # No hypernetwork.
        product = tf.nn.conv2d(self._to_compute(inputs), self._to_compute(self.kernel),
                               self.stride, self.padding)
        return tf.cast(product, tf.float32) + self.bias


@dataclasses.dataclass(frozen=True, kw_only=True)
class LayerFactory:
    """Builds a model's dense and conv layers for one network.

    Attributes:
      network: "stn" (STN layers gated by `num_hparams` hypernet inputs) or "plain".
      num_hparams: the hypernet input width (the number of tuned hyperparameters).
    """

    network: str = "stn"
    num_hparams: int = 1

    def __post_init__(self):
        if self.network not in NETWORKS:
            raise ValueError(f"network must be one of {NETWORKS}, received {self.network!r}.")

    def dense(self, input_size: int, output_size: int, *, seed: int | None = None,
              name: str | None = None) -> StnDense | PlainDense:
        if self.network == "plain":
            return PlainDense(input_size, output_size, seed=seed, name=name)
        return StnDense(input_size, output_size, self.num_hparams, seed=seed, name=name)

    def conv(self, input_channels: int, output_channels: int, kernel_size: int, *,
             stride: int = 1, padding: str = "SAME", seed: int | None = None,
             name: str | None = None) -> StnConv2D | PlainConv2D:
        if self.network == "plain":
            return PlainConv2D(input_channels, output_channels, kernel_size, stride, padding,
                               seed=seed, name=name)
        return StnConv2D(input_channels, output_channels, kernel_size, self.num_hparams,
                         stride=stride, padding=padding, seed=seed, name=name)
