"""SavedModel export of a trained STN: a folded serving graph, the response family and metadata.

An export is a versioned folder, as TF Serving expects: `<export_root>/1/`, `<export_root>/2/`,
... (exporting again adds the next version, never overwrites). Each version holds a SavedModel
with three signatures:

  serving_default(images)      raw inputs (uint8 [B, H, W, C] images for image models, any B;
                               normalisation runs inside the graph) -> `logits` [B, K] and
                               `probabilities` [B, K] (regressors: `outputs`), at the tuned
                               hyperparameters. Every STN layer is FOLDED into one ordinary layer
                               (kernel c W_e + W_h diag(h V_w), bias c b_e + (h V_b) b_h), so this
                               graph costs what a plain network costs.
  predict_with_hyperparameters(images, hyperparameters)
                               the same outputs from the unfolded best-response network at any
                               hyperparameters: float32 [B, H] constrained values (one row per
                               example) or [1, H] (one row shared by the batch). Values must lie
                               strictly inside each range; discrete ones may be fractional (their
                               gates see the value, dropout/augmentation its floor).
                               `hyperparameters()["continuous_values"]` reproduces serving_default.
  hyperparameters()            `names` [H], `values` [H] (the tuned constrained values, discrete
                               ones floored, as in results.json), `continuous_values` [H] (before
                               the floor) and `class_names` [K].

`assets/stn_export.json` holds the metadata: class names, input spec, normalisation, tuned
hyperparameters and their ranges, the per-cycle hyperparameter schedule, metrics and the training
config. Loading needs only `tf.saved_model.load` (no `stn_pipeline` import).

#### References
MacKay et al., Self-Tuning Networks, ICLR 2019, https://arxiv.org/abs/1903.03088 (section 4.2)
"""

from __future__ import annotations

import copy
import json
import math
import os
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import tensorflow as tf
from absl import logging

from stn_pipeline import checkpoints, methods
from stn_pipeline.files import staging_folder, write_json
from stn_pipeline.hparams import POSITIVE, HyperParameters
from stn_pipeline.layers import StnConv2D, StnDense, fold_layer
from stn_pipeline.models.base import StnClassifier, StnModel
from stn_pipeline.models.image import StnImageClassifier

__all__ = ["EXPORT_DIR", "METADATA_FILE", "ExportError", "ServingModule", "export_from_logdir",
           "export_metadata", "export_model", "export_run", "fold_model", "read_run",
           "stn_layers"]

EXPORT_DIR = "export"
METADATA_FILE = "stn_export.json"
FORMAT = "stn_pipeline.export/1"
SIGNATURES = ("serving_default", "predict_with_hyperparameters", "hyperparameters")


class ExportError(ValueError):
    """An export that cannot be written, with a one-line message."""


def stn_layers(model: tf.Module) -> list[tuple[tuple, StnDense | StnConv2D]]:
    """Every STN layer reachable from `model`, with its attribute path."""
    def is_stn(module) -> bool:
        return isinstance(module, (StnDense, StnConv2D))

    found = model._flatten(predicate=is_stn, with_path=True)  # pylint: disable=protected-access
    unique: dict[int, tuple[tuple, Any]] = {}
    for path, layer in found:
        unique.setdefault(id(layer), (path, layer))
    return list(unique.values())


def fold_model(model: StnModel, hnet_input: tf.Tensor) -> StnModel:
    """A copy of `model` whose STN layers are ordinary layers folded at the [H] `hnet_input`.

    The copy keeps the model's own `__call__`/`preprocess`; each `StnDense`/`StnConv2D` becomes a
    `FoldedDense`/`FoldedConv2D` with the same call signature (it ignores the hypernet input). The
    original model is not changed and shares no variables with the copy.
    """
    hnet_input = tf.reshape(tf.convert_to_tensor(hnet_input, tf.float32), [-1])
    layers = stn_layers(model)  # none in a plain network: its copy is already ordinary
    # deepcopy's memo maps each STN layer to its replacement, wherever the model refers to it
    # (attributes, lists, dicts), and copies everything else.
    memo = {id(layer): fold_layer(layer, hnet_input) for _, layer in layers}
    return copy.deepcopy(model, memo)


