"""STN layers: the structured best-response approximation of the original paper.

Each layer holds an elementary path (W_e, b_e), a response path (W_h, b_h), a bias-free linear
map V from the H hypernet inputs to 2 * D_out gates, and a learnable scalar c:

    y = c * (x W_e + b_e) + (h V_w) * (x W_h) + (h V_b) * b_h

with one gate per output unit (dense) or output channel (conv), broadcast over space. At a fixed
h the layer is an ordinary layer with kernel c W_e + W_h diag(h V_w); `folded` returns it.

Precision: variables are always float32. A layer's `compute_dtype` (float32 unless
`precision.apply_precision` sets bfloat16) is the dtype of its matmuls/convolutions: inputs and
kernels are cast to it once per call, and the products are cast back to float32 before the gated
combine, so gates, biases, outputs and every gradient reaching a variable stay float32.

#### References
MacKay et al., Self-Tuning Networks, ICLR 2019, https://arxiv.org/abs/1903.03088 (section 4.2)
"""

from __future__ import annotations

import math

import tensorflow as tf

__all__ = ["StnConv2D", "StnDense", "dropout"]

_GATE_STDDEV = 0.01  # the original STN initialisation of V


class _StnLayer(tf.Module):
    """Shared parameters and gate arithmetic of the two STN layers.

    The elementary path (`elementary_kernel`, `elementary_bias`, `elementary_scale`) and the
    response path (`response_kernel`, `response_bias`, `gate_kernel`) are separate variables, so
    a method can update them as separate parameter groups (Delta-STN's general and response
    parameters, `response_variables`).
    """

    def __init__(self, kernel_shape, fan_in: int, output_size: int, num_hparams: int,
                 seed: int | None, name: str | None):
        super().__init__(name=name)
        if num_hparams < 1 or output_size < 1 or fan_in < 1:
            raise ValueError(f"{type(self).__name__}: sizes must be >= 1, received "
                             f"fan_in={fan_in}, output_size={output_size}, num_hparams={num_hparams}.")
        self.output_size = output_size
        self.num_hparams = num_hparams
        # The dtype of the matmuls/convolutions; set it before the first call is traced.
        self.compute_dtype = tf.float32
        bound = 1.0 / math.sqrt(fan_in)
        init = (tf.random.Generator.from_non_deterministic_state() if seed is None
                else tf.random.Generator.from_seed(seed))
        # Drawn as the former side-by-side [..., 2 D_out] kernel and [2 D_out] bias and split, so
        # a seed gives the same initial network as before the paths were separate variables.
        kernel_e, kernel_h = tf.split(init.uniform(kernel_shape[:-1] + [2 * output_size],
                                                   -bound, bound), 2, axis=-1)
        bias_e, bias_h = tf.split(init.uniform([2 * output_size], -bound, bound), 2)
        with self.name_scope:
            self.elementary_kernel = tf.Variable(kernel_e, name="elementary_kernel")
            self.response_kernel = tf.Variable(kernel_h, name="response_kernel")
            self.elementary_bias = tf.Variable(bias_e, name="elementary_bias")
            self.response_bias = tf.Variable(bias_h, name="response_bias")
            self.gate_kernel = tf.Variable(
                init.normal([num_hparams, 2 * output_size], stddev=_GATE_STDDEV), name="gate_kernel")
            self.elementary_scale = tf.Variable(1.0, name="elementary_scale")

    def response_variables(self) -> list[tf.Variable]:
        """The response path: W_h, b_h and the gate map V (all that the hypernet input reaches)."""
        return [self.response_kernel, self.response_bias, self.gate_kernel]

    def _to_compute(self, tensor: tf.Tensor) -> tf.Tensor:
        """`tensor` in the compute dtype (tf.cast is a no-op when the dtype already matches)."""
        return tf.cast(tensor, self.compute_dtype)

    def gates(self, hnet_input: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
        """[B, H] hypernet input -> weight gates and bias gates, each [B, D_out]."""
        gates = tf.matmul(hnet_input, self.gate_kernel)
        return gates[:, :self.output_size], gates[:, self.output_size:]

    def _combine(self, elementary: tf.Tensor, response: tf.Tensor,
                 hnet_input: tf.Tensor) -> tf.Tensor:
        """c (elementary + b_e) + g_w * response + g_b * b_h from the float32 path outputs."""
        weight_gate, bias_gate = self.gates(hnet_input)
        # Gates are per example and per unit; insert the spatial axes of conv outputs.
        expand = [slice(None)] + [None] * (len(elementary.shape) - 2) + [slice(None)]
        return (self.elementary_scale * (elementary + self.elementary_bias)
                + weight_gate[expand] * response + bias_gate[expand] * self.response_bias)

    def folded(self, hnet_input: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
        """Kernel and bias of the ordinary layer equal to this one at a single [H] input."""
        weight_gate, bias_gate = self.gates(tf.reshape(hnet_input, [1, -1]))
        scale = self.elementary_scale
        kernel = scale * self.elementary_kernel + self.response_kernel * weight_gate[0]
        return kernel, scale * self.elementary_bias + bias_gate[0] * self.response_bias


class StnDense(_StnLayer):
    """Fully connected STN layer with one gate per output unit."""

    def __init__(self, input_size: int, output_size: int, num_hparams: int,
                 seed: int | None = None, name: str | None = None):
        """Constructs a `StnDense`.

        Args:
          input_size: D_in, the last dimension of the input.
          output_size: D_out, the number of output units.
          num_hparams: H, the width of the hypernet input.
          seed: seed of the initialisation (W, b ~ U(+-1/sqrt(D_in)), V ~ N(0, 0.01^2), c = 1).
          name: module name.
        """
        super().__init__([input_size, output_size], input_size, output_size, num_hparams, seed,
                         name)
        self.input_size = input_size

    def __call__(self, inputs: tf.Tensor, hnet_input: tf.Tensor) -> tf.Tensor:
        """[B, D_in] inputs and [B, H] hypernet input -> [B, D_out]."""
        inputs = self._to_compute(inputs)
        elementary = tf.matmul(inputs, self._to_compute(self.elementary_kernel))
        response = tf.matmul(inputs, self._to_compute(self.response_kernel))
        return self._combine(tf.cast(elementary, tf.float32), tf.cast(response, tf.float32),
                             hnet_input)


class StnConv2D(_StnLayer):
    """2-D convolution (NHWC) STN layer with one gate per output channel."""

    def __init__(self, input_channels: int, output_channels: int, kernel_size: int,
                 num_hparams: int, stride: int = 1, padding: str = "SAME",
                 seed: int | None = None, name: str | None = None):
        """Constructs a `StnConv2D`.

        Args:
          input_channels: C_in.
          output_channels: C_out.
          kernel_size: k for a k x k kernel.
          num_hparams: H, the width of the hypernet input.
          stride: spatial stride.
          padding: "SAME" or "VALID".
          seed: seed of the initialisation (fan_in = C_in k k, as in the original STN).
          name: module name.
        """
        if padding not in ("SAME", "VALID"):
            raise ValueError(f"StnConv2D: padding must be 'SAME' or 'VALID', received {padding!r}.")
        super().__init__([kernel_size, kernel_size, input_channels, output_channels],
                         input_channels * kernel_size * kernel_size, output_channels, num_hparams,
                         seed, name)
        self.stride = stride
        self.padding = padding

    def __call__(self, inputs: tf.Tensor, hnet_input: tf.Tensor) -> tf.Tensor:
        """[B, H, W, C_in] inputs and [B, num_hparams] hypernet input -> [B, H', W', C_out]."""
        # Two convolutions, with c folded into W_e and b_e: cheaper than one stacked convolution
        # whose large [B, H, W, 2 C_out] output would be split (and, backwards, concatenated).
        weight_gate, bias_gate = self.gates(hnet_input)
        inputs = self._to_compute(inputs)
        scale = self.elementary_scale
        elementary = tf.cast(self._conv(inputs, scale * self.elementary_kernel), tf.float32)
        elementary += scale * self.elementary_bias
        response = tf.cast(self._conv(inputs, self.response_kernel), tf.float32)
        return (elementary + weight_gate[:, None, None, :] * response
                + bias_gate[:, None, None, :] * self.response_bias)

    def _conv(self, inputs: tf.Tensor, kernel: tf.Tensor) -> tf.Tensor:
        return tf.nn.conv2d(inputs, self._to_compute(kernel), self.stride, self.padding)


def dropout(inputs: tf.Tensor, rate: tf.Tensor, seed: tf.Tensor, training: bool,
            channelwise: bool = False) -> tf.Tensor:
    """Inverted dropout with one drop probability per example.

    Args:
      inputs: [B, ...] activations.
      rate: [B] drop probabilities in [0, 1); no gradient flows into them.
      seed: shape-[2] integer seed of the stateless mask.
      training: identity when False.
      channelwise: drop whole channels of [B, H, W, C] feature maps (one draw per example and
        channel) instead of single elements.

    Returns:
      inputs * mask / (1 - rate), with mask ~ Bernoulli(1 - rate) per example.
    """
    if not training:
        return inputs
    keep = 1.0 - tf.stop_gradient(tf.cast(rate, inputs.dtype))
    keep = tf.reshape(keep, [-1] + [1] * (len(inputs.shape) - 1))
    shape = tf.shape(inputs)
    if channelwise:
        shape = tf.concat([shape[:1], tf.ones_like(shape[1:-1]), shape[-1:]], axis=0)
    mask = tf.cast(tf.random.stateless_uniform(shape, seed) < keep, inputs.dtype)
    # divide_no_nan: a rate of exactly 1 drops everything instead of producing NaN.
    return tf.math.divide_no_nan(inputs * mask, keep)


class _FoldedLayer(tf.Module):
    """An ordinary layer holding the folded kernel and bias of an STN layer at one fixed input."""

    def __init__(self, kernel: tf.Tensor, bias: tf.Tensor, name: str | None):
        super().__init__(name=name)
        kernel = tf.convert_to_tensor(kernel, tf.float32)
        bias = tf.convert_to_tensor(bias, tf.float32)
        if kernel.shape[-1] != bias.shape[0] or len(bias.shape) != 1:
            raise ValueError(f"{type(self).__name__}: the bias must be a vector with one entry per "
                             f"output unit, received kernel {kernel.shape} and bias {bias.shape}.")
        self.output_size = int(kernel.shape[-1])
        with self.name_scope:
            self.kernel = tf.Variable(kernel, name="kernel")
            self.bias = tf.Variable(bias, name="bias")


class FoldedDense(_FoldedLayer):
    """The ordinary dense layer y = x K + b that an `StnDense` equals at a fixed hypernet input.

    Called like the STN layer, `(inputs, hnet_input)`, so it can replace one inside a model; the
    hypernet input is ignored because it was fixed when folding:

        K = c W_e + W_h diag(h V_w),   b = c b_e + (h V_b) * b_h
    """

    def __init__(self, kernel: tf.Tensor, bias: tf.Tensor, name: str | None = None):
        """Constructs a `FoldedDense` from a [D_in, D_out] kernel and a [D_out] bias."""
        super().__init__(kernel, bias, name)
        self.input_size = int(self.kernel.shape[0])

    @classmethod
    def from_stn(cls, layer: StnDense, hnet_input: tf.Tensor) -> "FoldedDense":
        """Folds `layer` at the single [H] hypernet input `hnet_input`."""
        kernel, bias = layer.folded(hnet_input)
        return cls(kernel, bias, name=layer.name)

    def __call__(self, inputs: tf.Tensor, hnet_input: tf.Tensor | None = None) -> tf.Tensor:
        """[B, D_in] inputs -> [B, D_out]; `hnet_input` is ignored."""
        del hnet_input  # Fixed at folding time.
        return tf.nn.bias_add(tf.matmul(inputs, self.kernel), self.bias)


class FoldedConv2D(_FoldedLayer):
    """The ordinary convolution (NHWC) that an `StnConv2D` equals at a fixed hypernet input.

    Same kernel and bias formulas as `FoldedDense`, with one gate per output channel; called as
    `(inputs, hnet_input)` with the hypernet input ignored.
    """

    def __init__(self, kernel: tf.Tensor, bias: tf.Tensor, stride: int = 1,
                 padding: str = "SAME", name: str | None = None):
        """Constructs a `FoldedConv2D` from a [k, k, C_in, C_out] kernel and a [C_out] bias."""
        if padding not in ("SAME", "VALID"):
            raise ValueError(f"FoldedConv2D: padding must be 'SAME' or 'VALID', received "
                             f"{padding!r}.")
        super().__init__(kernel, bias, name)
        self.stride = stride
        self.padding = padding

    @classmethod
    def from_stn(cls, layer: StnConv2D, hnet_input: tf.Tensor) -> "FoldedConv2D":
        """Folds `layer` at the single [H] hypernet input `hnet_input`."""
        kernel, bias = layer.folded(hnet_input)
        return cls(kernel, bias, layer.stride, layer.padding, name=layer.name)

    def __call__(self, inputs: tf.Tensor, hnet_input: tf.Tensor | None = None) -> tf.Tensor:
        """[B, H, W, C_in] inputs -> [B, H', W', C_out]; `hnet_input` is ignored."""
        del hnet_input  # Fixed at folding time.
        return tf.nn.bias_add(tf.nn.conv2d(inputs, self.kernel, self.stride, self.padding),
                              self.bias)


def fold_layer(layer: StnDense | StnConv2D, hnet_input: tf.Tensor) -> FoldedDense | FoldedConv2D:
    """The ordinary layer equal to the STN layer `layer` at the single [H] input `hnet_input`."""
    if isinstance(layer, StnConv2D):
        return FoldedConv2D.from_stn(layer, hnet_input)
    if isinstance(layer, StnDense):
        return FoldedDense.from_stn(layer, hnet_input)
    raise TypeError(f"fold_layer: expected a StnDense or StnConv2D, received "
                    f"{type(layer).__name__}.")


__all__ += ["FoldedConv2D", "FoldedDense", "fold_layer"]
