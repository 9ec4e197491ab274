"""Tests for stn_pipeline.export: folding, the SavedModel signatures, reload, versions, metadata."""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import tensorflow as tf

from stn_pipeline import checkpoints, experiments, export
from stn_pipeline.hparams import HyperParameters
from stn_pipeline.layers import (FoldedConv2D, FoldedDense, StnConv2D, StnDense, fold_layer)
from stn_pipeline.models import CifarAlexNet, CifarCnn, alexnet_hparams, cifar_cnn_hparams
from stn_pipeline_scripts import export as export_cli

SHAPE = (24, 24, 3)
CLASSES = ("ant", "bee", "cat", "dog", "eel")
MEAN, STD = [120.0, 115.0, 100.0], [60.0, 62.0, 65.0]


def _randomise(model, hparams, seed=0):
    """Moves gates, c and the hyperparameters off their initial values so every term matters."""
    rng = np.random.default_rng(seed)
    for _, layer in export.stn_layers(model):
        layer.gate_kernel.assign(rng.normal(0.0, 0.5, layer.gate_kernel.shape).astype(np.float32))
        layer.elementary_scale.assign(rng.uniform(0.5, 1.5))
    hparams.unconstrained_value.assign(
        rng.normal(0.0, 1.0, hparams.unconstrained_value.shape).astype(np.float32))


def _cnn(seed=0):
    specs = cifar_cnn_hparams()
    hparams = HyperParameters(specs, seed=seed)
    model = CifarCnn(SHAPE, len(CLASSES), MEAN, STD, specs, seed=seed)
    _randomise(model, hparams, seed)
    return model, hparams


def _images(count, shape=SHAPE, seed=1):
    return np.random.default_rng(seed).integers(0, 256, (count, *shape), dtype=np.uint8)


def _unfolded(model, hparams, images, unconstrained=None):
    """Logits of the STN model at (by default) the tuned hyperparameters."""
    sample = hparams.sample(images.shape[0], perturb=False)
    if unconstrained is not None:
        sample = dataclasses.replace(sample, hnet_input=tf.constant(unconstrained),
                                     values=hparams.to_constrained(unconstrained))
    return model(model.preprocess(images), sample, training=False).numpy()


def _relative_error(actual, expected):
    return float(np.max(np.abs(actual - expected)) / np.max(np.abs(expected)))


SPEC = tf.TensorSpec([None, *SHAPE], tf.uint8)


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """A tiny randomised CifarCnn, its hyperparameters and its export (version 1)."""
    model, hparams = _cnn()
    root = str(tmp_path_factory.mktemp("export"))
    results = {"trajectory": [{"step": 10, "dropout0": 0.1}], "config": {"experiment": "cifar_cnn"},
               "metadata": {"class_names": list(CLASSES)}, "test_accuracy": 0.5, "best_epoch": 2}
    metadata = export.export_metadata(model, hparams, SPEC, results)
    path = export.export_model(root, model, hparams, SPEC, metadata)
    return model, hparams, root, path


# ------------------------------------------------------------------------------------------------
# Folding
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("stride,padding", [(1, "VALID"), (2, "SAME")])
def test_folded_conv_equals_stn_conv(stride, padding):
    layer = StnConv2D(3, 8, 3, 2, stride=stride, padding=padding, seed=0)
    layer.gate_kernel.assign(tf.random.stateless_normal([2, 16], [1, 2]))
    layer.elementary_scale.assign(1.4)
    h = tf.constant([0.3, -1.2])
    x = tf.random.stateless_normal([4, 9, 9, 3], [3, 4])
    folded = fold_layer(layer, h)
    assert isinstance(folded, FoldedConv2D)
    expected = layer(x, tf.broadcast_to(h, [4, 2])).numpy()
    assert _relative_error(folded(x, None).numpy(), expected) < 1e-5


def test_folded_dense_equals_stn_dense():
    layer = StnDense(6, 5, 3, seed=0)
    layer.gate_kernel.assign(tf.random.stateless_normal([3, 10], [1, 2]))
    h = tf.constant([0.3, -1.2, 2.0])
    x = tf.random.stateless_normal([4, 6], [3, 4])
    folded = FoldedDense.from_stn(layer, h)
    assert folded.kernel.shape == (6, 5) and folded.bias.shape == (5,)
    expected = layer(x, tf.broadcast_to(h, [4, 3])).numpy()
    assert _relative_error(folded(x).numpy(), expected) < 1e-5