def _continuous_values(hparams: HyperParameters) -> np.ndarray:
    """The current constrained values before the floor of discrete hyperparameters, [H]."""
    unconstrained = hparams.unconstrained_value.numpy()
    columns = [float(spec.bijector().forward(float(u))) for spec, u in zip(hparams.specs,
                                                                           unconstrained)]
    return np.asarray(columns, np.float32)


def _input_name(input_spec: tf.TensorSpec) -> str:
    return "images" if input_spec.shape.rank == 4 else "inputs"


class ServingModule(tf.Module):
    """What gets saved: the folded and the unfolded model and the three signature functions."""

    def __init__(self, model: StnModel, hparams: HyperParameters, input_spec: tf.TensorSpec,
                 class_names: Sequence[str] = (), metadata_file: str | None = None,
                 name: str | None = None, method: str = "stn"):
        """Constructs a `ServingModule` at the current hyperparameter values.

        Args:
          model: the trained STN model (kept unfolded for `predict_with_hyperparameters`).
          hparams: its hyperparameters; their current values are the tuned ones.
          input_spec: spec of one batch of raw inputs, batch dimension None.
          class_names: class names of a classifier, label i is class_names[i].
          metadata_file: optional JSON file saved as an asset of the SavedModel.
          name: module name.
          method: "stn" or "delta_stn", which says what the gates see (`methods`).
        """
        super().__init__(name=name)
        if input_spec.shape.rank is None or input_spec.shape[0] is not None:
            raise ExportError(f"input_spec must have a known rank and a None batch dimension, "
                              f"received {input_spec}.")
        self.model = model
        self.hparams = hparams
        self.is_classifier = isinstance(model, StnClassifier)
        self.input_spec = tf.TensorSpec(input_spec.shape, input_spec.dtype, _input_name(input_spec))
        self.hparam_names = tuple(hparams.names)
        self.class_names = tuple(str(c) for c in class_names)
        unconstrained = hparams.unconstrained_value.numpy()
        with self.name_scope:
            self.tuned_unconstrained = tf.Variable(unconstrained, trainable=False,
                                                   name="tuned_unconstrained")
            self.tuned_values = tf.Variable(hparams.to_constrained(unconstrained), trainable=False,
                                            name="tuned_values")
            self.tuned_continuous_values = tf.Variable(_continuous_values(hparams),
                                                       trainable=False,
                                                       name="tuned_continuous_values")
        self._hnet_input = methods.make_method(method).hnet_input
        self.folded_model = fold_model(model, self._hnet_input(unconstrained, unconstrained))
        lows, highs = [], []
        for spec in hparams.specs:
            lows.append(float(spec.minimum))
            highs.append(math.inf if spec.kind == POSITIVE else float(spec.maximum))
        self._lows, self._highs = lows, highs
        self._ranges_text = ", ".join(
            f"{n} in ({lo:g}, {hi:g})" for n, lo, hi in zip(self.hparam_names, lows, highs))
        if metadata_file is not None:
            self.metadata_file = tf.saved_model.Asset(metadata_file)

        images_spec = self.input_spec
        values_spec = tf.TensorSpec([None, hparams.size], tf.float32, "hyperparameters")
        # No Python control flow depends on tensors here, so autograph has nothing to convert.
        self.serve = tf.function(self._serve, input_signature=[images_spec], autograph=False)
        self.predict_with_hyperparameters = tf.function(
            self._predict_with_hyperparameters, input_signature=[images_spec, values_spec],
            autograph=False)
        self.hyperparameter_info = tf.function(self._hyperparameters, input_signature=[],
                                               autograph=False)
        outputs = self.serve(tf.zeros([1, *input_spec.shape[1:]], input_spec.dtype))
        if self.is_classifier and self.class_names:
            width = outputs["logits"].shape[-1]
            if width != len(self.class_names):
                raise ExportError(f"{type(model).__name__} has {width} outputs but "
                                  f"{len(self.class_names)} class names were given.")

    def signatures(self) -> dict[str, Any]:
        """The concrete functions to save, by signature name."""
        return {"serving_default": self.serve.get_concrete_function(),
                "predict_with_hyperparameters":
                    self.predict_with_hyperparameters.get_concrete_function(),
                "hyperparameters": self.hyperparameter_info.get_concrete_function()}

    def _check_images(self, images: tf.Tensor) -> tf.Tensor:
        """Fails with the expected and received shapes when `images` do not fit `input_spec`.

        Signature calls (TF Serving, `loaded.signatures[...]`) check the dtype but not the shape.
        """
        return tf.ensure_shape(images, self.input_spec.shape)

    def _outputs(self, outputs: tf.Tensor) -> dict[str, tf.Tensor]:
        if self.is_classifier:
            return {"logits": outputs, "probabilities": tf.nn.softmax(outputs, axis=-1)}
        return {"outputs": outputs}

    def _serve(self, images):
        """Outputs of the folded network at the tuned hyperparameters (accepts input_spec only)."""
        images = self._check_images(images)
        batch = tf.shape(images)[0]
        size = len(self.hparam_names)
        sample = self.hparams.make_sample(tf.broadcast_to(self.tuned_values, [batch, size]),
                                          tf.broadcast_to(self.tuned_unconstrained, [batch, size]))
        model = self.folded_model
        return self._outputs(model(model.preprocess(images), sample, training=False, seed=None))

    def _predict_with_hyperparameters(self, images, hyperparameters):
        """Outputs of the unfolded best-response network at the given constrained values.

        `hyperparameters` is float32 [B, H] (one row per example) or [1, H] (shared); each value
        must lie strictly inside its range. The gates see the unconstrained value of each entry;
        dropout and augmentation (off in evaluation) would see it floored where discrete.
        """
        images = self._check_images(images)
        # Signature calls do not enforce the static shape; EnsureShape checks it at run time.
        hyperparameters = tf.ensure_shape(hyperparameters, [None, len(self.hparam_names)])
        batch = tf.shape(images)[0]
        rows = tf.shape(hyperparameters)[0]
        inside = tf.logical_and(hyperparameters > tf.constant(self._lows, tf.float32),
                                hyperparameters < tf.constant(self._highs, tf.float32))
        checks = [
            tf.debugging.assert_equal(
                tf.logical_or(tf.equal(rows, 1), tf.equal(rows, batch)), True,
                message="predict_with_hyperparameters: hyperparameters must have one row per "
                        "image or a single row shared by all images"),
            tf.debugging.assert_equal(
                tf.reduce_all(inside), True,
                message=("predict_with_hyperparameters: hyperparameter values must lie strictly "
                         f"inside their ranges: {self._ranges_text}"))]
        with tf.control_dependencies(checks):
            values = tf.broadcast_to(hyperparameters, [batch, len(self.hparam_names)])
        unconstrained = self.hparams.to_unconstrained(values)
        sample = self.hparams.make_sample(self.hparams.to_constrained(unconstrained),
                                          self._hnet_input(unconstrained, self.tuned_unconstrained))
        model = self.model
        return self._outputs(model(model.preprocess(images), sample, training=False, seed=None))

    def _hyperparameters(self):
        """The tuned values, their names and the class names."""
        return {"names": tf.constant(self.hparam_names, tf.string),
                "values": tf.identity(self.tuned_values),
                "continuous_values": tf.identity(self.tuned_continuous_values),
                "class_names": tf.constant(self.class_names, tf.string,
                                           shape=[len(self.class_names)])}


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, (np.generic,)):
        return value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def export_metadata(model: StnModel, hparams: HyperParameters, input_spec: tf.TensorSpec,
                    results: Mapping[str, Any] | None = None,
                    class_names: Sequence[str] | None = None) -> dict:
    """The JSON metadata of an export.

    Args:
      model: the trained model.
      hparams: its hyperparameters at the exported (tuned) values.
      input_spec: spec of one batch of raw inputs.
      results: the run's results dict (`training.fit` plus "config" and "metadata"), if any:
        provides the schedule (`trajectory`), metrics, class names and the training config.
      class_names: overrides the class names found in `results["metadata"]`.
    """
    results = dict(results or {})
    run_metadata = dict(results.get("metadata") or {})
    if class_names is None:
        class_names = run_metadata.get("class_names", [])
    unconstrained = hparams.unconstrained_value.numpy()
    continuous = _continuous_values(hparams).tolist()
    values = hparams.constrained().numpy().tolist()
    names = list(hparams.names)
    metadata: dict[str, Any] = {
        "format": FORMAT,
        "model": type(model).__name__,
        "experiment": (results.get("config") or {}).get("experiment"),
        "signatures": {
            "serving_default": "inputs -> logits, probabilities at the tuned hyperparameters "
                               "(folded network)",
            "predict_with_hyperparameters": "inputs, hyperparameters float32 [B or 1, H] "
                                            "constrained values strictly inside their ranges -> "
                                            "outputs of the unfolded best-response network",
            "hyperparameters": "() -> names, values, continuous_values, class_names",
        },
        "input": {"name": _input_name(input_spec), "shape": input_spec.shape.as_list(),
                  "dtype": input_spec.dtype.name},
        "class_names": [str(c) for c in class_names],
        "hyperparameters": {
            "names": names,
            "values": dict(zip(names, values)),
            "continuous_values": dict(zip(names, continuous)),
            "unconstrained_values": dict(zip(names, unconstrained.tolist())),
            "scales": dict(zip(names, hparams.scale().numpy().tolist())),
            "specs": [{"name": s.name, "minimum": s.minimum, "maximum": s.maximum, "init": s.init,
                       "kind": s.kind} for s in hparams.specs],
        },
        "schedule": list(results.get("trajectory", [])),
        "initial_hyperparameters": results.get("initial_hparams"),
        "metrics": {k: v for k, v in results.items()
                    if k.startswith(("val_", "test_")) and isinstance(v, (int, float))},
        "best_epoch": results.get("best_epoch"),
        "training_config": results.get("config"),
        # The export computes in float32 whatever precision trained it.
        "trained_precision": (results.get("config") or {}).get("precision", "float32"),
        "dataset": run_metadata,
    }
    if isinstance(model, StnImageClassifier):
        metadata["input"]["accepts"] = ("raw uint8 pixels in [0, 255], NHWC, any batch size; "
                                        "float images are rejected (convert to uint8 first)")
        metadata["normalization"] = {
            "mean": model.mean.numpy().tolist(), "std": model.std.numpy().tolist(),
            "formula": "(float32(pixel) - mean) / std per channel, inside the graph"}
    return _jsonable(metadata)


