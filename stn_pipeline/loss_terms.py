"""Loss-term hyperparameters: per-example label smoothing and weight decay.

Both enter the TRAINING loss only, each example at its own (perturbed) value; the validation loss
of a hyper step never contains them, so their hyper-gradient flows only through the learned
best-response (the gates). That holds only if the penalty depends on what the gates control, which
decides which weights are decayed:

- Ordinary layers (the plain network, non-STN layers): their kernels, `l2_penalty`.
- STN layers: the kernel each example actually uses, c W_e + W_h diag(g_i) with g_i the example's
  weight gates (`stn_l2_penalty`). Decaying W_e and W_h separately would make the penalty blind
  to the gates: the response would have no reason to change with weight decay and its
  hyper-gradient would be noise. At Delta = 0 (Delta-STN's general update) the gates vanish and
  this is ordinary decay of c W_e.
- Never biases, gate kernels (the hypernetwork) or the elementary scale on its own: conventional
  L2 leaves biases alone, and the gates and c act on the weights only through the kernel above.

Convention: penalty_i = weight_decay_i * 0.5 * ||K||^2, so its gradient is weight_decay * K, the
`weight_decay` of SGD in PyTorch (ORIG, DSTN) and Keras.

`LOSS_TERM_HPARAMS` declares both for any classifier. Weight decay is POSITIVE (0 + softplus):
for values below ~0.1, softplus(u) ~ exp(u), so its unconstrained value is log-scale there and a
perturbation multiplies the decay by exp(sigma * eps).
"""

from __future__ import annotations

from typing import Sequence

import tensorflow as tf

from stn_pipeline.hparams import BOUNDED, POSITIVE, HParam
from stn_pipeline.layers import StnConv2D, StnDense
from stn_pipeline.plain_layers import PlainConv2D, PlainDense

__all__ = ["LOSS_TERM_HPARAMS", "l2_penalty", "layers_l2_penalty", "smoothed_cross_entropy",
           "stn_l2_penalty"]

LOSS_TERM_HPARAMS = {
    "weight_decay": HParam("weight_decay", 0.0, None, 1e-4, kind=POSITIVE),
    "label_smoothing": HParam("label_smoothing", 0.0, 0.5, 0.05, kind=BOUNDED),
}


def smoothed_cross_entropy(labels: tf.Tensor, logits: tf.Tensor,
                           smoothing: tf.Tensor) -> tf.Tensor:
    """Cross entropy with one label-smoothing value per example.

    The target of example i puts 1 - e_i + e_i / K on its class and e_i / K on each other class
    (Keras' and PyTorch's convention), so

        loss_i = logsumexp(z_i) - (1 - e_i) z_i[y_i] - e_i mean_k z_i[k].

    Args:
      labels: [B] integer classes.
      logits: [B, K].
      smoothing: [B] values e_i in [0, 1) (the hyperparameter's range is [0, 0.5)); scalars
        broadcast.

    Returns:
      [B] per-example losses; e_i = 0 gives the ordinary sparse cross entropy.
    """
    logits = tf.convert_to_tensor(logits)
    smoothing = tf.cast(smoothing, logits.dtype)
    true_logit = tf.gather(logits, tf.cast(labels, tf.int32), axis=1, batch_dims=1)
    return (tf.reduce_logsumexp(logits, axis=-1) - (1.0 - smoothing) * true_logit
            - smoothing * tf.reduce_mean(logits, axis=-1))


def l2_penalty(weight_decay: tf.Tensor, kernels: Sequence[tf.Tensor]) -> tf.Tensor:
    """Per-example weight decay of shared kernels: weight_decay_i * 0.5 * sum ||K||^2.

    Args:
      weight_decay: [B] per-example coefficients.
      kernels: the decayed tensors (every example uses the same ones).

    Returns:
      [B] penalties; the sum of squares is computed once and scaled per example, so the gradient
      of their batch mean with respect to a kernel is mean(weight_decay) * K.
    """
    squares = tf.add_n([tf.reduce_sum(tf.square(kernel)) for kernel in kernels])
    return tf.cast(weight_decay, squares.dtype) * 0.5 * squares


def stn_l2_penalty(weight_decay: tf.Tensor, kernel_e: tf.Tensor, kernel_h: tf.Tensor,
                   elementary_scale: tf.Tensor, weight_gate: tf.Tensor) -> tf.Tensor:
    """Per-example weight decay of an STN layer's effective kernel c W_e + W_h diag(g_i).

    Never builds the [B, ...] per-example kernels: with column sums over every axis but the last
    (output units or channels), ee = sum W_e^2, eh = sum W_e W_h, hh = sum W_h^2, each [D_out],

        ||K_i||^2 = c^2 sum(ee) + 2 c (g_i . eh) + (g_i^2 . hh).

    Args:
      weight_decay: [B] per-example coefficients.
      kernel_e: elementary kernel W_e, [D_in, D_out] or [k, k, C_in, C_out].
      kernel_h: response kernel W_h, same shape.
      elementary_scale: the scalar c.
      weight_gate: [B, D_out] weight gates g_i of the examples' hypernet inputs.

    Returns:
      [B] penalties weight_decay_i * 0.5 * ||K_i||^2.
    """
    axes = list(range(len(kernel_e.shape) - 1))
    ee = tf.reduce_sum(tf.square(kernel_e))
    eh = tf.reduce_sum(kernel_e * kernel_h, axis=axes)
    hh = tf.reduce_sum(tf.square(kernel_h), axis=axes)
    squares = (tf.square(elementary_scale) * ee + 2.0 * elementary_scale * tf.linalg.matvec(
        weight_gate, eh) + tf.linalg.matvec(tf.square(weight_gate), hh))
    return tf.cast(weight_decay, squares.dtype) * 0.5 * squares


def layers_l2_penalty(weight_decay: tf.Tensor, layers: Sequence[tf.Module],
                      hnet_input: tf.Tensor) -> tf.Tensor:
    """Per-example weight decay of a model's STN and plain layers (see the module docstring).

    Args:
      weight_decay: [B] per-example coefficients.
      layers: `StnDense`/`StnConv2D` (their effective kernels at each example's gates) and
        `PlainDense`/`PlainConv2D` (their kernels).
      hnet_input: [B, H] the examples' hypernet inputs (unused by plain layers).

    Returns:
      [B] penalties.
    """
    plain = [layer.kernel for layer in layers if isinstance(layer, (PlainDense, PlainConv2D))]
    penalty = l2_penalty(weight_decay, plain) if plain else tf.zeros_like(weight_decay)
    for layer in layers:
        if isinstance(layer, (StnDense, StnConv2D)):
            weight_gate, _ = layer.gates(hnet_input)
            penalty += stn_l2_penalty(weight_decay, layer.elementary_kernel,
                                      layer.response_kernel, layer.elementary_scale, weight_gate)
    return penalty
