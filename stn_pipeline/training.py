"""The training loop: runs the schedule, evaluates each epoch, keeps the best state, logs, and
checkpoints so that a killed run resumes exactly where its last checkpoint was.

The compiled steps live in `StnTrainer`; this loop only decides which step runs next and does the
side effects (summaries, progress lines, checkpoints), as big_vision's trainer does. The input
pipeline is a deterministic function of the number of batches drawn, so resuming only needs the
step counters: the iterators are rebuilt with `Dataset.skip`.
"""

from __future__ import annotations

import dataclasses
import json
import time
from typing import Callable

import tensorflow as tf
from absl import logging

from stn_pipeline.schedule import Schedule, ScheduleConfig
from stn_pipeline.summaries import RunLogger
from stn_pipeline.trainer import StnTrainer

__all__ = ["LoopState", "NonFiniteError", "RunData", "fit"]

ON_NAN_MODES = ("stop", "skip")


class NonFiniteError(RuntimeError):
    """A loss, gradient or hyperparameter became NaN or infinite."""


@dataclasses.dataclass
class RunData:
    """Batches for a run.

    Attributes:
      train: infinite, deterministic dataset of training batches (weight steps).
      hyper: infinite, deterministic dataset of validation batches (hyper steps).
      valid: finite dataset of validation batches, evaluated every epoch.
      test: finite dataset of test batches evaluated once at the best state, or None.
      steps_per_epoch: weight steps per epoch.
      batch_size: examples per training batch (for images/s).
    """

    train: tf.data.Dataset
    hyper: tf.data.Dataset
    valid: tf.data.Dataset
    test: tf.data.Dataset | None
    steps_per_epoch: int
    batch_size: int


class LoopState(tf.Module):
    """Everything about the loop's progress that a checkpoint must carry besides the trainer."""

    def __init__(self):
        super().__init__(name="loop_state")
        self.step = tf.Variable(0, dtype=tf.int64, trainable=False, name="weight_steps")
        self.hyper_steps = tf.Variable(0, dtype=tf.int64, trainable=False, name="hyper_steps")
        self.epoch = tf.Variable(0, dtype=tf.int64, trainable=False, name="epochs_done")
        self.skipped = tf.Variable(0, dtype=tf.int64, trainable=False, name="skipped_steps")
        # float64: a wall-clock total over days of training would lose seconds in float32.
        self.train_seconds = tf.Variable(0.0, dtype=tf.float64, trainable=False)
        # Python-side bookkeeping (schedule, trajectory), serialised so it checkpoints too.
        self.record = tf.Variable("{}", dtype=tf.string, trainable=False, name="record")

    def load_record(self) -> dict:
        return json.loads(self.record.numpy().decode())

    def save_record(self, record: dict) -> None:
        self.record.assign(json.dumps(record))


@dataclasses.dataclass
class LoopOptions:
    """Side-effect settings of `fit`.

    Attributes:
      log_every: weight steps between summaries and progress lines.
      max_steps: cap on weight steps (0: none); stops mid-epoch, then evaluates.
      checkpoint_every: weight steps between checkpoints (0: only at epoch ends).
      on_nan: "stop" raises `NonFiniteError`; "skip" skips the step and counts it.
    """

    log_every: int = 50
    max_steps: int = 0
    checkpoint_every: int = 0
    on_nan: str = "stop"


def _format(values: dict[str, float]) -> str:
    return " ".join(f"{k}={v:.4g}" for k, v in values.items())


def _scalars(outputs: dict) -> dict[str, float]:
    return {k: float(v) for k, v in outputs.items() if k not in ("hparam_values", "finite")}


