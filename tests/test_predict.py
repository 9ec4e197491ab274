"""Tests for stn-predict (scripts/predict.py, stn_pipeline.inference): batch inference on an
export, and its bad inputs."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf

from stn_pipeline import data, export, inference
from stn_pipeline.hparams import HyperParameters
from stn_pipeline.models import CifarCnn, cifar_cnn_hparams

SHAPE = (40, 24, 3)  # the tiny_image_folder fixture's images
SPEC = tf.TensorSpec([None, *SHAPE], tf.uint8)
PredictError = inference.PredictError


@pytest.fixture(scope="module")
def served(tiny_image_folder, tmp_path_factory):
    """(in-memory ServingModule, export root) of a randomised CifarCnn for the tiny folder."""
    specs = cifar_cnn_hparams()
    hparams = HyperParameters(specs, seed=0)
    model = CifarCnn(SHAPE, len(tiny_image_folder.class_names), [127.0] * 3, [70.0] * 3, specs)
    rng = np.random.default_rng(0)
    for _, layer in export.stn_layers(model):
        layer.gate_kernel.assign(rng.normal(0.0, 0.5, layer.gate_kernel.shape).astype(np.float32))
    hparams.unconstrained_value.assign([0.5, -0.5, 1.0, -1.0])
    root = str(tmp_path_factory.mktemp("predict_export") / "export")
    metadata = export.export_metadata(model, hparams, SPEC,
                                      class_names=tiny_image_folder.class_names)
    export.export_model(root, model, hparams, SPEC, metadata)
    module = export.ServingModule(model, hparams, SPEC, tiny_image_folder.class_names)
    return module, root


def _decode(path):
    return tf.io.decode_image(tf.io.read_file(path), expand_animations=False).numpy()


def _predict(**kwargs):
    return inference.predict(**kwargs)


def test_stn_predict_on_a_folder_matches_the_in_memory_model(served, tiny_image_folder, tmp_path):
    module, root = served
    output = tmp_path / "predictions.csv"
    # Run stn-predict's entry point in a fresh interpreter and report whether it imported model
    # code (it must load the model with tf.saved_model.load alone).
    wrapper = ("import atexit, sys\n"
               "model_code = ('stn_pipeline.models', 'stn_pipeline.layers',\n"
               "              'stn_pipeline.hparams')\n"
               "atexit.register(lambda: print('IMPORTED_MODEL_CODE=%s' % "
               "any(m in sys.modules for m in model_code)))\n"
               "from stn_pipeline_scripts import predict\n"
               "sys.argv = ['stn-predict'] + sys.argv[1:]\n"
               "predict.run()\n")
    result = subprocess.run(
        [sys.executable, "-c", wrapper, f"--saved_model={root}",
         f"--dataset=folder:{tiny_image_folder.root}", "--split=test", f"--output={output}",
         "--batch_size=5"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "IMPORTED_MODEL_CODE=False" in result.stdout

    with open(output) as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == len(tiny_image_folder.examples["test"])
    names = list(tiny_image_folder.class_names)
    images = np.stack([_decode(row["file"]) for row in rows])
    probabilities = module.serve(images)["probabilities"].numpy()
    correct = 0
    for row, expected in zip(rows, probabilities):
        assert row["label"] == os.path.basename(os.path.dirname(row["file"]))
        assert row["predicted_class"] == names[int(expected.argmax())]
        assert abs(float(row["probability"]) - float(expected.max())) < 1e-5
        correct += row["predicted_class"] == row["label"]
    accuracy = correct / len(rows)
    assert f"accuracy {accuracy:.4f} ({correct}/{len(rows)})" in result.stdout


def test_stn_predict_fails_with_one_line_and_no_output(tmp_path):
    output = tmp_path / "predictions.jsonl"
    binary = os.path.join(os.path.dirname(sys.executable), "stn-predict")
    command = [binary] if os.path.exists(binary) else [sys.executable, "-m",
                                                       "stn_pipeline_scripts.predict"]
    result = subprocess.run(command + [f"--saved_model={tmp_path / 'nowhere'}",
                                       f"--images={tmp_path / 'x.png'}", f"--output={output}"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode != 0
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert lines == [f"stn-predict: error: --saved_model={tmp_path / 'nowhere'} does not exist"]
    assert not os.listdir(tmp_path)


def test_folder_order_is_stn_trains_max_examples_order(served, tiny_image_folder):
    """--max_examples=N takes the same first N test examples as stn-train's data pipeline."""
    examples = inference.dataset_examples(f"folder:{tiny_image_folder.root}", "test",
                                          list(tiny_image_folder.class_names), max_examples=7)
    splits = data.load_splits(f"folder:{tiny_image_folder.root}", max_examples=7)
    expected = list(splits.test.as_numpy_iterator())
    assert len(examples) == len(expected) == 7
    for (path, label), (image, expected_label) in zip(examples, expected):
        assert label == expected_label
        np.testing.assert_array_equal(_decode(path), image)


