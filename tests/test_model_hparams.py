"""Every declared hyperparameter acts: on the network or on the data, each example at its own
value; a declaration that would act on nothing fails at construction, naming it."""

import math

import numpy as np
import pytest
import tensorflow as tf

from stn_pipeline import experiments
from stn_pipeline.hparams import DISCRETE, POSITIVE, HParam, HParamSample, HyperParameters
from stn_pipeline.loss_terms import LOSS_TERM_HPARAMS
from stn_pipeline.models import CifarAlexNet, CifarCnn, ReluToy, alexnet_hparams, cifar_cnn_hparams
from stn_pipeline.models.image import augmentation_hparams

SHAPE, CLASSES = (32, 32, 3), 10
MEAN, STD = (120.0, 110.0, 100.0), (60.0, 50.0, 40.0)

# Small versions of every registered experiment's model, from its declared hyperparameters.
_MODELS = {
    "relu_toy": lambda specs: ReluToy(depth=2, width=8, num_hparams=len(specs), seed=0),
    "cifar_cnn": lambda specs: CifarCnn(SHAPE, CLASSES, MEAN, STD, specs, seed=0),
    "cifar_alexnet": lambda specs: CifarAlexNet(SHAPE, CLASSES, MEAN, STD, specs, seed=0,
                                                fc_width=32),
}


def _batch(experiment):
    rng = np.random.default_rng(0)
    if experiment == "relu_toy":
        u = rng.uniform(-1.0, 1.0, (16, 1)).astype(np.float32)
        return tf.constant(u), tf.zeros_like(u)
    images = rng.integers(0, 256, (16, *SHAPE)).astype(np.uint8)
    return tf.constant(images), tf.constant(rng.integers(0, CLASSES, 16), tf.int64)


def _training_loss(model, names, values, hnet_input, batch):
    """The weight step's loss at fixed seeds, for the given per-example values.

    The gates always see the same `hnet_input`: a change of loss comes from the values alone.
    """
    sample = HParamSample(names, tf.constant(values), hnet_input)
    inputs, targets = model.augment(*batch, sample, tf.constant([1, 2]))
    outputs = model(inputs, sample, training=True, seed=tf.constant([3, 4]))
    return float(tf.reduce_mean(model.training_loss(targets, outputs, sample)))


def _moved(spec, value):
    """A value of `spec` away from `value`; for a discrete one, two integer cells up."""
    if spec.kind == DISCRETE:
        return math.floor(value) + 2.0
    if spec.kind == POSITIVE:
        return value + 1.0
    return value + 0.5 * (spec.maximum - value)


def test_every_registered_experiment_has_a_model_here():
    assert set(_MODELS) == set(experiments.EXPERIMENTS)


@pytest.mark.parametrize("experiment", sorted(_MODELS))
def test_every_declared_hyperparameter_moves_the_training_loss(experiment):
    own = experiments.hparam_specs(experiments.default_config(experiment)).tuned
    names = [spec.name for spec in own] + ([] if experiment == "relu_toy" else [*LOSS_TERM_HPARAMS])
    config = experiments.default_config(experiment, hparams=",".join(names))
    specs = experiments.hparam_specs(config).tuned  # every hyperparameter it offers, tuned
    hparams = HyperParameters(specs, seed=0)
    model = _MODELS[experiment](specs)
    batch = _batch(experiment)
    batch_size = int(batch[1].shape[0])
    base = np.tile(hparams.constrained().numpy(), [batch_size, 1])
    hnet_input = tf.broadcast_to(hparams.unconstrained_value, [batch_size, hparams.size])
    reference = _training_loss(model, hparams.names, base, hnet_input, batch)
    assert reference == _training_loss(model, hparams.names, base, hnet_input, batch)
    idle = []
    for index, spec in enumerate(specs):
        values = base.copy()
        values[:, index] = _moved(spec, base[0, index])
        if _training_loss(model, hparams.names, values, hnet_input, batch) == reference:
            idle.append(spec.name)
    assert not idle, f"{experiment}: moving {idle} does not change the training loss"


def _constant_images(count=4, value=200):
    return tf.fill([count, *SHAPE], tf.constant(value, tf.uint8))


