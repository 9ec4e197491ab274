"""Rerunning a run: which settings may change, and whether a finished run has more to train.

Resuming is rerunning: the configuration of a resumed run is its stored config.json overridden
by the flags given now, so a flag left out keeps its stored value (not the experiment default).
A given flag that differs from the stored value is applied, and logged in one line, when it only
changes how long the run trains or what it writes on the way (`RESUMABLE`); any other difference
(model, data, hyperparameters, seeds, optimizer, schedule) is refused in one line naming each
flag. A finished run trains on when the budget given now is larger (an extension); one that
stopped early (patience, learning-rate floor) only when asked with `--extend`.
"""

from __future__ import annotations

import dataclasses
import glob
import json
import os
from typing import Iterable

import tensorflow as tf
from absl import logging

from stn_pipeline.config import FLAGS, ConfigError, RunConfig, load_config

__all__ = ["RESUMABLE", "StoredRun", "check_more_to_train", "merge_flag_lines",
           "read_stored_run", "resumed_config"]

RESULTS_FILE = "results.json"
CONFIG_FILE = "config.json"

# Settings that may change on resume: the budget (an extension), logging and checkpoint cadence
# and retention, and the policy for non-finite steps (a run that meets none trains the same; a
# skipped step is counted). Not `patience`, `nonmono` and the like: they are the schedule.
# Also how the same steps are computed: `precision` (checkpoints are float32 at either) and
# `cycles_per_execution` (the same steps in the same order, grouped into fewer calls).
RESUMABLE = frozenset({"epochs", "max_steps", "log_every", "checkpoint_every",
                       "keep_checkpoints", "on_nan", "precision", "cycles_per_execution"})


@dataclasses.dataclass(frozen=True, kw_only=True)
class StoredRun:
    """What a `--logdir` holds.

    Attributes:
      logdir: the folder.
      config: its config.json.
      results: its results.json when the run finished and no later training followed (None for
        an unfinished run, or an extension interrupted after its first checkpoint).
      latest: the newest resume checkpoint (prefix), or None.
    """

    logdir: str
    config: RunConfig
    results: dict | None
    latest: str | None


def read_stored_run(logdir: str) -> StoredRun | None:
    """The run in `logdir`; None when it holds none (neither config.json nor results.json, or
    only the config.json of an attempt that never trained: no checkpoint, no summaries).

    Raises:
      ConfigError: when one of them exists but cannot be read.
    """
    paths = {name: os.path.join(logdir, name) for name in (CONFIG_FILE, RESULTS_FILE)}
    if not any(os.path.exists(path) for path in paths.values()):
        return None
    name, results = CONFIG_FILE, None
    try:
        config = load_config(paths[CONFIG_FILE])
        if os.path.exists(paths[RESULTS_FILE]):
            name = RESULTS_FILE
            with open(paths[RESULTS_FILE]) as handle:
                results = json.load(handle)
            results["weight_steps"], results["epochs_run"]  # noqa: B018 -- both must be there
    except (OSError, ValueError, TypeError, KeyError) as error:
        reason = getattr(error, "strerror", None) or f"{type(error).__name__}: {error}"
        raise ConfigError(f"--logdir={logdir} already holds a run whose {name} cannot be read "
                          f"({reason}); pass --overwrite to move it aside and start "
                          "anew.") from None
    latest = tf.train.latest_checkpoint(os.path.join(logdir, "checkpoints"))
    if results is None and latest is None and not glob.glob(os.path.join(logdir, "events.*")):
        # An attempt that stopped before training (e.g. its data could not be read): nothing to
        # resume or protect, so the settings given now start the run anew.
        logging.warning("--logdir=%s holds an attempt that never trained; starting anew.",
                        logdir)
        return None
    if results is not None and latest and _step(latest) > results["weight_steps"]:
        results = None  # an extension was interrupted: its checkpoints are newer than results
    return StoredRun(logdir=logdir, config=config, results=results, latest=latest)


def _step(checkpoint: str) -> int:
    return int(checkpoint.rsplit("-", 1)[-1])


