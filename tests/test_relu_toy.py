"""Tests for the deep-ReLU toy of the STN paper: the model, and that tuning finds r close to 2."""

import json

import numpy as np
import pytest
import tensorflow as tf

from stn_pipeline import experiments, run
from stn_pipeline.hparams import HyperParameters
from stn_pipeline.models.relu_toy import ReluToy, input_range_hparam

def _stacked(layer, what):
    """W_e and W_h (or b_e and b_h) side by side, [..., 2 D_out]."""
    return np.concatenate([getattr(layer, f"elementary_{what}").numpy(),
                           getattr(layer, f"response_{what}").numpy()], axis=-1)



def test_input_range_starts_at_its_init_and_stays_positive():
    hparams = HyperParameters([input_range_hparam(1.5, scale_init=0.2)], seed=0)
    assert hparams.as_dict()["input_range"] == pytest.approx(1.5, rel=1e-5)
    np.testing.assert_allclose(hparams.scale().numpy(), [0.2], rtol=1e-5)
    # r = softplus(unconstrained): positive however far the perturbation pushes it.
    unconstrained = np.array([[-50.0], [-5.0], [0.0], [5.0]], np.float32)
    values = hparams.to_constrained(unconstrained).numpy()[:, 0]
    assert np.all(values > 0.0)
    np.testing.assert_allclose(values, np.log1p(np.exp(unconstrained[:, 0].astype(np.float64))),
                               rtol=1e-5)


def test_augment_stretches_each_example_by_its_own_range():
    hparams = HyperParameters([input_range_hparam(1.0, scale_init=1.0)], seed=0)
    model = ReluToy(depth=2, width=8, num_hparams=1, seed=0)
    u = np.linspace(-1.0, 1.0, 16, dtype=np.float32)[:, None]
    sample = hparams.sample(16)
    x, y = model.augment(tf.constant(u), tf.zeros_like(u), sample, seed=None)
    r = sample["input_range"].numpy()
    assert len(np.unique(r)) == 16
    np.testing.assert_allclose(x.numpy(), u * r[:, None], rtol=1e-6)
    np.testing.assert_allclose(y.numpy(), (u * r[:, None]) ** 2, rtol=1e-5, atol=1e-7)


def test_relu_toy_forward_matches_numpy():
    model = ReluToy(depth=2, width=5, num_hparams=1, seed=3)
    rng = np.random.default_rng(0)
    for layer in model.hidden + [model.head]:
        layer.gate_kernel.assign(rng.normal(0, 0.5, layer.gate_kernel.shape).astype(np.float32))
    hparams = HyperParameters([input_range_hparam(1.3)], seed=0)
    sample = hparams.sample(7)
    x = rng.uniform(-2, 2, size=(7, 1)).astype(np.float32)
    out = model(tf.constant(x), sample, training=True).numpy()
    h = sample.hnet_input.numpy().astype(np.float64)
    a = x.astype(np.float64)
    for index, layer in enumerate(model.hidden + [model.head]):
        d = layer.output_size
        kernel, bias = _stacked(layer, "kernel"), _stacked(layer, "bias")
        gates = h @ layer.gate_kernel.numpy()
        a = (layer.elementary_scale.numpy() * (a @ kernel[:, :d] + bias[:d])
             + gates[:, :d] * (a @ kernel[:, d:]) + gates[:, d:] * bias[d:])
        if index < len(model.hidden):
            a = np.maximum(a, 0.0)
    assert out.shape == (7, 1)
    np.testing.assert_allclose(out, a, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("depth, width", [(0, 8), (2, 0)])
def test_relu_toy_rejects_empty_networks(depth, width):
    with pytest.raises(ValueError, match=f"received {depth}, {width}"):
        ReluToy(depth=depth, width=width)


def test_relu_toy_loss_is_squared_error():
    model = ReluToy(depth=1, width=2)
    outputs = tf.constant([[1.0], [-2.0], [0.5]])
    targets = tf.constant([[0.0], [1.0], [0.5]])
    np.testing.assert_allclose(model.loss(targets, outputs).numpy(), [1.0, 9.0, 0.0])


def test_tuning_moves_the_input_range_towards_two(tmp_path):
    config = experiments.default_config("relu_toy", seed=0, toy_r0=1.0)
    assert config.schedule.epochs >= 10 and config.trainer.tune  # the defaults do tune, for several epochs
    results = run.run_experiment(config, str(tmp_path / "relu_toy"))
    initial = results["initial_hparams"]["input_range"]
    final = results["final_hparams"]["input_range"]
    assert initial == pytest.approx(1.0, abs=1e-5)
    # Validation inputs cover [-2, 2], so the best training range is r = 2.
    assert 1.6 <= final <= 2.6, results["trajectory"][-5:]
    assert final > initial + 0.5
    assert results["val_loss"] < 0.01
    assert results["test_loss"] < 0.02
    # Upward, monotonically-ish: most logged moves go up, and r never falls far below the highest
    # value it has reached so far.
    values = np.array([point["input_range"] for point in results["trajectory"]])
    assert len(values) >= 10
    assert values[-1] > values[0] + 0.5
    moves = np.diff(values)
    moving = moves[np.abs(moves) > 1e-6]  # the warm-up epochs do not move r at all
    assert (moving > 0).mean() > 0.6
    assert np.max(np.maximum.accumulate(values) - values) < 0.15
    # The run was recorded.
    with open(tmp_path / "relu_toy" / "results.json") as handle:
        saved = json.load(handle)
    assert saved["final_hparams"]["input_range"] == pytest.approx(final)
    assert saved["hyper_steps"] > 0 and saved["weight_steps"] == config.schedule.epochs * (
        config.toy.train_size // config.data.batch_size)
