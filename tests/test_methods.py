"""Tests for stn_pipeline.methods through StnTrainer: Delta-STN's centring, parameter groups,
linearised response update and hyper-gradient, checked against NumPy and finite differences."""

import os

import numpy as np
import pytest
import tensorflow as tf
from test_resume import _train, assert_same_final_checkpoint, kill_when
from test_trainer import TinyNet, _batch, _hparams

from stn_pipeline import checkpoints, methods
from stn_pipeline.config import ConfigError, RunConfig
from stn_pipeline.trainer import StnTrainer, TrainerConfig

SPEC = tf.TensorSpec([None, 4], tf.float32)
TARGET_SPEC = tf.TensorSpec([None], tf.int64)


def _delta_trainer(randomise=True, **config):
    hparams = _hparams()
    model = TinyNet(hparams)
    trainer = StnTrainer(model, hparams, SPEC, TARGET_SPEC,
                         TrainerConfig(method="delta_stn", **config), seed=0)
    if randomise:  # after the trainer zeroed them: gates that make the response path matter
        rng = np.random.default_rng(1)
        for layer in (model.hidden, model.head):
            layer.gate_kernel.assign(rng.normal(0, 0.7, layer.gate_kernel.shape).astype("f4"))
    return trainer


def _refs(variables):
    return {v.ref() for v in variables}


def test_delta_stn_zeroes_the_gates_and_splits_the_parameter_groups():
    trainer = _delta_trainer(randomise=False)
    model = trainer.model
    for layer in (model.hidden, model.head):
        assert not np.any(layer.gate_kernel.numpy())
    response = [v for layer in (model.hidden, model.head)
                for v in (layer.response_kernel, layer.response_bias, layer.gate_kernel)]
    general = [v for layer in (model.hidden, model.head)
               for v in (layer.elementary_kernel, layer.elementary_bias, layer.elementary_scale)]
    assert _refs(trainer.response_weights) == _refs(response)
    assert _refs(trainer.weights) == _refs(general + [model.input_scale])  # non-STN: general
    assert len(trainer.weight_optimizers) == 2
    hparams = _hparams()
    stn = StnTrainer(TinyNet(hparams), hparams, SPEC, TARGET_SPEC)
    assert stn.response_optimizer is None and len(stn.weights) == 13


def test_centred_input_is_zero_at_the_current_values_and_the_network_is_the_general_one():
    trainer = _delta_trainer()
    model, hparams = trainer.model, trainer.hparams
    hparams.unconstrained_value.assign([0.4, -0.3])
    sample = trainer.method.prepare(hparams.sample(6, perturb=False), hparams)
    assert not np.any(sample.hnet_input.numpy())
    x, _ = _batch(6, seed=2)
    hidden, head = model.hidden, model.head
    h = np.maximum(0.0, hidden.elementary_scale.numpy() * (
        (x.numpy() * model.input_scale.numpy()) @ hidden.elementary_kernel.numpy()
        + hidden.elementary_bias.numpy()))
    expected = head.elementary_scale.numpy() * (h @ head.elementary_kernel.numpy()
                                                + head.elementary_bias.numpy())
    np.testing.assert_allclose(model(x, sample, training=False).numpy(), expected,
                               rtol=1e-5, atol=1e-6)
    # A perturbed sample is centred on the current value: Delta = sigma * eps.
    perturbed = trainer.method.prepare(hparams.sample(6), hparams)
    offsets = perturbed.hnet_input.numpy() / hparams.scale().numpy()
    assert np.abs(offsets).max() > 0.1 and np.abs(offsets).max() < 6


def _changed(before, variables):
    return [not np.array_equal(b, v.numpy()) for b, v in zip(before, variables)]


def test_general_update_leaves_the_response_parameters_unchanged():
    trainer = _delta_trainer(tune=False)  # the general update alone
    response = [v.numpy() for v in trainer.response_weights]
    general = [v.numpy() for v in trainer.weights]
    out = trainer.weight_step(*_batch(16, seed=3))
    assert "response_loss" not in out
    assert not any(_changed(response, trainer.response_weights))
    assert all(_changed(general, trainer.weights))


def _response_only(trainer):
    phase = methods.Phase(name="", group=methods.RESPONSE, perturb=True, linearize=True)
    trainer.method.weight_phases = lambda tune: (phase,)


def test_response_update_leaves_the_general_parameters_unchanged():
    trainer = _delta_trainer()
    _response_only(trainer)
    response = [v.numpy() for v in trainer.response_weights]
    general = [v.numpy() for v in trainer.weights]
    trainer.weight_step(*_batch(16, seed=4))
    assert not any(_changed(general, trainer.weights))
    assert all(_changed(response, trainer.response_weights))


def test_a_non_finite_general_update_skips_the_whole_weight_step():
    trainer = _delta_trainer()
    model = trainer.model
    training_loss = model.training_loss

    def nan_at_the_current_values(targets, outputs, sample):  # the general update's sample only
        at_current = tf.reduce_all(tf.equal(sample.hnet_input, 0.0))
        return tf.where(at_current, np.nan, training_loss(targets, outputs, sample))

    model.training_loss = nan_at_the_current_values
    weights = trainer.weights + trainer.response_weights
    before = [v.numpy() for v in weights]
    out = trainer.weight_step(*_batch(16, seed=5))
    assert np.isnan(out["loss"]) and np.isfinite(out["response_loss"])
    assert not out["finite"] and not any(_changed(before, weights))


