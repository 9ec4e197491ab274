"""The experiment registry: name -> hyperparameters, model, data and default settings.

Add an experiment by writing a builder `(RunConfig) -> Experiment` and registering it in
`EXPERIMENTS` with its default settings; `stn-train --experiment=<name>` then runs it.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import numpy as np
import tensorflow as tf

from stn_pipeline.hparams import HyperParameters
from stn_pipeline.models.base import StnModel
from stn_pipeline.models.relu_toy import ReluToy, input_range_hparam
from stn_pipeline.schedule import ScheduleConfig
from stn_pipeline.trainer import TrainerConfig
from stn_pipeline.training import RunData

__all__ = ["EXPERIMENTS", "Experiment", "RunConfig", "build_experiment", "default_config"]


@dataclasses.dataclass(frozen=True)
class RunConfig:
    """Every setting of a run (what `stn-train` flags fill in)."""

    experiment: str
    seed: int = 0
    batch_size: int = 128
    epochs: int = 10
    max_steps: int = 0
    warmup_epochs: int = 1
    train_steps: int = 2
    hyper_steps: int = 1
    weight_optimizer: str = "sgd"
    weight_lr: float = 0.01
    hyper_lr: float = 3e-3
    scale_lr: float = 3e-3
    tau: float = 1e-3
    tune: bool = True
    tune_scales: bool = True
    nonmono: int = 60
    patience: int = 75
    log_every: int = 50
    # relu_toy
    toy_depth: int = 3
    toy_width: int = 32
    toy_r0: float = 1.0
    toy_train_size: int = 4096
    # image experiments
    dataset: str = "cifar10"
    data_dir: str | None = None
    valid_fraction: float = 0.2
    max_examples: int = 0

    def trainer_config(self) -> TrainerConfig:
        return TrainerConfig(self.weight_optimizer, self.weight_lr, self.hyper_lr, self.scale_lr,
                             self.tau, self.tune, self.tune_scales, self.seed)

    def schedule_config(self) -> ScheduleConfig:
        return ScheduleConfig(epochs=self.epochs, warmup_epochs=self.warmup_epochs,
                              train_steps=self.train_steps, hyper_steps=self.hyper_steps,
                              nonmono=self.nonmono, patience=self.patience)


@dataclasses.dataclass
class Experiment:
    """Everything a run needs, built from a `RunConfig`."""

    model: StnModel
    hparams: HyperParameters
    data: RunData
    input_spec: tf.TensorSpec
    target_spec: tf.TensorSpec
    metadata: dict


def _batches(arrays, batch_size: int, seed: int | None) -> tf.data.Dataset:
    dataset = tf.data.Dataset.from_tensor_slices(arrays)
    if seed is None:
        return dataset.batch(batch_size)
    dataset = dataset.shuffle(len(arrays[0]), seed=seed).repeat()
    return dataset.batch(batch_size, drop_remainder=True)


def build_relu_toy(config: RunConfig) -> Experiment:
    """y = x^2; weight steps see x = r u with u ~ U(-1, 1), validation x ~ U(-2, 2)."""
    rng = np.random.default_rng(config.seed)
    uniform = lambda n, a: rng.uniform(-a, a, size=(n, 1)).astype(np.float32)  # noqa: E731
    train_u = uniform(config.toy_train_size, 1.0)
    valid_x, test_x = uniform(1024, 2.0), uniform(1024, 2.0)
    hparams = HyperParameters([input_range_hparam(config.toy_r0)], seed=config.seed)
    model = ReluToy(config.toy_depth, config.toy_width, hparams.size, seed=config.seed)
    data = RunData(
        train=iter(_batches((train_u, np.zeros_like(train_u)), config.batch_size, config.seed)),
        hyper=iter(_batches((valid_x, valid_x ** 2), config.batch_size, config.seed + 1)),
        valid=_batches((valid_x, valid_x ** 2), 1024, None),
        test=_batches((test_x, test_x ** 2), 1024, None),
        steps_per_epoch=max(1, config.toy_train_size // config.batch_size),
        batch_size=config.batch_size)
    spec = tf.TensorSpec([None, 1], tf.float32)
    return Experiment(model, hparams, data, spec, spec, {"task": "regression y = x^2"})


# name -> (builder, default settings that differ from RunConfig's).
EXPERIMENTS: dict[str, tuple[Callable[[RunConfig], Experiment], dict]] = {
    "relu_toy": (build_relu_toy, dict(batch_size=128, epochs=30, warmup_epochs=2,
                                      weight_optimizer="adam", weight_lr=3e-3, hyper_lr=0.03,
                                      scale_lr=0.03, nonmono=0, patience=0, log_every=20)),
}


def default_config(name: str) -> RunConfig:
    """The registered defaults of experiment `name`."""
    if name not in EXPERIMENTS:
        raise ValueError(f"Unknown experiment {name!r}; choose one of {sorted(EXPERIMENTS)}.")
    return RunConfig(experiment=name, **EXPERIMENTS[name][1])


def build_experiment(config: RunConfig) -> Experiment:
    """Builds the experiment named by `config.experiment`."""
    default_config(config.experiment)  # validates the name
    return EXPERIMENTS[config.experiment][0](config)
