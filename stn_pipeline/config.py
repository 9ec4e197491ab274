"""The run configuration: one nested, frozen, keyword-only dataclass.

`RunConfig` holds the part each component takes as it is -- `trainer` (`StnTrainer`), `schedule`
(the schedule), `loop` (`training.fit`), `data` and `toy` (relu_toy's model) -- plus the few
settings of the run itself. `stn-train`'s flags stay flat (`--weight_lr`, `--epochs`); `FLAGS`
is the one map from a flag name to its place in the nesting, and `RunConfig.override` and
`RunConfig.as_flags` translate through it. `config.json` holds `RunConfig.to_dict()`, which
`RunConfig.from_dict` (or `load_config`) reads back into an equal configuration.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any, Mapping

from stn_pipeline.methods import METHODS
from stn_pipeline.schedule import ScheduleConfig
from stn_pipeline.trainer import TrainerConfig
from stn_pipeline.training import ON_NAN_MODES, LoopOptions

__all__ = ["FLAGS", "HELP", "ConfigError", "DataConfig", "ReluToyConfig", "RunConfig",
           "check_setting", "load_config"]


class ConfigError(ValueError):
    """A setting that cannot work, reported as one line naming the flag."""


@dataclasses.dataclass(frozen=True, kw_only=True)
class DataConfig:
    """Where examples come from and how many go into a batch.

    Attributes:
      dataset: a TFDS image-classification name or "folder:<dir>" (image experiments).
      data_dir: TFDS data folder.
      valid_fraction: part of the training split held out for hyper steps and selection.
      max_examples: use only the first N training (and test) examples; 0: all.
      batch_size: the global batch of weight and hyper steps.
    """

    dataset: str = "cifar10"
    data_dir: str | None = None
    valid_fraction: float = 0.2
    max_examples: int = 0
    batch_size: int = 128


@dataclasses.dataclass(frozen=True, kw_only=True)
class ReluToyConfig:
    """The relu_toy model and data (flags `--toy_<name>`)."""

    depth: int = 3
    width: int = 32
    r0: float = 1.0
    train_size: int = 4096


@dataclasses.dataclass(frozen=True, kw_only=True)
class RunConfig:
    """Every setting of a run: the settings of the run itself and one part per component."""

    experiment: str
    seed: int = 0
    hparams: str = ""
    network: str = "stn"
    replay: str = ""
    keep_checkpoints: int = 3
    precision: str = "float32"  # or "mixed_bfloat16": see stn_pipeline/precision.py
    trainer: TrainerConfig = dataclasses.field(default_factory=TrainerConfig)
    schedule: ScheduleConfig = dataclasses.field(default_factory=ScheduleConfig)
    loop: LoopOptions = dataclasses.field(default_factory=LoopOptions)
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    toy: ReluToyConfig = dataclasses.field(default_factory=ReluToyConfig)

    def as_flags(self) -> dict[str, Any]:
        """Every setting under its flat flag name (what `--name=value` sets)."""
        return {flag: getattr(getattr(self, part), name) if part else getattr(self, name)
                for flag, (part, name) in FLAGS.items()}

    def override(self, **flags: Any) -> RunConfig:
        """A copy with the settings named by their flag names changed, each value checked.

        Raises:
          ConfigError: naming the flag, for an unknown name or a value out of its range.
        """
        unknown = sorted(set(flags) - set(FLAGS))
        if unknown:
            raise ConfigError(f"unknown settings {unknown}; known: {sorted(FLAGS)}.")
        for flag, value in flags.items():
            check_setting(flag, value)
        top: dict[str, Any] = {}
        parts: dict[str, dict[str, Any]] = {}
        for flag, value in flags.items():
            part, name = FLAGS[flag]
            (parts.setdefault(part, {}) if part else top)[name] = value
        for part, changes in parts.items():
            top[part] = dataclasses.replace(getattr(self, part), **changes)
        return dataclasses.replace(self, **top)

    def to_dict(self) -> dict[str, Any]:
        """The nested settings as plain JSON values (what config.json holds)."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> RunConfig:
        """The configuration `to_dict` returned (config.json); also reads the flat format of
        config.json files written before the configuration was nested.

        Raises:
          ConfigError: for a key that is no setting.
        """
        if not any(isinstance(value, Mapping) for value in values.values()):  # the flat format
            flags = {k: v for k, v in values.items() if k in FLAGS and k != "experiment"}
            return cls(experiment=values["experiment"]).override(**flags)
        settings = dict(values)
        if settings.pop("hparam_inits", ""):  # written before --hparams replaced it
            raise ConfigError("this config sets --hparam_inits, which --hparams=NAME=INIT,... "
                              "replaced; rerun with --hparams.")
        for field in dataclasses.fields(cls):
            if field.name in _PARTS and field.name in settings:
                settings[field.name] = _from_dict(_PARTS[field.name], settings[field.name])
        return _from_dict(cls, settings)


def load_config(path: str) -> RunConfig:
    """The `RunConfig` saved in a run's config.json."""
    with open(path) as handle:
        return RunConfig.from_dict(json.load(handle))


def _from_dict(cls, values: Mapping[str, Any]):
    names = {field.name for field in dataclasses.fields(cls)}
    unknown = sorted(set(values) - names)
    if unknown:
        raise ConfigError(f"{cls.__name__} has no settings {unknown}; known: {sorted(names)}.")
    return cls(**values)