def test_a_cnn_declaring_cutout_cuts_out():
    specs = cifar_cnn_hparams() + augmentation_hparams(["cutout_length", "cutout_holes"])
    model = CifarCnn(SHAPE, CLASSES, MEAN, STD, specs)
    names = tuple(s.name for s in specs)
    values = np.zeros([4, len(names)], np.float32)  # no pixel drop, no dropout
    values[:, names.index("cutout_length")] = 8.0
    values[:, names.index("cutout_holes")] = [0.0, 1.0, 2.0, 3.0]
    sample = HParamSample(names, tf.constant(values), tf.zeros_like(values))
    images, _ = model.augment(_constant_images(), tf.zeros([4], tf.int64), sample,
                              tf.constant([5, 6]))
    cut = np.all(images.numpy() == 0.0, axis=-1).sum(axis=(1, 2))  # normalised 200 is not 0
    assert cut[0] == 0
    assert 0 < cut[1] <= 64 and cut[2] <= 128 and cut[3] <= 192
    assert cut[3] > cut[1]


@pytest.mark.parametrize("extra, message", [
    (["cutout_length"], "cutout_length needs cutout_length and cutout_holes"),
    (["cutout_holes"], "cutout_holes needs cutout_length and cutout_holes"),
])
def test_half_of_cutout_is_refused(extra, message):
    with pytest.raises(ValueError, match=message):
        CifarCnn(SHAPE, CLASSES, MEAN, STD, cifar_cnn_hparams() + augmentation_hparams(extra))


def test_a_hyperparameter_acting_on_nothing_is_refused():
    specs = cifar_cnn_hparams() + [
        HParam("momentum", minimum=0.0, maximum=1.0, init=0.1)]
    with pytest.raises(ValueError, match=r"CifarCnn: hyperparameters \['momentum'\] act on "
                                         "nothing"):
        CifarCnn(SHAPE, CLASSES, MEAN, STD, specs)


def test_a_missing_network_dropout_is_named():
    specs = [s for s in alexnet_hparams() if s.name != "fc_dropout1"]
    with pytest.raises(ValueError, match=r"applies hyperparameters \['fc_dropout1'\]"):
        CifarAlexNet(SHAPE, CLASSES, MEAN, STD, specs, fc_width=8)


def test_colour_hyperparameters_on_grayscale_images_are_named():
    with pytest.raises(ValueError, match=r"\['saturation', 'hue'\] act on 3-channel \(RGB\) "
                                         r"images only; these images have 1 channel"):
        CifarAlexNet((32, 32, 1), CLASSES, MEAN[:1], STD[:1], alexnet_hparams(), fc_width=8)


def test_alexnet_each_examples_dropout_rate_reaches_its_own_mask():
    specs = alexnet_hparams()
    model = CifarAlexNet(SHAPE, CLASSES, MEAN, STD, specs, seed=0, fc_width=64)
    names = tuple(s.name for s in specs)
    values = np.zeros([2, len(names)], np.float32)
    values[1, names.index("fc_dropout0")] = 0.89  # example 0 keeps rate 0
    sample = HParamSample(names, tf.constant(values), tf.zeros_like(values))
    seen = []
    fc1 = model.fc1
    model.fc1 = lambda x, h: (seen.append(x.numpy()), fc1(x, h))[1]  # records fc1's input
    images = model.preprocess(tf.constant(
        np.random.default_rng(1).integers(0, 256, (2, *SHAPE)).astype(np.uint8)))
    model(images, sample, training=False)
    model(images, sample, training=True, seed=tf.constant([7, 8]))
    clean, dropped = seen
    np.testing.assert_array_equal(dropped[0], clean[0])  # rate 0: untouched
    active = clean[1] != 0.0
    assert active.sum() > 100
    zeroed = np.mean(dropped[1][active] == 0.0)
    assert 0.8 < zeroed < 0.97, zeroed  # rate 0.89: mostly zero
    kept = dropped[1][active & (dropped[1] != 0.0)]
    np.testing.assert_allclose(kept, clean[1][active & (dropped[1] != 0.0)] / 0.11, rtol=1e-4)
