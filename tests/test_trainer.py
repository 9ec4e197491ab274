"""Tests for stn_pipeline.trainer.StnTrainer on a tiny STN classifier with per-example dropout."""

import numpy as np
import pytest
import tensorflow as tf

from stn_pipeline import layers
from stn_pipeline.hparams import BOUNDED, POSITIVE, HParam, HyperParameters
from stn_pipeline.models.base import StnClassifier
from stn_pipeline.trainer import StnTrainer, TrainerConfig

INPUTS, CLASSES, HIDDEN = 4, 3, 16

def _stacked(layer, what):
    """W_e and W_h (or b_e and b_h) side by side, [..., 2 D_out]."""
    return np.concatenate([getattr(layer, f"elementary_{what}").numpy(),
                           getattr(layer, f"response_{what}").numpy()], axis=-1)



class TinyNet(StnClassifier):
    """StnDense -> ReLU -> per-example dropout -> StnDense.

    It also holds a reference to the hyperparameters (so its `trainable_variables` include them) and
    a weight whose name collides with a hyperparameter variable: the trainer must select weights by
    identity, not by name.
    """

    def __init__(self, hparams, seed=0):
        super().__init__()
        self.hparams = hparams
        self.hidden = layers.StnDense(INPUTS, HIDDEN, hparams.size, seed=seed)
        self.head = layers.StnDense(HIDDEN, CLASSES, hparams.size, seed=seed + 1)
        self.input_scale = tf.Variable(tf.ones([INPUTS]), name="unconstrained_value")

    def __call__(self, inputs, sample, training, seed=None):
        x = tf.nn.relu(self.hidden(inputs * self.input_scale, sample.hnet_input))
        x = layers.dropout(x, sample["dropout"], seed, training)
        return self.head(x, sample.hnet_input)


def _hparams(seed=0):
    return HyperParameters([
        HParam("dropout", 0.0, 0.9, 0.3, scale_init=0.5, kind=BOUNDED),
        HParam("spare", 0.0, None, 1.0, scale_init=0.5, kind=POSITIVE, per_example=False),
    ], seed=seed)


def _trainer(seed=0, **config):
    hparams = _hparams()
    model = TinyNet(hparams)
    spec = tf.TensorSpec([None, INPUTS], tf.float32)
    target_spec = tf.TensorSpec([None], tf.int64)
    return StnTrainer(model, hparams, spec, target_spec, TrainerConfig(**config), seed=seed)


def _batch(size, seed):
    rng = np.random.default_rng(seed)
    inputs = rng.normal(size=(size, INPUTS)).astype(np.float32)
    targets = rng.integers(0, CLASSES, size=size).astype(np.int64)
    return tf.constant(inputs), tf.constant(targets)


def _snapshot(variables):
    return [v.numpy().copy() for v in variables]


def _hparam_variables(trainer):
    return [trainer.hparams.unconstrained_value, trainer.hparams.unconstrained_scale]


def _numpy_stn_dense(layer, x, h):
    d = layer.output_size
    kernel, bias = (_stacked(layer, w).astype(np.float64) for w in ("kernel", "bias"))
    gates = h @ layer.gate_kernel.numpy().astype(np.float64)
    c = float(layer.elementary_scale.numpy())
    return (c * (x @ kernel[:, :d] + bias[:d]) + gates[:, :d] * (x @ kernel[:, d:])
            + gates[:, d:] * bias[d:])


def _numpy_forward(trainer, inputs):
    """Logits, hidden activations and gate input at the unperturbed hyperparameters, no dropout."""
    model = trainer.model
    h = np.tile(trainer.hparams.unconstrained_value.numpy().astype(np.float64), (len(inputs), 1))
    x = inputs.astype(np.float64) * model.input_scale.numpy()
    hidden = np.maximum(_numpy_stn_dense(model.hidden, x, h), 0.0)
    return _numpy_stn_dense(model.head, hidden, h), hidden, h


def _numpy_losses(trainer, inputs, targets):
    """Per-example cross-entropy and correctness at the unperturbed hyperparameters, eval mode."""
    logits, _, _ = _numpy_forward(trainer, inputs)
    shifted = logits - logits.max(axis=1, keepdims=True)
    log_softmax = shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))
    loss = -log_softmax[np.arange(len(targets)), targets]
    return loss, (logits.argmax(axis=1) == targets).astype(np.float64)


