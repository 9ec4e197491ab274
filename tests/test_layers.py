"""Tests for stn_pipeline.layers: StnDense, StnConv2D and per-example dropout."""

import math

import numpy as np
import pytest
import tensorflow as tf

from stn_pipeline.layers import StnConv2D, StnDense, dropout


def _randomise(layer, seed, gate_std=0.7, scale=1.7):
    """Moves the gates and c away from their initial values so every term of the formula matters."""
    rng = np.random.default_rng(seed)
    layer.gate_kernel.assign(rng.normal(0.0, gate_std, layer.gate_kernel.shape).astype(np.float32))
    layer.elementary_scale.assign(scale)


def _split(layer):
    d = layer.output_size
    w_e, w_h, b_e, b_h, gate_kernel = (v.numpy().astype(np.float64) for v in (
        layer.elementary_kernel, layer.response_kernel, layer.elementary_bias,
        layer.response_bias, layer.gate_kernel))
    return (w_e, w_h, b_e, b_h, gate_kernel[:, :d], gate_kernel[:, d:],
            float(layer.elementary_scale.numpy()))


def _numpy_dense(layer, x, h):
    w_e, w_h, b_e, b_h, v_w, v_b, c = _split(layer)
    x, h = x.astype(np.float64), h.astype(np.float64)
    return c * (x @ w_e + b_e) + (h @ v_w) * (x @ w_h) + (h @ v_b) * b_h


