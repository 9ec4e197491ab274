"""The study's records: one JSON file, `{"study": {...}, "runs": [...]}`, one entry per run.

Each entry holds what the report needs without the run folders: the run's identity (experiment,
arm, seed, trial), its settings (epochs, max_examples, precision), best-validation metrics,
minutes (over all sessions of a resumed run), parameters, the hyperparameters (final values of
the tuned arms and replay, the fixed values of the others), the validation loss per epoch, for the
tuned arms the trajectory, and the run's whole results.json (`results`), from which `restore` puts
a finished run back into an empty rundir: a study resumed on another machine reuses it (and can
replay it) instead of training it again.
"""

from __future__ import annotations

import json
import os
from typing import Sequence

from stn_pipeline.files import atomic_write
from stn_pipeline.hparams import HParam
from stn_pipeline.resume import RESULTS_FILE
from study.arms import Run, StudySettings, fixed_hparams, read_results
from study.runner import elapsed_minutes, mismatch, set_elapsed_minutes


def _val_losses(results: dict) -> list[float]:
    history = results.get("history")
    if history:
        return [entry["val_loss"] for entry in history]
    return list(results.get("epoch_val_losses", []))


def record(run: Run, settings: StudySettings, results: dict, specs: Sequence[HParam],
           machine: str = "") -> dict:
    """The entry of one finished run (`machine`: where it ran, as the report names it)."""
    fixed = fixed_hparams(run, specs)
    minutes = elapsed_minutes(run.logdir)
    entry = {
        "experiment": settings.experiment, "arm": run.arm, "seed": run.seed,
        "trial": run.trial, "epochs": settings.epochs, "max_examples": settings.max_examples,
        "precision": results.get("config", {}).get("precision", settings.precision),
        "best_epoch": results["best_epoch"], "val_loss": results["val_loss"],
        "val_accuracy": results.get("val_accuracy"), "test_loss": results.get("test_loss"),
        "test_accuracy": results.get("test_accuracy"),
        "minutes": minutes if minutes is not None else results["wall_time_s"] / 60.0,
        "num_parameters": results.get("num_parameters"),
        "hparams": fixed if fixed is not None else dict(results["final_hparams"]),
        "val_losses": _val_losses(results), "logdir": run.logdir, "machine": machine,
        "results": results,
    }
    if run.arm in ("tuned", "delta_stn"):
        entry["trajectory"] = _trajectory(results)
    return entry


def _trajectory(results: dict) -> list[dict]:
    """The logged trajectory, from the initial values at step 0."""
    trajectory = list(results.get("trajectory", []))
    initial = results.get("initial_hparams")
    if trajectory and initial and trajectory[0]["step"] > 0:
        names = [name for name in trajectory[0] if name != "step"]
        trajectory.insert(0, {"step": 0, **{name: initial[name] for name in names}})
    return trajectory


def collect(runs: Sequence[Run], settings: StudySettings, specs: Sequence[HParam],
            skip: Sequence[str] = (), machine: str = "") -> list[dict]:
    """Entries of the finished runs, in plan order (logdirs in `skip` are left out)."""
    entries = []
    for run in runs:
        results = read_results(run.logdir)
        if results is not None and run.logdir not in skip:
            entries.append(record(run, settings, results, specs, machine))
    return entries


def _key(entry: dict) -> tuple:
    return entry["experiment"], entry["arm"], entry["seed"], entry["trial"]


def restore(runs: Sequence[Run], settings: StudySettings, entries: Sequence[dict]) -> list[Run]:
    """Writes back the results.json (and minutes) of recorded runs missing from the rundir.

    Only an entry of the same run (experiment, arm, seed, trial) whose settings match the study's
    is restored; a run with neither results.json nor such an entry is left to train. Returns the
    runs restored.
    """
    recorded = {_key(entry): entry for entry in entries if "results" in entry}
    restored = []
    for run in runs:
        entry = recorded.get((settings.experiment, run.arm, run.seed, run.trial))
        if (entry is None or read_results(run.logdir) is not None
                or mismatch(run, settings, entry["results"])):
            continue
        os.makedirs(run.logdir, exist_ok=True)
        with atomic_write(os.path.join(run.logdir, RESULTS_FILE)) as stream:
            json.dump(entry["results"], stream)
        set_elapsed_minutes(run.logdir, entry["minutes"])
        restored.append(run)
    return restored


def merge(old: Sequence[dict], new: Sequence[dict]) -> list[dict]:
    """`old` entries that `new` does not replace, then `new`: earlier studies are kept."""
    replaced = {_key(entry) for entry in new}
    return [entry for entry in old if _key(entry) not in replaced] + list(new)


def load(path: str) -> dict:
    """The records file, or an empty one if it does not exist."""
    if not os.path.exists(path):
        return {"runs": []}
    with open(path) as handle:
        return json.load(handle)


def write(path: str, study: dict, runs: Sequence[dict]) -> None:
    """Writes the records atomically (a temporary file renamed over `path`)."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with atomic_write(path) as stream:
        json.dump({"study": study, "runs": list(runs)}, stream, indent=1)
        stream.write("\n")