@pytest.mark.parametrize("network", ["cifar_cnn", "cifar_alexnet"])
def test_folded_model_equals_stn_model(network):
    if network == "cifar_cnn":
        model, hparams = _cnn()
        shape = SHAPE
    else:
        specs = alexnet_hparams()
        hparams = HyperParameters(specs)
        shape = (16, 16, 3)
        model = CifarAlexNet(shape, 4, MEAN, STD, specs, fc_width=32)
        _randomise(model, hparams)
    folded = export.fold_model(model, hparams.unconstrained_value)
    images = _images(6, shape)
    sample = hparams.sample(6, perturb=False)
    actual = folded(folded.preprocess(images), sample, training=False).numpy()
    assert _relative_error(actual, _unfolded(model, hparams, images)) < 1e-5
    kinds = {type(module) for module in folded._flatten()}  # pylint: disable=protected-access
    assert not kinds & {StnDense, StnConv2D} and FoldedDense in kinds and FoldedConv2D in kinds
    # The original keeps its STN layers and shares no variable with the copy.
    assert all(isinstance(conv, StnConv2D) for conv in model.convs)
    assert not {v.ref() for v in model.variables} & {v.ref() for v in folded.variables}


def test_folded_model_does_half_the_work():
    model, hparams = _cnn()
    folded = export.fold_model(model, hparams.unconstrained_value)
    stn_weights = sum(int(np.prod(kernel.shape)) for _, layer in export.stn_layers(model)
                      for kernel in (layer.elementary_kernel, layer.response_kernel))
    folded_weights = sum(int(np.prod(conv.kernel.shape)) for conv in folded.convs)
    folded_weights += sum(int(np.prod(d.kernel.shape)) for d in (folded.dense, folded.logits))
    assert 2 * folded_weights == stn_weights


# ------------------------------------------------------------------------------------------------
# Signatures
# ------------------------------------------------------------------------------------------------


def test_serving_module_outputs(exported):
    model, hparams, _, _ = exported
    module = export.ServingModule(model, hparams, SPEC, CLASSES)
    images = _images(5)
    expected = _unfolded(model, hparams, images)
    served = module.serve(images)
    assert _relative_error(served["logits"].numpy(), expected) < 1e-5
    np.testing.assert_allclose(served["probabilities"].numpy(),
                               tf.nn.softmax(expected).numpy(), atol=1e-6)
    info = module.hyperparameter_info()
    assert [n.decode() for n in info["names"].numpy()] == list(hparams.names)
    np.testing.assert_allclose(info["values"].numpy(), hparams.constrained().numpy(), rtol=1e-6)
    assert [c.decode() for c in info["class_names"].numpy()] == list(CLASSES)
    # One shared row at the tuned values reproduces serving_default ...
    shared = module.predict_with_hyperparameters(images, info["continuous_values"][None])
    assert _relative_error(shared["logits"].numpy(), expected) < 1e-5
    # ... and one row per example gives each example the response at its own values.
    rows = np.random.default_rng(3).uniform(0.05, 0.7, (5, hparams.size)).astype(np.float32)
    per_example = module.predict_with_hyperparameters(images, rows)["logits"].numpy()
    for index in range(5):
        expected_row = _unfolded(model, hparams, images[index:index + 1],
                                 hparams.to_unconstrained(rows[index:index + 1]))
        assert _relative_error(per_example[index:index + 1], expected_row) < 1e-5
    assert _relative_error(per_example, expected) > 1e-4  # the values matter


