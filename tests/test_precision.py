"""Tests for stn_pipeline.precision: --precision=float32|mixed_bfloat16."""

import dataclasses
import json
import os

import numpy as np
import pytest
import tensorflow as tf

from stn_pipeline import experiments, export, precision, run
from stn_pipeline.hparams import HyperParameters
from stn_pipeline.layers import StnConv2D, StnDense
from stn_pipeline.models.cifar_cnn import CifarCnn, cifar_cnn_hparams
from stn_pipeline.trainer import StnTrainer, TrainerConfig

SHAPE = (18, 18, 3)
IMAGES = tf.TensorSpec([None, *SHAPE], tf.uint8)
LABELS = tf.TensorSpec([None], tf.int64)
BF16_RELATIVE = 2.0 ** -7  # a few bfloat16 roundings (8-bit significand) of O(1) products


def _randomised(layer, seed):
    rng = np.random.default_rng(seed)
    layer.gate_kernel.assign(rng.normal(0.0, 0.7, layer.gate_kernel.shape).astype(np.float32))
    layer.elementary_scale.assign(1.3)
    return layer


def _numpy_reference(layer, x, h):
    """The layer's formula in float64 NumPy (a 1x1 conv is a matmul over channels)."""
    kernel = np.concatenate([layer.elementary_kernel.numpy(), layer.response_kernel.numpy()],
                            axis=-1).astype(np.float64).reshape(-1, 2 * layer.output_size)
    bias = np.concatenate([layer.elementary_bias.numpy(), layer.response_bias.numpy()])
    bias, gate_kernel = bias.astype(np.float64), layer.gate_kernel.numpy()
    d, c = layer.output_size, float(layer.elementary_scale.numpy())
    both = x.astype(np.float64) @ kernel
    gates = h.astype(np.float64) @ gate_kernel.astype(np.float64)
    if x.ndim == 4:
        gates = gates[:, None, None, :]
    return (c * (both[..., :d] + bias[:d]) + gates[..., :d] * both[..., d:]
            + gates[..., d:] * bias[d:])


def _op_dtypes(function, *args) -> dict[str, set[str]]:
    """{op type: dtypes of its T attribute} of the traced graph of `function(*args)`."""
    graph = tf.function(function).get_concrete_function(*args).graph
    found: dict[str, set[str]] = {}
    for op in graph.get_operations():
        if op.type in ("MatMul", "Conv2D"):
            found.setdefault(op.type, set()).add(op.get_attr("T").name)
    return found


@pytest.mark.parametrize("make, x_shape", [
    (lambda: StnDense(16, 8, num_hparams=3, seed=0), (5, 16)),
    (lambda: StnConv2D(16, 8, kernel_size=1, num_hparams=3, seed=0), (5, 4, 4, 16)),
])
def test_bf16_layers_match_the_float64_reference_within_bf16_tolerance(make, x_shape):
    layer = _randomised(make(), seed=1)
    rng = np.random.default_rng(2)
    x = rng.normal(size=x_shape).astype(np.float32)
    h = rng.normal(size=(x_shape[0], 3)).astype(np.float32)
    expected = _numpy_reference(layer, x, h)
    assert precision.apply_precision(layer, "mixed_bfloat16") == 1
    out = layer(tf.constant(x), tf.constant(h))
    assert out.dtype == tf.float32
    error = np.abs(out.numpy() - expected).max() / np.abs(expected).max()
    # Within bfloat16 rounding, and far from float32 agreement: it really computed in bf16.
    assert 1e-5 < error < BF16_RELATIVE
    precision.apply_precision(layer, "float32")
    error = np.abs(layer(x, h).numpy() - expected).max() / np.abs(expected).max()
    assert error < 1e-5


@pytest.mark.parametrize("name, dtype", [("float32", "float32"), ("mixed_bfloat16", "bfloat16")])
def test_matmuls_and_convolutions_run_in_the_compute_dtype(name, dtype):
    dense = StnDense(6, 4, num_hparams=2, seed=0)
    conv = StnConv2D(3, 4, kernel_size=3, num_hparams=2, seed=0)
    for layer in (dense, conv):
        precision.apply_precision(layer, name)
    h = tf.zeros([2, 2])
    # The gates' matmul (h V) stays float32: the hyper-gradient flows through it.
    assert _op_dtypes(dense, tf.zeros([2, 6]), h) == {"MatMul": {"float32", dtype}}
    # The elementary and the response convolutions both run in the compute dtype.
    assert _op_dtypes(conv, tf.zeros([2, 5, 5, 3]), h) == {"Conv2D": {dtype},
                                                           "MatMul": {"float32"}}


def _cnn_trainer(name):
    specs = cifar_cnn_hparams()
    model = CifarCnn(SHAPE, 10, [120.0] * 3, [60.0] * 3, specs, seed=0)
    assert precision.apply_precision(model, name) == 5  # 3 convolutions, 2 dense layers
    hparams = HyperParameters(specs, seed=0)
    return StnTrainer(model, hparams, IMAGES, LABELS, TrainerConfig())


def _batch(seed=0, size=8):
    rng = np.random.default_rng(seed)
    return (tf.constant(rng.integers(0, 256, (size, *SHAPE), dtype=np.uint8)),
            tf.constant(rng.integers(0, 10, size), tf.int64))