def resumed_config(stored: StoredRun, requested: RunConfig,
                   given: Iterable[str] | None = None) -> RunConfig:
    """The configuration of the resumed run: the stored one with the given settings applied.

    Args:
      stored: the run being resumed.
      requested: the configuration built from the command line.
      given: the flag names given on the command line; None: every setting of `requested`
        (a configuration built in Python).

    Raises:
      ConfigError: naming every given setting that differs and may not change on resume.
    """
    old, new = stored.config.as_flags(), requested.as_flags()
    names = new if given is None else [name for name in given if name in FLAGS]
    changed = {name: new[name] for name in sorted(names) if new[name] != old[name]}
    fixed = [name for name in changed if name not in RESUMABLE]
    if fixed:
        way_out = "pass --overwrite to move it aside and start anew"
        if stored.latest:
            way_out += (", or train a new --logdir from its last state with "
                        f"--init_from={stored.latest}")
        raise ConfigError(
            f"--logdir={stored.logdir} holds a run whose settings differ from those given, which "
            "cannot change on resume (stored -> given: "
            + "; ".join(f"--{name}: {old[name]!r} -> {changed[name]!r}" for name in fixed)
            + f"); {way_out}.")
    if changed:
        logging.info("resuming with changed settings: %s",
                     ", ".join(f"--{name} {old[name]} -> {value}"
                               for name, value in changed.items()))
    return stored.config.override(**changed)


def check_more_to_train(stored: StoredRun, config: RunConfig, extend: bool) -> None:
    """Checks that resuming `stored` under `config` trains something, or says why not.

    Raises:
      ConfigError: for a finished run whose budget `config` does not raise, and for a run that
        stopped early (patience, learning-rate floor) unless `extend`.
    """
    results = stored.results
    if results is None:
        if extend:
            logging.warning("--extend has no effect: --logdir=%s holds an unfinished run, which "
                            "resumes as it is.", stored.logdir)
        return
    epochs_run, steps = results["epochs_run"], results["weight_steps"]
    reason = results.get("stop_reason", "")
    # results.json of runs written before `stopped_early` existed: budget reasons say "reached".
    early = results.get("stopped_early", bool(reason) and not reason.startswith("reached"))
    epochs, max_steps = config.schedule.epochs, config.loop.max_steps
    raise_budget = [f"a larger --epochs (now {epochs})"] if epochs <= epochs_run else []
    if max_steps and max_steps <= steps:
        raise_budget.append(f"a larger --max_steps (now {max_steps}; 0: no cap)")
    if early and not extend:
        raise ConfigError(f"--logdir={stored.logdir} holds a run that stopped early after "
                          f"{epochs_run} epochs ({reason}); pass --extend to train on past the "
                          "stop" + "".join(f" with {what}" for what in raise_budget[:1])
                          + ", or --overwrite to move it aside and start anew.")
    if raise_budget:
        raise ConfigError(f"--logdir={stored.logdir} holds a finished run ({reason}: "
                          f"{epochs_run} epochs, {steps} weight steps); to train it further "
                          f"rerun with {' and '.join(raise_budget)}, or pass --overwrite to "
                          "move it aside and start anew.")
    logging.info("extending the finished run (%s: %d epochs) to --epochs=%d%s", reason,
                 epochs_run, epochs, f" --max_steps={max_steps}" if max_steps else "")


def merge_flag_lines(stored_text: str, given_text: str) -> str:
    """flags.txt of a resumed run: the stored lines of every flag not given now, then the given.

    Lines are `--name=value`, `--name` or `--noname` (absl's serialisation of booleans).
    """
    def name(line: str) -> str:
        return line.strip().lstrip("-").split("=", 1)[0]

    given = {name(line) for line in given_text.splitlines() if line.strip()}
    given |= {f"no{flag}" for flag in given} | {flag[2:] for flag in given if flag[:2] == "no"}
    kept = [line for line in stored_text.splitlines() if line.strip() and name(line) not in given]
    return "".join(line + "\n" for line in kept) + given_text
