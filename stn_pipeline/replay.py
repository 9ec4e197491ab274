"""Schedule replay: the hyperparameter trajectory a finished run recorded, as a step function.

A run's `results.json` holds `trajectory`, the constrained values of its tuned hyperparameters
logged every `log_every` weight steps (`{"step": s, name: value, ...}`, s = weight steps done),
and `initial_hparams`. A replay trains another network with its hyperparameters following that
trajectory by the HOLD rule:

    after s weight steps, use the value logged at the last logged step <= s;
    before the first logged step, the run's initial values.

So at every logged step the replayed value equals the recorded one exactly (float32 values
survive the JSON round trip), and between logged steps it is piecewise constant, as the source's
own values were between hyper steps. The replay follows the hyperparameter *means*: the source's
per-example perturbations are not replayed. `final_hparams` of results.json is not used: it is
the best-validation state, not the end of the trajectory.
"""

from __future__ import annotations

import glob
import json
import os
from typing import Sequence

import numpy as np
import tensorflow as tf

from stn_pipeline.config import ConfigError, RunConfig
from stn_pipeline.resume import RESULTS_FILE

__all__ = ["HParamTrajectory", "ReplayError", "replay_config"]


class ReplayError(ConfigError):
    """A run that cannot be replayed, with a one-line message naming it."""


class HParamTrajectory:
    """A run's recorded hyperparameter values as a function of the weight step (HOLD rule).

    Attributes:
      names: hyperparameter names, the column order of every value returned.
      steps: [N] logged weight steps, strictly increasing.
      values: [N + 1, H] float32; row 0 holds the initial values, row k + 1 those of steps[k].
      weight_steps: weight steps the source run trained for (what a replay should train).
      config, metadata: the source run's settings and data description (results.json).
    """

    def __init__(self, names: Sequence[str], steps, values, weight_steps: int,
                 config: dict | None = None, metadata: dict | None = None):
        self.names = tuple(names)
        self.steps = np.asarray(steps, np.int64).reshape([-1])
        self.values = np.asarray(values, np.float32)
        if self.values.shape != (len(self.steps) + 1, len(self.names)):
            raise ValueError(f"HParamTrajectory: values must be [{len(self.steps) + 1}, "
                             f"{len(self.names)}] (initial row + one per step), received "
                             f"{self.values.shape}.")
        if np.any(np.diff(self.steps) <= 0) or np.any(self.steps < 0):
            raise ValueError(f"HParamTrajectory: steps must be increasing and >= 0, received "
                             f"{self.steps.tolist()}.")
        self.weight_steps = int(weight_steps)
        self.config = dict(config or {})
        self.metadata = dict(metadata or {})

    @classmethod
    def from_run(cls, run_dir: str, experiment: str | None = None,
                 names: Sequence[str] | None = None,
                 metadata: dict | None = None) -> "HParamTrajectory":
        """Reads and checks the trajectory of the finished run in `run_dir`.

        Args:
          run_dir: the source run's logdir.
          experiment: if given, the source must be a run of this experiment.
          names: if given, the source must have tuned exactly these hyperparameters; the columns
            then follow this order.
          metadata: if given, the replay's data description: `image_shape` and `class_names`
            (where both sides have them) must match the source's.

        Raises:
          ReplayError: missing folder, unfinished run, unreadable results, another experiment,
            other hyperparameters or data of another shape.
        """
        results = _read_results(run_dir)
        where = f"--replay={run_dir}"
        source_config = results.get("config") or {}
        if experiment is not None:
            _check_experiment(run_dir, source_config, experiment)
        source_metadata = results.get("metadata") or {}
        if metadata is not None:
            _check_same_data(where, source_metadata, metadata)
        initial = results.get("initial_hparams")
        trajectory = results.get("trajectory")
        if not isinstance(initial, dict) or not isinstance(trajectory, list):
            raise ReplayError(f"{where}: {RESULTS_FILE} has no 'initial_hparams' and "
                              "'trajectory' to replay.")
        if names is None:
            names = list(initial)
        elif set(names) != set(initial):
            raise ReplayError(f"{where} tuned {sorted(initial)}, but the replay has "
                              f"{sorted(names)}; replay the same hyperparameters.")
        rows = [[initial[name] for name in names]]
        for position, entry in enumerate(trajectory):
            missing = [key for key in ["step", *names] if key not in entry]
            if missing:
                raise ReplayError(f"{where}: trajectory entry {position} lacks {missing}.")
            rows.append([entry[name] for name in names])
        steps = [entry["step"] for entry in trajectory]
        try:
            return cls(names, steps, rows, results.get("weight_steps", steps[-1] if steps else 0),
                       source_config, source_metadata)
        except ValueError as error:
            raise ReplayError(f"{where}: {error}") from None

    def values_at(self, step: int) -> np.ndarray:
        """[H] values after `step` weight steps (what weight step `step + 1` trains with)."""
        if step < 0:
            raise ValueError(f"HParamTrajectory.values_at: step must be >= 0, received {step}.")
        return self.values[np.searchsorted(self.steps, step, side="right")]

    def as_dict(self, step: int) -> dict[str, float]:
        """`values_at(step)` by name."""
        return dict(zip(self.names, self.values_at(step).tolist()))

    def lookup(self, step: tf.Tensor) -> tf.Tensor:
        """In-graph `values_at`: a scalar step tensor -> [H] float32 values.

        The table is a graph constant, so a compiled step that reads the step from a variable
        traces once and fetches the values of every step.
        """
        step = tf.reshape(tf.cast(step, tf.int64), [1])
        row = tf.searchsorted(tf.constant(self.steps), step, side="right")[0]
        return tf.gather(tf.constant(self.values), row)


