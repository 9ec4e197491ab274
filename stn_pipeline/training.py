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
from stn_pipeline.trainer import CYCLE_STATUS, StnTrainer

__all__ = ["LoopState", "NonFiniteError", "RunData", "fit"]

ON_NAN_MODES = ("stop", "skip")


class NonFiniteError(RuntimeError):
    """A loss, gradient or hyperparameter became NaN or infinite."""


@dataclasses.dataclass(kw_only=True)
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
        # Python-side bookkeeping (schedule, trajectory, history), serialised so it checkpoints too.
        self.record = tf.Variable("{}", dtype=tf.string, trainable=False, name="record")

    def load_record(self) -> dict:
        return json.loads(self.record.numpy().decode())

    def save_record(self, record: dict) -> None:
        self.record.assign(json.dumps(record))


@dataclasses.dataclass(frozen=True, kw_only=True)
class LoopOptions:
    """Side-effect settings of `fit`.

    Attributes:
      log_every: weight steps between summaries and progress lines.
      max_steps: cap on weight steps (0: none); stops mid-epoch, then evaluates.
      checkpoint_every: weight steps between checkpoints (0: only at epoch ends).
      on_nan: "stop" raises `NonFiniteError`; "skip" skips the step and counts it.
      cycles_per_execution: cycles per compiled call (`StnTrainer.run_cycles`); 1 calls every
        step separately. Above 1, everything the loop does between steps happens at the end of
        a call: a summary or checkpoint due inside a call is written at its end.
    """

    log_every: int = 50
    max_steps: int = 0
    checkpoint_every: int = 0
    on_nan: str = "stop"
    cycles_per_execution: int = 1


def _format(values: dict[str, float]) -> str:
    return " ".join(f"{k}={v:.4g}" for k, v in values.items())


def _scalars(outputs: dict) -> dict[str, float]:
    return {k: float(v) for k, v in outputs.items() if k not in ("hparam_values", "finite")}


class _BestState:
    """The best-validation state: the best checkpoint, or a copy in memory without checkpoints."""

    def __init__(self, trainer: StnTrainer, checkpoints):
        self.trainer = trainer
        self.checkpoints = checkpoints
        self.values = None

    def save(self) -> None:
        if self.checkpoints is not None:
            self.checkpoints.save_best()
        else:
            self.values = [v.numpy() for v in self.trainer.state_variables()]

    def restore(self) -> None:
        if self.checkpoints is not None:
            self.checkpoints.restore_best()
            return
        for variable, value in zip(self.trainer.state_variables(), self.values):
            variable.assign(value)


