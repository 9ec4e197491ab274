"""Tests for stn_pipeline.training.fit with a scripted trainer: warm-up epochs stay outside the
schedule (never best, no decay window, no patience), in tuned and frozen runs alike, and the
per-epoch history records what happened."""

import dataclasses

import numpy as np
import pytest
import tensorflow as tf

from stn_pipeline.hparams import HParam, HyperParameters
from stn_pipeline.schedule import ScheduleConfig
from stn_pipeline.summaries import RunLogger
from stn_pipeline.trainer import TrainerConfig
from stn_pipeline.training import LoopOptions, RunData, fit

STEPS_PER_EPOCH = 2


class _Optimizer:
    def __init__(self, learning_rate):
        self.learning_rate = tf.Variable(learning_rate, dtype=tf.float32)


class ScriptedTrainer:
    """The parts of `StnTrainer` that `fit` uses; validation losses come from a script.

    `weights` counts weight steps, so the restored best state says which epoch it came from.
    """

    def __init__(self, val_losses, tune=True, learning_rate=0.5):
        self.hparams = HyperParameters([HParam("rate", 0.0, 1.0, 0.5)], seed=0)
        self.config = TrainerConfig(tune=tune)
        self.weight_optimizer = _Optimizer(learning_rate)
        self.weight_optimizers = [self.weight_optimizer]
        self.weights = tf.Variable(0.0)
        self.val_losses = list(val_losses)
        self.evaluations = 0
        self.hyper_calls = 0

    def distribute(self, dataset):
        return dataset

    def weight_step(self, inputs, targets):
        del inputs, targets
        self.weights.assign_add(1.0)
        return {"loss": tf.constant(1.0), "finite": tf.constant(True),
                "hparam_values": tf.zeros([1, 1])}

    def hyper_step(self, inputs, targets):
        del inputs, targets
        self.hyper_calls += 1
        return {"loss": tf.constant(1.0), "finite": tf.constant(True)}

    def evaluate_dataset(self, dataset):
        del dataset
        index = min(self.evaluations, len(self.val_losses) - 1)
        self.evaluations += 1
        # After the run, `fit` evaluates the restored state: report its weight-step count.
        if self.evaluations > len(self.val_losses):
            return {"loss": float(self.weights.numpy())}
        return {"loss": self.val_losses[index], "accuracy": 1.0 - self.val_losses[index] / 10}

    def state_variables(self):
        return [self.weights]


def _fit(tmp_path, val_losses, tune=True, **schedule):
    trainer = ScriptedTrainer(val_losses, tune=tune)
    batches = tf.data.Dataset.from_tensors((0.0, 0.0)).repeat()
    data = RunData(train=batches, hyper=batches, valid=batches, test=None,
                   steps_per_epoch=STEPS_PER_EPOCH, batch_size=1)
    settings = dict(epochs=len(val_losses), warmup_epochs=2, train_steps=1, hyper_steps=1,
                    nonmono=0, patience=0, min_lr=0.0)
    settings.update(schedule)
    results = fit(trainer, data, ScheduleConfig(**settings), RunLogger(str(tmp_path)),
                  LoopOptions(log_every=100))
    return trainer, results


@pytest.mark.parametrize("tune", [True, False])
def test_a_warmup_epoch_is_never_the_best_state(tmp_path, tune):
    # The warm-up epochs have the lowest losses; the best tuning epoch is epoch 4.
    trainer, results = _fit(tmp_path, [0.1, 0.2, 3.0, 2.0, 2.5], tune=tune)
    assert results["best_epoch"] == 4
    assert results["val_loss"] == 4 * STEPS_PER_EPOCH  # the state after epoch 4 was restored
    assert [entry["phase"] for entry in results["history"]] == ["warmup"] * 2 + ["tune"] * 3
    assert [entry["val_loss"] for entry in results["history"]] == [0.1, 0.2, 3.0, 2.0, 2.5]
    assert [entry["epoch"] for entry in results["history"]] == [1, 2, 3, 4, 5]
    assert results["history"][0]["val_accuracy"] == pytest.approx(0.99)
    assert (trainer.hyper_calls > 0) == tune


@pytest.mark.parametrize("tune", [True, False])
def test_warmup_losses_are_outside_the_decay_window(tmp_path, tune):
    # nonmono=1 over the tuning epochs 3..6 only: e3 has no earlier tuning loss, e4 has one (not
    # more than 1), e5: earlier [3, 3.5] but the last: [3]; 3.2 > 3: decay. e6: [3, 3.5] -> 3;
    # 3.1 > 3: decay. Had the warm-up losses 0.1, 0.2 counted, e3 and e4 would decay too.
    _, results = _fit(tmp_path, [0.1, 0.2, 3.0, 3.5, 3.2, 3.1], tune=tune, nonmono=1)
    rates = [entry["learning_rate"] for entry in results["history"]]
    # The rate used during each epoch: a decay at the end of e5 acts from e6.
    assert rates == pytest.approx([0.5, 0.5, 0.5, 0.5, 0.5, 0.05])
    assert results["best_epoch"] == 3


@pytest.mark.parametrize("tune", [True, False])
def test_warmup_epochs_do_not_count_towards_patience(tmp_path, tune):
    # patience=2: warm-up epochs are the best losses but do not start the count. Best tuning
    # epoch is e3; e4 and e5 do not improve: stop after e5, not after e3 or e4.
    _, results = _fit(tmp_path, [0.1, 0.2, 1.0, 1.5, 1.2, 0.5, 0.4], tune=tune, patience=2)
    assert results["epochs_run"] == 5
    assert "no improvement for 2 tuning epochs" in results["stop_reason"]
    assert results["best_epoch"] == 3


def test_no_tuning_epoch_keeps_the_final_state(tmp_path):
    _, results = _fit(tmp_path, [0.1, 0.2], tune=False, warmup_epochs=2)
    assert results["best_epoch"] is None
    assert results["val_loss"] == 2 * STEPS_PER_EPOCH  # the final state, not the initial one


@pytest.mark.parametrize("config_class", [LoopOptions, ScheduleConfig])
def test_configs_are_frozen_and_keyword_only(config_class):
    config = config_class(epochs=3) if config_class is ScheduleConfig else config_class()
    field = dataclasses.fields(config)[0].name
    with pytest.raises(dataclasses.FrozenInstanceError):
        setattr(config, field, 4)
    with pytest.raises(TypeError):
        config_class(3)  # pylint: disable=too-many-function-args
    assert not hasattr(LoopOptions(), "nan_at_step")  # the test hook is gone


def test_history_is_json_and_matches_the_epochs(tmp_path):
    _, results = _fit(tmp_path, [1.0, 0.9, 0.8], warmup_epochs=1)
    assert [entry["phase"] for entry in results["history"]] == ["warmup", "tune", "tune"]
    assert all(np.isfinite(entry["learning_rate"]) for entry in results["history"])
    assert results["best_epoch"] == 3
