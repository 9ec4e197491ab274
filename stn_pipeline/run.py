"""One complete run: build the experiment, train, write results. What `stn-train` calls."""

from __future__ import annotations

import itertools
import os
import time

from absl import logging

from stn_pipeline import distribute, experiments, export
from stn_pipeline.checkpoints import RunCheckpoints, restore_trainer
from stn_pipeline.config import ConfigError, RunConfig, check_setting, load_config
from stn_pipeline.summaries import RunLogger, write_json
from stn_pipeline.trainer import StnTrainer
from stn_pipeline.training import LoopState, fit

__all__ = ["ConfigError", "prepare_logdir", "run_experiment", "validate_config"]

RESULTS_FILE = "results.json"
CONFIG_FILE = "config.json"
METADATA_FILE = "metadata.json"  # what rebuilding the model needs (shapes, classes, normalisation)


# Settings that may change when a run is resumed: they do not change what is being trained.
_RESUMABLE = {"epochs", "max_steps", "log_every", "checkpoint_every", "keep_checkpoints",
              "on_nan", "patience"}


def validate_config(config: RunConfig) -> None:
    """Raises `ConfigError` for the first setting that cannot work, before any heavy work."""
    if config.experiment not in experiments.EXPERIMENTS:
        raise ConfigError(f"--experiment={config.experiment!r} is unknown; choose one of "
                          f"{sorted(experiments.EXPERIMENTS)}.")
    for flag, value in config.as_flags().items():
        check_setting(flag, value)
    schedule = config.schedule
    if config.trainer.tune and schedule.hyper_steps == 0:
        raise ConfigError("--hyper_steps=0 with --tune=true never tunes; use --tune=false for "
                          "a fixed-hyperparameter run.")
    if config.trainer.tune and schedule.warmup_epochs >= schedule.epochs:
        raise ConfigError(f"--warmup_epochs={schedule.warmup_epochs} leaves no epoch of tuning "
                          f"within --epochs={schedule.epochs}.")
    if not config.data.dataset.strip():
        raise ConfigError("--dataset is empty; give a TFDS name or folder:<dir>.")
    try:
        experiments.hparam_specs(config)
    except ValueError as error:
        raise ConfigError(str(error)) from None


def _differences(old: RunConfig, new: RunConfig) -> list[str]:
    """The settings that differ, named by their flags (resumable ones excepted)."""
    old_flags, new_flags = old.as_flags(), new.as_flags()
    return [f"--{k}: {old_flags[k]!r} -> {new_flags[k]!r}" for k in sorted(old_flags)
            if k not in _RESUMABLE and old_flags[k] != new_flags[k]]


def prepare_logdir(logdir: str, config: RunConfig, overwrite: bool) -> bool:
    """Creates `logdir` or checks that it holds the same run; returns True to resume it.

    A logdir with a finished run (results.json) or a run of another configuration is refused
    unless `overwrite`, which moves the old run aside to `<logdir>.old-<timestamp>`: results are
    never deleted.
    """
    config_path = os.path.join(logdir, CONFIG_FILE)
    problem = None
    if os.path.exists(os.path.join(logdir, RESULTS_FILE)):
        problem = f"--logdir={logdir} already holds a finished run ({RESULTS_FILE})"
    elif os.path.exists(config_path):
        try:
            differences = _differences(load_config(config_path), config)
        except (ValueError, TypeError) as error:
            differences = [f"its {CONFIG_FILE} cannot be read: {error}"]
        if differences:
            problem = (f"--logdir={logdir} holds a run with another configuration ("
                       + "; ".join(differences) + ")")
    elif os.path.isdir(logdir) and os.listdir(logdir):
        problem = f"--logdir={logdir} is not empty and holds no stn-train run"
    if problem and not overwrite:
        raise ConfigError(problem + "; choose another --logdir or pass --overwrite to move it "
                          "aside.")
    if problem:
        base = aside = f"{logdir.rstrip(os.sep)}.old-{time.strftime('%Y%m%d-%H%M%S')}"
        for suffix in itertools.count(1):  # two overwrites within a second get distinct names
            if not os.path.exists(aside):
                break
            aside = f"{base}-{suffix}"
        os.rename(logdir, aside)
        logging.warning("moved the previous run in %s to %s", logdir, aside)
    resume = os.path.exists(config_path)
    try:
        os.makedirs(logdir, exist_ok=True)
        probe = os.path.join(logdir, ".write_test")
        with open(probe, "w"):
            pass
        os.remove(probe)
    except OSError as error:
        raise ConfigError(f"--logdir={logdir} is not writable: {error.strerror}.") from None
    return resume