class _Loop:
    """One run of `fit`: epochs of cycles, each epoch closed by evaluation and bookkeeping.

    The record (a JSON dict checkpointed in `LoopState.record`) holds what is not a variable:
    initial hyperparameters, the trajectory, the per-epoch history, the schedule state and the
    stop reason.
    """

    def __init__(self, trainer: StnTrainer, data: RunData, config: ScheduleConfig,
                 logger: RunLogger, options: LoopOptions, checkpoints, state: LoopState,
                 on_weight_step: Callable[[int], None] | None = None):
        self.trainer, self.data, self.config, self.logger = trainer, data, config, logger
        self.options, self.checkpoints, self.state = options, checkpoints, state
        self.on_weight_step = on_weight_step or (lambda step: None)
        self.on_weight_step(int(state.step.numpy()))
        self.record = state.load_record()
        self.record.setdefault("initial_hparams", trainer.hparams.as_dict())
        for key in ("trajectory", "history"):
            self.record.setdefault(key, [])
        self.schedule = Schedule(config, **self.record.get("schedule", {}))
        self.best = _BestState(trainer, checkpoints)
        self.tuning = trainer.config.tune and config.hyper_steps > 0
        self.step, self.hyper_steps = int(state.step.numpy()), int(state.hyper_steps.numpy())
        self.epoch = int(state.epoch.numpy())
        # Under a strategy, `distribute` cuts each global batch into per-replica pieces.
        self.train_batches = iter(trainer.distribute(data.train.skip(self.step)))
        self.hyper_batches = iter(trainer.distribute(data.hyper.skip(self.hyper_steps)))
        self.start, self.start_step = time.time(), self.step
        self.total_steps = config.epochs * data.steps_per_epoch
        if options.max_steps:
            self.total_steps = min(self.total_steps, options.max_steps)

    def save_record(self) -> None:
        self.record["schedule"] = self.schedule.state()
        self.state.save_record(self.record)
        self.state.step.assign(self.step)
        self.state.hyper_steps.assign(self.hyper_steps)

    def check(self, outputs: dict, what: str) -> None:
        """Raises or counts a step whose loss or gradients were not finite."""
        if bool(outputs["finite"]):
            return
        if self.options.on_nan == "stop":
            raise self.non_finite(what, outputs)
        self.count_skipped(1)

    def non_finite(self, what: str, outputs: dict) -> NonFiniteError:
        return NonFiniteError(
            f"non-finite {what} loss or gradient at weight step {self.step} (loss="
            f"{float(outputs['loss'])}); stopped without applying it. The last checkpoint is "
            "intact; rerun with --on_nan=skip to skip such steps.")

    def count_skipped(self, count: int) -> None:
        self.state.skipped.assign_add(count)
        self.logger.scalars(self.step, {"skipped_nonfinite_steps": int(self.state.skipped.numpy())},
                            "train/")

    def run_epoch(self) -> str:
        """Trains one epoch (warm-up or tuning) and closes it; returns the stop reason or ""."""
        epoch_start = time.time()
        learning_rate = float(self.trainer.weight_optimizer.learning_rate.numpy())
        hyper_now = self.tuning and self.epoch >= self.config.warmup_epochs
        weight_out = None
        epoch_end = min((self.epoch + 1) * self.data.steps_per_epoch, self.total_steps)
        while self.step < epoch_end:
            if self.options.cycles_per_execution == 1:
                weight_out = self.cycle_step(hyper_now)
            else:
                weight_out = self.cycles_call(hyper_now, epoch_end)
        self.state.train_seconds.assign_add(time.time() - epoch_start)
        return self.end_epoch(learning_rate, weight_out, epoch_start)

    def cycle_step(self, hyper_now: bool) -> dict:
        """One weight step, the cycle's hyper steps when it completes a cycle, logs, checkpoint."""
        weight_out = self.trainer.weight_step(*next(self.train_batches))
        self.step += 1
        self.check(weight_out, "weight-step")
        self.on_weight_step(self.step)
        at_cycle_end = self.step % self.config.train_steps == 0
        hyper_out = self.hyper_cycle() if hyper_now and at_cycle_end else None
        if self.step % self.options.log_every == 0 or self.step == self.total_steps:
            self.log_step(weight_out, hyper_out)
        every = self.options.checkpoint_every
        if self.checkpoints is not None and every and at_cycle_end and self.step % every == 0:
            self.save_record()
            self.checkpoints.save(self.step)
        return weight_out

    def cycles_call(self, hyper_now: bool, epoch_end: int) -> dict:
        """`cycles_per_execution` cycles in one compiled call, then what `cycle_step` does.

        A call ends at the N-th cycle end after its start, or earlier at `epoch_end` (the
        epoch's end or the step cap), so call boundaries depend on the step alone and a resumed
        run makes the same calls. Its results are read once, with one host sync. A summary is
        written when a multiple of `log_every` falls inside the call, a checkpoint when one of
        `checkpoint_every` does and the call ends at a cycle's end (at an epoch end, `end_epoch`
        writes one anyway).
        """
        train_steps, start = self.config.train_steps, self.step
        stop = min(start - start % train_steps + self.options.cycles_per_execution * train_steps,
                   epoch_end)
        out = self.trainer.run_cycles(
            self.train_batches, self.hyper_batches, first_step=start, weight_steps=stop - start,
            train_steps=train_steps, hyper_steps=self.config.hyper_steps if hyper_now else 0,
            stop_on_nan=self.options.on_nan == "stop")
        status = CYCLE_STATUS[int(out["status"])]
        self.step += int(out["weight_steps"])
        hyper_steps = int(out["hyper_steps"])
        self.hyper_steps += hyper_steps
        if status == "hparams":
            raise NonFiniteError(f"non-finite hyperparameters {self.trainer.hparams.as_dict()} "
                                 f"after the hyper step at weight step {self.step}.")
        if status != "running":
            raise self.non_finite(f"{status}-step", out[status])
        if int(out["skipped"]):
            self.count_skipped(int(out["skipped"]))
        hyper_out = out["hyper"] if hyper_steps else None
        log_every, every = self.options.log_every, self.options.checkpoint_every
        if self.step // log_every > start // log_every or self.step == self.total_steps:
            self.log_step(out["weight"], hyper_out)
        if (self.checkpoints is not None and every and self.step % train_steps == 0
                and self.step // every > start // every):
            self.save_record()
            self.checkpoints.save(self.step)
        return out["weight"]

    def hyper_cycle(self) -> dict:
        """The hyper steps of one cycle; returns the last one's outputs."""
        for _ in range(self.config.hyper_steps):
            hyper_out = self.trainer.hyper_step(*next(self.hyper_batches))
            self.hyper_steps += 1
            self.check(hyper_out, "hyper-step")
        hparams = self.trainer.hparams
        if not tf.reduce_all(tf.math.is_finite(hparams.constrained())):
            raise NonFiniteError(f"non-finite hyperparameters {hparams.as_dict()} after the "
                                 f"hyper step at weight step {self.step}.")
        return hyper_out

    def log_step(self, weight_out: dict, hyper_out: dict | None) -> None:
        """Summaries of the latest steps and a progress line."""
        hparams = self.trainer.hparams
        _log_step(self.logger, hparams, self.step, weight_out, hyper_out,
                  self.record["trajectory"])
        elapsed = time.time() - self.start
        done = self.step - self.start_step
        rate = done * self.data.batch_size / max(elapsed, 1e-9)
        eta = (self.total_steps - self.step) * elapsed / max(done, 1)
        logging.info("step %d/%d epoch %d %s | %s | %.0f img/s, ETA %.0fs", self.step,
                     self.total_steps, self.epoch + 1, _format(_scalars(weight_out)),
                     _format(hparams.as_dict()), rate, eta)

    def end_epoch(self, learning_rate: float, weight_out: dict | None, epoch_start: float) -> str:
        """Evaluates, feeds a tuning epoch to the schedule, logs, records and checkpoints.

        `learning_rate` is the rate used during the epoch; a decay acts from the next one.
        """
        metrics = {f"val_{k}": v for k, v in self.trainer.evaluate_dataset(self.data.valid).items()}
        phase = "warmup" if self.epoch < self.config.warmup_epochs else "tune"
        improved = False
        if phase == "tune":
            improved, new_lr = self.schedule.end_epoch(metrics["val_loss"], learning_rate)
            if new_lr != learning_rate:
                for optimizer in self.trainer.weight_optimizers:
                    optimizer.learning_rate.assign(new_lr)
                logging.info("epoch %d: learning rate decayed to %.2e", self.epoch + 1, new_lr)
            if improved:
                self.best.save()
        self.record["history"].append({"epoch": self.epoch + 1, "phase": phase,
                                       "learning_rate": learning_rate, **metrics})
        self.logger.scalars(self.step, {**metrics, "learning_rate": learning_rate}, "epoch/")
        hparams = self.trainer.hparams
        if weight_out is not None:
            self.logger.hparam_histograms(self.step, hparams.names,
                                          weight_out["hparam_values"].numpy(),
                                          prefix="epoch_hparam_sample/")
        self.logger.flush()
        logging.info("epoch %d (%s) done in %.1fs: %s%s | %s", self.epoch + 1, phase,
                     time.time() - epoch_start, _format(metrics), " (best)" if improved else "",
                     _format(hparams.as_dict()))
        self.epoch += 1
        self.record["stop_reason"] = self.stop_reason()
        self.state.epoch.assign(self.epoch)
        self.save_record()
        if self.checkpoints is not None:
            self.checkpoints.save(self.step)
        return self.record["stop_reason"]

    def stop_reason(self) -> str:
        if self.schedule.stop_reason:
            return self.schedule.stop_reason
        if self.epoch >= self.config.epochs:
            return f"reached --epochs={self.config.epochs}"
        if self.step >= self.total_steps:
            return f"reached the step cap of {self.total_steps} weight steps"
        return ""

    def results(self) -> dict:
        """Restores the best state (if a tuning epoch ran) and returns the results dict."""
        tuned_epochs = [entry["epoch"] for entry in self.record["history"]
                        if entry["phase"] == "tune"]
        best_epoch = None
        if self.schedule.best_epoch >= 0:
            self.best.restore()
            best_epoch = tuned_epochs[self.schedule.best_epoch]
        else:
            logging.warning("no tuning epoch ran: the results are those of the final state.")
        trainer, state = self.trainer, self.state
        results = {f"val_{k}": v for k, v in trainer.evaluate_dataset(self.data.valid).items()}
        if self.data.test is not None:
            test_metrics = trainer.evaluate_dataset(self.data.test)
            results.update({f"test_{k}": v for k, v in test_metrics.items()})
            self.logger.scalars(self.step, test_metrics, "epoch/test_")
        train_seconds = float(state.train_seconds.numpy())
        hparams = trainer.hparams
        results.update({
            "best_epoch": best_epoch,
            "epochs_run": len(self.record["history"]),
            "stop_reason": self.record.get("stop_reason", ""),
            "stopped_early": bool(self.schedule.stop_reason),  # patience or the rate floor
            "weight_steps": self.step,
            "hyper_steps": self.hyper_steps,
            "skipped_nonfinite_steps": int(state.skipped.numpy()),
            "initial_hparams": self.record["initial_hparams"],
            "final_hparams": hparams.as_dict(),
            "final_scales": dict(zip(hparams.names, hparams.scale().numpy().tolist())),
            "trajectory": self.record["trajectory"],
            "history": self.record["history"],
            "wall_time_s": time.time() - self.start,
            "train_images_per_s": self.step * self.data.batch_size / max(train_seconds, 1e-9),
        })
        self.logger.flush()
        return results


def fit(trainer: StnTrainer, data: RunData, schedule_config: ScheduleConfig, logger: RunLogger,
        options: LoopOptions = LoopOptions(), checkpoints=None, loop_state: LoopState | None = None,
        on_epoch_end: Callable[[int, dict], None] | None = None, extend: bool = False,
        on_weight_step: Callable[[int], None] | None = None) -> dict:
    """Trains until the schedule stops, then restores the best-validation state.

    A resumed run carries on its schedule (validation losses, best epoch, patience) under the
    budget of `schedule_config` and `options`: a finished run given more epochs trains on.

    Warm-up epochs are evaluated and logged but stay outside the schedule: the best state, the
    learning-rate decay and patience only see tuning epochs, in tuned and frozen runs alike.

    Args:
      trainer: the compiled steps.
      data: batches.
      schedule_config: epochs, warm-up, cycle shape, decay and early stopping.
      logger: TensorBoard writer.
      options: logging, step cap, checkpoint cadence, non-finite policy.
      checkpoints: a `checkpoints.RunCheckpoints` (or None: nothing is saved, best state kept in
        memory); `loop_state` must be the one it saves. It has been restored already on resume.
      loop_state: the loop's progress; a new one starts from scratch.
      on_epoch_end: optional callback(epoch, entry) with the epoch's history entry.
      extend: train on past an early stop (patience, rate floor) of the resumed run.
      on_weight_step: optional callback(step) called at the start and after each weight step
        (step = weight steps done), before hyper steps and logging: a replay sets the
        hyperparameters of the next steps there.

    Returns:
      A results dict: best validation/test metrics, `best_epoch` (counted from 1 at the start of
      the run; None if no tuning epoch ran), initial/final hyperparameters, the hyperparameter
      trajectory, the per-epoch `history` (phase, validation metrics, learning rate), timings.

    Raises:
      NonFiniteError: with `on_nan="stop"`, naming the step and the quantity.
    """
    if options.on_nan not in ON_NAN_MODES:
        raise ValueError(f"on_nan must be one of {ON_NAN_MODES}, received {options.on_nan!r}.")
    loop = _Loop(trainer, data, schedule_config, logger, options, checkpoints,
                 loop_state or LoopState(), on_weight_step)
    if loop.step:
        logging.info("resuming at weight step %d (epoch %d)", loop.step, loop.epoch + 1)
    if extend and loop.schedule.stop_reason:
        logging.info("training on past the early stop (%s) at epoch %d", loop.schedule.stop_reason,
                     loop.epoch)
        loop.schedule.lift()
    stop_reason = loop.stop_reason()  # the budget's reasons are those of the budget given now
    while not stop_reason and loop.epoch < schedule_config.epochs:
        stop_reason = loop.run_epoch()
        if on_epoch_end is not None:
            on_epoch_end(loop.epoch - 1, loop.record["history"][-1])
    return loop.results()


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
