"""The trainer itself as a SavedModel: compiled weight and hyper steps that keep training without
stn_pipeline installed.

`<logdir>/trainer_export/<n>/` holds the model (both paths and gates), the hyperparameters and
scales, all three optimizers' state and the random generators, with these functions (also as
signatures, for `saved_model_cli` and the C API):

  weight_step(images, labels)   one weight step on a per-example perturbed batch
  hyper_step(images, labels)    one hyperparameter/scale step on a clean validation batch
  evaluate(images, labels)      sums of loss and metrics at the current hyperparameters
  hyperparameters()             current constrained values, scales and names

Inputs are the run's raw inputs (uint8 images of the training shape, any batch size; int64
labels). A loaded trainer writes its state back with `tf.train.Checkpoint(trainer=loaded)`, and
`stn-train --init_from=<that checkpoint>` continues from it.
"""

from __future__ import annotations

import os
from typing import Any, Mapping

import tensorflow as tf

from stn_pipeline import checkpoints, export
from stn_pipeline.hparams import HyperParameters
from stn_pipeline.models.base import StnModel
from stn_pipeline.trainer import StnTrainer, TrainerConfig

__all__ = ["TRAINER_EXPORT_DIR", "export_trainer", "new_trainer", "save_trainer"]

TRAINER_EXPORT_DIR = "trainer_export"
_SOURCES = ("latest", "best")


def new_trainer(model: StnModel, hparams: HyperParameters, metadata: Mapping[str, Any],
                config: TrainerConfig, seed: int = 0) -> StnTrainer:
    """An untrained `StnTrainer` of a run's freshly built model, with the run's input specs.

    Args:
      model, hparams: built from the run's config and metadata (`experiments.build_model`).
      metadata: the run's metadata.json: image runs name their `image_shape`.
      config: the run's trainer configuration.
      seed: the run's seed.
    """
    if "image_shape" in metadata:
        input_spec = tf.TensorSpec([None, *metadata["image_shape"]], tf.uint8)
        target_spec = tf.TensorSpec([None], tf.int64)
    else:  # relu_toy: one float input and target per example
        input_spec = target_spec = tf.TensorSpec([None, 1], tf.float32)
    return StnTrainer(model, hparams, input_spec, target_spec, config, seed=seed)


def save_trainer(trainer: StnTrainer, export_root: str) -> str:
    """Saves `trainer` as the next version under `export_root`; returns the version folder."""
    signatures = {name: getattr(trainer, name).get_concrete_function()
                  for name in ("weight_step", "hyper_step", "evaluate", "hyperparameters")}
    return export.save_versioned(
        export_root, lambda staging: export.quiet_save(trainer, os.path.join(staging, "model"),
                                                       signatures))


def export_trainer(logdir: str, trainer: StnTrainer, source: str = "latest",
                   export_root: str | None = None) -> str:
    """Exports the trainer of the run in `logdir` from its latest resume checkpoint or its best.

    Args:
      logdir: an stn-train run (finished or not).
      trainer: the run's trainer, newly built (`new_trainer`); its state is restored here.
      source: "latest" (the newest resume checkpoint: everything, optimizer slots included) or
        "best" (the best-validation model and hyperparameters; optimizers start fresh).
      export_root: folder of versions; default `<logdir>/trainer_export`.

    Returns:
      The version folder written.
    """
    if source not in _SOURCES:
        raise export.ExportError(f"--source must be one of {_SOURCES}, received {source!r}.")
    if source == "best":
        checkpoints.restore_best(logdir, trainer.model, trainer.hparams)
    else:
        folder = os.path.join(logdir, "checkpoints")
        latest = tf.train.latest_checkpoint(folder)
        if latest is None:
            raise export.ExportError(f"no resume checkpoint in {folder}.")
        tf.train.Checkpoint(trainer=trainer).read(latest).expect_partial()
    return save_trainer(trainer, export_root or os.path.join(logdir, TRAINER_EXPORT_DIR))