def test_response_update_descends_the_linearised_loss():
    """First SGD step: change = -lr * gradient of the loss of f(0) + J Delta, with J Delta from a
    central difference in Delta (exact here: the net is quadratic in Delta between relu kinks)."""
    trainer = _delta_trainer(weight_lr=0.1)
    _response_only(trainer)
    model, hparams = trainer.model, trainer.hparams
    x, y = _batch(16, seed=5)
    step_state = tf.identity(trainer.step_generator.state)
    before = [v.numpy() for v in trainer.response_weights]
    out = trainer.weight_step(x, y)
    changes = [v.numpy() - b for v, b in zip(trainer.response_weights, before)]
    for variable, value in zip(trainer.response_weights, before):
        variable.assign(value)
    # The step's masks: the same generator state draws the same seeds.
    seeds = tf.random.Generator.from_state(step_state, trainer.step_generator.algorithm)
    seeds = seeds.make_seeds(2)
    values = out["hparam_values"]
    # Both hyperparameters are continuous: the sample's unconstrained value is recoverable.
    delta = hparams.to_unconstrained(values) - hparams.unconstrained_value

    def predict(hnet_input):
        sample = type(hparams.sample(1))(hparams.names, values, hnet_input)
        return model(x, sample, training=True, seed=seeds[:, 1])

    step = 1e-3  # small enough that no unit crosses its relu kink
    with tf.GradientTape() as tape:
        jvp = (predict(step * delta) - predict(-step * delta)) / (2 * step)
        loss = tf.reduce_mean(model.loss(y, predict(tf.zeros_like(delta)) + jvp))
    gradients = tape.gradient(loss, trainer.response_weights)
    for variable, change, gradient in zip(trainer.response_weights, changes, gradients):
        assert np.abs(gradient.numpy()).max() > 1e-4, variable.name
        np.testing.assert_allclose(change, -0.1 * gradient.numpy(), rtol=1e-3, atol=1e-6,
                                   err_msg=variable.name)


def test_hyper_gradient_reaches_lambda_only_through_the_sample():
    """d hnet_input / d lambda is the identity (the subtracted lambda is a constant), so the
    hyper step's gradient equals a finite difference that moves lambda with Delta held fixed."""
    trainer = _delta_trainer(tune_scales=False, tau=0.0)
    model, hparams = trainer.model, trainer.hparams
    x, y = _batch(32, seed=6)
    lam = hparams.unconstrained_value.numpy()

    def loss_at(delta):  # evaluation mode: only the gates see the hyperparameters
        sample = hparams.sample(32, perturb=False)
        sample = type(sample)(sample.names, sample.values, tf.broadcast_to(delta, [32, 2]))
        return float(tf.reduce_mean(model.loss(y, model(x, sample, training=False))))

    step = 1e-2
    expected = [(loss_at(step * e) - loss_at(-step * e)) / (2 * step)
                for e in np.eye(2, dtype="f4")]
    with tf.GradientTape() as tape:
        sample = trainer.method.prepare(hparams.sample(32, perturb=False), hparams)
        loss = tf.reduce_mean(model.loss(y, model(x, sample, training=False)))
    gradient = tape.gradient(loss, hparams.unconstrained_value).numpy()
    np.testing.assert_allclose(gradient, expected, rtol=2e-2, atol=1e-5)
    assert np.abs(gradient).max() > 1e-3
    trainer.hyper_step(x, y)  # Adam's first step moves each value by about lr against its sign
    moved = hparams.unconstrained_value.numpy() - lam
    np.testing.assert_array_equal(np.sign(moved), -np.sign(gradient))


def test_method_is_validated_and_sets_the_default_cycle():
    from stn_pipeline import experiments
    with pytest.raises(ConfigError, match="--method"):
        RunConfig(experiment="relu_toy").override(method="dstn")
    assert experiments.default_config("relu_toy", method="delta_stn").schedule.train_steps == 5
    assert experiments.default_config("relu_toy").schedule.train_steps == 2
    assert experiments.default_config("relu_toy", method="delta_stn",
                                      train_steps=3).schedule.train_steps == 3


def test_init_from_a_checkpoint_of_the_other_method_is_refused(tmp_path):
    hparams = _hparams()
    stn = StnTrainer(TinyNet(hparams), hparams, SPEC, TARGET_SPEC)
    prefix = tf.train.Checkpoint(trainer=stn).write(str(tmp_path / "stn"))
    with pytest.raises(checkpoints.CheckpointError, match="holds a stn trainer.*delta_stn"):
        checkpoints.restore_trainer(_delta_trainer(), prefix)
    delta = tf.train.Checkpoint(trainer=_delta_trainer()).write(str(tmp_path / "delta"))
    with pytest.raises(checkpoints.CheckpointError, match="holds a delta_stn trainer"):
        checkpoints.restore_trainer(stn, delta)
    checkpoints.restore_trainer(_delta_trainer(randomise=False), delta)  # same method: fine


@pytest.mark.slow
def test_killed_delta_stn_run_resumes_bitwise(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    assert _train(a, "--method=delta_stn").returncode == 0
    kill_when(_train(b, "--method=delta_stn", wait=False),
              lambda: (b / "checkpoints" / "ckpt-320.index").exists())
    resumed = _train(b, "--method=delta_stn")
    assert resumed.returncode == 0 and "resuming at weight step" in resumed.stderr
    variables = assert_same_final_checkpoint(a, b)
    assert any("response_optimizer" in name for name in variables)
    assert os.path.exists(b / "results.json")