def _randomise_gates(trainer):
    rng = np.random.default_rng(0)
    for layer in (trainer.model.hidden, trainer.model.head):
        layer.gate_kernel.assign(rng.normal(0, 0.5, layer.gate_kernel.shape).astype(np.float32))


# ------------------------------------------------------------------------- variable selection


def test_weights_are_selected_by_identity():
    trainer = _trainer()
    hparam_refs = {v.ref() for v in _hparam_variables(trainer)}
    weight_refs = [v.ref() for v in trainer.weights]
    # The model's trainable variables include the hyperparameters (it holds them) ...
    model_refs = {v.ref() for v in trainer.model.trainable_variables}
    assert hparam_refs <= model_refs
    # ... but the trainer's weights do not, and contain every other trainable variable.
    assert not hparam_refs & set(weight_refs)
    assert set(weight_refs) == model_refs - hparam_refs
    assert len(weight_refs) == len(set(weight_refs))
    # The weight named like a hyperparameter variable is still a weight.
    assert trainer.model.input_scale.ref() in set(weight_refs)
    assert trainer.model.hidden.gate_kernel.ref() in set(weight_refs)
    assert trainer.model.head.elementary_scale.ref() in set(weight_refs)


def test_model_without_trainable_variables_is_rejected():
    class Empty(StnClassifier):
        def __call__(self, inputs, sample, training, seed=None):
            return inputs

    spec = tf.TensorSpec([None, 3], tf.float32)
    with pytest.raises(ValueError, match="Empty has no trainable variables"):
        StnTrainer(Empty(), _hparams(), spec, tf.TensorSpec([None], tf.int64))


# ------------------------------------------------------------------------------------- steps


def test_hyper_step_changes_hparams_but_no_model_weight():
    trainer = _trainer(tune_scales=True, hyper_lr=0.01, scale_lr=0.01)
    hparam_refs = {h.ref() for h in _hparam_variables(trainer)}
    model_vars = [v for v in trainer.model.variables if v.ref() not in hparam_refs]
    model_before = _snapshot(model_vars)
    hparams_before = _snapshot(_hparam_variables(trainer))
    out = trainer.hyper_step(*_batch(32, seed=1))
    for key in ("loss", "hyper_loss", "entropy", "accuracy"):
        assert key in out and np.isfinite(float(out[key]))
    # Gaussian entropy of the perturbation, in NumPy from the scales before the step.
    sigma = np.log1p(np.exp(hparams_before[1].astype(np.float64)))
    entropy = np.sum(np.log(sigma * np.sqrt(2.0 * np.pi * np.e)))
    assert float(out["entropy"]) == pytest.approx(entropy, rel=1e-5)
    assert float(out["hyper_loss"]) == pytest.approx(float(out["loss"]) - 1e-3 * entropy,
                                                     abs=1e-6)
    trainer.hyper_step(*_batch(32, seed=2))
    for variable, before in zip(model_vars, model_before):
        np.testing.assert_array_equal(variable.numpy(), before, err_msg=variable.name)
    value_after, scale_after = _snapshot(_hparam_variables(trainer))
    assert np.all(value_after != hparams_before[0])
    assert np.all(scale_after != hparams_before[1])
    # Weight optimizer state is untouched as well.
    assert int(trainer.weight_optimizer.iterations.numpy()) == 0


def test_hyper_step_without_tune_scales_leaves_the_scale_unchanged():
    trainer = _trainer(tune_scales=False)
    scale_before = trainer.hparams.unconstrained_scale.numpy().copy()
    value_before = trainer.hparams.unconstrained_value.numpy().copy()
    for seed in range(3):
        trainer.hyper_step(*_batch(16, seed=seed))
    np.testing.assert_array_equal(trainer.hparams.unconstrained_scale.numpy(), scale_before)
    assert np.any(trainer.hparams.unconstrained_value.numpy() != value_before)
    assert int(trainer.scale_optimizer.iterations.numpy()) == 0


