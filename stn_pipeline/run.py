"""One complete run: build the experiment, train, write results. What `stn-train` calls."""

from __future__ import annotations

import itertools
import os
import time
from typing import Iterable

import numpy as np
from absl import logging

from stn_pipeline import distribute, experiments, export, precision, resume
from stn_pipeline.checkpoints import RunCheckpoints, restore_trainer
from stn_pipeline.config import ConfigError, RunConfig, check_setting
from stn_pipeline.files import atomic_write, write_json
from stn_pipeline.replay import HParamTrajectory, replay_config
from stn_pipeline.summaries import RunLogger
from stn_pipeline.trainer import StnTrainer
from stn_pipeline.training import LoopState, fit

__all__ = ["ConfigError", "prepare_logdir", "run_experiment", "validate_config"]

RESULTS_FILE = resume.RESULTS_FILE
CONFIG_FILE = resume.CONFIG_FILE
FLAGS_FILE = "flags.txt"
METADATA_FILE = "metadata.json"  # what rebuilding the model needs (shapes, classes, normalisation)


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
    try:
        precision.check_precision(config.precision)  # the name, and whether the device can
    except precision.PrecisionError as error:
        raise ConfigError(str(error)) from None
    if not config.data.dataset.strip():
        raise ConfigError("--dataset is empty; give a TFDS name or folder:<dir>.")
    try:
        selection = experiments.hparam_specs(config)
    except ValueError as error:
        raise ConfigError(str(error)) from None
    if config.network == "plain" and config.trainer.tune:
        raise ConfigError("--network=plain has no hypernetwork to tune its hyperparameters; "
                          "drop --tune=true (plain runs train at fixed or replayed values).")
    if config.replay and config.network != "plain":
        raise ConfigError(f"--replay trains the plain network; drop --network={config.network}.")
    if config.replay and config.loop.cycles_per_execution > 1:
        # The replayed values change between weight steps, which one compiled call cannot see.
        raise ConfigError("--replay sets the hyperparameters before every weight step; use "
                          "--cycles_per_execution=1.")
    if config.replay:  # missing, unfinished, another experiment, other hyperparameters
        HParamTrajectory.from_run(config.replay, experiment=config.experiment,
                                  names=[spec.name for spec in selection.tuned])


def prepare_logdir(logdir: str, overwrite: bool) -> bool:
    """Creates `logdir`, or moves the run it holds aside; returns True to resume it.

    Whether the run it holds may be resumed is `resume`'s question, asked before. `overwrite`
    moves whatever `logdir` holds to `<logdir>.old-<timestamp>`: results are never deleted.
    """
    config_path = os.path.join(logdir, CONFIG_FILE)
    holds_run = os.path.exists(config_path) or os.path.exists(os.path.join(logdir, RESULTS_FILE))
    if not holds_run and os.path.isdir(logdir) and os.listdir(logdir) and not overwrite:
        raise ConfigError(f"--logdir={logdir} is not empty and holds no stn-train run; choose "
                          "another --logdir or pass --overwrite to move it aside.")
    if overwrite and os.path.isdir(logdir) and os.listdir(logdir):
        base = aside = f"{logdir.rstrip(os.sep)}.old-{time.strftime('%Y%m%d-%H%M%S')}"
        for suffix in itertools.count(1):  # two overwrites within a second get distinct names
            if not os.path.exists(aside):
                break
            aside = f"{base}-{suffix}"
        os.rename(logdir, aside)
        logging.warning("moved the previous run in %s to %s", logdir, aside)
    resume_run = os.path.exists(config_path)
    try:
        os.makedirs(logdir, exist_ok=True)
        probe = os.path.join(logdir, ".write_test")
        with open(probe, "w"):
            pass
        os.remove(probe)
    except OSError as error:
        raise ConfigError(f"--logdir={logdir} is not writable: {error.strerror}.") from None
    return resume_run


def run_experiment(config: RunConfig, logdir: str, overwrite: bool = False,
                   flagfile_text: str | None = None, restore_fallback: bool = False,
                   init_from: str | None = None, strategy=None,
                   given: Iterable[str] | None = None, extend: bool = False) -> dict:
    """Validates `config`, trains, and writes `results.json` and TensorBoard logs to `logdir`.

    Rerunning with the same `logdir` resumes from the latest checkpoint (`resume`): the stored
    configuration with the settings in `given` (flag names; None: all of `config`) applied, which
    may change only the budget and cadence settings of `resume.RESUMABLE`. A finished run given
    a larger budget trains on (an extension); one that stopped early only with `extend`.
    `flagfile_text`, if given, is saved as `<logdir>/flags.txt` (rerun with `--flagfile`).
    `restore_fallback` resumes from an older checkpoint when the newest is damaged.
    `init_from` starts a new run from a trainer checkpoint (e.g. written by a reloaded trainer
    export with `tf.train.Checkpoint(trainer=loaded).write(...)`); the loop counters start at 0.
    `strategy` (from `distribute.make_strategy`) trains under `tf.distribute`, `batch_size` being
    the global batch; only its chief writes `logdir` (others write to a removed temp folder).
    """
    config = replay_config(config)
    stored = None if overwrite else resume.read_stored_run(logdir)
    if stored is not None:
        config = resume.resumed_config(stored, config, given)
    validate_config(config)
    if stored is not None:
        resume.check_more_to_train(stored, config, extend)
    elif extend:
        logging.warning("--extend has no effect: --logdir=%s holds no run to extend.", logdir)
    for message in config.schedule.inactive_settings():
        logging.warning("%s.", message)
    replicas = strategy.num_replicas_in_sync if strategy is not None else 1
    if config.data.batch_size % replicas:
        raise ConfigError(f"--batch_size={config.data.batch_size} (the global batch) must be a "
                          f"multiple of the {replicas} replicas.")
    with distribute.worker_logdir(logdir, strategy) as write_dir:
        return _run(config, logdir, write_dir, overwrite, flagfile_text, restore_fallback,
                    init_from, strategy, extend)