def _versions(export_root: str) -> list[int]:
    if not os.path.isdir(export_root):
        return []
    return sorted(int(d) for d in os.listdir(export_root)
                  if d.isdigit() and os.path.isdir(os.path.join(export_root, d)))


def export_model(export_root: str, model: StnModel, hparams: HyperParameters,
                 input_spec: tf.TensorSpec, metadata: Mapping[str, Any] | None = None,
                 method: str = "stn") -> str:
    """Saves a new version `<export_root>/<n>/` (n = 1 + the highest existing version).

    The SavedModel is written to a hidden temporary folder and renamed into place, so a crash
    never leaves a half-written version that a server could pick up.

    Args:
      export_root: the folder of versions, e.g. `<logdir>/export`.
      model, hparams: the trained model at its tuned hyperparameters.
      input_spec: spec of one batch of raw inputs, batch dimension None.
      metadata: JSON metadata (default: `export_metadata(model, hparams, input_spec)`).
      method: the model's training method, "stn" or "delta_stn".

    Returns:
      The version folder written.
    """
    if metadata is None:
        metadata = export_metadata(model, hparams, input_spec)

    def write(folder: str) -> None:
        os.makedirs(os.path.join(folder, "assets_source"))  # outside the SavedModel's folder
        metadata_path = os.path.join(folder, "assets_source", METADATA_FILE)
        write_json(metadata_path, metadata)
        module = ServingModule(model, hparams, input_spec,
                               class_names=metadata.get("class_names", ()),
                               metadata_file=metadata_path, method=method)
        quiet_save(module, os.path.join(folder, "model"), module.signatures())

    return save_versioned(export_root, write)


