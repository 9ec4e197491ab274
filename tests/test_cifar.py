"""The CIFAR experiments end to end: models, per-example augmentation wiring, runs, errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf

from stn_pipeline import experiments, run
from stn_pipeline.hparams import DISCRETE, HParamSample, HyperParameters
from stn_pipeline.models import CifarAlexNet, CifarCnn, alexnet_hparams, cifar_cnn_hparams

MEAN, STD = (120.0, 110.0, 100.0), (60.0, 50.0, 40.0)


def _config(name: str, dataset: str, **overrides) -> experiments.RunConfig:
    settings = dict(dataset=dataset, batch_size=4, epochs=1, warmup_epochs=0, log_every=2)
    settings.update(overrides)
    return experiments.default_config(name, **settings)


def test_alexnet_declares_the_papers_fifteen_hyperparameters():
    specs = {s.name: s for s in alexnet_hparams()}
    assert len(specs) == 15
    for name in [f"dropout{i}" for i in range(5)] + ["fc_dropout0", "fc_dropout1"]:
        assert (specs[name].minimum, specs[name].maximum, specs[name].init) == (0.0, 0.9, 0.05)
    assert specs["hue"].maximum == 0.5 and specs["input_scale"].maximum == 0.3
    for name in ("contrast", "saturation", "brightness", "input_dropout"):
        assert specs[name].maximum == 1.0
    assert specs["cutout_length"].kind == DISCRETE and specs["cutout_length"].maximum == 24
    assert specs["cutout_holes"].kind == DISCRETE and specs["cutout_holes"].init == 1


def test_alexnet_matches_the_papers_parameter_count():
    specs = alexnet_hparams()
    model = CifarAlexNet((32, 32, 3), 10, MEAN, STD, specs)
    count = sum(int(np.prod(v.shape)) for v in model.trainable_variables)
    assert count == 46_825_160  # ORIG's hyper model: 2 x elementary + gates + 8 scalars


@pytest.mark.parametrize("shape", [(32, 32, 3), (24, 20, 1)])
def test_models_run_on_any_image_shape(shape):
    for model_class, specs in ((CifarCnn, cifar_cnn_hparams()), (CifarAlexNet, alexnet_hparams())):
        kwargs = {"fc_width": 32} if model_class is CifarAlexNet else {}
        if shape[-1] != 3:  # saturation and hue act on RGB only (the model refuses them)
            specs = [s for s in specs if s.name not in ("saturation", "hue")]
        model = model_class(shape, 7, MEAN[:shape[-1]], STD[:shape[-1]], specs, **kwargs)
        hparams = HyperParameters(specs)
        images = tf.zeros([5, *shape], tf.uint8)
        sample = hparams.sample(5)
        augmented, _ = model.augment(images, tf.zeros([5], tf.int64), sample, tf.constant([1, 2]))
        logits = model(augmented, sample, training=True, seed=tf.constant([3, 4]))
        assert logits.shape == (5, 7)


def test_augmentation_follows_each_examples_own_values():
    specs = cifar_cnn_hparams()
    model = CifarCnn((32, 32, 3), 10, MEAN, STD, specs)
    names = tuple(s.name for s in specs)
    values = np.full([2, len(names)], 0.05, np.float32)
    values[:, names.index("pixel_drop")] = [0.0, 0.7]
    sample = HParamSample(names, tf.constant(values), tf.zeros_like(values))
    images = tf.fill([2, 32, 32, 3], tf.constant(200, tf.uint8))
    augmented, _ = model.augment(images, tf.zeros([2], tf.int64), sample, tf.constant([5, 6]))
    expected = (200.0 - np.array(MEAN)) / np.array(STD)
    np.testing.assert_allclose(augmented[0], np.broadcast_to(expected, (32, 32, 3)), rtol=1e-6)
    dropped = np.mean(np.all(augmented[1].numpy() == 0.0, axis=-1))
    assert 0.6 < dropped < 0.8


def test_validation_inputs_are_only_normalised():
    model = CifarCnn((32, 32, 3), 10, MEAN, STD, cifar_cnn_hparams())
    images = np.random.default_rng(0).integers(0, 256, [4, 32, 32, 3]).astype(np.uint8)
    expected = (images.astype(np.float32) - np.array(MEAN)) / np.array(STD)
    np.testing.assert_allclose(model.preprocess(images), expected, rtol=1e-6, atol=1e-6)


def test_tiny_folders_run_end_to_end(image_folder_factory, tmp_path):
    def sizes(split, label, k):  # mostly 24x24, a few 30x28 that get resized
        return (30, 28, 1) if k % 5 == 0 else (24, 24, 1)

    gray = image_folder_factory("gray_mixed", shape=(24, 24, 1), sizes=sizes)
    rgb = image_folder_factory("rgb_tall", shape=(40, 24, 3))
    for name, folder in (("cifar_cnn", gray), ("cifar_alexnet", rgb)):
        logdir = str(tmp_path / name)
        results = run.run_experiment(_config(name, f"folder:{folder.root}", hyper_steps=1,
                                             train_steps=1), logdir)
        assert results["metadata"]["image_shape"][:2] == ([24, 24] if folder is gray else [40, 24])
        for key in ("val_loss", "val_accuracy", "test_loss", "test_accuracy"):
            assert np.isfinite(results[key])
        assert results["hyper_steps"] > 0
        with open(os.path.join(logdir, "results.json")) as handle:
            assert json.load(handle)["final_hparams"] == results["final_hparams"]


def test_frozen_baseline_keeps_initial_hyperparameters(tiny_image_folder, tmp_path):
    config = _config("cifar_cnn", f"folder:{tiny_image_folder.root}", tune=False, epochs=2)
    results = run.run_experiment(config, str(tmp_path / "frozen"))
    assert results["hyper_steps"] == 0
    for name, value in results["initial_hparams"].items():
        assert results["final_hparams"][name] == value


@pytest.mark.slow
def test_short_real_cifar_run_learns(cifar_folder, tmp_path):
    config = _config("cifar_cnn", f"folder:{cifar_folder}", max_examples=10000, batch_size=64,
                     log_every=50)
    results = run.run_experiment(config, str(tmp_path / "cifar"))
    assert results["weight_steps"] == 125
    assert results["val_accuracy"] > 0.2, results["val_accuracy"]
    assert results["test_accuracy"] > 0.2, results["test_accuracy"]
    assert results["final_hparams"] != results["initial_hparams"]


@pytest.mark.parametrize("flags, message", [
    (["--dataset=folder:/nonexistent/cifar"], "/nonexistent/cifar"),
    (["--dataset=no_such_dataset_xyz"], "no_such_dataset_xyz"),
    (["--batch_size=100000"], "batch"),
])
def test_cli_data_errors_are_one_line(flags, message, tiny_image_folder, tmp_path):
    if not any(f.startswith("--dataset") for f in flags):
        flags.append(f"--dataset=folder:{tiny_image_folder.root}")
    command = [sys.executable, "-m", "stn_pipeline_scripts.train", "--experiment=cifar_cnn",
               f"--logdir={tmp_path / 'run'}", *flags]
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    last_line = result.stderr.strip().splitlines()[-1]
    assert last_line.startswith("stn-train: error:") and message in last_line, last_line