# The parts, and the prefix of their flag names where a bare field name would be ambiguous.
_PARTS = {field.name: field.default_factory for field in dataclasses.fields(RunConfig)
          if field.default_factory is not dataclasses.MISSING}
_FLAG_PREFIX = {"toy": "toy_"}


def _flag_places() -> dict[str, tuple[str | None, str]]:
    places: dict[str, tuple[str | None, str]] = {}
    for field in dataclasses.fields(RunConfig):
        part = _PARTS.get(field.name)
        names = ([(None, field.name)] if part is None
                 else [(field.name, f.name) for f in dataclasses.fields(part)])
        for part_name, name in names:
            flag = _FLAG_PREFIX.get(part_name, "") + name
            if flag in places:
                raise TypeError(f"RunConfig: two settings have the flag name {flag!r}.")
            places[flag] = (part_name, name)
    return places


# flag name -> (part, field name); part None for the settings of RunConfig itself.
FLAGS = _flag_places()

HELP = {
    "experiment": "The registered experiment.",
    "seed": "Seed of initialisation, data order, perturbations and masks.",
    "hparams": ("The tuned hyperparameters with optional initial values, e.g. "
                "'dropout0,weight_decay=0.001,label_smoothing'; the others stay fixed at their "
                "initial values. Empty: all of the experiment's own."),
    "network": ("'stn' (hypernetwork-gated layers, tuned) or 'plain' (ordinary layers at fixed "
                "or replayed hyperparameters; implies --tune=false)."),
    "replay": ("Path of a finished run: train the plain network with its hyperparameters "
               "following that run's recorded trajectory (implies --network=plain)."),
    "keep_checkpoints": "How many resume checkpoints to keep.",
    "precision": "'float32' or 'mixed_bfloat16' (STN layers' matmuls and convolutions in "
                 "bfloat16, variables and losses float32; README 'Precision').",
    "weight_optimizer": "'sgd' (momentum 0.9) or 'adam'.",
    "weight_lr": "Learning rate of the model weights.",
    "hyper_lr": "Adam learning rate of the hyperparameters.",
    "scale_lr": "Adam learning rate of the perturbation scales.",
    "tau": "Entropy weight of the hyper loss.",
    "tune": "False freezes the hyperparameters at their initial values (the baseline).",
    "tune_scales": "Learn the perturbation scales.",
    "method": "'stn' or 'delta_stn' (Delta-STN: centred gates, general and response updates, "
              "linearised response update; default cycle 5 weight : 1 hyper).",
    "epochs": "Maximum number of epochs.",
    "warmup_epochs": "Epochs of weight steps only before tuning starts.",
    "train_steps": "Weight steps per cycle.",
    "hyper_steps": "Hyper steps per cycle.",
    "nonmono": "Window (epochs) of the non-monotone learning-rate decay; 0 disables it.",
    "decay_factor": "Learning-rate multiplier at each decay.",
    "patience": "Early stopping after this many epochs without improvement; 0 disables it.",
    "min_lr": "Stop once the weight learning rate falls below this.",
    "log_every": "Weight steps between progress lines and summaries.",
    "max_steps": "Cap on weight steps (0: none); also --max_cycles.",
    "checkpoint_every": "Weight steps between resume checkpoints (0: only at epoch ends).",
    "on_nan": "'stop' (exit non-zero) or 'skip' (skip and count) a non-finite step.",
    "cycles_per_execution": "Cycles (weight steps, then hyper steps) per compiled call; "
                            "logs and checkpoints fall on call ends (README 'Cycles per call').",
    "dataset": "'cifar10' (or any TFDS image classification name) or 'folder:<dir>'.",
    "data_dir": "TFDS data folder.",
    "valid_fraction": "Part of the training split held out for hyper steps and selection.",
    "max_examples": "Use only the first N training (and test) examples; 0: all.",
    "batch_size": "Examples per weight and hyper step (the global batch).",
    "toy_depth": "relu_toy: number of hidden layers.",
    "toy_width": "relu_toy: units per hidden layer.",
    "toy_r0": "relu_toy: initial input half-width r.",
    "toy_train_size": "relu_toy: number of training points.",
}

_POSITIVE = ("batch_size", "epochs", "train_steps", "log_every", "cycles_per_execution",
             "toy_depth", "toy_width", "toy_train_size", "keep_checkpoints", "weight_lr",
             "hyper_lr", "scale_lr", "toy_r0")
_NON_NEGATIVE = ("max_steps", "warmup_epochs", "hyper_steps", "nonmono", "patience",
                 "max_examples", "tau", "checkpoint_every", "min_lr")
_OPEN_UNIT = ("valid_fraction", "decay_factor")
_CHOICES = {"weight_optimizer": ("sgd", "adam"), "on_nan": ON_NAN_MODES,
            "network": ("stn", "plain"), "method": tuple(METHODS)}


def check_setting(flag: str, value: Any) -> None:
    """Raises `ConfigError` naming `--flag` when `value` is outside its range."""
    if flag in _POSITIVE and not value > 0:
        raise ConfigError(f"--{flag} must be > 0, received {value}.")
    if flag in _NON_NEGATIVE and value < 0:
        raise ConfigError(f"--{flag} must be >= 0, received {value}.")
    if flag in _OPEN_UNIT and not 0 < value < 1:
        raise ConfigError(f"--{flag} must be in (0, 1), received {value}.")
    if flag in _CHOICES and value not in _CHOICES[flag]:
        raise ConfigError(f"--{flag} must be one of {_CHOICES[flag]}, received {value!r}.")
