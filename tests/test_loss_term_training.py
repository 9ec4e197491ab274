"""Loss-term hyperparameters in training: weight decay and label smoothing act on the weight-step
loss only, and their hyper-gradient flows through the best-response (the gates) alone."""

import numpy as np
import tensorflow as tf

from stn_pipeline.hparam_selection import select_hparams
from stn_pipeline.hparams import HyperParameters
from stn_pipeline.loss_terms import LOSS_TERM_HPARAMS
from stn_pipeline.models.cifar_cnn import CifarCnn, cifar_cnn_hparams
from stn_pipeline.plain_layers import LayerFactory
from stn_pipeline.trainer import StnTrainer, TrainerConfig

SHAPE = (18, 18, 1)
CLASSES = 4


def _model(text, network="stn", seed=0):
    selection = select_hparams(text, cifar_cnn_hparams(), list(LOSS_TERM_HPARAMS.values()))
    hparams = HyperParameters(selection.tuned, seed=seed, fixed=selection.fixed)
    model = CifarCnn(SHAPE, CLASSES, [128.0], [64.0], [*selection.tuned, *selection.fixed],
                     seed=seed, layers=LayerFactory(network=network, num_hparams=hparams.size))
    return model, hparams


def _batch(count, seed):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, CLASSES, count)
    # Class-dependent brightness makes the task learnable within a few steps.
    images = rng.integers(0, 64, (count, *SHAPE)) + 48 * labels[:, None, None, None]
    return images.astype(np.uint8), labels.astype(np.int64)


def test_plain_training_loss_by_hand():
    """loss_i = logsumexp(z_i) - (1 - e) z_i[y_i] - e mean_k z_ik + wd * 0.5 * sum_layers ||K||^2
    for a plain network (no gates), with e and wd the sample's values."""
    model, hparams = _model("weight_decay=0.01,label_smoothing=0.2", network="plain")
    images, labels = _batch(5, seed=1)
    sample = hparams.sample(5, perturb=False)
    logits = model(model.preprocess(images), sample, training=False)
    z = logits.numpy().astype(np.float64)
    logsumexp = np.log(np.exp(z).sum(-1))
    smoothing, decay = 0.2, 0.01
    cross_entropy = logsumexp - (1 - smoothing) * z[np.arange(5), labels] - smoothing * z.mean(-1)
    squares = sum(np.sum(layer.kernel.numpy().astype(np.float64) ** 2)
                  for layer in [*model.convs, model.dense, model.logits])
    expected = cross_entropy + decay * 0.5 * squares
    np.testing.assert_allclose(model.training_loss(labels, logits, sample), expected, rtol=1e-4)
    # The evaluation / validation loss is the plain cross entropy.
    np.testing.assert_allclose(model.loss(labels, logits), logsumexp - z[np.arange(5), labels],
                               rtol=1e-5)


def test_weight_decay_hypergradient_flows_through_the_response():
    """After some weight steps with per-example perturbed weight decay, the hyper step's gradient
    of the validation loss with respect to the unconstrained weight decay u is

        dL_val(w*(u))/du = sum_layers dL_val/dgates . V[u-row]       (weights held fixed)
                         ~ [L_val(gates(u + eps)) - L_val(gates(u - eps))] / (2 eps),

    since L_val (clean inputs, eval mode, no loss terms) depends on u only through the gates:
    it is non-zero, agrees with the finite difference, the hyper step moves u against it, and it
    vanishes exactly once the weight-decay row of every gate kernel is zeroed."""
    model, hparams = _model("dropout0,weight_decay")
    config = TrainerConfig(weight_optimizer="adam", weight_lr=3e-3, hyper_lr=0.01,
                           tune_scales=False)
    trainer = StnTrainer(model, hparams, tf.TensorSpec([None, *SHAPE], tf.uint8),
                         tf.TensorSpec([None], tf.int64), config, seed=0)
    for step in range(30):
        trainer.weight_step(*_batch(32, seed=100 + step))
    valid_images, valid_labels = _batch(64, seed=7)
    column = hparams.index("weight_decay")

    def valid_loss(unconstrained):
        hnet_input = tf.tile(unconstrained[None], [64, 1])
        sample = hparams.make_sample(hparams.to_constrained(hnet_input), hnet_input)
        logits = model(model.preprocess(valid_images), sample, training=False)
        return tf.reduce_mean(model.loss(valid_labels, logits))

    def gradient():
        with tf.GradientTape() as tape:
            loss = valid_loss(hparams.unconstrained_value)
        return tape.gradient(loss, hparams.unconstrained_value).numpy()[column]

    u = hparams.unconstrained_value.numpy()
    eps = 0.05
    shift = np.eye(hparams.size, dtype=np.float32)[column] * eps
    finite_difference = (float(valid_loss(tf.constant(u + shift)))
                         - float(valid_loss(tf.constant(u - shift)))) / (2 * eps)
    analytic = gradient()
    assert abs(analytic) > 1e-6
    np.testing.assert_allclose(analytic, finite_difference, rtol=0.05)

    trainer.hyper_step(valid_images, valid_labels)  # Adam's first step: -lr * sign(gradient)
    moved = hparams.unconstrained_value.numpy()[column] - u[column]
    assert np.sign(moved) == -np.sign(finite_difference)

    for layer in [*model.convs, model.dense, model.logits]:
        kernel = layer.gate_kernel.numpy()
        kernel[column] = 0.0
        layer.gate_kernel.assign(kernel)
    assert gradient() == 0.0


def test_hyper_step_loss_has_no_loss_terms():
    """A large weight decay changes the weight-step loss but not the hyper step's loss, which
    equals the evaluation loss of the same batch at the same values."""
    model, hparams = _model("weight_decay=0.09,label_smoothing=0.4")
    trainer = StnTrainer(model, hparams, tf.TensorSpec([None, *SHAPE], tf.uint8),
                         tf.TensorSpec([None], tf.int64),
                         TrainerConfig(tune_scales=False, hyper_lr=1e-12), seed=0)
    images, labels = _batch(16, seed=3)
    evaluated = trainer.evaluate(images, labels)
    hyper = trainer.hyper_step(images, labels)
    np.testing.assert_allclose(float(hyper["loss"]), float(evaluated["loss"]) / 16, rtol=1e-5)
    sample = hparams.sample(16, perturb=False)
    logits = model(model.preprocess(images), sample, training=False)
    assert float(tf.reduce_mean(model.training_loss(labels, logits, sample))) > float(
        hyper["loss"]) + 0.05
