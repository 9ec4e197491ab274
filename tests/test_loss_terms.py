"""Tests for stn_pipeline.loss_terms against NumPy: label smoothing and weight decay."""

import numpy as np
import tensorflow as tf

from stn_pipeline.hparams import HyperParameters
from stn_pipeline.layers import StnDense
from stn_pipeline.loss_terms import (LOSS_TERM_HPARAMS, l2_penalty, smoothed_cross_entropy,
                                     stn_l2_penalty)

RNG = np.random.default_rng(0)


def _numpy_smoothed_ce(labels, logits, smoothing):
    logits = logits.astype(np.float64)
    k = logits.shape[1]
    log_p = logits - logits.max(1, keepdims=True)
    log_p -= np.log(np.exp(log_p).sum(1, keepdims=True))
    target = np.eye(k)[labels] * (1 - smoothing[:, None]) + smoothing[:, None] / k
    return -(target * log_p).sum(1)


def test_smoothed_cross_entropy_matches_numpy_per_example():
    logits = RNG.normal(0, 3, size=(6, 5)).astype(np.float32)
    labels = np.array([0, 4, 2, 2, 1, 3])
    smoothing = np.array([0.0, 0.1, 0.49, 0.25, 0.0, 0.3], np.float32)
    got = smoothed_cross_entropy(labels, logits, smoothing).numpy()
    np.testing.assert_allclose(got, _numpy_smoothed_ce(labels, logits, smoothing), rtol=1e-5)
    # e = 0 is TensorFlow's ordinary sparse cross entropy.
    plain = tf.nn.sparse_softmax_cross_entropy_with_logits(labels, logits).numpy()
    np.testing.assert_allclose(got[[0, 4]], plain[[0, 4]], rtol=1e-6)


def test_smoothed_cross_entropy_gradient_is_softmax_minus_smoothed_target():
    logits = tf.constant(RNG.normal(size=(3, 4)).astype(np.float32))
    labels, smoothing = np.array([1, 0, 3]), np.array([0.2, 0.0, 0.4], np.float32)
    with tf.GradientTape() as tape:
        tape.watch(logits)
        loss = tf.reduce_sum(smoothed_cross_entropy(labels, logits, smoothing))
    p = np.exp(logits.numpy()) / np.exp(logits.numpy()).sum(1, keepdims=True)
    target = np.eye(4)[labels] * (1 - smoothing[:, None]) + smoothing[:, None] / 4
    np.testing.assert_allclose(tape.gradient(loss, logits).numpy(), p - target, atol=1e-6)


def test_l2_penalty_scales_one_sum_of_squares_per_example():
    kernels = [tf.Variable(RNG.normal(size=(3, 4)).astype(np.float32)),
               tf.Variable(RNG.normal(size=(2, 2, 3, 5)).astype(np.float32))]
    decay = np.array([1e-3, 0.1, 0.0, 0.02], np.float32)
    squares = sum((k.numpy().astype(np.float64) ** 2).sum() for k in kernels)
    with tf.GradientTape() as tape:
        penalty = l2_penalty(decay, kernels)
        mean = tf.reduce_mean(penalty)
    np.testing.assert_allclose(penalty.numpy(), decay * 0.5 * squares, rtol=1e-5)
    for kernel, gradient in zip(kernels, tape.gradient(mean, kernels)):
        np.testing.assert_allclose(gradient.numpy(), decay.mean() * kernel.numpy(), rtol=1e-5)


def _numpy_effective_penalty(decay, kernel_e, kernel_h, c, gates):
    """Builds each example's kernel c W_e + W_h diag(g_i) explicitly."""
    kernels = c * kernel_e[None] + kernel_h[None] * gates.reshape(
        (len(gates),) + (1,) * (kernel_e.ndim - 1) + (-1,))
    return decay * 0.5 * (kernels.astype(np.float64) ** 2).reshape(len(gates), -1).sum(1)


def test_stn_l2_penalty_equals_decay_of_each_examples_kernel():
    for shape in [(4, 3), (3, 3, 2, 5)]:  # dense and conv kernels
        kernel_e = RNG.normal(size=shape).astype(np.float32)
        kernel_h = RNG.normal(size=shape).astype(np.float32)
        gates = RNG.normal(size=(6, shape[-1])).astype(np.float32)
        decay = RNG.uniform(0, 0.1, size=6).astype(np.float32)
        got = stn_l2_penalty(decay, kernel_e, kernel_h, tf.constant(1.7), gates).numpy()
        np.testing.assert_allclose(
            got, _numpy_effective_penalty(decay, kernel_e, kernel_h, 1.7, gates), rtol=1e-5)


def test_stn_l2_penalty_at_one_input_is_the_decay_of_the_folded_kernel():
    layer = StnDense(5, 4, 2, seed=3)
    layer.gate_kernel.assign(RNG.normal(size=(2, 8)).astype(np.float32))
    layer.elementary_scale.assign(0.8)
    hnet_input = tf.constant([[0.3, -1.2]])
    kernel_e, kernel_h = layer.elementary_kernel, layer.response_kernel
    weight_gate, _ = layer.gates(hnet_input)
    got = stn_l2_penalty([0.01], kernel_e, kernel_h, layer.elementary_scale, weight_gate)
    folded_kernel, _ = layer.folded(hnet_input[0])
    np.testing.assert_allclose(got.numpy(), 0.01 * 0.5 * np.sum(folded_kernel.numpy() ** 2),
                               rtol=1e-5)


def test_stn_l2_penalty_gives_the_gates_a_gradient():
    # What makes weight decay tunable through the response: d penalty_i / d g_ij =
    # wd_i (c <W_e, W_h>_j + g_ij ||W_h||_j^2), with sums over the input axis of column j.
    kernel_e = RNG.normal(size=(4, 3)).astype(np.float32)
    kernel_h = RNG.normal(size=(4, 3)).astype(np.float32)
    gates = tf.constant(RNG.normal(size=(2, 3)).astype(np.float32))
    decay, c = np.array([0.05, 0.2], np.float32), 1.3
    with tf.GradientTape() as tape:
        tape.watch(gates)
        total = tf.reduce_sum(stn_l2_penalty(decay, kernel_e, kernel_h, tf.constant(c), gates))
    expected = decay[:, None] * (c * (kernel_e * kernel_h).sum(0)
                                 + gates.numpy() * (kernel_h ** 2).sum(0))
    np.testing.assert_allclose(tape.gradient(total, gates).numpy(), expected, rtol=1e-5)


def test_weight_decay_is_log_scale_where_it_is_used():
    hparams = HyperParameters(list(LOSS_TERM_HPARAMS.values()))
    np.testing.assert_allclose(hparams.constrained().numpy(), [1e-4, 0.05], rtol=1e-5)
    # A unit step of the unconstrained value multiplies the decay by e (1e-4 -> 2.718e-4).
    moved = hparams.to_constrained(hparams.unconstrained_value + [1.0, 0.0]).numpy()
    np.testing.assert_allclose(moved[0], 1e-4 * np.e, rtol=1e-3)