def test_reload_in_subprocess_equals_in_memory(exported, tmp_path):
    model, hparams, _, path = exported
    module = export.ServingModule(model, hparams, SPEC, CLASSES)
    images = _images(9, seed=5)
    rows = np.random.default_rng(4).uniform(0.05, 0.7, (9, hparams.size)).astype(np.float32)
    np.savez(tmp_path / "expected.npz", images=images, rows=rows,
             logits=module.serve(images)["logits"].numpy(),
             probabilities=module.serve(images)["probabilities"].numpy(),
             response=module.predict_with_hyperparameters(images, rows)["logits"].numpy(),
             values=hparams.constrained().numpy())
    script = textwrap.dedent(f"""
        import sys
        import numpy as np
        import tensorflow as tf
        expected = np.load({str(tmp_path / "expected.npz")!r})
        loaded = tf.saved_model.load({path!r})
        served = loaded.signatures["serving_default"](images=tf.constant(expected["images"]))
        response = loaded.signatures["predict_with_hyperparameters"](
            images=tf.constant(expected["images"]), hyperparameters=tf.constant(expected["rows"]))
        info = loaded.signatures["hyperparameters"]()
        def check(name, actual, wanted):
            error = np.max(np.abs(actual - wanted)) / np.max(np.abs(wanted))
            assert error < 1e-5, (name, error)
        check("logits", served["logits"].numpy(), expected["logits"])
        check("probabilities", served["probabilities"].numpy(), expected["probabilities"])
        check("response", response["logits"].numpy(), expected["response"])
        check("values", info["values"].numpy(), expected["values"])
        assert "stn_pipeline" not in sys.modules, "the reload imported stn_pipeline"
        print("RELOAD_OK", sorted(loaded.signatures))
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                            timeout=120, env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"})
    assert result.returncode == 0, result.stderr[-2000:]
    assert "RELOAD_OK" in result.stdout


def _saved_model_cli_text(path):
    binary = os.path.join(os.path.dirname(sys.executable), "saved_model_cli")
    if os.path.exists(binary):
        result = subprocess.run([binary, "show", "--dir", path, "--all"], capture_output=True,
                                text=True, timeout=120,
                                env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"})
        assert result.returncode == 0, result.stderr[-2000:]
        return result.stdout
    loaded = tf.saved_model.load(path)  # pragma: no cover - the binary ships with TensorFlow
    return "\n".join(f"signature_def['{k}']: {f.structured_input_signature} "
                     f"{f.structured_outputs}" for k, f in loaded.signatures.items())


def test_saved_model_cli_lists_three_signatures(exported):
    text = _saved_model_cli_text(exported[3])
    blocks = dict(re.findall(r"signature_def\['([^']+)'\]:(.*?)(?=signature_def\[|\Z)", text,
                             flags=re.S))
    assert set(export.SIGNATURES) <= set(blocks)
    flat = {k: " ".join(v.split()) for k, v in blocks.items()}
    image_input = "inputs['images'] tensor_info: dtype: DT_UINT8 shape: (-1, 24, 24, 3)"
    assert image_input in flat["serving_default"]
    assert image_input in flat["predict_with_hyperparameters"]
    assert ("inputs['hyperparameters'] tensor_info: dtype: DT_FLOAT shape: (-1, 4)"
            in flat["predict_with_hyperparameters"])
    for name in ("serving_default", "predict_with_hyperparameters"):
        for output in ("logits", "probabilities"):
            assert (f"outputs['{output}'] tensor_info: dtype: DT_FLOAT shape: (-1, 5)"
                    in flat[name])
    info = flat["hyperparameters"]
    assert "The given SavedModel SignatureDef contains the following input(s): The given" in info
    for output, dtype, shape in [("names", "DT_STRING", 4), ("values", "DT_FLOAT", 4),
                                 ("continuous_values", "DT_FLOAT", 4),
                                 ("class_names", "DT_STRING", 5)]:
        assert f"outputs['{output}'] tensor_info: dtype: {dtype} shape: ({shape})" in info


def test_signature_calls_reject_bad_inputs(exported):
    loaded = tf.saved_model.load(exported[3])
    serve = loaded.signatures["serving_default"]
    respond = loaded.signatures["predict_with_hyperparameters"]
    images = tf.constant(_images(3))
    shape_error = r"images \[3,20,24,3\] is not compatible with expected shape"
    with pytest.raises(tf.errors.InvalidArgumentError, match=shape_error):
        serve(images=images[:, :20])
    with pytest.raises(tf.errors.InvalidArgumentError, match=r"images \[3,24,24\] is not"):
        serve(images=images[..., 0])
    with pytest.raises(tf.errors.InvalidArgumentError, match=r"images \[3,24,24,1\] is not"):
        serve(images=images[..., :1])
    with pytest.raises(tf.errors.InvalidArgumentError, match="expected to be a uint8 tensor"):
        serve(images=tf.cast(images, tf.float32))
    with pytest.raises(tf.errors.InvalidArgumentError,
                       match=r"hyperparameters \[1,3\] is not compatible with expected shape"):
        respond(images=images, hyperparameters=tf.fill([1, 3], 0.1))
    with pytest.raises(tf.errors.InvalidArgumentError, match="one row per image"):
        respond(images=images, hyperparameters=tf.fill([2, 4], 0.1))
    range_error = r"strictly inside their ranges: dropout0 in \(0, 0.9\)"
    with pytest.raises(tf.errors.InvalidArgumentError, match=range_error):
        respond(images=images, hyperparameters=tf.constant([[0.1, 0.95, 0.1, 0.1]]))
    assert respond(images=images, hyperparameters=tf.fill([3, 4], 0.1))["logits"].shape == (3, 5)


# ------------------------------------------------------------------------------------------------
# Folders, metadata, checkpoints
# ------------------------------------------------------------------------------------------------


def test_export_adds_versions_and_never_overwrites(exported, tmp_path):
    model, hparams, _, _ = exported
    root = str(tmp_path / "export")
    first = export.export_model(root, model, hparams, SPEC)
    stamp = os.path.getmtime(os.path.join(first, "saved_model.pb"))
    second = export.export_model(root, model, hparams, SPEC)
    assert (first, second) == (os.path.join(root, "1"), os.path.join(root, "2"))
    assert os.path.getmtime(os.path.join(first, "saved_model.pb")) == stamp
    assert sorted(os.listdir(root)) == ["1", "2"]  # no staging folder left behind
    with pytest.raises(export.ExportError, match="unversioned SavedModel"):
        export.export_model(first, model, hparams, SPEC)


def test_metadata_asset(exported):
    _, hparams, _, path = exported
    with open(os.path.join(path, "assets", export.METADATA_FILE)) as handle:
        metadata = json.load(handle)
    assert metadata["class_names"] == list(CLASSES)
    assert metadata["input"] == {"name": "images", "shape": [None, 24, 24, 3], "dtype": "uint8",
                                 "accepts": metadata["input"]["accepts"]}
    assert metadata["normalization"]["mean"] == MEAN and metadata["normalization"]["std"] == STD
    names = list(hparams.names)
    assert metadata["hyperparameters"]["names"] == names
    np.testing.assert_allclose([metadata["hyperparameters"]["values"][n] for n in names],
                               hparams.constrained().numpy(), rtol=1e-6)
    assert metadata["schedule"] == [{"step": 10, "dropout0": 0.1}]
    assert metadata["training_config"] == {"experiment": "cifar_cnn"}
    assert metadata["metrics"] == {"test_accuracy": 0.5}
    loaded = tf.saved_model.load(path)
    assert loaded.metadata_file.asset_path.numpy().decode().endswith(export.METADATA_FILE)


def test_export_from_logdir_restores_the_best_checkpoint(tmp_path):
    config = experiments.default_config("cifar_cnn")
    metadata = {"image_shape": list(SHAPE), "class_names": list(CLASSES), "mean": MEAN,
                "std": STD}
    model, hparams = experiments.build_model(config, metadata)
    _randomise(model, hparams, seed=7)
    logdir = tmp_path / "run"
    checkpoints.save_best(str(logdir), model, hparams, SPEC)
    (logdir / "config.json").write_text(json.dumps(config.to_dict()))
    (logdir / "results.json").write_text(json.dumps({"metadata": metadata, "trajectory": []}))
    path = export_cli.export_model(str(logdir))
    assert path == str(logdir / "export" / "1")
    images = _images(4)
    served = tf.saved_model.load(path).signatures["serving_default"](images=images)
    assert _relative_error(served["logits"].numpy(), _unfolded(model, hparams, images)) < 1e-5
    shutil.rmtree(logdir / "checkpoints")
    with pytest.raises(checkpoints.CheckpointError, match="no best checkpoint"):
        export_cli.export_model(str(logdir))
    with pytest.raises(export.ExportError, match="cannot read"):
        export_cli.export_model(str(tmp_path / "missing"))


def test_stn_train_run_ends_with_an_export(tmp_path):
    """run_experiment (what stn-train calls) checkpoints and exports; relu_toy keeps it fast."""
    from stn_pipeline.run import run_experiment
    config = experiments.default_config("relu_toy", epochs=1, warmup_epochs=0, max_steps=4,
                                        toy_train_size=256, log_every=2)
    results = run_experiment(config, str(tmp_path / "toy"))
    assert results["export_path"] == str(tmp_path / "toy" / "export" / "1")
    with open(tmp_path / "toy" / "results.json") as handle:
        assert json.load(handle)["export_path"] == results["export_path"]
    loaded = tf.saved_model.load(results["export_path"])
    inputs = tf.constant([[-1.0], [0.5]])
    served = loaded.signatures["serving_default"](inputs=inputs)["outputs"]
    values = loaded.signatures["hyperparameters"]()["continuous_values"]
    response = loaded.signatures["predict_with_hyperparameters"](
        inputs=inputs, hyperparameters=values[None])["outputs"]
    assert served.shape == (2, 1)
    np.testing.assert_allclose(served.numpy(), response.numpy(), rtol=1e-5, atol=1e-6)
    with open(os.path.join(results["export_path"], "assets", export.METADATA_FILE)) as handle:
        metadata = json.load(handle)
    assert metadata["schedule"] == results["trajectory"] and metadata["schedule"]
    assert metadata["training_config"]["experiment"] == "relu_toy"


def test_export_modules_do_not_import_the_experiment_registry():
    """Arrows one way: what export needs comes in through arguments and the run's metadata."""
    import ast
    import pathlib
    package = pathlib.Path(export.__file__).parent
    modules = sorted(p for p in package.rglob("*.py") if "export" in str(p.relative_to(package)))
    assert len(modules) >= 2
    for path in modules:
        imported = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                imported |= {f"{node.module}.{a.name}" for a in node.names} | {node.module}
            elif isinstance(node, ast.Import):
                imported |= {a.name for a in node.names}
        assert "stn_pipeline.experiments" not in imported, path
