"""Tests for stn_pipeline.optimizers: Momentum and Adam against NumPy references."""

import numpy as np
import pytest
import tensorflow as tf

from stn_pipeline.optimizers import Adam, Momentum, make_optimizer

INITIAL = [np.array([[0.5, -1.0, 2.0], [0.0, 3.0, -0.25]]), np.array([1.5, -0.5])]
GRADIENTS = [  # three steps, two variables of different shapes
    [np.array([[0.1, -0.2, 0.3], [1.0, 0.0, -2.0]]), np.array([0.5, -1.5])],
    [np.array([[-0.4, 0.2, 0.1], [0.5, 0.3, 2.0]]), np.array([0.25, 3.0])],
    [np.array([[0.05, 0.7, -0.3], [-1.0, 0.1, 0.0]]), np.array([-2.0, 0.01])],
]


def _variables():
    return [tf.Variable(v.astype(np.float32)) for v in INITIAL]


def _momentum_reference(lr, momentum, steps):
    weights = [w.copy() for w in INITIAL]
    velocity = [np.zeros_like(w) for w in INITIAL]
    history = []
    for gradients in steps:
        for i, g in enumerate(gradients):
            velocity[i] = momentum * velocity[i] + g
            weights[i] = weights[i] - lr * velocity[i]
        history.append([w.copy() for w in weights])
    return history


def _adam_reference(lr, beta1, beta2, eps, steps):
    """Algorithm 1 of Kingma and Ba (2015)."""
    weights = [w.copy() for w in INITIAL]
    m = [np.zeros_like(w) for w in INITIAL]
    v = [np.zeros_like(w) for w in INITIAL]
    history = []
    for t, gradients in enumerate(steps, start=1):
        for i, g in enumerate(gradients):
            m[i] = beta1 * m[i] + (1 - beta1) * g
            v[i] = beta2 * v[i] + (1 - beta2) * g * g
            m_hat = m[i] / (1 - beta1 ** t)
            v_hat = v[i] / (1 - beta2 ** t)
            weights[i] = weights[i] - lr * m_hat / (np.sqrt(v_hat) + eps)
        history.append([w.copy() for w in weights])
    return history


def _apply(optimizer, gradients):
    optimizer.apply([tf.constant(g, tf.float32) for g in gradients])


def test_momentum_matches_numpy_for_three_steps():
    variables = _variables()
    optimizer = Momentum(variables, learning_rate=0.1, momentum=0.9)
    expected = _momentum_reference(0.1, 0.9, GRADIENTS)
    for step, gradients in enumerate(GRADIENTS):
        _apply(optimizer, gradients)
        for variable, reference in zip(variables, expected[step]):
            np.testing.assert_allclose(variable.numpy(), reference, rtol=1e-5, atol=1e-6)
    assert int(optimizer.iterations.numpy()) == 3


def test_adam_matches_numpy_for_three_steps():
    variables = _variables()
    optimizer = Adam(variables, learning_rate=0.05, beta1=0.8, beta2=0.99, epsilon=1e-8)
    expected = _adam_reference(0.05, 0.8, 0.99, 1e-8, GRADIENTS)
    for step, gradients in enumerate(GRADIENTS):
        _apply(optimizer, gradients)
        for variable, reference in zip(variables, expected[step]):
            np.testing.assert_allclose(variable.numpy(), reference, rtol=1e-5, atol=1e-6)