def test_npy_batch_with_hyperparameters(served, tmp_path):
    module, root = served
    images = np.random.default_rng(1).integers(0, 256, (3, *SHAPE), dtype=np.uint8)
    np.save(tmp_path / "batch.npy", images)
    output = tmp_path / "out.jsonl"
    summary = _predict(saved_model=root, images=[str(tmp_path / "*.npy")], output=str(output),
                       hyperparameters="pixel_drop=0.3,dropout0=0.2,dropout1=0.1,dropout2=0.4")
    assert summary["count"] == 3 and summary["accuracy"] is None
    records = [json.loads(line) for line in output.read_text().splitlines()]
    assert [r["file"] for r in records] == [f"{tmp_path / 'batch.npy'}[{i}]" for i in range(3)]
    expected = module.predict_with_hyperparameters(
        images, np.array([[0.2, 0.1, 0.4, 0.3]], np.float32))["probabilities"].numpy()
    for record, row in zip(records, expected):
        assert abs(record["probability"] - row.max()) < 1e-5
    served_probabilities = module.serve(images)["probabilities"].numpy()
    assert np.abs(served_probabilities - expected).max() > 1e-6  # other values, other outputs


@pytest.fixture()
def bad_inputs(tmp_path):
    """Files of every kind of bad input, by name."""
    rng = np.random.default_rng(2)
    files = {
        "float": rng.uniform(0, 1, SHAPE).astype(np.float32),
        "rank": rng.integers(0, 256, SHAPE[:2], dtype=np.uint8),
        "channels": rng.integers(0, 256, (*SHAPE[:2], 1), dtype=np.uint8),
    }
    paths = {}
    for name, array in files.items():
        paths[name] = tmp_path / f"{name}.npy"
        np.save(paths[name], array)
    paths["size"] = tmp_path / "size.png"
    paths["size"].write_bytes(tf.io.encode_png(rng.integers(0, 256, (32, 32, 3),
                                                            dtype=np.uint8)).numpy())
    paths["grey"] = tmp_path / "grey.png"
    paths["grey"].write_bytes(tf.io.encode_png(rng.integers(0, 256, (*SHAPE[:2], 1),
                                                            dtype=np.uint8)).numpy())
    paths["corrupt"] = tmp_path / "corrupt.jpg"
    paths["corrupt"].write_bytes(b"this is not a JPEG")
    paths["good"] = tmp_path / "good.png"
    paths["good"].write_bytes(tf.io.encode_png(rng.integers(0, 256, SHAPE,
                                                            dtype=np.uint8)).numpy())
    return paths


@pytest.mark.parametrize("name,message", [
    ("float", r"holds float32 pixels; the model takes uint8 \(convert"),
    ("rank", r"has rank 2 .*an image must have rank 3"),
    ("channels", r"has 1 channel\(s\); the model takes 3"),
    ("grey", r"grey.png has 1 channel\(s\); the model takes 3"),
    ("size", r"is 32x32 pixels; the model takes 40x24"),
    ("corrupt", r"cannot read image file .*corrupt.jpg"),
])
def test_bad_images_are_named(served, bad_inputs, name, message):
    with pytest.raises(PredictError, match=message):
        _predict(saved_model=served[1], images=[str(bad_inputs[name])])


@pytest.mark.parametrize("values,message", [
    ("0.1,0.2,0.3", r"has 3 values; the model has 4 hyperparameters: dropout0, dropout1"),
    ("dropout0=0.1,dropout1=0.1,dropout2=0.1", r"names .* do not match"),
    ("0.1,0.2,x,0.4", r"not a list of numbers"),
    ("0.1,0.2,0.3,0.9", r"strictly inside their ranges: .*pixel_drop in \(0, 0.75\)"),
])
def test_bad_hyperparameters_are_named(served, bad_inputs, values, message):
    with pytest.raises(PredictError, match=message):
        _predict(saved_model=served[1], images=[str(bad_inputs["good"])], hyperparameters=values)


def test_bad_export_folders_are_named(tmp_path):
    with pytest.raises(PredictError, match="does not exist"):
        _predict(saved_model=str(tmp_path / "missing"), images=["x.png"])
    (tmp_path / "empty").mkdir()
    with pytest.raises(PredictError, match="is not a SavedModel"):
        _predict(saved_model=str(tmp_path / "empty"), images=["x.png"])
    (tmp_path / "broken" / "1").mkdir(parents=True)
    (tmp_path / "broken" / "1" / "saved_model.pb").write_bytes(b"garbage")
    with pytest.raises(PredictError, match="cannot load the SavedModel"):
        _predict(saved_model=str(tmp_path / "broken"), images=["x.png"])


def test_bad_file_lists_are_named(served, tmp_path, tiny_image_folder):
    root = served[1]
    with pytest.raises(PredictError, match="image file does not exist"):
        _predict(saved_model=root, images=[str(tmp_path / "missing.png")])
    with pytest.raises(PredictError, match="matches no file"):
        _predict(saved_model=root, images=[str(tmp_path / "*.png")])
    with pytest.raises(PredictError, match="exactly one of"):
        _predict(saved_model=root)
    with pytest.raises(PredictError, match="has no 'valid' subfolder"):
        _predict(saved_model=root, dataset=f"folder:{tiny_image_folder.root}", split="valid")


def test_a_failure_midway_leaves_no_output_file(served, bad_inputs, tmp_path):
    output = tmp_path / "out" / "predictions.csv"
    output.parent.mkdir()
    with pytest.raises(PredictError, match="corrupt.jpg"):
        _predict(saved_model=served[1], images=[str(bad_inputs["good"]),
                                                str(bad_inputs["corrupt"])],
                 output=str(output), batch_size=1)
    assert not os.listdir(output.parent)
