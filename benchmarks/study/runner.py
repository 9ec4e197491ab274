"""Runs a study's `stn-train` processes, `parallel` at a time, resuming an interrupted study.

A run whose logdir holds results.json is finished and reused (if its settings match); a logdir
without results.json is resumed by rerunning the same command (stn-train continues from its
checkpoints); a run waits for the tuned run it needs. Each run's stdout and stderr are appended
to `<logdir>.log`; a failed run is reported with one line and the others proceed.
"""

from __future__ import annotations

import os
import subprocess
import time
from typing import Callable, Sequence

from study.arms import Run, StudySettings, read_results

# Settings of a finished run that must match the study's for the run to be reused.
_CHECKED = ("experiment", "dataset", "epochs", "max_examples", "seed", "precision")


def mismatch(run: Run, settings: StudySettings, results: dict) -> str | None:
    """Why a finished run cannot be reused for `run`, or None if its settings match."""
    config = results.get("config", {})
    planned = {"experiment": settings.experiment, "dataset": settings.dataset,
               "epochs": settings.epochs, "max_examples": settings.max_examples,
               "seed": run.seed, "precision": settings.precision}
    differences = [f"--{key}={config[key]!r} (study: {planned[key]!r})" for key in _CHECKED
                   if key in config and config[key] != planned[key]]
    if not differences:
        return None
    return (f"{run.logdir} holds a finished run with other settings: {', '.join(differences)}; "
            "use another --rundir")


def failure_line(log_path: str) -> str:
    """The line of a run's log that says why it failed (a rejected flag, else the last line)."""
    try:
        with open(log_path, errors="replace") as handle:
            lines = [line.strip() for line in handle if line.strip()]
    except OSError:
        return f"no log at {log_path}"
    rejected = [line for line in lines if "Flags parsing error" in line]
    if rejected:
        return (f"stn-train rejects a flag ({rejected[-1].split('error:', 1)[-1].strip()}): "
                "this stn-train lacks a flag the arm needs")
    return lines[-1] if lines else f"empty log {log_path}"


def launch(command: Sequence[str], logdir: str) -> subprocess.Popen:
    """Starts one run, appending its output to `<logdir>.log`."""
    os.makedirs(os.path.dirname(os.path.abspath(logdir)), exist_ok=True)
    with open(logdir + ".log", "a") as log:
        return subprocess.Popen(list(command), stdout=log, stderr=subprocess.STDOUT,
                                env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"})


def run_all(runs: Sequence[Run], start: Callable[[Run], subprocess.Popen], parallel: int,
            poll_seconds: float = 5.0, sleep: Callable[[float], None] = time.sleep,
            on_finished: Callable[[Run], None] = lambda run: None,
            report: Callable[[str], None] = print) -> dict[str, str]:
    """Runs every unfinished run; returns {logdir: why} of the runs that failed or could not run.

    `start(run)` launches a run and returns an object with `poll()` (a `subprocess.Popen`);
    `on_finished(run)` is called after each run that ends with results.json.
    """
    pending = [run for run in runs if read_results(run.logdir) is None]
    running: dict[str, tuple[Run, object]] = {}
    failed: dict[str, str] = {}
    while pending or running:
        for run in list(pending):
            if len(running) >= parallel:
                break
            if run.after is not None and run.after in failed:
                pending.remove(run)
                failed[run.logdir] = f"not run: the tuned run {os.path.basename(run.after)} failed"
                report(f"{run.name}: {failed[run.logdir]}")
            elif run.after is None or (run.after not in running
                                       and read_results(run.after) is not None):
                pending.remove(run)
                resumed = os.path.isdir(run.logdir)
                try:
                    running[run.logdir] = (run, start(run))
                except (OSError, ValueError) as error:
                    failed[run.logdir] = str(error)
                    report(f"{run.name}: failed to start: {error}")
                    continue
                report(f"{run.name}: {'resumed' if resumed else 'started'}")
        if not running:
            for run in pending:  # waiting for a tuned run that is neither planned nor finished
                failed[run.logdir] = f"not run: {run.after} has no finished tuned run"
                report(f"{run.name}: {failed[run.logdir]}")
            break
        sleep(poll_seconds)
        for logdir, (run, process) in list(running.items()):
            code = process.poll()
            if code is None:
                continue
            del running[logdir]
            if code == 0 and read_results(logdir) is not None:
                report(f"{run.name}: finished")
                on_finished(run)
            else:
                failed[logdir] = f"exit {code}: {failure_line(logdir + '.log')}"
                report(f"{run.name}: FAILED, {failed[logdir]} (log: {logdir}.log)")
    return failed
