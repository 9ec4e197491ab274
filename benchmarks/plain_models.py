"""Plain (non-STN) baselines of `cifar_cnn` and `cifar_alexnet` for the training benchmarks.

Each baseline has the architecture of its STN counterpart (same filters, kernel sizes, strides,
paddings, pools and fc widths) built from ordinary layers: `tf.nn.conv2d` + bias and
`tf.matmul` + bias, one kernel per layer instead of the STN's two stacked paths and gates. Dropout
sits where the STN model has it but at a FIXED rate (0.05, channel-wise after the conv blocks,
element-wise before AlexNet's first two fc layers), and the model sees no augmentation. Inputs are
raw uint8 images normalised inside the compiled step, as the STN models do.

The weight update is SGD with heavy-ball momentum 0.9 (v = m v + g; w -= lr v) with TensorFlow's
single-kernel `ResourceApplyMomentum`, as `stn_pipeline.optimizers.Momentum` does since f81dbee,
so the benchmark compares network cost, not optimizer implementations. `fused=False` writes the
same arithmetic as two variable assignments (the library's previous rule).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Sequence

import tensorflow as tf

__all__ = ["ConvBlock", "PlainConvNet", "PlainMomentum", "PlainTrainer", "plain_alexnet",
           "plain_cifar_cnn"]


@dataclasses.dataclass(frozen=True, kw_only=True)
class ConvBlock:
    """conv(k x k, stride, padding) -> relu -> [2x2 max-pool] -> channel-wise dropout."""

    filters: int
    kernel_size: int = 3
    stride: int = 1
    padding: str = "SAME"
    pool: bool = False


class PlainConvNet(tf.Module):
    """conv blocks -> flatten -> [dropout] fc -> relu ... -> logits, with fixed dropout rates."""

    def __init__(self, image_shape: Sequence[int], num_classes: int, mean: Sequence[float],
                 std: Sequence[float], blocks: Sequence[ConvBlock], fc_widths: Sequence[int],
                 fc_dropout: int = 0, rate: float = 0.05, seed: int = 0,
                 bias_add: bool = False, name: str | None = None):
        """Constructs a `PlainConvNet`.

        Args:
          image_shape: (H, W, C) of the uint8 inputs.
          num_classes: width of the logits layer.
          mean, std: per-channel statistics of the in-graph normalisation.
          blocks: the conv blocks, in order.
          fc_widths: widths of the hidden fc layers (the logits layer is added).
          fc_dropout: element-wise dropout before each of the first `fc_dropout` fc layers.
          rate: the fixed drop probability of every dropout.
          seed: seed of the initialisation (W, b ~ U(+-1/sqrt(fan_in)), as the STN layers).
          bias_add: add biases with `tf.nn.bias_add` (as Keras layers do) instead of a
            broadcast `x + b`. With bias_add, grappler fuses each conv's filter gradient with
            its bias gradient into oneDNN's `Conv2DBackpropFilterWithBias`, which is much slower
            than the unfused pair for the 3-channel first conv on this CPU; the default is the
            faster form, so the baseline is not handicapped.
          name: module name.
        """
        super().__init__(name=name)
        self.mean = tf.constant(mean, tf.float32)
        self.std = tf.constant(std, tf.float32)
        self.blocks = tuple(blocks)
        self.rate = float(rate)
        self.fc_dropout = fc_dropout
        self._add_bias = tf.nn.bias_add if bias_add else (lambda x, b: x + b)
        init = tf.random.Generator.from_seed(seed)
        height, width, channels = image_shape
        self.conv_kernels, self.conv_biases = [], []
        with self.name_scope:
            for index, block in enumerate(self.blocks):
                fan_in = block.kernel_size ** 2 * channels
                bound = 1.0 / math.sqrt(fan_in)
                shape = [block.kernel_size, block.kernel_size, channels, block.filters]
                self.conv_kernels.append(
                    tf.Variable(init.uniform(shape, -bound, bound), name=f"conv{index}/kernel"))
                self.conv_biases.append(
                    tf.Variable(init.uniform([block.filters], -bound, bound),
                                name=f"conv{index}/bias"))
                if block.padding == "SAME":
                    height, width = -(-height // block.stride), -(-width // block.stride)
                else:
                    height = (height - block.kernel_size) // block.stride + 1
                    width = (width - block.kernel_size) // block.stride + 1
                if block.pool:
                    height, width = height // 2, width // 2
                channels = block.filters
            self.flat_size = height * width * channels
            self.fc_kernels, self.fc_biases = [], []
            size = self.flat_size
            for index, units in enumerate(list(fc_widths) + [num_classes]):
                bound = 1.0 / math.sqrt(size)
                self.fc_kernels.append(tf.Variable(init.uniform([size, units], -bound, bound),
                                                   name=f"fc{index}/kernel"))
                self.fc_biases.append(
                    tf.Variable(init.uniform([units], -bound, bound), name=f"fc{index}/bias"))
                size = units

    def preprocess(self, images: tf.Tensor) -> tf.Tensor:
        """uint8 images -> per-channel standardised float32 (in-graph)."""
        return (tf.cast(images, tf.float32) - self.mean) / self.std

    def __call__(self, images: tf.Tensor, training: bool, seed: tf.Tensor | None = None):
        """Logits of uint8 [B, H, W, C] images; `seed` ([2] int) drives the dropout masks."""
        num_dropouts = len(self.blocks) + self.fc_dropout
        seeds = (tf.random.experimental.stateless_split(seed, num_dropouts) if training
                 else [None] * num_dropouts)
        x = self.preprocess(images)
        # Name scopes (conv<i>, fc<i>, dropout) only label ops for the benchmark's profile.
        for index, block in enumerate(self.blocks):
            # The relu is in the scope because grappler fuses conv + bias + relu into one op
            # named after the relu.
            with tf.name_scope(f"conv{index}"):
                x = tf.nn.conv2d(x, self.conv_kernels[index], block.stride, block.padding)
                x = tf.nn.relu(self._add_bias(x, self.conv_biases[index]))
            if block.pool:
                x = tf.nn.max_pool2d(x, 2, 2, "VALID")
            if training:
                with tf.name_scope("dropout"):
                    shape = tf.shape(x)
                    x = tf.nn.experimental.stateless_dropout(
                        x, self.rate, seeds[index], noise_shape=[shape[0], 1, 1, shape[3]])
        x = tf.reshape(x, [-1, self.flat_size])
        last = len(self.fc_kernels) - 1
        for index, (kernel, bias) in enumerate(zip(self.fc_kernels, self.fc_biases)):
            if training and index < self.fc_dropout:
                with tf.name_scope("dropout"):
                    x = tf.nn.experimental.stateless_dropout(x, self.rate,
                                                             seeds[len(self.blocks) + index])
            with tf.name_scope(f"fc{index}"):
                x = self._add_bias(tf.matmul(x, kernel), bias)
                if index < last:
                    x = tf.nn.relu(x)
        return x


def plain_cifar_cnn(image_shape=(32, 32, 3), num_classes=10, mean=(0.0,) * 3, std=(1.0,) * 3,
                    rate: float = 0.05, seed: int = 0, bias_add: bool = False) -> PlainConvNet:
    """`CifarCnn` without STN: 3x3 VALID convs 32 -> pool -> 64 -> pool -> 64, fc 64, fc K."""
    blocks = [ConvBlock(filters=32, padding="VALID", pool=True),
              ConvBlock(filters=64, padding="VALID", pool=True),
              ConvBlock(filters=64, padding="VALID")]
    return PlainConvNet(image_shape, num_classes, mean, std, blocks, [64], fc_dropout=0,
                        rate=rate, seed=seed, bias_add=bias_add, name="plain_cifar_cnn")


def plain_alexnet(image_shape=(32, 32, 3), num_classes=10, mean=(0.0,) * 3, std=(1.0,) * 3,
                  rate: float = 0.05, fc_width: int = 4096, seed: int = 0,
                  bias_add: bool = False) -> PlainConvNet:
    """`CifarAlexNet` without STN: SAME 3x3 convs 64/2 -> pool -> 192 -> pool -> 384 -> 256 -> 256
    -> pool, dropout + fc 4096, dropout + fc 4096, fc K."""
    blocks = [ConvBlock(filters=64, stride=2, pool=True), ConvBlock(filters=192, pool=True),
              ConvBlock(filters=384), ConvBlock(filters=256), ConvBlock(filters=256, pool=True)]
    return PlainConvNet(image_shape, num_classes, mean, std, blocks, [fc_width, fc_width],
                        fc_dropout=2, rate=rate, seed=seed, bias_add=bias_add,
                        name="plain_alexnet")


class PlainMomentum(tf.Module):
    """SGD with heavy-ball momentum: v = m v + g; w -= lr v (the rule of the library's Momentum)."""

    def __init__(self, variables: Sequence[tf.Variable], learning_rate: float = 0.01,
                 momentum: float = 0.9, fused: bool = True, name: str | None = None):
        super().__init__(name=name)
        self._targets = list(variables)
        self.fused = fused
        self.momentum = float(momentum)
        with self.name_scope:
            self.learning_rate = tf.Variable(float(learning_rate), trainable=False,
                                             name="learning_rate")
            self.velocity = [tf.Variable(tf.zeros_like(v), trainable=False, name="velocity")
                             for v in self._targets]

    def apply(self, gradients: Sequence[tf.Tensor]) -> None:
        for gradient, variable, velocity in zip(gradients, self._targets, self.velocity):
            if self.fused:
                # accum = accum * momentum + grad; var -= lr * accum, in one kernel.
                tf.raw_ops.ResourceApplyMomentum(
                    var=variable.handle, accum=velocity.handle,
                    lr=tf.cast(self.learning_rate, variable.dtype), grad=gradient,
                    momentum=tf.constant(self.momentum, variable.dtype))
            else:
                velocity.assign(self.momentum * velocity + gradient)
                variable.assign_sub(self.learning_rate * velocity)


class PlainTrainer(tf.Module):
    """The compiled training step of a `PlainConvNet`: softmax cross-entropy, momentum SGD."""

    def __init__(self, model: PlainConvNet, input_spec: tf.TensorSpec,
                 target_spec: tf.TensorSpec, learning_rate: float = 0.01, seed: int = 0,
                 fused: bool = True, jit_compile: bool = False, name: str | None = None):
        super().__init__(name=name)
        self.model = model
        self.weights = list(model.trainable_variables)
        self.optimizer = PlainMomentum(self.weights, learning_rate, fused=fused)
        self.generator = tf.random.Generator.from_seed(seed)
        signature = [input_spec, target_spec]
        self.train_step = tf.function(self._train_step, input_signature=signature,
                                      jit_compile=jit_compile)

    def _loss(self, targets, logits):
        return tf.reduce_mean(tf.nn.sparse_softmax_cross_entropy_with_logits(
            tf.cast(targets, tf.int32), logits))

    def forward(self, images, targets):
        """Training-mode loss (dropout on), no gradient: the forward share of a step."""
        seed = self.generator.make_seeds(1)[:, 0]
        return self._loss(targets, self.model(images, training=True, seed=seed))

    def gradients(self, images, targets):
        """Loss and weight gradients without the update: forward + backward of a step."""
        with tf.GradientTape(watch_accessed_variables=False) as tape:
            tape.watch(self.weights)
            loss = self.forward(images, targets)
        return loss, tape.gradient(loss, self.weights)

    def _train_step(self, images, targets):
        seed = self.generator.make_seeds(1)[:, 0]
        with tf.GradientTape(watch_accessed_variables=False) as tape:
            tape.watch(self.weights)
            logits = self.model(images, training=True, seed=seed)
            loss = self._loss(targets, logits)
        gradients = tape.gradient(loss, self.weights)
        with tf.name_scope("update"):
            self.optimizer.apply(gradients)
        predicted = tf.argmax(logits, axis=-1, output_type=tf.int32)
        accuracy = tf.reduce_mean(tf.cast(predicted == tf.cast(targets, tf.int32), tf.float32))
        return {"loss": loss, "accuracy": accuracy}
