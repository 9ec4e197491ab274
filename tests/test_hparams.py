"""Tests for stn_pipeline.hparams: declarations, bijectors, per-example sampling and entropy."""

import math

import numpy as np
import pytest
import tensorflow as tf

from stn_pipeline.hparams import BOUNDED, DISCRETE, POSITIVE, HParam, HParamSample, HyperParameters
from stn_pipeline.layers import StnDense


def _softplus(x):
    return np.log1p(np.exp(x))


def _softplus_inverse(y):
    return np.log(np.expm1(y))


def _logit(p):
    return np.log(p) - np.log1p(-p)


def _sigmoid(x):
    return 1.0 / (1.0 + np.exp(-x))


def _three_kinds(per_example=(True, True, True), scales=(0.5, 0.5, 0.5), seed=0):
    specs = [
        HParam("dropout", minimum=0.0, maximum=0.9, init=0.3, scale_init=scales[0],
               kind=BOUNDED, per_example=per_example[0]),
        HParam("decay", minimum=0.5, maximum=None, init=2.0, scale_init=scales[1],
               kind=POSITIVE, per_example=per_example[1]),
        HParam("holes", minimum=0.0, maximum=8.0, init=3.5, scale_init=scales[2],
               kind=DISCRETE, per_example=per_example[2]),
    ]
    return HyperParameters(specs, seed=seed)


# ---------------------------------------------------------------------------------- bijectors


def test_to_unconstrained_matches_numpy_inverse_of_each_kind():
    hparams = _three_kinds()
    values = np.array([[0.05, 0.6, 0.2], [0.45, 1.0, 3.7], [0.85, 7.5, 7.9]], np.float32)
    expected = np.stack([
        _logit(values[:, 0] / 0.9),               # stretched sigmoid on (0, 0.9)
        _softplus_inverse(values[:, 1] - 0.5),    # 0.5 + softplus
        _logit((values[:, 2] - 0.0) / 8.0),       # stretched sigmoid on (0, 8)
    ], axis=-1)
    np.testing.assert_allclose(hparams.to_unconstrained(values).numpy(), expected,
                               rtol=1e-4, atol=1e-4)