def run_experiment(config: RunConfig, logdir: str, overwrite: bool = False,
                   flagfile_text: str | None = None, restore_fallback: bool = False,
                   init_from: str | None = None, strategy=None) -> dict:
    """Validates `config`, trains, and writes `results.json` and TensorBoard logs to `logdir`.

    Rerunning with the same `logdir` and configuration resumes from the latest checkpoint.
    `flagfile_text`, if given, is saved as `<logdir>/flags.txt` (rerun with `--flagfile`).
    `restore_fallback` resumes from an older checkpoint when the newest is damaged.
    `init_from` starts a new run from a trainer checkpoint (e.g. written by a reloaded trainer
    export with `tf.train.Checkpoint(trainer=loaded).write(...)`); the loop counters start at 0.
    `strategy` (from `distribute.make_strategy`) trains under `tf.distribute`, `batch_size` being
    the global batch; only its chief writes `logdir` (others write to a removed temp folder).
    """
    validate_config(config)
    for message in config.schedule.inactive_settings():
        logging.warning("%s.", message)
    replicas = strategy.num_replicas_in_sync if strategy is not None else 1
    if config.data.batch_size % replicas:
        raise ConfigError(f"--batch_size={config.data.batch_size} (the global batch) must be a "
                          f"multiple of the {replicas} replicas.")
    with distribute.worker_logdir(logdir, strategy) as write_dir:
        return _run(config, logdir, write_dir, overwrite, flagfile_text, restore_fallback,
                    init_from, strategy)


def _run(config, logdir, write_dir, overwrite, flagfile_text, restore_fallback, init_from,
         strategy):
    if write_dir == logdir:  # the chief, or the only worker
        resume = prepare_logdir(logdir, config, overwrite)
        if flagfile_text is not None:
            with open(os.path.join(logdir, "flags.txt"), "w") as handle:
                handle.write(flagfile_text)
        write_json(os.path.join(logdir, CONFIG_FILE), config.to_dict())
    else:
        # The chief checks the logdir; this worker resumes from its checkpoints if any (the
        # chief saves none before this worker has joined the first collective step).
        os.makedirs(write_dir)
        resume = not overwrite
    resume_dir, logdir = logdir, write_dir
    with distribute.scope(strategy):
        # Every variable (model, hyperparameters, generators, optimizer slots) is created in
        # the strategy scope, so each is mirrored over the replicas.
        experiment = experiments.build_experiment(config)
        if write_dir == resume_dir:
            write_json(os.path.join(resume_dir, METADATA_FILE), experiment.metadata)
        trainer = StnTrainer(experiment.model, experiment.hparams, experiment.input_spec,
                             experiment.target_spec, config.trainer, seed=config.seed,
                             strategy=strategy)
    # Outside the scope: the loop's counters are only touched eagerly, and its string record
    # cannot be broadcast between workers (string collectives do not exist).
    loop_state = LoopState()
    checkpoints = RunCheckpoints(logdir, trainer, loop_state, config.keep_checkpoints,
                                 fallback=restore_fallback, restore_from=resume_dir)
    restored = checkpoints.restore_latest() if resume else None
    if resume:
        logging.info("resuming from %s", restored or "scratch (no checkpoint was written yet)")
    if init_from and not restored:
        restore_trainer(trainer, init_from)
        logging.info("initialised the trainer from %s", init_from)
    logger = RunLogger(logdir)
    logging.info("experiment %s: %d hyperparameters %s, %d weight steps per epoch",
                 config.experiment, experiment.hparams.size, list(experiment.hparams.names),
                 experiment.data.steps_per_epoch)
    results = fit_and_record(trainer, experiment, config, logger, checkpoints, loop_state)
    logger.close()
    write_json(os.path.join(logdir, RESULTS_FILE), results)
    logging.info("results written to %s", os.path.join(logdir, RESULTS_FILE))
    # The model is at its best-validation state (fit restored it): checkpoint and export it.
    results.update(export.export_run(logdir, experiment.model, experiment.hparams,
                                     experiment.input_spec, results))
    write_json(os.path.join(logdir, RESULTS_FILE), results)
    logging.info("best checkpoint %s, SavedModel %s", results["checkpoint_path"],
                 results["export_path"])
    return results


def fit_and_record(trainer: StnTrainer, experiment: experiments.Experiment,
                   config: RunConfig, logger: RunLogger,
                   checkpoints: RunCheckpoints | None = None,
                   loop_state: LoopState | None = None) -> dict:
    """Trains and returns the results with the config and HParams summary attached."""
    results = fit(trainer, experiment.data, config.schedule, logger, config.loop, checkpoints,
                  loop_state)
    results["config"] = config.to_dict()
    results["method"] = config.trainer.method
    results["metadata"] = experiment.metadata
    settings = config.as_flags()
    settings.update({f"init/{k}": v for k, v in results["initial_hparams"].items()})
    final = {f"final/{k}": v for k, v in results["final_hparams"].items()}
    final.update({f"final/{k}": results[k] for k in results
                  if k.startswith(("val_", "test_")) and isinstance(results[k], float)})
    logger.run_summary(settings, final)
    return results
