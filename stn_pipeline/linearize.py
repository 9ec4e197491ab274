"""The Delta-STN expansion around the current hyperparameters: centring and linearisation.

Delta-STN feeds the hypernetwork the offset of each example's sample from the current value,

    Delta_i = lambda_sample_i - stop_gradient(lambda),

so that at Delta = 0 (the current hyperparameters) the network is its general path alone, and
trains the response parameters on the first-order expansion of the prediction in Delta,

    y_i ~ f(x_i; Delta = 0) + J_Delta f(x_i) . Delta_i,

a Jacobian-vector product computed in forward mode (`tf.autodiff.ForwardAccumulator`). Recorded
by an outer `tf.GradientTape`, the product back-propagates into the response parameters
(reverse-over-forward).

#### References
Bae & Grosse, Delta-STN: Efficient Bilevel Optimization for Neural Networks using Structured
Response Jacobians, NeurIPS 2020, https://arxiv.org/abs/2010.13514
"""

from __future__ import annotations

from typing import Any, Callable

import tensorflow as tf

__all__ = ["centred_hnet_input", "linearized"]


def centred_hnet_input(sample_unconstrained: tf.Tensor,
                       unconstrained_value: tf.Tensor) -> tf.Tensor:
    """The centred hypernet input Delta = sample - stop_gradient(value).

    Args:
      sample_unconstrained: [B, H] perturbed unconstrained samples, lambda + sigma * eps.
      unconstrained_value: [H] current unconstrained values lambda.

    Returns:
      [B, H] offsets; their derivative with respect to lambda is the identity, through the
      sample only, so a hyper step still reaches lambda (and sigma) through the gates.
    """
    return sample_unconstrained - tf.stop_gradient(unconstrained_value)


def linearized(function: Callable[[tf.Tensor], Any], delta: tf.Tensor) -> Any:
    """The first-order prediction f(0) + J_Delta f(0) . delta, in one forward pass.

    Args:
      function: maps a [B, H] hypernet input to a tensor or nest of tensors (e.g. a model's
        forward pass at fixed inputs, dropout masks and rates). It is traced once, at zero;
        randomness inside it is therefore shared by the value and its derivative.
      delta: [B, H] tangent, each example's offset from the expansion point. Batch size may be
        dynamic.

    Returns:
      The same nest as `function` returns: value at zero plus the directional derivative along
      `delta` (outputs that do not depend on the input get a zero derivative). Differentiable
      with respect to the variables `function` reads when computed under a `GradientTape`.
    """
    delta = tf.convert_to_tensor(delta)
    origin = tf.zeros_like(delta)
    with tf.autodiff.ForwardAccumulator(primals=origin, tangents=delta) as accumulator:
        outputs = function(origin)
    derivatives = accumulator.jvp(outputs, unconnected_gradients=tf.UnconnectedGradients.ZERO)
    return tf.nest.map_structure(tf.add, outputs, derivatives)
