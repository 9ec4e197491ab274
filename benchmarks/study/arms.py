"""The arms of the tuning study, its runs, and the `stn-train` command of each run.

Arms (each run is one `stn-train` invocation, one thread):
  tuned      the STN
  delta_stn  Delta-STN (`--method=delta_stn`)
  frozen     the STN network with `--tune=false`, at the initial values: the capacity control
  plain      the plain network (`--network=plain`) at the initial values
  random:N   N runs of the plain network at values sampled from the declared ranges; the trial
             with the best validation loss is the search's answer
  replay     the plain network following the tuned run's recorded trajectory (`--replay`)
  final      the plain network fixed at the tuned run's final values
`replay` and `final` need the finished tuned run of the same seed (added to the plan if absent).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import sys
from typing import Sequence

import numpy as np

from stn_pipeline.hparams import DISCRETE, POSITIVE, HParam
from stn_pipeline.resume import RESULTS_FILE

ARMS = ("tuned", "delta_stn", "frozen", "plain", "random", "replay", "final")
DEPENDENT_ARMS = ("replay", "final")
# A POSITIVE hyperparameter (minimum + softplus, e.g. weight_decay) declares no maximum: random
# search samples its distance above the minimum log-uniformly within this many decades either
# side of the initial distance (weight_decay from 1e-4: [1e-6, 1e-2]).
POSITIVE_DECADES = 2.0
_ARM_FLAGS = {
    "tuned": [],
    "delta_stn": ["--method=delta_stn"],
    "frozen": ["--tune=false"],
    "plain": ["--network=plain"],
    "random": ["--network=plain"],
    "replay": ["--network=plain"],
    "final": ["--network=plain"],
}


@dataclasses.dataclass(frozen=True, kw_only=True)
class StudySettings:
    """What every run of a study shares.

    Attributes:
      experiment, dataset, epochs, max_examples, precision: the `stn-train` flags of that name
        (`max_examples=0`: all examples).
      rundir: folder of the runs' logdirs.
      extra_flags: further `stn-train` flags given to every run.
    """

    experiment: str
    dataset: str
    epochs: int
    rundir: str
    max_examples: int = 0
    precision: str = "float32"
    extra_flags: tuple[str, ...] = ()


@dataclasses.dataclass(frozen=True, kw_only=True)
class Run:
    """One run of the study.

    Attributes:
      arm: one of `ARMS`.
      seed: the study seed (`--seed` of the run).
      trial: the random-search trial (None for other arms).
      logdir: the run's folder (its output goes to `<logdir>.log`).
      after: logdir of the tuned run this run needs finished first (replay, final), else None.
      sampled: the random trial's hyperparameters (None for other arms).
    """

    arm: str
    seed: int
    logdir: str
    trial: int | None = None
    after: str | None = None
    sampled: dict | None = None

    @property
    def name(self) -> str:
        return os.path.basename(self.logdir)


def parse_arms(text: str) -> list[tuple[str, int]]:
    """"tuned,random:4" -> [("tuned", 1), ("random", 4)]; ValueError naming `--arms` if bad."""
    arms = []
    for entry in filter(None, (e.strip() for e in text.split(","))):
        arm, has_count, count = entry.partition(":")
        if arm not in ARMS:
            raise ValueError(f"--arms: unknown arm {arm!r}; known: {', '.join(ARMS)} "
                             "(random as random:N).")
        if (arm == "random") != bool(has_count) or has_count and not (
                count.isdigit() and int(count) >= 1):
            raise ValueError(f"--arms: {entry!r}: give the random search as random:N with N >= 1, "
                             "and no count for other arms.")
        if arm in (a for a, _ in arms):
            raise ValueError(f"--arms: {arm!r} is given twice.")
        arms.append((arm, int(count) if has_count else 1))
    if not arms:
        raise ValueError("--arms is empty.")
    return arms


def sample_hparams(specs: Sequence[HParam], seed: int, trial: int) -> dict[str, float]:
    """Hyperparameters of random trial `trial` of seed `seed`, from their declared ranges.

    One uniform draw u per hyperparameter, in declaration order, from a generator seeded by
    (seed, trial) alone, so every trial is fixed before any result exists. Bounded: uniform over
    (minimum, maximum). Discrete: floor of that uniform (the integers the model takes). Positive:
    minimum + log-uniform distance, `POSITIVE_DECADES` either side of the initial distance.
    """
    rng = np.random.default_rng([seed, trial])
    values = {}
    for spec in specs:
        u = float(rng.uniform())
        if spec.kind == POSITIVE:
            log_init = math.log(spec.init - spec.minimum)
            half = POSITIVE_DECADES * math.log(10.0)
            values[spec.name] = spec.minimum + math.exp(log_init - half + 2.0 * half * u)
        else:
            value = spec.minimum + u * (spec.maximum - spec.minimum)
            values[spec.name] = float(math.floor(value)) if spec.kind == DISCRETE else value
    return values


def plan_runs(settings: StudySettings, arms: Sequence[tuple[str, int]], seeds: Sequence[int],
              specs: Sequence[HParam]) -> list[Run]:
    """Every run of the study: tuned runs first (others wait for them), then the arms in order."""
    names = [arm for arm, _ in arms]
    if any(arm in DEPENDENT_ARMS for arm in names) and "tuned" not in names:
        names.insert(0, "tuned")
    ordered = sorted(names, key=lambda arm: arm != "tuned")
    trials = dict(arms).get("random", 0)
    runs = []
    for arm in ordered:
        for seed in seeds:
            logdir = os.path.join(settings.rundir, f"{settings.experiment}_{arm}_s{seed}")
            if arm == "random":
                runs.extend(Run(arm=arm, seed=seed, trial=t, logdir=f"{logdir}_t{t}",
                                sampled=sample_hparams(specs, seed, t)) for t in range(trials))
            else:
                tuned = os.path.join(settings.rundir, f"{settings.experiment}_tuned_s{seed}")
                runs.append(Run(arm=arm, seed=seed, logdir=logdir,
                                after=tuned if arm in DEPENDENT_ARMS else None))
    return runs


def read_results(logdir: str) -> dict | None:
    """The run's results.json, or None while it has not finished."""
    path = os.path.join(logdir, RESULTS_FILE)
    if not os.path.exists(path):
        return None
    with open(path) as handle:
        return json.load(handle)