def _numpy_conv2d(x, kernel, stride, padding):
    """Plain cross-correlation (what tf.nn.conv2d computes), NHWC / HWIO, TF's SAME padding."""
    batch, height, width, _ = x.shape
    k = kernel.shape[0]
    if padding == "SAME":
        out_h, out_w = -(-height // stride), -(-width // stride)
        pad_h = max((out_h - 1) * stride + k - height, 0)
        pad_w = max((out_w - 1) * stride + k - width, 0)
        x = np.pad(x, [(0, 0), (pad_h // 2, pad_h - pad_h // 2), (pad_w // 2, pad_w - pad_w // 2),
                       (0, 0)])
    else:
        out_h, out_w = (height - k) // stride + 1, (width - k) // stride + 1
    out = np.zeros((batch, out_h, out_w, kernel.shape[-1]))
    for i in range(out_h):
        for j in range(out_w):
            patch = x[:, i * stride:i * stride + k, j * stride:j * stride + k, :]
            out[:, i, j, :] = np.tensordot(patch, kernel, axes=([1, 2, 3], [0, 1, 2]))
    return out


def _numpy_conv_layer(layer, x, h):
    w_e, w_h, b_e, b_h, v_w, v_b, c = _split(layer)
    x, h = x.astype(np.float64), h.astype(np.float64)
    elementary = _numpy_conv2d(x, w_e, layer.stride, layer.padding)
    response = _numpy_conv2d(x, w_h, layer.stride, layer.padding)
    weight_gate = (h @ v_w)[:, None, None, :]
    bias_gate = (h @ v_b)[:, None, None, :]
    return c * (elementary + b_e) + weight_gate * response + bias_gate * b_h


# ----------------------------------------------------------------------------------- StnDense


def test_stn_dense_matches_the_formula():
    layer = StnDense(5, 4, num_hparams=3, seed=1)
    _randomise(layer, seed=2)
    rng = np.random.default_rng(3)
    x = rng.normal(size=(6, 5)).astype(np.float32)
    h = rng.normal(size=(6, 3)).astype(np.float32)
    np.testing.assert_allclose(layer(x, h).numpy(), _numpy_dense(layer, x, h),
                               rtol=1e-5, atol=1e-5)


def test_stn_dense_elementary_scale_matters():
    layer = StnDense(3, 2, num_hparams=1, seed=0)
    x = np.ones((2, 3), np.float32)
    h = np.zeros((2, 1), np.float32)  # zero gates: output is c * (x W_e + b_e)
    before = layer(x, h).numpy()
    layer.elementary_scale.assign(2.5)
    np.testing.assert_allclose(layer(x, h).numpy(), 2.5 * before, rtol=1e-6)


def test_gates_are_per_example_and_per_unit():
    layer = StnDense(5, 4, num_hparams=3, seed=1)
    _randomise(layer, seed=4)
    h = np.random.default_rng(5).normal(size=(6, 3)).astype(np.float32)
    weight_gate, bias_gate = layer.gates(h)
    assert weight_gate.shape == (6, 4) and bias_gate.shape == (6, 4)
    v = layer.gate_kernel.numpy()
    np.testing.assert_allclose(weight_gate.numpy(), h @ v[:, :4], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(bias_gate.numpy(), h @ v[:, 4:], rtol=1e-5, atol=1e-6)
    for gate in (weight_gate.numpy(), bias_gate.numpy()):
        assert len(np.unique(np.round(gate[0], 6))) == 4  # different units, different gates
        assert not np.allclose(gate[0], gate[1])  # different examples, different gates


def test_rows_of_the_batch_use_their_own_hnet_input():
    layer = StnDense(5, 4, num_hparams=2, seed=1)
    _randomise(layer, seed=6)
    rng = np.random.default_rng(7)
    x = np.tile(rng.normal(size=(1, 5)).astype(np.float32), (2, 1))  # same input twice
    h = np.float32([[0.0, 0.0], [1.0, -2.0]])
    out = layer(x, h).numpy()
    assert not np.allclose(out[0], out[1])
    np.testing.assert_allclose(out[1], layer(x[1:], h[1:]).numpy()[0], rtol=1e-6)


def test_stn_dense_folded_equals_the_layer():
    layer = StnDense(5, 4, num_hparams=3, seed=1)
    _randomise(layer, seed=8)
    rng = np.random.default_rng(9)
    x = rng.normal(size=(7, 5)).astype(np.float32)
    h = rng.normal(size=(3,)).astype(np.float32)
    kernel, bias = layer.folded(h)
    assert kernel.shape == (5, 4) and bias.shape == (4,)
    expected = layer(x, np.tile(h, (7, 1))).numpy()
    np.testing.assert_allclose(x @ kernel.numpy() + bias.numpy(), expected, rtol=1e-5, atol=1e-5)


def test_stn_dense_under_tf_function_with_unknown_batch():
    layer = StnDense(5, 4, num_hparams=2, seed=1)
    _randomise(layer, seed=10)
    call = tf.function(layer.__call__, input_signature=[tf.TensorSpec([None, 5], tf.float32),
                                                        tf.TensorSpec([None, 2], tf.float32)])
    rng = np.random.default_rng(11)
    for batch in (1, 3, 8):
        x = rng.normal(size=(batch, 5)).astype(np.float32)
        h = rng.normal(size=(batch, 2)).astype(np.float32)
        np.testing.assert_allclose(call(x, h).numpy(), _numpy_dense(layer, x, h),
                                   rtol=1e-5, atol=1e-5)
    assert call.experimental_get_tracing_count() == 1


@pytest.mark.parametrize("input_size", [4, 100])
def test_stn_dense_initialisation(input_size):
    layer = StnDense(input_size, 64, num_hparams=40, seed=0)
    bound = 1.0 / math.sqrt(input_size)
    for variable in (layer.elementary_kernel, layer.response_kernel, layer.elementary_bias,
                     layer.response_bias):
        values = np.abs(variable.numpy())
        assert values.max() <= bound
        assert values.max() > 0.9 * bound  # uniform over the whole range, not a narrower one
    assert layer.elementary_kernel.shape == layer.response_kernel.shape == (input_size, 64)
    assert layer.elementary_bias.shape == layer.response_bias.shape == (64,)
    assert not np.allclose(layer.elementary_kernel.numpy(), layer.response_kernel.numpy())
    assert layer.gate_kernel.shape == (40, 128)
    gates = layer.gate_kernel.numpy()
    assert abs(gates.mean()) < 0.001
    assert gates.std() == pytest.approx(0.01, rel=0.05)
    assert float(layer.elementary_scale.numpy()) == 1.0


def test_same_seed_same_initialisation():
    a, b, c = StnDense(3, 4, 2, seed=5), StnDense(3, 4, 2, seed=5), StnDense(3, 4, 2, seed=6)
    for name in ("elementary_kernel", "response_kernel", "response_bias", "gate_kernel"):
        np.testing.assert_array_equal(getattr(a, name).numpy(), getattr(b, name).numpy())
        assert not np.allclose(getattr(a, name).numpy(), getattr(c, name).numpy())


def test_invalid_sizes_are_rejected():
    with pytest.raises(ValueError, match="num_hparams=0"):
        StnDense(3, 4, num_hparams=0)
    with pytest.raises(ValueError, match="output_size=0"):
        StnDense(3, 0, num_hparams=1)
    with pytest.raises(ValueError, match="'FULL'"):
        StnConv2D(3, 4, 3, num_hparams=1, padding="FULL")


# ---------------------------------------------------------------------------------- StnConv2D


@pytest.mark.parametrize("stride, padding", [(1, "SAME"), (2, "VALID"), (2, "SAME")])
def test_stn_conv2d_matches_the_formula(stride, padding):
    layer = StnConv2D(3, 4, kernel_size=3, num_hparams=2, stride=stride, padding=padding, seed=1)
    _randomise(layer, seed=12, scale=0.6)
    rng = np.random.default_rng(13)
    x = rng.normal(size=(2, 7, 6, 3)).astype(np.float32)
    h = rng.normal(size=(2, 2)).astype(np.float32)
    expected = _numpy_conv_layer(layer, x, h)
    out = layer(x, h).numpy()
    assert out.shape == expected.shape
    np.testing.assert_allclose(out, expected, rtol=1e-4, atol=1e-4)


def test_stn_conv2d_gates_are_per_channel_and_broadcast_over_space():
    layer = StnConv2D(2, 3, kernel_size=1, num_hparams=1, seed=0)
    _randomise(layer, seed=14)
    x = np.ones((2, 4, 4, 2), np.float32)  # spatially constant input
    h = np.float32([[0.5], [-1.5]])
    out = layer(x, h).numpy()
    # A 1x1 conv of a constant image is constant over space; each channel has its own value.
    np.testing.assert_allclose(out, np.broadcast_to(out[:, :1, :1, :], out.shape), atol=1e-6)
    weight_gate, bias_gate = layer.gates(h)
    assert weight_gate.shape == (2, 3) and bias_gate.shape == (2, 3)
    assert len(np.unique(np.round(weight_gate.numpy()[0], 6))) == 3


def test_stn_conv2d_folded_equals_the_layer():
    layer = StnConv2D(3, 5, kernel_size=3, num_hparams=2, seed=2)
    _randomise(layer, seed=15, scale=1.3)
    rng = np.random.default_rng(16)
    x = rng.normal(size=(3, 6, 6, 3)).astype(np.float32)
    h = rng.normal(size=(2,)).astype(np.float32)
    kernel, bias = layer.folded(h)
    assert kernel.shape == (3, 3, 3, 5) and bias.shape == (5,)
    folded = _numpy_conv2d(x.astype(np.float64), kernel.numpy().astype(np.float64), 1, "SAME")
    folded += bias.numpy()
    np.testing.assert_allclose(layer(x, np.tile(h, (3, 1))).numpy(), folded, rtol=1e-4, atol=1e-4)


def test_stn_conv2d_under_tf_function_with_unknown_batch():
    layer = StnConv2D(3, 4, kernel_size=3, num_hparams=2, seed=3)
    _randomise(layer, seed=17)
    call = tf.function(layer.__call__,
                       input_signature=[tf.TensorSpec([None, 5, 5, 3], tf.float32),
                                        tf.TensorSpec([None, 2], tf.float32)])
    rng = np.random.default_rng(18)
    for batch in (1, 4):
        x = rng.normal(size=(batch, 5, 5, 3)).astype(np.float32)
        h = rng.normal(size=(batch, 2)).astype(np.float32)
        np.testing.assert_allclose(call(x, h).numpy(), _numpy_conv_layer(layer, x, h),
                                   rtol=1e-4, atol=1e-4)
    assert call.experimental_get_tracing_count() == 1


def test_stn_conv2d_initialisation():
    layer = StnConv2D(8, 64, kernel_size=3, num_hparams=16, seed=0)
    bound = 1.0 / math.sqrt(8 * 3 * 3)  # fan_in = C_in k k
    assert layer.elementary_kernel.shape == layer.response_kernel.shape == (3, 3, 8, 64)
    for kernel in (layer.elementary_kernel, layer.response_kernel):
        assert np.abs(kernel.numpy()).max() <= bound
        assert np.abs(kernel.numpy()).max() > 0.9 * bound
    for bias in (layer.elementary_bias, layer.response_bias):
        assert np.abs(bias.numpy()).max() <= bound
    assert layer.gate_kernel.numpy().std() == pytest.approx(0.01, rel=0.08)
    assert float(layer.elementary_scale.numpy()) == 1.0


# ------------------------------------------------------------------------------------ dropout

SEED = tf.constant([1, 2], tf.int32)


def test_dropout_keeps_about_one_minus_rate_and_preserves_the_mean():
    rate = 0.3
    inputs = tf.ones([200, 1000])
    out = dropout(inputs, tf.fill([200], rate), SEED, training=True).numpy()
    kept = out != 0
    assert kept.mean() == pytest.approx(1 - rate, abs=0.005)
    np.testing.assert_allclose(out[kept], 1.0 / (1 - rate), rtol=1e-6)  # inverted dropout
    assert out.mean() == pytest.approx(1.0, abs=0.01)


def test_dropout_preserves_the_mean_of_non_constant_inputs():
    inputs = np.random.default_rng(0).uniform(1.0, 3.0, size=(100, 2000)).astype(np.float32)
    out = dropout(inputs, tf.fill([100], 0.5), SEED, training=True).numpy()
    assert out.mean() == pytest.approx(inputs.mean(), rel=0.01)
    kept = out != 0
    np.testing.assert_allclose(out[kept], 2.0 * inputs[kept], rtol=1e-6)


def test_channelwise_dropout_zeros_whole_channels_per_example():
    inputs = tf.ones([64, 5, 6, 16])
    out = dropout(inputs, tf.fill([64], 0.5), SEED, training=True, channelwise=True).numpy()
    per_channel = out.reshape(64, 30, 16)
    zero = np.all(per_channel == 0, axis=1)
    full = np.all(per_channel == 2.0, axis=1)
    assert np.all(zero | full)  # every (example, channel) is dropped or kept as a whole
    assert zero.mean() == pytest.approx(0.5, abs=0.06)
    assert not np.all(zero == zero[:1])  # the pattern differs between examples


def test_dropout_rates_are_per_example():
    inputs = tf.ones([4, 5000])
    rates = tf.constant([0.0, 0.9, 0.5, 0.0])
    out = dropout(inputs, rates, SEED, training=True).numpy()
    np.testing.assert_array_equal(out[0], np.ones(5000))
    np.testing.assert_array_equal(out[3], np.ones(5000))
    assert (out[1] != 0).mean() == pytest.approx(0.1, abs=0.02)
    assert (out[2] != 0).mean() == pytest.approx(0.5, abs=0.03)
    np.testing.assert_allclose(out[1][out[1] != 0], 10.0, rtol=1e-5)


def test_dropout_rate_one_drops_everything_without_nan():
    out = dropout(tf.ones([2, 10]), tf.constant([1.0, 0.0]), SEED, training=True).numpy()
    np.testing.assert_array_equal(out[0], 0.0)
    np.testing.assert_array_equal(out[1], 1.0)


def test_dropout_is_identity_when_not_training():
    inputs = tf.random.normal([8, 4, 4, 3])
    for channelwise in (False, True):
        out = dropout(inputs, tf.fill([8], 0.7), SEED, training=False, channelwise=channelwise)
        np.testing.assert_array_equal(out.numpy(), inputs.numpy())


def test_dropout_mask_depends_on_the_seed_only():
    inputs = tf.ones([8, 100])
    rates = tf.fill([8], 0.5)
    first = dropout(inputs, rates, SEED, training=True).numpy()
    again = dropout(inputs, rates, SEED, training=True).numpy()
    other = dropout(inputs, rates, tf.constant([1, 3]), training=True).numpy()
    np.testing.assert_array_equal(first, again)
    assert not np.array_equal(first, other)


def test_no_gradient_flows_into_the_rate():
    inputs = tf.Variable(tf.ones([16, 32]))
    rate = tf.Variable(tf.fill([16], 0.25))
    with tf.GradientTape(persistent=True) as tape:
        out = dropout(inputs, rate, SEED, training=True)
        total = tf.reduce_sum(out)
    assert tape.gradient(total, rate) is None
    input_gradient = tape.gradient(total, inputs).numpy()
    np.testing.assert_allclose(input_gradient, (out.numpy() != 0) / 0.75, rtol=1e-6)


def test_dropout_under_tf_function_with_unknown_batch():
    @tf.function(input_signature=[tf.TensorSpec([None, 4, 4, 2], tf.float32),
                                  tf.TensorSpec([None], tf.float32)])
    def drop(inputs, rate):
        return dropout(inputs, rate, SEED, training=True, channelwise=True)

    for batch in (1, 5):
        out = drop(tf.ones([batch, 4, 4, 2]), tf.fill([batch], 0.5)).numpy()
        assert out.shape == (batch, 4, 4, 2)
        assert set(np.unique(out)) <= {0.0, 2.0}
    assert drop.experimental_get_tracing_count() == 1


# ---------------------------------------------------------------------------------- precision


@pytest.mark.parametrize("stride, padding", [(1, "SAME"), (2, "VALID")])
def test_bf16_compute_dtype_matches_the_formula_within_bf16_rounding(stride, padding):
    layer = StnConv2D(3, 4, kernel_size=3, num_hparams=2, stride=stride, padding=padding, seed=4)
    assert layer.compute_dtype == tf.float32  # the default
    _randomise(layer, seed=19, scale=0.8)
    rng = np.random.default_rng(20)
    x = rng.normal(size=(2, 7, 6, 3)).astype(np.float32)
    h = rng.normal(size=(2, 2)).astype(np.float32)
    expected = _numpy_conv_layer(layer, x, h)
    kernel, bias = layer.folded(h[0])
    layer.compute_dtype = tf.bfloat16
    out = layer(x, h)
    assert out.dtype == tf.float32
    # bfloat16 keeps 8 significant bits: errors of a few 2^-8 of the output's scale.
    np.testing.assert_allclose(out.numpy(), expected, atol=2.0 ** -6 * np.abs(expected).max())
    assert np.abs(out.numpy() - expected).max() > 1e-5  # not float32 arithmetic
    # Folding is float32 arithmetic on the float32 variables at any compute dtype.
    folded_kernel, folded_bias = layer.folded(h[0])
    assert folded_kernel.dtype == tf.float32
    np.testing.assert_array_equal(folded_kernel.numpy(), kernel.numpy())
    np.testing.assert_array_equal(folded_bias.numpy(), bias.numpy())
