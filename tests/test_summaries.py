"""Tests for stn_pipeline.summaries: the TensorBoard record of a short relu_toy run."""

import collections
import glob
import json
import os

import numpy as np
import pytest
import tensorflow as tf

from tensorboard.plugins.hparams import plugin_data_pb2

from stn_pipeline import experiments, run
from stn_pipeline.files import write_json
from stn_pipeline.models.relu_toy import input_range_hparam
from stn_pipeline.summaries import RunLogger

EPOCHS, WARMUP, LOG_EVERY = 3, 1, 5


def _read_events(logdir):
    """tag -> list of (step, plugin_name, value array); plus plugin name -> list of contents."""
    events = collections.defaultdict(list)
    plugins = collections.defaultdict(list)
    files = glob.glob(os.path.join(logdir, "events.out.tfevents.*"))
    assert files, f"no event file in {logdir}"
    for path in files:
        for event in tf.compat.v1.train.summary_iterator(path):
            for value in event.summary.value:
                plugin = value.metadata.plugin_data.plugin_name
                plugins[plugin].append(value.metadata.plugin_data.content)
                array = tf.make_ndarray(value.tensor) if value.HasField("tensor") else None
                events[value.tag].append((event.step, plugin, array))
    return events, plugins


@pytest.fixture(scope="module")
def short_run(tmp_path_factory):
    logdir = str(tmp_path_factory.mktemp("summaries") / "run")
    config = experiments.default_config("relu_toy", seed=0, epochs=EPOCHS, warmup_epochs=WARMUP,
                                        log_every=LOG_EVERY)
    results = run.run_experiment(config, logdir)
    events, plugins = _read_events(logdir)
    return config, results, events, plugins


def _scalars(events, tag):
    return [(step, float(array)) for step, _, array in events[tag]]


@pytest.mark.parametrize("tag", [
    "train/loss", "hyper/loss", "hyper/hyper_loss", "hyper/entropy", "hparam/input_range",
    "scale/input_range", "epoch/val_loss", "epoch/learning_rate", "epoch/test_loss",
])
def test_scalar_tags_exist(short_run, tag):
    _, _, events, _ = short_run
    assert tag in events, sorted(events)
    for _, _, array in events[tag]:
        assert array.shape == () and np.isfinite(array)


def test_per_example_hparam_histogram(short_run):
    config, _, events, _ = short_run
    records = events["hparam_sample/input_range"]
    assert records
    # The histogram plugin (its tensor is [bins, 3]: left edge, right edge, count).
    assert any(plugin == "histograms" for _, plugin, _ in records)
    for _, _, array in records:
        assert array.ndim == 2 and array.shape[1] == 3
        assert array[:, 2].sum() == pytest.approx(config.data.batch_size)  # one count per example


def test_hparams_plugin_record(short_run):
    config, results, _, plugins = short_run
    assert "hparams" in plugins
    records = [plugin_data_pb2.HParamsPluginData.FromString(c) for c in plugins["hparams"]]
    starts = [r.session_start_info for r in records if r.HasField("session_start_info")]
    experiment = [r.experiment for r in records if r.HasField("experiment")]
    assert len(starts) == 1 and len(experiment) == 1
    settings = starts[0].hparams
    assert settings["experiment"].string_value == "relu_toy"
    assert settings["epochs"].number_value == EPOCHS
    assert settings["init/input_range"].number_value == pytest.approx(
        results["initial_hparams"]["input_range"])
    metrics = {m.name.tag for m in experiment[0].metric_infos}
    assert {"final/input_range", "final/val_loss", "final/test_loss"} <= metrics


def test_last_logged_value_equals_the_trajectory(short_run):
    _, results, events, _ = short_run
    last = results["trajectory"][-1]
    values = sorted(_scalars(events, "hparam/input_range"))
    assert values[-1][0] == last["step"]
    assert values[-1][1] == pytest.approx(last["input_range"], abs=1e-6)
    assert [step for step, _ in values] == [point["step"] for point in results["trajectory"]]