def fixed_hparams(run: Run, specs: Sequence[HParam]) -> dict[str, float] | None:
    """The values a run is fixed at (None for the tuned arms and replay, whose values move)."""
    if run.arm in ("frozen", "plain"):
        return {spec.name: spec.init for spec in specs}
    if run.arm == "random":
        return dict(run.sampled)
    if run.arm == "final":
        tuned = read_results(run.after)
        if tuned is None:
            raise ValueError(f"{run.name} needs the finished tuned run {run.after}.")
        return dict(tuned["final_hparams"])
    return None


def _hparams_flag(values: dict[str, float], specs: Sequence[HParam]) -> str:
    # A value must lie strictly inside its open range, so a discrete k is passed as k + 0.5
    # (the model floors it back to k; cutout_holes=0 would otherwise be refused).
    discrete = {spec.name for spec in specs if spec.kind == DISCRETE}
    text = [f"{name}={math.floor(value) + 0.5 if name in discrete else value!r}"
            for name, value in values.items()]
    return "--hparams=" + ",".join(text)


def command(run: Run, settings: StudySettings, specs: Sequence[HParam]) -> list[str]:
    """The `stn-train` command line of `run` (final: needs its tuned run finished)."""
    line = [sys.executable, "-m", "stn_pipeline_scripts.train",
            f"--experiment={settings.experiment}", f"--dataset={settings.dataset}",
            f"--epochs={settings.epochs}", f"--max_examples={settings.max_examples}",
            f"--seed={run.seed}", "--threads=1", f"--logdir={run.logdir}"]
    if settings.precision != "float32":  # stn-train's default; older versions lack the flag
        line.append(f"--precision={settings.precision}")
    line += _ARM_FLAGS[run.arm]
    if run.arm == "replay":
        line.append(f"--replay={run.after}")
    if run.arm in ("random", "final"):
        line.append(_hparams_flag(fixed_hparams(run, specs), specs))
    return line + list(settings.extra_flags)
