"""The plain network (--network=plain) and fixed hyperparameters (--hparams)."""

import dataclasses

import numpy as np
import pytest
import tensorflow as tf

from stn_pipeline import experiments, export
from stn_pipeline.hparam_selection import select_hparams
from stn_pipeline.hparams import HyperParameters
from stn_pipeline.models.cifar_cnn import CifarCnn, cifar_cnn_hparams
from stn_pipeline.plain_layers import LayerFactory, PlainConv2D, PlainDense

METADATA = {"image_shape": [20, 20, 3], "class_names": list("abcd"), "mean": [120.0] * 3,
            "std": [60.0] * 3}


def _images(count, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (count, 20, 20, 3), dtype=np.uint8)


def test_plain_dense_is_xk_plus_b_and_ignores_the_hypernet_input():
    layer = PlainDense(5, 3, seed=1)
    x = np.random.default_rng(0).normal(size=(4, 5)).astype(np.float32)
    expected = x @ layer.kernel.numpy() + layer.bias.numpy()
    np.testing.assert_allclose(layer(x, tf.ones([4, 7])), expected, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(layer(x, None), expected, rtol=1e-5, atol=1e-6)
    bound = 1 / np.sqrt(5)
    assert np.all(np.abs(layer.kernel.numpy()) <= bound) and layer.kernel.shape == (5, 3)


def test_plain_conv_matches_a_numpy_convolution():
    layer = PlainConv2D(2, 3, 3, padding="VALID", seed=2)
    x = np.random.default_rng(1).normal(size=(2, 5, 5, 2)).astype(np.float32)
    kernel, bias = layer.kernel.numpy(), layer.bias.numpy()
    expected = np.zeros([2, 3, 3, 3], np.float32)
    for i in range(3):
        for j in range(3):
            expected[:, i, j] = np.einsum("bhwc,hwco->bo", x[:, i:i + 3, j:j + 3], kernel) + bias
    np.testing.assert_allclose(layer(x, tf.zeros([2, 1])), expected, rtol=1e-4, atol=1e-5)
    assert np.all(np.abs(kernel) <= 1 / np.sqrt(2 * 9))


def test_fixed_hyperparameters_are_sample_columns_but_not_hypernet_inputs():
    selection = select_hparams("dropout1=0.3", cifar_cnn_hparams())
    hparams = HyperParameters(selection.tuned, seed=0, fixed=selection.fixed)
    assert hparams.names == ("dropout1",) and hparams.size == 1
    assert hparams.sample_names == ("dropout1", "dropout0", "dropout2", "pixel_drop")
    sample = hparams.sample(6)
    assert sample.hnet_input.shape == (6, 1) and sample.values.shape == (6, 4)
    np.testing.assert_allclose(sample["dropout0"], [0.05] * 6)
    np.testing.assert_allclose(sample["pixel_drop"], [0.05] * 6)
    assert len(set(np.round(sample["dropout1"].numpy(), 6))) == 6  # perturbed per example
    assert hparams.fixed_values == {"dropout0": 0.05, "dropout2": 0.05, "pixel_drop": 0.05}


def test_gate_width_is_the_number_tuned():
    config = experiments.default_config("cifar_cnn", hparams="dropout0,label_smoothing")
    model, hparams = experiments.build_model(config, METADATA)
    assert hparams.names == ("dropout0", "label_smoothing")
    assert {conv.gate_kernel.shape[0] for conv in model.convs} == {2}
    assert set(model.hparam_names) == {"dropout0", "dropout1", "dropout2", "pixel_drop",
                                       "label_smoothing"}


def test_unknown_hyperparameter_lists_the_available_ones():
    config = experiments.default_config("cifar_cnn", hparams="dropout0,momentum")
    with pytest.raises(ValueError, match="unknown hyperparameter 'momentum'; available: dropout0, "
                                         "dropout1, dropout2, pixel_drop, weight_decay, "
                                         "label_smoothing"):
        experiments.hparam_specs(config)


def test_a_fixed_dropout_still_drops():
    """A plain CNN whose dropout0 is fixed acts at that rate: training outputs at a fixed 0.85
    differ from those at a fixed 1e-6, with the same weights and seeds."""
    outputs = []
    for rate in (1e-6, 0.85):
        specs = cifar_cnn_hparams()
        specs[0] = dataclasses.replace(specs[0], init=rate)  # dropout0
        hparams = HyperParameters(specs[1:2], fixed=[specs[0], *specs[2:]])
        model = CifarCnn([20, 20, 3], 4, [0.0] * 3, [1.0] * 3, specs, seed=0,
                         layers=LayerFactory(network="plain"))
        x = model.preprocess(_images(8))
        outputs.append(model(x, hparams.sample(8, perturb=False), training=True,
                             seed=tf.constant([1, 2])).numpy())
    assert np.abs(outputs[0] - outputs[1]).max() > 1e-3


def test_plain_network_has_about_half_the_parameters():
    counts = {}
    for network in ("stn", "plain"):
        config = experiments.default_config("cifar_cnn", network=network)
        model, _ = experiments.build_model(config, METADATA)
        counts[network] = sum(int(np.prod(v.shape)) for v in model.trainable_variables)
        assert config.trainer.tune == (network == "stn")  # plain implies --tune=false
    assert counts["plain"] <= 0.55 * counts["stn"]
    # The plain CNN by hand: convs 3->32->64->64 (3x3), dense 64*1*1 -> 64, logits 64 -> 4.
    assert counts["plain"] == (27 * 32 + 32) + (288 * 64 + 64) + (576 * 64 + 64) + (
        64 * 64 + 64) + (64 * 4 + 4)


def test_plain_model_exports_unchanged():
    config = experiments.default_config("cifar_cnn", network="plain")
    model, hparams = experiments.build_model(config, METADATA)
    copy = export.fold_model(model, hparams.unconstrained_value)
    x = model.preprocess(_images(3))
    sample = hparams.sample(3, perturb=False)
    np.testing.assert_allclose(copy(x, sample, training=False),
                               model(x, sample, training=False), rtol=1e-6)
    assert copy.convs[0].kernel is not model.convs[0].kernel