def test_bf16_training_keeps_variables_gradients_slots_and_losses_float32():
    trainer = _cnn_trainer("mixed_bfloat16")
    images, labels = _batch()
    weight = trainer.weight_step(images, labels)
    hyper = trainer.hyper_step(images, labels)
    for outputs in (weight, hyper):
        assert np.isfinite(float(outputs["loss"])) and outputs["loss"].dtype == tf.float32
    assert {v.dtype for v in trainer.variables if v.dtype.is_floating} == {tf.float32}
    slots = [v for o in (trainer.weight_optimizer, trainer.hyper_optimizer,
                         trainer.scale_optimizer) for v in o.variables if v.dtype.is_floating]
    assert slots and {v.dtype for v in slots} == {tf.float32}
    with tf.GradientTape() as tape:
        sample = trainer.hparams.sample(8)
        logits = trainer.model(trainer.model.preprocess(images), sample, training=False)
        loss = tf.reduce_mean(trainer.model.loss(labels, logits))
    assert logits.dtype == tf.float32
    gradients = tape.gradient(loss, trainer.weights + [trainer.hparams.unconstrained_value])
    assert all(g is not None and g.dtype == tf.float32 for g in gradients)


@pytest.mark.parametrize("saved_at, restored_at", [("mixed_bfloat16", "float32"),
                                                   ("float32", "mixed_bfloat16")])
def test_a_checkpoint_restores_at_the_other_precision(tmp_path, saved_at, restored_at):
    trainer = _cnn_trainer(saved_at)
    images, labels = _batch()
    trainer.weight_step(images, labels)
    trainer.hyper_step(images, labels)
    path = tf.train.Checkpoint(trainer=trainer).write(str(tmp_path / "ckpt"))
    restored = _cnn_trainer(restored_at)
    tf.train.Checkpoint(trainer=restored).read(path).assert_consumed()
    for saved, loaded in zip(trainer.variables, restored.variables):
        np.testing.assert_array_equal(saved.numpy(), loaded.numpy())
    # Same weights, evaluated at the two precisions: equal within bfloat16 rounding.
    expected = float(trainer.evaluate(images, labels)["loss"])
    assert float(restored.evaluate(images, labels)["loss"]) == pytest.approx(expected, rel=0.05)
    assert np.isfinite(float(restored.weight_step(images, labels)["loss"]))


def test_unknown_precision_is_refused_with_the_flag_name():
    with pytest.raises(precision.PrecisionError, match=r"--precision='bfloat16' is unknown.*"
                                                       r"float32.*mixed_bfloat16"):
        precision.apply_precision(StnDense(2, 2, 1, seed=0), "bfloat16")
    config = dataclasses.replace(experiments.default_config("relu_toy"), precision="fp16")
    with pytest.raises(run.ConfigError, match=r"^--precision='fp16' is unknown"):
        run.validate_config(config)


def test_a_device_without_bf16_kernels_is_refused(monkeypatch):
    # What the device probe reports on a device without bfloat16 kernels.
    monkeypatch.setattr(precision, "_device_problem",
                        lambda dtype: f"No registered 'MatMul' OpKernel for {dtype}")
    with pytest.raises(precision.PrecisionError,
                       match=r"--precision=mixed_bfloat16: this device cannot run bfloat16.*"
                             r"No registered 'MatMul'.*use --precision=float32"):
        precision.check_precision("mixed_bfloat16")
    assert precision.check_precision("float32") == tf.float32  # float32 needs no probe
    config = dataclasses.replace(experiments.default_config("relu_toy"),
                                 precision="mixed_bfloat16")
    with pytest.raises(run.ConfigError, match="cannot run bfloat16"):
        run.validate_config(config)  # before any logdir is touched


def test_cpu_bf16_flags_are_read_from_cpuinfo(tmp_path):
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("model name\t: X\nflags\t\t: fpu sse2 avx512f avx512_bf16 avx2\n")
    assert precision.cpu_bf16_flags(str(cpuinfo)) == ["avx512_bf16"]
    cpuinfo.write_text("flags\t\t: fpu amx_tile amx_bf16 avx512_bf16\n")
    assert precision.cpu_bf16_flags(str(cpuinfo)) == ["avx512_bf16", "amx_bf16"]
    cpuinfo.write_text("flags\t\t: fpu sse2 avx2\n")
    assert precision.cpu_bf16_flags(str(cpuinfo)) == []
    assert precision.cpu_bf16_flags(str(tmp_path / "missing")) is None


def test_bf16_run_exports_a_float32_model_naming_its_precision(tmp_path):
    config = experiments.default_config("relu_toy").override(
        epochs=1, max_steps=4, warmup_epochs=0, toy_train_size=256, log_every=2,
        precision="mixed_bfloat16")
    results = run.run_experiment(config, str(tmp_path / "toy"))
    with open(tmp_path / "toy" / run.RESULTS_FILE) as handle:
        assert json.load(handle)["config"]["precision"] == "mixed_bfloat16"
    with open(os.path.join(results["export_path"], "assets", export.METADATA_FILE)) as handle:
        assert json.load(handle)["trained_precision"] == "mixed_bfloat16"
    loaded = tf.saved_model.load(results["export_path"])
    for name in ("serving_default", "predict_with_hyperparameters"):
        signature = loaded.signatures[name]
        assert signature.structured_input_signature[1]["inputs"].dtype == tf.float32
        assert {spec.dtype for spec in signature.structured_outputs.values()} == {tf.float32}
    inputs = tf.constant([[-1.0], [0.5]])
    values = loaded.signatures["hyperparameters"]()["continuous_values"]
    served = loaded.signatures["serving_default"](inputs=inputs)["outputs"]
    response = loaded.signatures["predict_with_hyperparameters"](
        inputs=inputs, hyperparameters=values[None])["outputs"]
    # Both paths computed in float32: they agree to float32 rounding, not bfloat16's.
    np.testing.assert_allclose(served.numpy(), response.numpy(), rtol=1e-5, atol=1e-6)