def _write_flags(logdir: str, flagfile_text: str) -> None:
    path = os.path.join(logdir, FLAGS_FILE)
    if os.path.exists(path):  # a resumed run: the flags not given now keep their stored lines
        with open(path) as handle:
            flagfile_text = resume.merge_flag_lines(handle.read(), flagfile_text)
    with atomic_write(path) as handle:
        handle.write(flagfile_text)


def _run(config, logdir, write_dir, overwrite, flagfile_text, restore_fallback, init_from,
         strategy, extend):
    # A run that finished before wrote its HParams settings record then (TensorBoard keeps one).
    finished_before = os.path.exists(os.path.join(logdir, RESULTS_FILE)) and not overwrite
    if write_dir == logdir:  # the chief, or the only worker
        resume_run = prepare_logdir(logdir, overwrite)
        if flagfile_text is not None:
            _write_flags(logdir, flagfile_text)
        write_json(os.path.join(logdir, CONFIG_FILE), config.to_dict())
    else:
        # The chief checks the logdir; this worker resumes from its checkpoints if any (the
        # chief saves none before this worker has joined the first collective step).
        os.makedirs(write_dir)
        resume_run = not overwrite
    resume_dir, logdir = logdir, write_dir
    with distribute.scope(strategy):
        # Every variable (model, hyperparameters, generators, optimizer slots) is created in
        # the strategy scope, so each is mirrored over the replicas.
        experiment = experiments.build_experiment(config)
        precision.apply_precision(experiment.model, config.precision)
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
    restored = checkpoints.restore_latest() if resume_run else None
    if resume_run:
        logging.info("resuming from %s", restored or "scratch (no checkpoint was written yet)")
    if init_from and restored:
        logging.warning("--init_from=%s has no effect: the run resumes from its own checkpoint "
                        "%s.", init_from, restored)
    elif init_from:
        restore_trainer(trainer, init_from)
        logging.info("initialised the trainer from %s", init_from)
    logger = RunLogger(logdir)
    logging.info("experiment %s: %d hyperparameters %s, %d weight steps per epoch",
                 config.experiment, experiment.hparams.size, list(experiment.hparams.names),
                 experiment.data.steps_per_epoch)
    results = fit_and_record(trainer, experiment, config, logger, checkpoints, loop_state,
                             extend=extend, with_settings=not finished_before,
                             on_weight_step=_replay_hook(config, experiment))
    logger.close()
    write_json(os.path.join(logdir, RESULTS_FILE), results)
    logging.info("results written to %s", os.path.join(logdir, RESULTS_FILE))
    # The model is at its best-validation state (fit restored it): checkpoint and export it,
    # in float32 at every precision (the folded kernels are float32 anyway).
    precision.apply_precision(experiment.model, "float32")
    results.update(export.export_run(logdir, experiment.model, experiment.hparams,
                                     experiment.input_spec, results))
    write_json(os.path.join(logdir, RESULTS_FILE), results)
    logging.info("best checkpoint %s, SavedModel %s", results["checkpoint_path"],
                 results["export_path"])
    return results


def _replay_hook(config: RunConfig, experiment: experiments.Experiment):
    """`fit`'s `on_weight_step` for `--replay` (None otherwise): the HOLD rule, after s weight
    steps the source's values logged at its last logged step <= s."""
    if not config.replay:
        return None
    trajectory = HParamTrajectory.from_run(config.replay, experiment=config.experiment,
                                           names=experiment.hparams.names,
                                           metadata=experiment.metadata)
    planned = config.schedule.epochs * experiment.data.steps_per_epoch
    if planned < trajectory.weight_steps:
        logging.warning("--replay=%s trained %d weight steps; --epochs=%d gives only %d.",
                        config.replay, trajectory.weight_steps, config.schedule.epochs, planned)

    def on_weight_step(step: int) -> None:
        experiment.hparams.assign_values(trajectory.values_at(step))
    return on_weight_step


def fit_and_record(trainer: StnTrainer, experiment: experiments.Experiment,
                   config: RunConfig, logger: RunLogger,
                   checkpoints: RunCheckpoints | None = None,
                   loop_state: LoopState | None = None, extend: bool = False,
                   with_settings: bool = True, on_weight_step=None) -> dict:
    """Trains and returns the results with the config and HParams summary attached.

    `extend` trains on past an early stop of a resumed run; `with_settings` writes the HParams
    settings record (once per run: False for an extension of a finished run);
    `on_weight_step` is `fit`'s hook (a replay sets the hyperparameters there).
    """
    results = fit(trainer, experiment.data, config.schedule, logger, config.loop, checkpoints,
                  loop_state, extend=extend, on_weight_step=on_weight_step)
    results["config"] = config.to_dict()
    results["method"] = config.trainer.method
    results["metadata"] = experiment.metadata
    results["network"] = config.network
    weights = trainer.weights + (trainer.response_weights if trainer.response_optimizer else [])
    results["num_parameters"] = sum(int(np.prod(v.shape)) for v in weights)
    results["fixed_hparams"] = experiment.hparams.fixed_values
    settings = config.as_flags()
    settings.update({f"init/{k}": v for k, v in results["initial_hparams"].items()})
    final = {f"final/{k}": v for k, v in results["final_hparams"].items()}
    final.update({f"final/{k}": results[k] for k in results
                  if k.startswith(("val_", "test_")) and isinstance(results[k], float)})
    logger.run_summary(settings, final, step=results["weight_steps"], with_settings=with_settings)
    return results