def test_hyper_step_of_a_frozen_trainer_changes_nothing():
    # tune=False is the fixed-hyperparameter baseline, also in a hand-written loop: hyper steps
    # only measure the validation loss.
    trainer = _trainer(tune=False, tune_scales=True, hyper_lr=0.1, scale_lr=0.1)
    _randomise_gates(trainer)  # so that the hyper-gradient is not zero
    watched = _hparam_variables(trainer) + [trainer.hparams.generator.state]
    before = _snapshot(watched + list(trainer.model.variables))
    inputs, targets = _batch(16, seed=7)
    for _ in range(3):
        out = trainer.hyper_step(inputs, targets)
    for variable, value in zip(watched + list(trainer.model.variables), before):
        np.testing.assert_array_equal(variable.numpy(), value, err_msg=variable.name)
    assert int(trainer.hyper_optimizer.iterations.numpy()) == 0
    assert int(trainer.scale_optimizer.iterations.numpy()) == 0
    # It still reports the clean validation loss, as `evaluate` measures it.
    losses, _ = _numpy_losses(trainer, inputs.numpy(), targets.numpy())
    assert float(out["loss"]) == pytest.approx(losses.mean(), rel=1e-5)
    assert bool(out["finite"])


def test_weight_step_changes_weights_but_no_hparam():
    trainer = _trainer()
    weights_before = _snapshot(trainer.weights)
    hparams_before = _snapshot(_hparam_variables(trainer))
    out = trainer.weight_step(*_batch(24, seed=3))
    assert np.isfinite(float(out["loss"])) and 0.0 <= float(out["accuracy"]) <= 1.0
    assert out["hparam_values"].shape == (24, 2)
    for variable, before in zip(trainer.weights, weights_before):
        assert np.any(variable.numpy() != before), f"{variable.name} did not change"
    for variable, before in zip(_hparam_variables(trainer), hparams_before):
        np.testing.assert_array_equal(variable.numpy(), before)
    assert int(trainer.hyper_optimizer.iterations.numpy()) == 0
    assert int(trainer.scale_optimizer.iterations.numpy()) == 0


def test_first_sgd_weight_step_matches_a_numpy_gradient():
    # Unperturbed (tune=False) and a dropout rate of ~1e-13 (keep probability 1.0 in float32)
    # make the step deterministic; the first momentum-SGD update is then -lr * dL/dw.
    lr = 0.5
    trainer = _trainer(weight_optimizer="sgd", weight_lr=lr, tune=False)
    trainer.hparams.unconstrained_value.assign([-30.0, 0.4])
    _randomise_gates(trainer)
    inputs, targets = (t.numpy() for t in _batch(8, seed=4))
    head = trainer.model.head
    bias_before = _stacked(head, "bias").astype(np.float64)
    kernel_before = _stacked(head, "kernel").astype(np.float64)
    gate_kernel_before = head.gate_kernel.numpy().astype(np.float64)
    logits, hidden, h = _numpy_forward(trainer, inputs)
    out = trainer.weight_step(tf.constant(inputs), tf.constant(targets))
    softmax = np.exp(logits - logits.max(1, keepdims=True))
    softmax /= softmax.sum(1, keepdims=True)
    onehot = np.eye(CLASSES)[targets]
    loss = -np.log(softmax[np.arange(8), targets]).mean()
    assert float(out["loss"]) == pytest.approx(loss, rel=1e-5)
    d_logits = (softmax - onehot) / len(targets)  # gradient of the mean cross-entropy
    bias_gate = h @ gate_kernel_before[:, CLASSES:]
    c = 1.0  # elementary_scale before the step
    d_bias = np.concatenate([c * d_logits.sum(0), (bias_gate * d_logits).sum(0)])
    np.testing.assert_allclose(_stacked(head, "bias"), bias_before - lr * d_bias, rtol=1e-4,
                               atol=1e-6)
    # The elementary scale: dL/dc = sum(d_logits * (hidden W_e + b_e)).
    elementary = hidden @ kernel_before[:, :CLASSES] + bias_before[:CLASSES]
    expected_c = c - lr * np.sum(d_logits * elementary)
    assert float(head.elementary_scale.numpy()) == pytest.approx(expected_c, rel=1e-5)


