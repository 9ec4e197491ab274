"""A run's checkpoints: resume checkpoints of the whole trainer, and its best-validation state.

    <logdir>/checkpoints/ckpt-<step>.*          `RunCheckpoints`: everything that decides the run's
                                                future (trainer and loop state); `stn-train` resumes
                                                from the newest readable one
    <logdir>/checkpoints/best/ckpt.*            `save_best`: model and hyperparameter variables of
                                                the best-validation state (no optimizer state)
    <logdir>/checkpoints/best/input_spec.json   dtype and shape of one batch of raw inputs

`training.fit` restores the best state at the end of a run; `stn-export` rebuilds an export from
it (`restore_best`). `restore_trainer` initialises a trainer from a checkpoint written as
`trainer=...` (`stn-train --init_from`, e.g. a continued trainer SavedModel).
"""

from __future__ import annotations

import json
import os

import tensorflow as tf
from absl import logging

from stn_pipeline.files import write_json
from stn_pipeline.hparams import HyperParameters

__all__ = ["BEST_DIR", "CheckpointError", "RunCheckpoints", "restore_best",
           "restore_trainer", "save_best"]

BEST_DIR = os.path.join("checkpoints", "best")
_PREFIX = "ckpt"
_SPEC_FILE = "input_spec.json"


class CheckpointError(ValueError):
    """A checkpoint that is missing or does not fit the model, with a one-line message."""


def _checkpoint(model: tf.Module, hparams: HyperParameters) -> tf.train.Checkpoint:
    return tf.train.Checkpoint(model=model, hparams=hparams)


def save_best(logdir: str, model: tf.Module, hparams: HyperParameters,
              input_spec: tf.TensorSpec) -> str:
    """Writes the current model and hyperparameter values to `<logdir>/checkpoints/best`.

    Returns:
      The checkpoint prefix (what `tf.train.Checkpoint.read` takes).
    """
    folder = os.path.join(logdir, BEST_DIR)
    os.makedirs(folder, exist_ok=True)
    path = _checkpoint(model, hparams).write(os.path.join(folder, _PREFIX))
    write_json(os.path.join(folder, _SPEC_FILE),
               {"shape": list(input_spec.shape.as_list()), "dtype": input_spec.dtype.name})
    return path


def restore_best(logdir: str, model: tf.Module, hparams: HyperParameters) -> tf.TensorSpec:
    """Restores the variables saved by `save_best` into a freshly built model and hyperparameters.

    Returns:
      The input spec saved with the checkpoint.

    Raises:
      CheckpointError: if `logdir` holds no best checkpoint or it does not match the model.
    """
    folder = os.path.join(logdir, BEST_DIR)
    prefix = os.path.join(folder, _PREFIX)
    if not tf.io.gfile.exists(prefix + ".index"):
        raise CheckpointError(f"no best checkpoint in {folder} (a run writes it when it finishes)")
    try:
        status = _checkpoint(model, hparams).read(prefix)
        status.assert_existing_objects_matched()
        with open(os.path.join(folder, _SPEC_FILE)) as handle:
            spec = json.load(handle)
    except (AssertionError, ValueError, tf.errors.OpError, OSError) as error:
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise CheckpointError(f"cannot restore the checkpoint {prefix} into "
                              f"{type(model).__name__}: {first}") from error
    return tf.TensorSpec(spec["shape"], tf.as_dtype(spec["dtype"]))