def _read_results(run_dir: str) -> dict:
    where = f"--replay={run_dir}"
    if not os.path.isdir(run_dir):
        raise ReplayError(f"{where}: no such run folder.")
    path = os.path.join(run_dir, RESULTS_FILE)
    if not os.path.exists(path):
        checkpoints = glob.glob(os.path.join(run_dir, "checkpoints", "ckpt-*.index"))
        if checkpoints:
            latest = max(int(p.rsplit("-", 1)[1].split(".")[0]) for p in checkpoints)
            raise ReplayError(f"{where} is unfinished: no {RESULTS_FILE}, checkpoints up to "
                              f"weight step {latest}; finish it by rerunning it with the same "
                              "--logdir.")
        raise ReplayError(f"{where} holds no finished run: no {RESULTS_FILE} and no "
                          "checkpoints.")
    try:
        with open(path) as handle:
            results = json.load(handle)
    except (OSError, ValueError) as error:
        raise ReplayError(f"{where}: cannot read {RESULTS_FILE} ({error}).") from None
    if not isinstance(results, dict):
        raise ReplayError(f"{where}: {RESULTS_FILE} is not a JSON object.")
    return results


def _check_experiment(run_dir: str, source_config: dict, experiment: str) -> None:
    if source_config.get("experiment") != experiment:
        raise ReplayError(f"--replay={run_dir} is a run of experiment "
                          f"{source_config.get('experiment')!r}, not {experiment!r}.")


def _check_same_data(where: str, source: dict, replay: dict) -> None:
    pairs = [("image shape", source.get("image_shape"), replay.get("image_shape"))]
    if source.get("class_names") is not None and replay.get("class_names") is not None:
        pairs.append(("number of classes", len(source["class_names"]),
                      len(replay["class_names"])))
    for what, old, new in pairs:
        if old is not None and new is not None and list(np.atleast_1d(old)) != list(
                np.atleast_1d(new)):
            raise ReplayError(f"{where} was trained on data of {what} {old}, but the replay's "
                              f"data has {new}.")


def replay_config(config: RunConfig) -> RunConfig:
    """`config` completed from its `--replay` source (unchanged without one).

    The replay tunes (follows) the source's hyperparameters and fixes the same others: an empty
    `--hparams` takes the source's. It trains as many weight steps as the source: an unset
    `--max_steps` becomes the source's `weight_steps`.

    Raises:
      ReplayError: a missing or unfinished source, or one trained with another batch size (its
        steps would be other steps).
    """
    if not config.replay or config.network != "plain":  # validate_config refuses the latter
        return config
    results = _read_results(config.replay)
    source = results.get("config") or {}
    _check_experiment(config.replay, source, config.experiment)
    batch_size = (source.get("data") or {}).get("batch_size", config.data.batch_size)
    if batch_size != config.data.batch_size:
        raise ReplayError(f"--replay={config.replay} was trained with --batch_size={batch_size}, "
                          f"the replay has --batch_size={config.data.batch_size}; a weight step "
                          "must be the same step in both.")
    changes = {}
    if not config.hparams and source.get("hparams"):
        changes["hparams"] = source["hparams"]
    if not config.loop.max_steps and results.get("weight_steps"):
        changes["max_steps"] = int(results["weight_steps"])
    return config.override(**changes)