def test_tune_false_weight_steps_see_unperturbed_values():
    trainer = _trainer(tune=False)
    expected = trainer.hparams.constrained().numpy()
    for size in (5, 12):
        values = trainer.weight_step(*_batch(size, seed=size))["hparam_values"].numpy()
        np.testing.assert_allclose(values, np.tile(expected, (size, 1)), rtol=1e-6)


def test_tune_true_weight_steps_see_per_example_values():
    trainer = _trainer(tune=True)
    values = trainer.weight_step(*_batch(64, seed=5))["hparam_values"].numpy()
    assert len(np.unique(values[:, 0])) == 64  # per-example dropout rates
    assert np.all(values[:, 1] == values[0, 1])  # the shared hyperparameter
    assert np.all((values[:, 0] > 0) & (values[:, 0] < 0.9))


def test_steps_compile_once_for_any_batch_size():
    trainer = _trainer()
    sizes = [3, 8, 5, 17, 1, 32, 9, 2, 11, 6]
    for index, size in enumerate(sizes):
        trainer.weight_step(*_batch(size, seed=100 + index))
        trainer.hyper_step(*_batch(size + 1, seed=200 + index))
        trainer.evaluate(*_batch(size + 2, seed=300 + index))
    assert trainer.weight_step.experimental_get_tracing_count() == 1
    assert trainer.hyper_step.experimental_get_tracing_count() == 1
    assert trainer.evaluate.experimental_get_tracing_count() == 1
    # The schedule changes the learning rate through its variable, without retracing either.
    trainer.weight_optimizer.learning_rate.assign(1e-4)
    trainer.weight_step(*_batch(4, seed=400))
    assert trainer.weight_step.experimental_get_tracing_count() == 1


def test_weight_steps_are_reproducible_from_the_seed():
    first, second = _trainer(seed=3), _trainer(seed=3)
    for seed in range(3):
        batch = _batch(10, seed=seed)
        a, b = first.weight_step(*batch), second.weight_step(*batch)
        assert float(a["loss"]) == float(b["loss"])
    for x, y in zip(first.weights, second.weights):
        np.testing.assert_array_equal(x.numpy(), y.numpy())


# -------------------------------------------------------------------------------- evaluation


def test_evaluate_dataset_is_a_mean_over_examples_not_batches():
    trainer = _trainer()
    _randomise_gates(trainer)
    for seed in range(3):  # move away from the initialisation
        trainer.weight_step(*_batch(16, seed=seed))
    inputs, targets = (t.numpy() for t in _batch(23, seed=42))
    dataset = tf.data.Dataset.from_tensor_slices((inputs, targets)).batch(10)  # 10, 10, 3
    result = trainer.evaluate_dataset(dataset)
    loss, correct = _numpy_losses(trainer, inputs, targets)
    assert set(result) == {"loss", "accuracy"}
    assert result["loss"] == pytest.approx(loss.mean(), rel=1e-5)
    assert result["accuracy"] == pytest.approx(correct.mean(), abs=1e-9)
    batch_means = np.mean([loss[:10].mean(), loss[10:20].mean(), loss[20:].mean()])
    assert abs(batch_means - loss.mean()) > 1e-4  # the check above can tell the two apart


def test_evaluate_uses_unperturbed_values_and_no_dropout():
    trainer = _trainer()
    batch = _batch(12, seed=7)
    first = {k: float(v) for k, v in trainer.evaluate(*batch).items()}
    second = {k: float(v) for k, v in trainer.evaluate(*batch).items()}
    assert first == second  # deterministic: no perturbation, no dropout
    assert first["count"] == 12.0
    loss, _ = _numpy_losses(trainer, *(t.numpy() for t in batch))
    assert first["loss"] == pytest.approx(loss.sum(), rel=1e-5)


def test_evaluate_dataset_rejects_an_empty_dataset():
    trainer = _trainer()
    inputs, targets = _batch(4, seed=0)
    empty = tf.data.Dataset.from_tensor_slices((inputs, targets)).take(0).batch(2)
    with pytest.raises(ValueError, match="empty"):
        trainer.evaluate_dataset(empty)


def test_state_variables_cover_model_and_hparams():
    trainer = _trainer()
    refs = {v.ref() for v in trainer.state_variables()}
    assert {v.ref() for v in trainer.model.variables} <= refs
    assert {v.ref() for v in _hparam_variables(trainer)} <= refs