def quiet_save(module: tf.Module, path: str, signatures=None) -> None:
    """`tf.saved_model.save` without TF's per-function INFO lines."""
    verbosity = logging.get_verbosity()
    logging.set_verbosity(logging.WARNING)
    try:
        tf.saved_model.save(module, path, signatures=signatures)
    finally:
        logging.set_verbosity(verbosity)


def save_versioned(export_root: str, write: Callable[[str], None]) -> str:
    """Writes a new version `<export_root>/<n>/` (n = 1 + the highest existing version).

    `write(staging)` must write the SavedModel to `<staging>/model`; it is renamed into place
    only when complete, so a crash never leaves a half-written version that a server could pick
    up, and an existing version is never overwritten.
    """
    if os.path.isfile(os.path.join(export_root, "saved_model.pb")):
        raise ExportError(f"{export_root} holds an unversioned SavedModel; export into its parent "
                          "or into another folder (versions go in numbered subfolders).")
    try:
        os.makedirs(export_root, exist_ok=True)
    except OSError as error:
        raise ExportError(f"cannot create the export folder {export_root}: "
                          f"{error.strerror}") from None
    with staging_folder(export_root, prefix=".export-") as staging:
        write(staging)
        while True:
            version = (_versions(export_root) or [0])[-1] + 1
            target = os.path.join(export_root, str(version))
            try:
                os.rename(os.path.join(staging, "model"), target)  # fails if a concurrent
                return target                                      # export took this number
            except OSError:
                if not os.path.isdir(target):
                    raise


