"""TensorBoard logging of an STN run: scalars, per-example hyperparameter histograms, HParams.

Tags (step = number of weight steps taken):
  train/<metric>            weight-step loss and metrics (perturbed, training mode)
  hyper/<metric>            hyper-step validation loss, hyper loss (loss - tau * entropy), entropy
  hparam/<name>             current constrained value of each hyperparameter
  scale/<name>              its perturbation scale sigma
  hparam_sample/<name>      histogram of the per-example constrained values of one weight step
  epoch/<split>_<metric>    per-epoch evaluation at the unperturbed hyperparameters
  epoch/learning_rate       weight learning rate
"""

from __future__ import annotations

import os
from typing import Mapping

import numpy as np
import tensorflow as tf
from tensorboard.plugins.hparams import api as hparams_api


__all__ = ["RunLogger"]


class RunLogger:
    """Writes the summaries of one run to `logdir`."""

    def __init__(self, logdir: str):
        self.logdir = logdir
        self.writer = tf.summary.create_file_writer(logdir)

    def scalars(self, step: int, values: Mapping[str, float], prefix: str = "") -> None:
        with self.writer.as_default():
            for key, value in values.items():
                tf.summary.scalar(prefix + key, float(value), step=step)

    def hparam_state(self, step: int, names, values, scales) -> None:
        """Constrained values and perturbation scales of every hyperparameter."""
        with self.writer.as_default():
            for name, value, scale in zip(names, values, scales):
                tf.summary.scalar(f"hparam/{name}", float(value), step=step)
                tf.summary.scalar(f"scale/{name}", float(scale), step=step)

    def hparam_histograms(self, step: int, names, sample_values: np.ndarray,
                          prefix: str = "hparam_sample/") -> None:
        """One histogram per hyperparameter of a [B, H] batch of per-example values."""
        with self.writer.as_default():
            for index, name in enumerate(names):
                tf.summary.histogram(prefix + name, sample_values[:, index], step=step)

    def run_summary(self, config: Mapping[str, object], metrics: Mapping[str, float],
                    step: int, with_settings: bool = True) -> None:
        """The TensorBoard HParams-plugin record of the run: its settings and final figures.

        The figures are written at `step` (the last weight step: the plugin shows the latest
        value, so an extended run's figures replace the earlier ones without a duplicate step).
        The settings record is written at step 0 by TensorBoard: only when `with_settings`,
        i.e. once per run (TensorBoard keeps the first one anyway).
        """
        allowed = (bool, int, float, str)
        settings = {k: v for k, v in config.items() if isinstance(v, allowed)}
        with self.writer.as_default():
            if with_settings:
                hparams_api.hparams_config(
                    hparams=[hparams_api.HParam(k) for k in settings],
                    metrics=[hparams_api.Metric(k) for k in metrics])
                hparams_api.hparams(settings,
                                    trial_id=os.path.basename(os.path.abspath(self.logdir)))
            for key, value in metrics.items():
                tf.summary.scalar(key, float(value), step=step)

    def flush(self) -> None:
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()
