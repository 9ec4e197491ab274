"""Runs a study's `stn-train` processes, `parallel` at a time, resuming an interrupted study.

A run whose logdir holds results.json is finished and reused (if its settings match); a logdir
without results.json is resumed by rerunning the same command (stn-train continues from its
checkpoints); a run waits for the tuned run it needs. Each run's stdout and stderr are appended
to `<logdir>.log`; a failed run is reported with one line and the others proceed.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from typing import Callable, Sequence

from study.arms import Run, StudySettings, read_results

ELAPSED_SUFFIX = ".elapsed.json"
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


def elapsed_minutes(logdir: str) -> float | None:
    """Wall minutes the study's processes spent on a run over all sessions, if it kept a ledger.

    results.json's wall_time_s covers only the session that finished the run; a resumed run
    cost more.
    """
    path = logdir + ELAPSED_SUFFIX
    if not os.path.exists(path):
        return None
    with open(path) as handle:
        return sum(json.load(handle)["seconds"]) / 60.0


def set_elapsed_minutes(logdir: str, minutes: float) -> None:
    """Replaces the run's ledger by one session of `minutes` (a run restored from records)."""
    with open(logdir + ELAPSED_SUFFIX, "w") as handle:
        json.dump({"seconds": [minutes * 60.0]}, handle)


def _note_elapsed(logdir: str, session: int | None, seconds: float) -> int:
    """Sets the seconds of `session` in the run's ledger (None: a new one); returns its index."""
    path = logdir + ELAPSED_SUFFIX
    ledger = {"seconds": []}
    if os.path.exists(path):
        with open(path) as handle:
            ledger = json.load(handle)
    if session is None:
        session = len(ledger["seconds"])
        ledger["seconds"].append(0.0)
    ledger["seconds"][session] = seconds
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as handle:
        json.dump(ledger, handle)
    return session


def launch(command: Sequence[str], logdir: str) -> subprocess.Popen:
    """Starts one run, appending its output to `<logdir>.log`."""
    os.makedirs(os.path.dirname(os.path.abspath(logdir)), exist_ok=True)
    with open(logdir + ".log", "a") as log:
        return subprocess.Popen(list(command), stdout=log, stderr=subprocess.STDOUT,
                                env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"})


def run_all(runs: Sequence[Run], start: Callable[[Run], subprocess.Popen], parallel: int,
            poll_seconds: float = 5.0, sleep: Callable[[float], None] = time.sleep,
            on_finished: Callable[[Run], None] = lambda run: None,
            report: Callable[[str], None] = print,
            clock: Callable[[], float] = time.monotonic) -> dict[str, str]:
    """Runs every unfinished run; returns {logdir: why} of the runs that failed or could not run.

    `start(run)` launches a run and returns an object with `poll()` (a `subprocess.Popen`);
    `on_finished(run)` is called after each run that ends with results.json. If the study is
    interrupted (an exception, Ctrl-C), its running runs are stopped: rerunning resumes them.
    Each run's wall time per session is kept in `<logdir>.elapsed.json` (updated every poll,
    so a killed study loses at most one poll of it).
    """
    pending = [run for run in runs if read_results(run.logdir) is None]
    running: dict[str, list] = {}  # logdir -> [run, process, start time, ledger session]
    failed: dict[str, str] = {}
    try:
        while pending or running:
            _start_ready(pending, running, failed, start, parallel, report, clock)
            if not running:
                for run in pending:  # waiting for a tuned run neither planned nor finished
                    failed[run.logdir] = f"not run: {run.after} has no finished tuned run"
                    report(f"{run.name}: {failed[run.logdir]}")
                break
            sleep(poll_seconds)
            _collect_ended(running, failed, on_finished, report, clock)
    finally:
        for run, process, started, session in running.values():
            if process.poll() is None:
                process.terminate()
                process.wait()
                report(f"{run.name}: stopped (rerun the study to resume it)")
            _note_elapsed(run.logdir, session, clock() - started)
    return failed


def _start_ready(pending: list, running: dict, failed: dict, start, parallel: int,
                 report, clock) -> None:
    """Starts pending runs whose tuned run has finished, up to `parallel` running."""
    for run in list(pending):
        if len(running) >= parallel:
            return
        if run.after is not None and run.after in failed:
            pending.remove(run)
            failed[run.logdir] = f"not run: the tuned run {os.path.basename(run.after)} failed"
            report(f"{run.name}: {failed[run.logdir]}")
        elif run.after is None or (run.after not in running
                                   and read_results(run.after) is not None):
            pending.remove(run)
            resumed = os.path.isdir(run.logdir)
            try:
                running[run.logdir] = [run, start(run), clock(), None]
            except (OSError, ValueError) as error:
                failed[run.logdir] = f"failed to start: {error}"
                report(f"{run.name}: {failed[run.logdir]}")
                continue
            report(f"{run.name}: {'resumed' if resumed else 'started'}")


def _collect_ended(running: dict, failed: dict, on_finished, report, clock) -> None:
    for logdir, (run, process, started, session) in list(running.items()):
        code = process.poll()
        running[logdir][3] = _note_elapsed(logdir, session, clock() - started)
        if code is None:
            continue
        del running[logdir]
        if code == 0 and read_results(logdir) is not None:
            report(f"{run.name}: finished")
            on_finished(run)
        else:
            failed[logdir] = f"exit {code}: {failure_line(logdir + '.log')}"
            report(f"{run.name}: FAILED, {failed[logdir]} (log: {logdir}.log)")