def export_run(logdir: str, model: StnModel, hparams: HyperParameters,
               input_spec: tf.TensorSpec, results: Mapping[str, Any]) -> dict[str, str]:
    """End of a run: exports the best state (the model's current state) to `<logdir>/export/<n>/`.

    Returns:
      {"checkpoint_path": ..., "export_path": ...} to record in results.json.
    """
    # The training loop saved this best state already (checkpoints.RunCheckpoints.save_best).
    checkpoint_path = os.path.join(logdir, checkpoints.BEST_DIR, "ckpt")
    metadata = export_metadata(model, hparams, input_spec, results)
    export_path = export_model(os.path.join(logdir, EXPORT_DIR), model, hparams, input_spec,
                               metadata, method=methods.recorded_method(results))
    return {"checkpoint_path": checkpoint_path, "export_path": export_path}


def read_run(logdir: str, need_results: bool = False) -> tuple[dict, dict]:
    """(config.json, results) of the run in `logdir`, as read; results may be partial.

    An unfinished run has no results.json; its metadata.json (written when the run starts) is
    returned as `{"metadata": ...}` instead. Turning the config into a model is the caller's job
    (`stn-export` uses the experiment registry; export code does not import it).
    """
    names = ["config.json", "results.json" if need_results or os.path.exists(
        os.path.join(logdir, "results.json")) else "metadata.json"]
    loaded = {}
    for name in names:
        path = os.path.join(logdir, name)
        try:
            with open(path) as handle:
                loaded[name] = json.load(handle)
        except OSError as error:
            raise ExportError(f"cannot read {path}: {error.strerror} (is --logdir an stn-train "
                              "run?)") from None
        except json.JSONDecodeError as error:
            raise ExportError(f"{path} is not valid JSON: {error}") from None
    results = loaded.get("results.json") or {"metadata": loaded["metadata.json"]}
    return loaded["config.json"], results


def export_from_logdir(logdir: str, model: StnModel, hparams: HyperParameters,
                       results: Mapping[str, Any], export_root: str | None = None) -> str:
    """Restores a finished run's best checkpoint into a freshly built model and exports it.

    Args:
      logdir: the run's folder (checkpoints/best).
      model, hparams: the run's model and hyperparameters, newly built (e.g. by
        `experiments.build_model` from the run's config and metadata).
      results: the run's results.json (`read_run(logdir, need_results=True)`).
      export_root: folder of versions; default `<logdir>/export`.

    Returns:
      The version folder written.
    """
    input_spec = checkpoints.restore_best(logdir, model, hparams)
    metadata = export_metadata(model, hparams, input_spec, results)
    return export_model(export_root or os.path.join(logdir, EXPORT_DIR), model, hparams,
                        input_spec, metadata, method=methods.recorded_method(results))
