"""Tests for stn_pipeline.linearize: the Delta-STN centred input and linearised prediction."""

import numpy as np
import tensorflow as tf

from stn_pipeline.layers import StnDense
from stn_pipeline.linearize import centred_hnet_input, linearized

H = 3


class _TwoLayers(tf.Module):
    """x -> StnDense -> relu -> StnDense: nonlinear in the hypernet input through the relu."""

    def __init__(self):
        super().__init__()
        self.hidden = StnDense(4, 6, H, seed=1)
        self.out = StnDense(6, 2, H, seed=2)
        rng = np.random.default_rng(0)
        for layer in (self.hidden, self.out):  # gates large enough that Delta matters
            layer.gate_kernel.assign(rng.normal(0, 0.8, layer.gate_kernel.shape).astype("f4"))

    def __call__(self, x, hnet_input):
        return self.out(tf.nn.relu(self.hidden(x, hnet_input)), hnet_input)


def _data(batch=5):
    rng = np.random.default_rng(3)
    x = rng.normal(size=(batch, 4)).astype(np.float32)
    delta = rng.normal(0, 0.5, size=(batch, H)).astype(np.float32)
    return x, delta


def _central_difference(fn, delta, step=1e-3):
    """d/dt f(t * delta) at t = 0, per example, in float64 arithmetic on float32 evaluations."""
    plus = fn(tf.constant(step * delta)).numpy().astype(np.float64)
    minus = fn(tf.constant(-step * delta)).numpy().astype(np.float64)
    return (plus - minus) / (2 * step)


def test_linearized_equals_value_plus_finite_difference_derivative():
    net, (x, delta) = _TwoLayers(), _data()
    fn = lambda h: net(x, h)  # noqa: E731
    expected = fn(tf.zeros_like(delta)).numpy() + _central_difference(fn, delta)
    got = linearized(fn, delta).numpy()
    np.testing.assert_allclose(got, expected, rtol=1e-3, atol=1e-3)
    # Guard against a vacuous test: the network is visibly nonlinear in Delta here.
    assert np.abs(fn(tf.constant(delta)).numpy() - got).max() > 1e-2


def test_linearized_is_exact_for_an_affine_function_and_keeps_the_nest():
    # One STN layer is affine in its hypernet input: the expansion is the function itself.
    layer, (x, delta) = StnDense(4, 3, H, seed=5), _data()
    layer.gate_kernel.assign(np.random.default_rng(1).normal(size=(H, 6)).astype("f4"))
    got = linearized(lambda h: {"y": layer(x, h), "const": tf.ones([2])}, delta)
    np.testing.assert_allclose(got["y"].numpy(), layer(x, tf.constant(delta)).numpy(),
                               rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(got["const"].numpy(), np.ones(2))  # unconnected: zero slope


def _loss(net, x, delta):
    return tf.reduce_sum(tf.square(linearized(lambda h: net(x, h), delta) - 0.3))


def test_gradient_reaches_response_parameters_through_the_jvp():
    net, (x, delta) = _TwoLayers(), _data()
    # The weight gates of the hidden layer enter the prediction only through the JVP term
    # (their Delta = 0 contribution vanishes), so a non-zero gradient proves reverse-over-forward.
    variable = net.hidden.gate_kernel
    with tf.GradientTape() as tape:
        loss = _loss(net, x, delta)
    gradient = tape.gradient(loss, variable).numpy()
    original = variable.numpy()
    index, step = (1, 2), 1e-2
    losses = []
    for sign in (1, -1):
        moved = original.copy()
        moved[index] += sign * step
        variable.assign(moved)
        losses.append(float(_loss(net, x, delta)))
    variable.assign(original)
    expected = (losses[0] - losses[1]) / (2 * step)
    assert abs(expected) > 1e-2
    np.testing.assert_allclose(gradient[index], expected, rtol=2e-2)


def test_compiles_once_for_dynamic_batch_sizes():
    net = _TwoLayers()
    variables = [net.out.response_kernel, net.hidden.gate_kernel]
    traces = []

    @tf.function(input_signature=[tf.TensorSpec([None, 4]), tf.TensorSpec([None, H])])
    def step(x, delta):
        traces.append(1)
        with tf.GradientTape() as tape:
            loss = tf.reduce_mean(linearized(lambda h: net(x, h), delta))
        return loss, tape.gradient(loss, variables)

    for batch in (5, 2, 7):
        x, delta = _data(batch)
        loss, gradients = step(x, delta)
        eager = tf.reduce_mean(linearized(lambda h: net(x, h), delta))
        np.testing.assert_allclose(float(loss), float(eager), rtol=1e-5)
        assert all(g is not None and np.all(np.isfinite(g.numpy())) for g in gradients)
    assert len(traces) == 1


def test_centred_input_passes_gradient_through_the_sample_only():
    value = tf.Variable([0.2, -1.0, 3.0])
    scale = tf.Variable([0.1, 0.5, 2.0])
    eps = tf.constant([[1.0, -2.0, 0.5], [0.0, 1.0, -1.0]])
    with tf.GradientTape(persistent=True) as tape:
        delta = centred_hnet_input(value + tf.math.softplus(scale) * eps, value)
    # Its value is sigma * eps (the current value cancels) ...
    sigma = np.log1p(np.exp(scale.numpy()))
    np.testing.assert_allclose(delta.numpy(), sigma * eps.numpy(), rtol=1e-6)
    # ... its Jacobian in lambda is the identity per example (not zero, as the value suggests) ...
    jacobian = tape.jacobian(delta, value).numpy()  # [B, H, H]
    np.testing.assert_allclose(jacobian, np.broadcast_to(np.eye(3), (2, 3, 3)), atol=1e-7)
    # ... and in s it is diag(sigmoid(s) * eps_i), the softplus derivative times the noise.
    jacobian_s = tape.jacobian(delta, scale).numpy()
    expected = np.einsum("bh,hk->bhk", eps.numpy() / (1 + np.exp(-scale.numpy())), np.eye(3))
    np.testing.assert_allclose(jacobian_s, expected, rtol=1e-5, atol=1e-7)