def test_round_trip_constrained_unconstrained_constrained():
    hparams = _three_kinds()
    values = np.array([[0.01, 0.51, 0.3], [0.3, 2.0, 2.6], [0.7, 20.0, 5.2], [0.89, 100.0, 7.7]],
                      np.float32)
    back = hparams.to_constrained(hparams.to_unconstrained(values)).numpy()
    np.testing.assert_allclose(back[:, 0], values[:, 0], rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(back[:, 1], values[:, 1], rtol=1e-4, atol=1e-5)
    # Discrete values come back floored (these lie inside integer cells; an exact integer sits on
    # the floor's jump, see test_discrete_integer_init_is_kept).
    np.testing.assert_array_equal(back[:, 2], np.floor(values[:, 2]))


def test_to_constrained_matches_numpy_forward_and_floors_only_discrete_column():
    hparams = _three_kinds()
    unconstrained = np.array([[-2.0, -3.0, -1.3], [0.0, 0.0, 0.1], [1.7, 4.0, 2.2]], np.float32)
    expected = np.stack([
        0.9 * _sigmoid(unconstrained[:, 0]),
        0.5 + _softplus(unconstrained[:, 1]),
        np.floor(8.0 * _sigmoid(unconstrained[:, 2])),
    ], axis=-1)
    np.testing.assert_allclose(hparams.to_constrained(unconstrained).numpy(), expected,
                               rtol=1e-5, atol=1e-5)


def test_initial_values_are_the_declared_inits():
    hparams = _three_kinds()
    values = hparams.as_dict()
    assert values["dropout"] == pytest.approx(0.3, abs=1e-6)
    assert values["decay"] == pytest.approx(2.0, abs=1e-5)
    assert values["holes"] == 3.0  # floor(3.5)
    np.testing.assert_allclose(hparams.unconstrained_value.numpy(),
                               [_logit(0.3 / 0.9), _softplus_inverse(1.5), _logit(3.5 / 8.0)],
                               rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(hparams.scale().numpy(), [0.5, 0.5, 0.5], rtol=1e-6)


def test_discrete_integer_init_is_kept():
    # A discrete hyperparameter declared with an integer init (e.g. 4 cutout holes) must start at
    # that integer, not one below it through the float32 round-off of sigmoid(logit(init)).
    wrong = []
    for minimum, maximum in [(0.0, 4.0), (0.0, 10.0), (-5.0, 5.0), (0.0, 32.0)]:
        for init in range(int(minimum) + 1, int(maximum)):
            hparams = HyperParameters([HParam("holes", minimum, maximum, float(init),
                                              kind=DISCRETE)])
            start = hparams.as_dict()["holes"]
            if start != init:
                wrong.append(f"init={init} in ({minimum}, {maximum}) starts at {start}")
    assert not wrong, "; ".join(wrong)


def test_discrete_values_are_integers_but_hnet_input_is_not_floored():
    hparams = _three_kinds(scales=(0.5, 0.5, 1.0))
    sample = hparams.sample(4000)
    values = sample.values.numpy()
    hnet_input = sample.hnet_input.numpy()
    holes = values[:, 2]
    np.testing.assert_array_equal(holes, np.round(holes))
    assert len(np.unique(holes)) >= 4  # the perturbation spreads over several integers
    assert holes.min() >= 0 and holes.max() <= 7
    # The gates see the raw unconstrained draw: mostly non-integer and not the floor image.
    assert np.mean(hnet_input[:, 2] != np.round(hnet_input[:, 2])) > 0.99
    # values = floor(bijector(hnet_input)), computed here in float64.
    raw = 8.0 * _sigmoid(hnet_input[:, 2].astype(np.float64))
    # An off-by-one is tolerated only where the float32 sigmoid is within round-off of an integer.
    near_integer = np.abs(raw - np.round(raw)) < 1e-5
    assert np.all((holes == np.floor(raw)) | near_integer)
    # Continuous columns are not floored.
    assert np.mean(values[:, 0] != np.round(values[:, 0])) > 0.99


def _gradients_through_values_and_gates(gate_std):
    """d loss / d unconstrained_value, in total and with the values' path stopped (gates only).

    The loss uses the values of `dropout` (continuous) and `holes` (discrete) as factors, and
    every column through the gates of one StnDense layer.
    """
    hparams = _three_kinds()
    layer = StnDense(2, 1, hparams.size, seed=0)
    layer.gate_kernel.assign(tf.random.stateless_normal(layer.gate_kernel.shape, [1, 2]) * gate_std)
    rng = np.random.default_rng(0)
    x = tf.constant(rng.normal(size=(16, 2)), tf.float32)
    y = tf.constant(rng.normal(size=16), tf.float32)

    def loss(sample):
        outputs = layer(x, sample.hnet_input)[:, 0] * (1.0 + sample["dropout"] + sample["holes"])
        return tf.reduce_mean(tf.square(outputs - y))

    with tf.GradientTape(persistent=True) as tape:
        sample = hparams.sample(16)
        total = loss(sample)
        gates_only = loss(HParamSample(sample.names, tf.stop_gradient(sample.values),
                                       sample.hnet_input))
    return (tape.gradient(total, hparams.unconstrained_value).numpy(),
            tape.gradient(gates_only, hparams.unconstrained_value).numpy())


def test_a_discrete_hyperparameter_learns_only_through_the_gates():
    total, gates_only = _gradients_through_values_and_gates(gate_std=0.5)
    holes = 2
    assert gates_only[holes] != 0.0
    assert total[holes] == pytest.approx(gates_only[holes], rel=1e-6, abs=1e-9)
    # The comparison can tell: the continuous dropout also reaches the loss through its value.
    assert abs(total[0] - gates_only[0]) > 1e-3 * abs(total[0])


def test_without_gates_a_discrete_hyperparameter_gets_no_gradient():
    total, gates_only = _gradients_through_values_and_gates(gate_std=0.0)
    assert total[2] == 0.0 and gates_only[2] == 0.0
    assert total[0] != 0.0  # the continuous one still does, through its value


# --------------------------------------------------------------------------------- validation


def test_empty_name_is_rejected():
    with pytest.raises(ValueError, match=r"non-empty.*received ''"):
        HParam("", 0.0, 1.0, 0.5)
    with pytest.raises(ValueError, match=r"non-empty.*received '   '"):
        HParam("   ", 0.0, 1.0, 0.5)


def test_duplicate_names_are_rejected():
    with pytest.raises(ValueError, match=r"Duplicate.*'dropout'"):
        HyperParameters([HParam("dropout", 0.0, 1.0, 0.5), HParam("other", 0.0, 1.0, 0.5),
                         HParam("dropout", 0.0, 0.8, 0.2)])


def test_no_hparams_is_rejected():
    with pytest.raises(ValueError, match="at least one"):
        HyperParameters([])


@pytest.mark.parametrize("kwargs, bad", [
    (dict(minimum=0.0, maximum=1.0, init=1.5), "init=1.5"),
    (dict(minimum=0.0, maximum=1.0, init=0.0), "init=0.0"),  # the range is open
    (dict(minimum=0.0, maximum=1.0, init=-0.25), "init=-0.25"),
    (dict(minimum=1.0, maximum=None, init=0.5, kind=POSITIVE), "init=0.5"),
    (dict(minimum=2.0, maximum=8.0, init=8.0, kind=DISCRETE), "init=8.0"),
])
def test_init_outside_range_is_rejected(kwargs, bad):
    with pytest.raises(ValueError, match=rf"'rate'.*{bad}"):
        HParam("rate", **kwargs)


@pytest.mark.parametrize("minimum, maximum", [(1.0, 1.0), (2.0, 1.0)])
def test_minimum_not_below_maximum_is_rejected(minimum, maximum):
    with pytest.raises(ValueError, match=rf"'width'.*minimum={minimum}, maximum={maximum}"):
        HParam("width", minimum, maximum, 1.0)


def test_missing_maximum_of_bounded_is_rejected():
    with pytest.raises(ValueError, match=r"'width'.*maximum=None"):
        HParam("width", 0.0, None, 1.0, kind=BOUNDED)


@pytest.mark.parametrize("scale", [0.0, -0.5])
def test_non_positive_scale_is_rejected(scale):
    with pytest.raises(ValueError, match=rf"'noise'.*scale_init must be > 0.*{scale}"):
        HParam("noise", 0.0, 1.0, 0.5, scale_init=scale)


def test_bad_kind_is_rejected():
    with pytest.raises(ValueError, match=r"'noise'.*'categorical'"):
        HParam("noise", 0.0, 1.0, 0.5, kind="categorical")


def test_maximum_given_for_positive_is_rejected():
    with pytest.raises(ValueError, match=r"'decay'.*maximum=5.0"):
        HParam("decay", 0.0, 5.0, 1.0, kind=POSITIVE)


# ----------------------------------------------------------------------------------- sampling


def test_per_example_perturbation_mean_and_std():
    hparams = _three_kinds(scales=(0.3, 1.2, 0.7), seed=3)
    # Move the scales away from their inits so that softplus itself is checked.
    raw_scale = np.array([-1.0, 0.4, 1.5], np.float32)
    hparams.unconstrained_scale.assign(raw_scale)
    sigma = _softplus(raw_scale.astype(np.float64))
    n = 20000
    hnet_input = hparams.sample(n).hnet_input.numpy().astype(np.float64)
    assert hnet_input.shape == (n, 3)
    mean_tolerance = 5.0 * sigma / math.sqrt(n)  # 5 standard errors
    np.testing.assert_array_less(np.abs(hnet_input.mean(0) - hparams.unconstrained_value.numpy()),
                                 mean_tolerance)
    # The standard error of a Gaussian sample std is sigma / sqrt(2n), about 0.5% here.
    np.testing.assert_allclose(hnet_input.std(0), sigma, rtol=0.03)


def test_shared_columns_are_identical_across_the_batch():
    hparams = _three_kinds(per_example=(False, True, False), scales=(0.5, 0.5, 2.0))
    sample = hparams.sample(256)
    hnet_input = sample.hnet_input.numpy()
    for column in (0, 2):
        assert np.all(hnet_input[:, column] == hnet_input[0, column])
        assert np.all(sample.values.numpy()[:, column] == sample.values.numpy()[0, column])
    assert len(np.unique(hnet_input[:, 1])) == 256
    # Shared columns are still perturbed: two batches draw different shared values.
    other = hparams.sample(256).hnet_input.numpy()
    assert other[0, 0] != hnet_input[0, 0]
    assert hnet_input[0, 0] != hparams.unconstrained_value.numpy()[0]


@pytest.mark.parametrize("batch_size", [1, 2, 7, 129])
def test_sample_shapes_follow_the_batch_size(batch_size):
    hparams = _three_kinds()
    sample = hparams.sample(batch_size)
    assert sample.values.shape == (batch_size, 3)
    assert sample.hnet_input.shape == (batch_size, 3)
    assert sample.names == ("dropout", "decay", "holes")
    assert sample["decay"].shape == (batch_size,)


def test_sample_inside_tf_function_with_dynamic_batch_size():
    hparams = _three_kinds()

    @tf.function(input_signature=[tf.TensorSpec([], tf.int32)])
    def draw(batch_size):
        sample = hparams.sample(batch_size)
        return sample.values, sample.hnet_input, sample["dropout"]

    for batch_size in (3, 11, 1, 40):
        values, hnet_input, dropout = draw(tf.constant(batch_size))
        assert values.shape == (batch_size, 3)
        assert hnet_input.shape == (batch_size, 3)
        np.testing.assert_array_equal(dropout.numpy(), values.numpy()[:, 0])
        assert np.all((values.numpy()[:, 0] > 0) & (values.numpy()[:, 0] < 0.9))
    assert draw.experimental_get_tracing_count() == 1

    @tf.function
    def draw_from_tensor(x):  # batch size taken from a tensor whose batch dimension is None
        return hparams.sample(tf.shape(x)[0]).values

    spec = tf.TensorSpec([None, 5], tf.float32)
    concrete = draw_from_tensor.get_concrete_function(spec)
    assert concrete(tf.zeros([6, 5])).shape == (6, 3)
    assert concrete(tf.zeros([2, 5])).shape == (2, 3)


def test_same_seed_gives_same_samples_and_other_seed_differs():
    first = _three_kinds(seed=7)
    second = _three_kinds(seed=7)
    third = _three_kinds(seed=8)
    for _ in range(2):
        a, b, c = first.sample(16), second.sample(16), third.sample(16)
        np.testing.assert_array_equal(a.hnet_input.numpy(), b.hnet_input.numpy())
        np.testing.assert_array_equal(a.values.numpy(), b.values.numpy())
        assert not np.allclose(a.hnet_input.numpy(), c.hnet_input.numpy())
    # Consecutive draws of one module differ.
    assert not np.allclose(first.sample(16).hnet_input.numpy(), first.sample(16).hnet_input.numpy())


def test_perturb_false_rows_equal_the_current_value():
    hparams = _three_kinds()
    hparams.unconstrained_value.assign([0.2, -0.4, 1.1])
    sample = hparams.sample(9, perturb=False)
    expected_values = np.array([0.9 * _sigmoid(0.2), 0.5 + _softplus(-0.4),
                                np.floor(8 * _sigmoid(1.1))])
    np.testing.assert_allclose(sample.values.numpy(), np.tile(expected_values, (9, 1)),
                               rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(sample.hnet_input.numpy(),
                                  np.tile(np.float32([0.2, -0.4, 1.1]), (9, 1)))


def test_sample_is_differentiable_with_respect_to_value_and_scale():
    hparams = _three_kinds()
    with tf.GradientTape() as tape:
        sample = hparams.sample(32)
        target = tf.reduce_sum(sample.hnet_input) + tf.reduce_sum(sample.values[:, :2])
    value_gradient, scale_gradient = tape.gradient(
        target, [hparams.unconstrained_value, hparams.unconstrained_scale])
    assert value_gradient is not None and scale_gradient is not None
    assert np.all(value_gradient.numpy() != 0)
    assert np.all(scale_gradient.numpy() != 0)


# ----------------------------------------------------------------------------- entropy, state


def test_entropy_matches_numpy():
    hparams = _three_kinds(scales=(0.2, 1.0, 3.0))
    raw_scale = np.array([-2.0, 0.3, 1.7], np.float32)
    hparams.unconstrained_scale.assign(raw_scale)
    sigma = _softplus(raw_scale.astype(np.float64))
    expected = np.sum(np.log(sigma * np.sqrt(2 * np.pi * np.e)))
    assert float(hparams.entropy()) == pytest.approx(expected, rel=1e-5, abs=1e-5)
    # Equivalent closed form of the Gaussian entropy: 0.5 * log(2 pi e sigma^2) per dimension.
    assert float(hparams.entropy()) == pytest.approx(
        np.sum(0.5 * np.log(2 * np.pi * np.e * sigma ** 2)), rel=1e-5, abs=1e-5)


def test_variables_are_float32_vectors_without_batch_dimension():
    hparams = _three_kinds()
    for variable in (hparams.unconstrained_value, hparams.unconstrained_scale):
        assert variable.dtype == tf.float32
        assert variable.shape == (3,)
    assert hparams.size == 3
    assert {v.ref() for v in hparams.trainable_variables} >= {
        hparams.unconstrained_value.ref(), hparams.unconstrained_scale.ref()}


def test_unknown_names_raise_key_error():
    hparams = _three_kinds()
    sample = hparams.sample(4)
    assert isinstance(sample, HParamSample)
    with pytest.raises(KeyError, match="'nope'"):
        sample["nope"]
    with pytest.raises(KeyError, match="'nope'"):
        hparams.index("nope")
    assert hparams.index("holes") == 2
    np.testing.assert_array_equal(sample["holes"].numpy(), sample.values.numpy()[:, 2])
