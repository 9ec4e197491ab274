"""One complete run: build the experiment, train, write results. What `stn-train` calls."""

from __future__ import annotations

import dataclasses
import os
import time

from absl import logging

from stn_pipeline import experiments
from stn_pipeline.summaries import RunLogger, write_json
from stn_pipeline.trainer import StnTrainer

__all__ = ["ConfigError", "prepare_logdir", "run_experiment", "validate_config"]

RESULTS_FILE = "results.json"
CONFIG_FILE = "config.json"


class ConfigError(ValueError):
    """A setting that cannot work, reported as one line naming the flag."""


_POSITIVE = ("batch_size", "epochs", "train_steps", "log_every", "toy_depth", "toy_width",
             "toy_train_size")
_NON_NEGATIVE = ("max_steps", "warmup_epochs", "hyper_steps", "nonmono", "patience",
                 "max_examples", "tau")
_POSITIVE_FLOAT = ("weight_lr", "hyper_lr", "scale_lr", "toy_r0")


def validate_config(config: experiments.RunConfig) -> None:
    """Raises `ConfigError` for the first setting that is out of range."""
    if config.experiment not in experiments.EXPERIMENTS:
        raise ConfigError(f"--experiment={config.experiment!r} is unknown; choose one of "
                          f"{sorted(experiments.EXPERIMENTS)}.")
    for name in _POSITIVE + _POSITIVE_FLOAT:
        if not getattr(config, name) > 0:
            raise ConfigError(f"--{name} must be > 0, received {getattr(config, name)}.")
    for name in _NON_NEGATIVE:
        if getattr(config, name) < 0:
            raise ConfigError(f"--{name} must be >= 0, received {getattr(config, name)}.")
    if not 0 < config.valid_fraction < 1:
        raise ConfigError(f"--valid_fraction must be in (0, 1), received {config.valid_fraction}.")
    if config.weight_optimizer not in ("sgd", "adam"):
        raise ConfigError(f"--weight_optimizer must be 'sgd' or 'adam', received "
                          f"{config.weight_optimizer!r}.")


def prepare_logdir(logdir: str, overwrite: bool) -> None:
    """Creates `logdir`; refuses to reuse one that holds results unless `overwrite`.

    With `overwrite`, the old run is moved aside to `<logdir>.old-<timestamp>`, never deleted.
    """
    if os.path.exists(os.path.join(logdir, RESULTS_FILE)):
        if not overwrite:
            raise ConfigError(f"--logdir={logdir} already holds a finished run ({RESULTS_FILE}); "
                              "choose another --logdir or pass --overwrite to move it aside.")
        aside = f"{logdir.rstrip(os.sep)}.old-{time.strftime('%Y%m%d-%H%M%S')}"
        os.rename(logdir, aside)
        logging.warning("moved the previous run in %s to %s", logdir, aside)
    try:
        os.makedirs(logdir, exist_ok=True)
        probe = os.path.join(logdir, ".write_test")
        with open(probe, "w"):
            pass
        os.remove(probe)
    except OSError as error:
        raise ConfigError(f"--logdir={logdir} is not writable: {error.strerror}.") from None


def run_experiment(config: experiments.RunConfig, logdir: str, overwrite: bool = False,
                   flagfile_text: str | None = None) -> dict:
    """Validates `config`, trains, and writes `results.json` and TensorBoard logs to `logdir`.

    `flagfile_text`, if given, is saved as `<logdir>/flags.txt` (rerun with `--flagfile`).
    """
    validate_config(config)
    prepare_logdir(logdir, overwrite)
    if flagfile_text is not None:
        with open(os.path.join(logdir, "flags.txt"), "w") as handle:
            handle.write(flagfile_text)
    write_json(os.path.join(logdir, CONFIG_FILE), dataclasses.asdict(config))
    experiment = experiments.build_experiment(config)
    trainer = StnTrainer(experiment.model, experiment.hparams, experiment.input_spec,
                         experiment.target_spec, config.trainer_config())
    logger = RunLogger(logdir)
    logging.info("experiment %s: %d hyperparameters %s, %d weight steps per epoch",
                 config.experiment, experiment.hparams.size, list(experiment.hparams.names),
                 experiment.data.steps_per_epoch)
    results = fit_and_record(trainer, experiment, config, logger)
    logger.close()
    write_json(os.path.join(logdir, RESULTS_FILE), results)
    logging.info("results written to %s", os.path.join(logdir, RESULTS_FILE))
    return results


def fit_and_record(trainer: StnTrainer, experiment: experiments.Experiment,
                   config: experiments.RunConfig, logger: RunLogger) -> dict:
    """Trains and returns the results with the config and HParams summary attached."""
    from stn_pipeline.training import fit  # local: keeps the import graph one-way
    results = fit(trainer, experiment.data, config.schedule_config(), logger,
                  log_every=config.log_every, max_steps=config.max_steps)
    results["config"] = dataclasses.asdict(config)
    results["metadata"] = experiment.metadata
    settings = dataclasses.asdict(config)
    settings.update({f"init/{k}": v for k, v in results["initial_hparams"].items()})
    final = {f"final/{k}": v for k, v in results["final_hparams"].items()}
    final.update({f"final/{k}": results[k] for k in results
                  if k.startswith(("val_", "test_")) and isinstance(results[k], float)})
    logger.run_summary(settings, final)
    return results