def fit(trainer: StnTrainer, data: RunData, schedule_config: ScheduleConfig, logger: RunLogger,
        options: LoopOptions = LoopOptions(), checkpoints=None, loop_state: LoopState | None = None,
        on_epoch_end: Callable[[int, dict], None] | None = None) -> dict:
    """Trains until the schedule stops, then restores the best-validation state.

    Args:
      trainer: the compiled steps.
      data: batches.
      schedule_config: epochs, warm-up, cycle shape, decay and early stopping.
      logger: TensorBoard writer.
      options: logging, step cap, checkpoint cadence, non-finite policy.
      checkpoints: a `checkpoints.RunCheckpoints` (or None: nothing is saved, best state kept in
        memory); `loop_state` must be the one it saves. It has been restored already on resume.
      loop_state: the loop's progress; a new one starts from scratch.
      on_epoch_end: optional callback(epoch, epoch_metrics).

    Returns:
      A results dict: best validation/test metrics, initial/final hyperparameters, the
      hyperparameter trajectory, timings.

    Raises:
      NonFiniteError: with `on_nan="stop"`, naming the step and the quantity.
    """
    if options.on_nan not in ON_NAN_MODES:
        raise ValueError(f"on_nan must be one of {ON_NAN_MODES}, received {options.on_nan!r}.")
    hparams = trainer.hparams
    state = loop_state or LoopState()
    record = state.load_record()
    record.setdefault("initial_hparams", hparams.as_dict())
    record.setdefault("trajectory", [])
    schedule = Schedule(schedule_config, record.get("val_losses", []),
                        record.get("best_epoch", -1))
    tuning = trainer.config.tune and schedule_config.hyper_steps > 0
    best_state = [v.numpy() for v in trainer.state_variables()]
    step, hyper_steps = int(state.step.numpy()), int(state.hyper_steps.numpy())
    first_epoch = int(state.epoch.numpy())
    # Under a strategy, `distribute` cuts each global batch into per-replica pieces.
    train_batches = iter(trainer.distribute(data.train.skip(step)))
    hyper_batches = iter(trainer.distribute(data.hyper.skip(hyper_steps)))
    start, start_step = time.time(), step
    total_steps = schedule_config.epochs * data.steps_per_epoch
    if options.max_steps:
        total_steps = min(total_steps, options.max_steps)
    if step:
        logging.info("resuming at weight step %d (epoch %d)", step, first_epoch + 1)

    def save_record():
        record.update(val_losses=schedule.val_losses, best_epoch=schedule.best_epoch)
        state.save_record(record)
        state.step.assign(step)
        state.hyper_steps.assign(hyper_steps)

    def check(outputs, what):
        if bool(outputs["finite"]):
            return
        if options.on_nan == "stop":
            raise NonFiniteError(
                f"non-finite {what} loss or gradient at weight step {step} (loss="
                f"{float(outputs['loss'])}); stopped without applying it. The last checkpoint is "
                "intact; rerun with --on_nan=skip to skip such steps.")
        state.skipped.assign_add(1)
        logger.scalars(step, {"skipped_nonfinite_steps": int(state.skipped.numpy())}, "train/")

    stop_reason = record.get("stop_reason", "")
    epoch = first_epoch
    weight_out = None
    while not stop_reason and epoch < schedule_config.epochs:
        epoch_start = time.time()
        hyper_now = tuning and epoch >= schedule_config.warmup_epochs
        while step < min((epoch + 1) * data.steps_per_epoch, total_steps):
            weight_out = trainer.weight_step(*next(train_batches))
            step += 1
            check(weight_out, "weight-step")
            hyper_out = None
            if hyper_now and step % schedule_config.train_steps == 0:
                for _ in range(schedule_config.hyper_steps):
                    hyper_out = trainer.hyper_step(*next(hyper_batches))
                    hyper_steps += 1
                    check(hyper_out, "hyper-step")
                values = hparams.constrained().numpy()
                if not tf.reduce_all(tf.math.is_finite(values)):
                    raise NonFiniteError(f"non-finite hyperparameters {hparams.as_dict()} after "
                                         f"the hyper step at weight step {step}.")
            if step % options.log_every == 0 or step == total_steps:
                _log_step(logger, hparams, step, weight_out, hyper_out, record["trajectory"])
                elapsed = time.time() - start
                rate = (step - start_step) * data.batch_size / max(elapsed, 1e-9)
                eta = (total_steps - step) * elapsed / max(step - start_step, 1)
                logging.info("step %d/%d epoch %d %s | %s | %.0f img/s, ETA %.0fs", step,
                             total_steps, epoch + 1, _format(_scalars(weight_out)),
                             _format(hparams.as_dict()), rate, eta)
            at_cycle_end = step % schedule_config.train_steps == 0  # hyper steps done too
            if (checkpoints is not None and options.checkpoint_every and at_cycle_end
                    and step % options.checkpoint_every == 0):
                save_record()
                checkpoints.save(step)
        state.train_seconds.assign_add(time.time() - epoch_start)
        epoch_metrics = {f"val_{k}": v for k, v in trainer.evaluate_dataset(data.valid).items()}
        learning_rate = float(trainer.weight_optimizer.learning_rate.numpy())
        improved, new_lr = schedule.end_epoch(epoch_metrics["val_loss"], learning_rate)
        if new_lr != learning_rate:
            trainer.weight_optimizer.learning_rate.assign(new_lr)
            logging.info("epoch %d: learning rate decayed to %.2e", epoch + 1, new_lr)
        if improved:
            if checkpoints is not None:
                checkpoints.save_best()
            else:
                best_state = [v.numpy() for v in trainer.state_variables()]
        logger.scalars(step, {**epoch_metrics, "learning_rate": learning_rate}, "epoch/")
        if weight_out is not None:
            logger.hparam_histograms(step, hparams.names, weight_out["hparam_values"].numpy(),
                                     prefix="epoch_hparam_sample/")
        logger.flush()
        logging.info("epoch %d done in %.1fs: %s%s | %s", epoch + 1, time.time() - epoch_start,
                     _format(epoch_metrics), " (best)" if improved else "",
                     _format(hparams.as_dict()))
        epoch += 1
        if on_epoch_end is not None:
            on_epoch_end(epoch - 1, epoch_metrics)
        stop_reason = schedule.stop_reason
        if step >= total_steps and not stop_reason:
            stop_reason = f"reached the step cap of {total_steps} weight steps"
        record["stop_reason"] = stop_reason
        state.epoch.assign(epoch)
        save_record()
        if checkpoints is not None:
            checkpoints.save(step)

    if checkpoints is not None:
        checkpoints.restore_best()
    else:
        for variable, value in zip(trainer.state_variables(), best_state):
            variable.assign(value)
    results = {f"val_{k}": v for k, v in trainer.evaluate_dataset(data.valid).items()}
    if data.test is not None:
        test_metrics = trainer.evaluate_dataset(data.test)
        results.update({f"test_{k}": v for k, v in test_metrics.items()})
        logger.scalars(step, test_metrics, "epoch/test_")
    train_seconds = float(state.train_seconds.numpy())
    results.update({
        "best_epoch": schedule.best_epoch + 1,
        "epochs_run": len(schedule.val_losses),
        "stop_reason": stop_reason,
        "weight_steps": step,
        "hyper_steps": hyper_steps,
        "skipped_nonfinite_steps": int(state.skipped.numpy()),
        "initial_hparams": record["initial_hparams"],
        "final_hparams": hparams.as_dict(),
        "final_scales": dict(zip(hparams.names, hparams.scale().numpy().tolist())),
        "trajectory": record["trajectory"],
        "wall_time_s": time.time() - start,
        "train_images_per_s": step * data.batch_size / max(train_seconds, 1e-9),
        "epoch_val_losses": schedule.val_losses,
    })
    logger.flush()
    return results


def _log_step(logger: RunLogger, hparams, step: int, weight_out: dict, hyper_out: dict | None,
              trajectory: list) -> None:
    """Scalars of the latest steps, hyperparameter state and the per-example histogram."""
    logger.scalars(step, _scalars(weight_out), "train/")
    if hyper_out is not None:
        logger.scalars(step, _scalars(hyper_out), "hyper/")
    values, scales = hparams.constrained().numpy(), hparams.scale().numpy()
    logger.hparam_state(step, hparams.names, values, scales)
    logger.hparam_histograms(step, hparams.names, weight_out["hparam_values"].numpy())
    trajectory.append({"step": step, **dict(zip(hparams.names, values.tolist()))})