def test_adam_defaults_match_numpy():
    variables = _variables()
    optimizer = Adam(variables)  # lr 3e-3, betas 0.9 / 0.999
    expected = _adam_reference(3e-3, 0.9, 0.999, 1e-8, GRADIENTS)
    for gradients in GRADIENTS:
        _apply(optimizer, gradients)
    for variable, reference in zip(variables, expected[-1]):
        np.testing.assert_allclose(variable.numpy(), reference, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kind", ["sgd", "adam"])
def test_make_optimizer(kind):
    variables = _variables()
    optimizer = make_optimizer(kind, variables, 0.02)
    assert isinstance(optimizer, Momentum if kind == "sgd" else Adam)
    assert float(optimizer.learning_rate.numpy()) == pytest.approx(0.02)
    if kind == "sgd":
        assert optimizer.momentum == 0.9
        _apply(optimizer, GRADIENTS[0])
        expected = _momentum_reference(0.02, 0.9, GRADIENTS[:1])[0]
        np.testing.assert_allclose(variables[0].numpy(), expected[0], rtol=1e-5, atol=1e-6)


def test_make_optimizer_rejects_unknown_kind():
    with pytest.raises(ValueError, match="'rmsprop'"):
        make_optimizer("rmsprop", _variables(), 0.1)


@pytest.mark.parametrize("learning_rate", [0.0, -0.1])
def test_non_positive_learning_rate_is_rejected(learning_rate):
    with pytest.raises(ValueError, match=f"learning_rate must be > 0, received {learning_rate}"):
        Momentum(_variables(), learning_rate=learning_rate)


@pytest.mark.parametrize("optimizer_class", [Momentum, Adam])
def test_learning_rate_change_takes_effect_without_retracing(optimizer_class):
    variables = _variables()
    optimizer = optimizer_class(variables, learning_rate=0.1)
    step = tf.function(lambda g0, g1: optimizer.apply([g0, g1]))
    gradients = [tf.constant(g, tf.float32) for g in GRADIENTS[0]]
    step(*gradients)
    before = [v.numpy() for v in variables]
    optimizer.learning_rate.assign(0.0 + 1e-30)  # practically frozen
    step(*gradients)
    for variable, value in zip(variables, before):
        np.testing.assert_allclose(variable.numpy(), value, atol=1e-12)
    optimizer.learning_rate.assign(0.1)
    step(*gradients)
    assert not np.allclose(variables[0].numpy(), before[0])
    assert step.experimental_get_tracing_count() == 1


def test_learning_rate_change_scales_the_momentum_step():
    variables = _variables()
    optimizer = Momentum(variables, learning_rate=0.1, momentum=0.5)
    _apply(optimizer, GRADIENTS[0])
    optimizer.learning_rate.assign(0.3)
    before = variables[1].numpy().astype(np.float64)
    _apply(optimizer, GRADIENTS[1])
    velocity = 0.5 * GRADIENTS[0][1] + GRADIENTS[1][1]
    np.testing.assert_allclose(variables[1].numpy(), before - 0.3 * velocity, rtol=1e-5)


@pytest.mark.parametrize("optimizer_class", [Momentum, Adam])
def test_wrong_number_of_gradients_raises(optimizer_class):
    variables = _variables()
    optimizer = optimizer_class(variables, learning_rate=0.1)
    with pytest.raises(ValueError, match="1 gradients for 2 variables"):
        optimizer.apply([tf.ones([2, 3])])
    with pytest.raises(ValueError, match="3 gradients for 2 variables"):
        optimizer.apply([tf.ones([2, 3]), tf.ones([2]), tf.ones([2])])
    for variable, initial in zip(variables, INITIAL):  # nothing was applied
        np.testing.assert_array_equal(variable.numpy(), initial.astype(np.float32))
    assert int(optimizer.iterations.numpy()) == 0


def test_none_gradient_leaves_its_variable_alone():
    variables = _variables()
    optimizer = Momentum(variables, learning_rate=0.1)
    optimizer.apply([None, tf.constant(GRADIENTS[0][1], tf.float32)])
    np.testing.assert_array_equal(variables[0].numpy(), INITIAL[0].astype(np.float32))
    np.testing.assert_allclose(variables[1].numpy(), INITIAL[1] - 0.1 * GRADIENTS[0][1],
                               rtol=1e-6)


def test_state_is_plain_variables_created_up_front():
    variables = _variables()
    optimizer = Adam(variables, learning_rate=0.1)
    # Slots exist before the first step (nothing is created inside a compiled step).
    assert [m.shape for m in optimizer.first_moment] == [v.shape for v in variables]
    assert [s.shape for s in optimizer.second_moment] == [v.shape for v in variables]
    state = {v.ref() for v in optimizer.variables}
    assert optimizer.learning_rate.ref() in state and optimizer.iterations.ref() in state
    assert all(m.ref() in state for m in optimizer.first_moment + optimizer.second_moment)
    assert not optimizer.learning_rate.trainable and not optimizer.iterations.trainable
