"""--replay end to end on relu_toy: the plain network follows the source's logged trajectory."""

import glob
import json
import shutil

import numpy as np
import pytest
import tensorflow as tf

from stn_pipeline import experiments, run
from stn_pipeline.replay import ReplayError

TOY = dict(epochs=3, warmup_epochs=1, toy_train_size=512, batch_size=64, log_every=3,
           toy_width=16)


def _logged(logdir, tag):
    """{step: value} of a scalar tag in a run's TensorBoard events."""
    values = {}
    for path in glob.glob(f"{logdir}/events.out.tfevents.*"):
        for event in tf.compat.v1.train.summary_iterator(path):
            for value in event.summary.value:
                if value.tag == tag:
                    values[event.step] = float(tf.make_ndarray(value.tensor))
    return values


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    logdir = str(tmp_path_factory.mktemp("source") / "run")
    run.run_experiment(experiments.default_config("relu_toy", **TOY), logdir)
    return logdir


def test_replay_follows_the_logged_trajectory(source, tmp_path):
    replay_dir = str(tmp_path / "replay")
    config = experiments.default_config("relu_toy", **TOY, replay=source)
    assert config.network == "plain" and not config.trainer.tune
    results = run.run_experiment(config, replay_dir)
    with open(f"{source}/results.json") as handle:
        original = json.load(handle)
    assert results["network"] == "plain" and original["network"] == "stn"
    assert results["weight_steps"] == original["weight_steps"] and results["hyper_steps"] == 0
    assert results["num_parameters"] <= 0.7 * original["num_parameters"]
    expected, logged = _logged(source, "hparam/input_range"), _logged(replay_dir,
                                                                      "hparam/input_range")
    assert len(expected) >= 8 and set(logged) == set(expected)
    moved = max(expected.values()) - min(expected.values())
    assert moved > 1e-3  # the source tuned r, so the replay really follows a changing value
    for step, value in expected.items():
        assert logged[step] == pytest.approx(value, abs=1e-4), step
    assert results["initial_hparams"] == pytest.approx(original["initial_hparams"], abs=1e-6)


def test_replay_of_another_experiment_is_refused_before_work(source, tmp_path):
    config = experiments.default_config("cifar_cnn", replay=source, dataset="folder:/nowhere")
    with pytest.raises(run.ConfigError, match=f"--replay={source} is a run of experiment "
                                              "'relu_toy', not 'cifar_cnn'"):
        run.run_experiment(config, str(tmp_path / "never"))
    assert not (tmp_path / "never").exists()


def test_replay_of_an_unfinished_run_is_refused(source, tmp_path):
    unfinished = tmp_path / "unfinished"
    shutil.copytree(source, unfinished)
    (unfinished / "results.json").unlink()
    config = experiments.default_config("relu_toy", **TOY, replay=str(unfinished))
    with pytest.raises(ReplayError, match="is unfinished: no results.json, checkpoints up to"):
        run.run_experiment(config, str(tmp_path / "never"))


def test_replay_with_another_batch_size_is_refused(source, tmp_path):
    config = experiments.default_config("relu_toy", **{**TOY, "batch_size": 32}, replay=source)
    with pytest.raises(ReplayError, match="--batch_size=64, the replay has --batch_size=32"):
        run.run_experiment(config, str(tmp_path / "never"))


def test_replay_assigns_discrete_values_exactly():
    config = experiments.default_config("cifar_alexnet", hparams="cutout_holes,cutout_length,hue")
    _, hparams = experiments.build_model(config, {"image_shape": [32, 32, 3],
                                                  "class_names": list("ab"),
                                                  "mean": [0.0] * 3, "std": [1.0] * 3})
    assert hparams.names == ("hue", "cutout_length", "cutout_holes")  # declaration order
    for values in ([0.01, 0.0, 0.0], [0.3, 23.0, 3.0], [0.4999, 7.0, 1.0]):
        hparams.assign_values(values)
        np.testing.assert_allclose(hparams.constrained().numpy(), values, rtol=1e-5, atol=1e-6)


def test_replay_with_several_cycles_per_call_is_refused(source, tmp_path):
    config = experiments.default_config("relu_toy", **TOY, replay=source, cycles_per_execution=4)
    with pytest.raises(run.ConfigError, match="--replay .*--cycles_per_execution=1"):
        run.run_experiment(config, str(tmp_path / "never"))
    assert not (tmp_path / "never").exists()