class RunCheckpoints:
    """Resume checkpoints of a run: everything that determines its future.

    `<logdir>/checkpoints/ckpt-<step>` holds the trainer (model weights of both paths and gates,
    hyperparameter values and scales, their random generator, all three optimizers' slots and
    learning rates, the step generator) and the `LoopState` (step/epoch counters, schedule and
    early-stopping record, trajectory). The input pipeline needs no state: it is a deterministic
    function of the counters. The last `keep` are kept; the best-validation state goes to
    `save_best`'s folder. TensorFlow writes each checkpoint under a temporary name and renames it,
    so a failed save (disk full) leaves the previous one usable.
    """

    def __init__(self, logdir: str, trainer: tf.Module, loop_state: tf.Module, keep: int = 3,
                 fallback: bool = False, restore_from: str | None = None):
        """`restore_from`: the logdir to resume from when it is not `logdir` (a multi-worker
        job's non-chief workers write to a temporary folder but resume from the chief's)."""
        self.logdir = logdir
        self.trainer = trainer
        self.fallback = fallback
        self.folder = os.path.join(logdir, "checkpoints")
        self.checkpoint = tf.train.Checkpoint(trainer=trainer, loop=loop_state)
        self.manager = tf.train.CheckpointManager(self.checkpoint, self.folder, max_to_keep=keep)
        self.source = self.manager
        if restore_from is not None and restore_from != logdir:
            self.source = tf.train.CheckpointManager(
                self.checkpoint, os.path.join(restore_from, "checkpoints"), max_to_keep=keep)

    def restore_latest(self) -> str | None:
        """Restores the newest readable checkpoint; returns its path, or None if there is none.

        Raises:
          CheckpointError: when the newest is unreadable and `fallback` is off, naming the file;
            with `fallback`, older checkpoints are tried (with a warning) before giving up.
        """
        candidates = list(reversed(self.source.checkpoints))
        for index, path in enumerate(candidates):
            try:
                self.checkpoint.read(path).assert_existing_objects_matched()
                return path
            except Exception as error:  # noqa: BLE001 -- a damaged file fails in many ways
                reason = _first_line(error)
                if not self.fallback:
                    raise CheckpointError(
                        f"checkpoint {path} is unreadable ({reason}); rerun with "
                        "--restore_fallback to resume from the previous checkpoint") from None
                logging.warning("checkpoint %s is unreadable (%s); falling back to %s", path,
                                reason, candidates[index + 1] if index + 1 < len(candidates)
                                else "nothing")
        if candidates:
            raise CheckpointError(f"no readable checkpoint in {self.source.directory}: all "
                                  f"{len(candidates)} are damaged")
        return None

    def save(self, step: int) -> str:
        """Saves a resume checkpoint numbered `step`."""
        try:
            return self.manager.save(checkpoint_number=step)
        except (OSError, tf.errors.OpError) as error:
            raise CheckpointError(f"cannot write a checkpoint to {self.folder}: "
                                  f"{_first_line(error)}; the previous checkpoint "
                                  f"{self.manager.latest_checkpoint} is intact") from None

    def save_best(self) -> str:
        """Writes the trainer's current model and hyperparameters as the best state."""
        try:
            return save_best(self.logdir, self.trainer.model, self.trainer.hparams,
                             self.trainer.input_spec)
        except (OSError, tf.errors.OpError) as error:
            raise CheckpointError(f"cannot write the best checkpoint under {self.logdir}: "
                                  f"{_first_line(error)}") from None

    def restore_best(self) -> None:
        """Restores the best state written by `save_best` into the trainer."""
        restore_best(self.logdir, self.trainer.model, self.trainer.hparams)


def restore_trainer(trainer: tf.Module, prefix: str) -> None:
    """Restores every variable of `trainer` from a checkpoint written as `trainer=...`."""
    try:  # a trainer of the other method has other parameter groups and optimizers
        saved = {name.split("/")[1] for name, _ in tf.train.list_variables(prefix)
                 if name.startswith("trainer/")}
    except Exception:  # noqa: BLE001 -- reported by the read below
        saved = None
    if saved:
        method = "delta_stn" if "response_optimizer" in saved else "stn"
        if method != trainer.method.name:
            raise CheckpointError(f"--init_from={prefix} holds a {method} trainer; it cannot "
                                  f"initialise a --method={trainer.method.name} run.")
    try:
        tf.train.Checkpoint(trainer=trainer).read(prefix).assert_existing_objects_matched()
    except Exception as error:  # noqa: BLE001 -- missing, damaged or mismatched files
        raise CheckpointError(f"cannot initialise the trainer from {prefix}: "
                              f"{_first_line(error)}") from None


def _first_line(error: BaseException) -> str:
    text = getattr(error, "message", None) or str(error)
    return text.strip().splitlines()[0] if text.strip() else type(error).__name__
