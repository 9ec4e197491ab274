"""The training loop: runs the schedule, evaluates each epoch, keeps the best state, logs.

The compiled steps live in `StnTrainer`; this loop only decides which step runs next and does the
side effects (summaries, progress lines, best-state copies), as big_vision's trainer does.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Callable, Iterator

import tensorflow as tf
from absl import logging

from stn_pipeline.schedule import Schedule, ScheduleConfig
from stn_pipeline.summaries import RunLogger
from stn_pipeline.trainer import StnTrainer

__all__ = ["RunData", "fit"]


@dataclasses.dataclass
class RunData:
    """Batches for a run.

    Attributes:
      train: infinite iterator of training batches (weight steps).
      hyper: infinite iterator of validation batches (hyper steps).
      valid: finite dataset of validation batches, evaluated every epoch.
      test: finite dataset of test batches evaluated once at the best state, or None.
      steps_per_epoch: weight steps per epoch.
      batch_size: examples per training batch (for images/s).
    """

    train: Iterator
    hyper: Iterator
    valid: tf.data.Dataset
    test: tf.data.Dataset | None
    steps_per_epoch: int
    batch_size: int


def _format(values: dict[str, float]) -> str:
    return " ".join(f"{k}={v:.4g}" for k, v in values.items())


def fit(trainer: StnTrainer, data: RunData, schedule_config: ScheduleConfig, logger: RunLogger,
        log_every: int = 50, max_steps: int = 0,
        on_epoch_end: Callable[[int, dict], None] | None = None) -> dict:
    """Trains until the schedule stops, then restores the best-validation state.

    Args:
      trainer: the compiled steps.
      data: batches.
      schedule_config: epochs, warm-up, cycle shape, decay and early stopping.
      logger: TensorBoard writer.
      log_every: weight steps between summaries and progress lines.
      max_steps: cap on weight steps (0: none); stops mid-epoch, then evaluates.
      on_epoch_end: optional callback(epoch, epoch_metrics).

    Returns:
      A results dict: best validation/test metrics, initial/final hyperparameters, the
      hyperparameter trajectory, timings.
    """
    hparams = trainer.hparams
    schedule = Schedule(schedule_config)
    tuning = trainer.config.tune and schedule_config.hyper_steps > 0
    initial_hparams = hparams.as_dict()
    best_state = [v.numpy() for v in trainer.state_variables()]
    trajectory: list[dict] = []
    step = hyper_steps = 0
    train_seconds = 0.0
    start = time.time()
    total_steps = schedule_config.epochs * data.steps_per_epoch
    if max_steps:
        total_steps = min(total_steps, max_steps)
    epoch_metrics: dict[str, float] = {}

    def log_state(weight_out):
        values, scales = hparams.constrained().numpy(), hparams.scale().numpy()
        logger.hparam_state(step, hparams.names, values, scales)
        logger.hparam_histograms(step, hparams.names, weight_out["hparam_values"].numpy())
        trajectory.append({"step": step, **dict(zip(hparams.names, values.tolist()))})
        return values

    for epoch in range(schedule_config.epochs):
        epoch_start = time.time()
        hyper_now = tuning and epoch >= schedule_config.warmup_epochs
        for _ in range(data.steps_per_epoch):
            weight_out = trainer.weight_step(*next(data.train))
            step += 1
            hyper_out = None
            if hyper_now and step % schedule_config.train_steps == 0:
                for _ in range(schedule_config.hyper_steps):
                    hyper_out = trainer.hyper_step(*next(data.hyper))
                    hyper_steps += 1
            if step % log_every == 0 or step == total_steps:
                scalars = {k: float(v) for k, v in weight_out.items() if k != "hparam_values"}
                logger.scalars(step, scalars, "train/")
                if hyper_out is not None:
                    logger.scalars(step, {k: float(v) for k, v in hyper_out.items()}, "hyper/")
                values = log_state(weight_out)
                elapsed = time.time() - start
                rate = step * data.batch_size / max(elapsed, 1e-9)
                eta = (total_steps - step) * elapsed / step
                logging.info("step %d/%d epoch %d %s | %s | %.0f img/s, ETA %.0fs", step,
                             total_steps, epoch + 1, _format(scalars),
                             _format(dict(zip(hparams.names, values.tolist()))), rate, eta)
            if step >= total_steps:
                break
        train_seconds += time.time() - epoch_start
        epoch_metrics = {f"val_{k}": v for k, v in trainer.evaluate_dataset(data.valid).items()}
        learning_rate = float(trainer.weight_optimizer.learning_rate.numpy())
        improved, new_lr = schedule.end_epoch(epoch_metrics["val_loss"], learning_rate)
        if new_lr != learning_rate:
            trainer.weight_optimizer.learning_rate.assign(new_lr)
            logging.info("epoch %d: learning rate decayed to %.2e", epoch + 1, new_lr)
        if improved:
            best_state = [v.numpy() for v in trainer.state_variables()]
        logger.scalars(step, {**epoch_metrics, "learning_rate": learning_rate}, "epoch/")
        logger.hparam_histograms(step, hparams.names, weight_out["hparam_values"].numpy(),
                                 prefix="epoch_hparam_sample/")
        logger.flush()
        logging.info("epoch %d done in %.1fs: %s%s | %s", epoch + 1, time.time() - epoch_start,
                     _format(epoch_metrics), " (best)" if improved else "",
                     _format(hparams.as_dict()))
        if on_epoch_end is not None:
            on_epoch_end(epoch, epoch_metrics)
        if step >= total_steps and not schedule.stop_reason:
            schedule.stop_reason = f"reached the step cap of {total_steps} weight steps"
        if schedule.stop_reason:
            break

    for variable, value in zip(trainer.state_variables(), best_state):
        variable.assign(value)
    results = {f"val_{k}": v for k, v in trainer.evaluate_dataset(data.valid).items()}
    if data.test is not None:
        test_metrics = trainer.evaluate_dataset(data.test)
        results.update({f"test_{k}": v for k, v in test_metrics.items()})
        logger.scalars(step, test_metrics, "epoch/test_")
    results.update({
        "best_epoch": schedule.best_epoch + 1,
        "epochs_run": len(schedule.val_losses),
        "stop_reason": schedule.stop_reason,
        "weight_steps": step,
        "hyper_steps": hyper_steps,
        "initial_hparams": initial_hparams,
        "final_hparams": hparams.as_dict(),
        "final_scales": dict(zip(hparams.names, hparams.scale().numpy().tolist())),
        "trajectory": trajectory,
        "wall_time_s": time.time() - start,
        "train_images_per_s": step * data.batch_size / max(train_seconds, 1e-9),
        "epoch_val_losses": schedule.val_losses,
    })
    logger.flush()
    return results