def test_scales_are_positive_and_logged_with_values(short_run):
    config, results, events, _ = short_run
    scales = sorted(_scalars(events, "scale/input_range"))
    values = sorted(_scalars(events, "hparam/input_range"))
    assert scales and all(value > 0 for _, value in scales)
    assert [step for step, _ in scales] == [step for step, _ in values]
    # During the warm-up nothing is tuned: the logged value and scale are the declared inits.
    warmup_end = WARMUP * (config.toy.train_size // config.data.batch_size)
    warmup = [(s, v) for (step, s), (_, v) in zip(scales, values) if step <= warmup_end]
    assert warmup
    for scale, value in warmup:
        assert scale == pytest.approx(input_range_hparam().scale_init, abs=1e-6)
        assert value == pytest.approx(config.toy.r0, abs=1e-5)
    # Afterwards the scale is tuned too.
    assert len({scale for step, scale in scales if step > warmup_end}) > 1
    assert scales[-1][1] != pytest.approx(input_range_hparam().scale_init, abs=1e-6)


def test_steps_follow_log_every_and_the_epochs(short_run):
    config, results, events, _ = short_run
    steps_per_epoch = config.toy.train_size // config.data.batch_size
    total = EPOCHS * steps_per_epoch
    train_steps = sorted(step for step, _ in _scalars(events, "train/loss"))
    expected = sorted(set(range(LOG_EVERY, total + 1, LOG_EVERY)) | {total})
    assert train_steps == expected
    assert sorted(step for step, _ in _scalars(events, "epoch/val_loss")) == [
        steps_per_epoch * (epoch + 1) for epoch in range(EPOCHS)]
    # Hyper steps only start after the warm-up epochs.
    hyper_steps = [step for step, _ in _scalars(events, "hyper/loss")]
    assert hyper_steps and min(hyper_steps) > WARMUP * steps_per_epoch
    history = results["history"]
    assert [entry["phase"] for entry in history] == ["warmup"] * WARMUP + ["tune"] * (
        EPOCHS - WARMUP)
    assert [entry["val_loss"] for entry in history] == pytest.approx(
        [value for _, value in sorted(_scalars(events, "epoch/val_loss"))], rel=1e-6)
    assert [entry["learning_rate"] for entry in history] == pytest.approx(
        [value for _, value in sorted(_scalars(events, "epoch/learning_rate"))], rel=1e-6)
    assert results["best_epoch"] > WARMUP


def test_hyper_loss_is_loss_minus_tau_entropy(short_run):
    """Against the Gaussian entropy computed in NumPy from the logged scale sigma.

    The scale is logged after the hyper step that the entropy was computed before: one Adam
    step (lr 0.03) moves log(sigma) by less than 0.05, so the entropy agrees within 0.05 and
    tau * entropy within 1e-4 (tau * entropy itself is about 7e-4).
    """
    config, _, events, _ = short_run
    loss = dict(_scalars(events, "hyper/loss"))
    hyper_loss = dict(_scalars(events, "hyper/hyper_loss"))
    entropy = dict(_scalars(events, "hyper/entropy"))
    scale = dict(_scalars(events, "scale/input_range"))
    assert config.trainer.scale_lr <= 0.03 and loss
    for step in loss:
        numpy_entropy = np.log(scale[step] * np.sqrt(2.0 * np.pi * np.e))
        assert entropy[step] == pytest.approx(numpy_entropy, abs=0.05)
        assert hyper_loss[step] == pytest.approx(loss[step] - config.trainer.tau * numpy_entropy,
                                                 abs=1e-4)


def test_learning_rate_scalar_is_the_weight_lr(short_run):
    config, _, events, _ = short_run
    for _, value in _scalars(events, "epoch/learning_rate"):
        assert value == pytest.approx(config.trainer.weight_lr)


def test_run_logger_histograms_and_state(tmp_path):
    logger = RunLogger(str(tmp_path))
    values = np.array([[0.1, 2.0], [0.3, 4.0], [0.2, 6.0]], np.float32)
    logger.hparam_state(7, ("a", "b"), [0.5, 3.0], [0.25, 1.5])
    logger.hparam_histograms(7, ("a", "b"), values)
    logger.scalars(8, {"loss": 1.25}, "train/")
    logger.close()
    events, _ = _read_events(str(tmp_path))
    assert _scalars(events, "hparam/a") == [(7, 0.5)]
    assert _scalars(events, "scale/b") == [(7, 1.5)]
    assert _scalars(events, "train/loss") == [(8, 1.25)]
    (step, _, histogram), = events["hparam_sample/b"]
    assert step == 7 and histogram[:, 2].sum() == 3
    assert histogram[:, 0].min() == pytest.approx(2.0)
    assert histogram[:, 1].max() == pytest.approx(6.0)


def test_write_json_is_complete_and_leaves_no_temporary(tmp_path):
    path = str(tmp_path / "out.json")
    write_json(path, {"b": 1, "a": [1.5, "x"]})
    write_json(path, {"c": None})  # replaces
    with open(path) as handle:
        assert json.load(handle) == {"c": None}
    assert os.listdir(tmp_path) == ["out.json"]
