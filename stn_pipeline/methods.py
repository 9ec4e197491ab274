"""Training methods over the same STN layers and hyperparameters: STN and Delta-STN.

A method defines only what differs between them; `StnTrainer` runs either with the same step
bodies. What a method decides:

  hnet_input / prepare   what the gates see: the perturbed unconstrained value itself (STN), or
                         its offset Delta from the current value (Delta-STN: zero at the current
                         hyperparameters, where the network is its general path alone)
  response_variables     the parameters with their own group and optimizer (none for STN)
  weight_phases          the updates of one weight step, each on its own sample and loss
  init                   changes to a freshly built model (Delta-STN: zero gate kernels)

STN (MacKay et al. 2019): one update of all weights on the per-example perturbed batch, gates fed
the perturbed unconstrained values; 2 weight steps per hyper step.

Delta-STN (Bae & Grosse 2020), two updates per weight step: (a) the general parameters (the
elementary path and every non-STN variable) on the batch at the current hyperparameters (Delta =
0, dropout and augmentation at the current values), then (b) the response parameters (response
kernels, biases and gate kernels) on the per-example perturbed batch through the prediction
linearised in Delta (`linearize.linearized`). The hyper step is not linearised: Delta = sigma eps,
so the hyper-gradient reaches lambda through the sample only. 5 weight steps per hyper step.

#### References
MacKay et al., Self-Tuning Networks, ICLR 2019, https://arxiv.org/abs/1903.03088;
Bae & Grosse, Delta-STN, NeurIPS 2020, https://arxiv.org/abs/2010.13514
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import tensorflow as tf

from stn_pipeline.hparams import HParamSample, HyperParameters
from stn_pipeline.layers import StnConv2D, StnDense
from stn_pipeline.linearize import centred_hnet_input

__all__ = ["DeltaStn", "METHODS", "Phase", "Stn", "make_method", "recorded_method"]

# Parameter groups of the weights: `WEIGHTS` is every weight (STN) or the general ones
# (Delta-STN), updated by the trainer's `weight_optimizer`; `RESPONSE` has its own optimizer.
WEIGHTS, RESPONSE = "weights", "response"


@dataclasses.dataclass(frozen=True, kw_only=True)
class Phase:
    """One update of a weight step.

    Attributes:
      name: prefix of its loss in the step's outputs (the first phase's loss is "loss").
      group: the parameter group it descends, `WEIGHTS` or `RESPONSE`.
      perturb: per-example perturbed hyperparameters (else every example at the current ones).
      linearize: predict with the first-order expansion in the hypernet input around zero.
    """

    name: str
    group: str
    perturb: bool
    linearize: bool = False


def _stn_layers(model: tf.Module) -> list[StnDense | StnConv2D]:
    return [m for m in model.submodules if isinstance(m, (StnDense, StnConv2D))]


class Stn:
    """The original STN: uncentred gates, one update of every weight per weight step."""

    name = "stn"
    train_steps = 2  # weight steps per hyper step (the paper's cycle)

    def hnet_input(self, unconstrained: tf.Tensor, current: tf.Tensor) -> tf.Tensor:
        """The gates' input for unconstrained values `unconstrained` [B, H] at current [H]."""
        del current
        return unconstrained

    def prepare(self, sample: HParamSample, hparams: HyperParameters) -> HParamSample:
        """`sample` with the hypernet input this method feeds the gates."""
        hnet_input = self.hnet_input(sample.hnet_input, hparams.unconstrained_value)
        return dataclasses.replace(sample, hnet_input=hnet_input)

    def init(self, model: tf.Module) -> None:
        """Changes to a freshly built model before training (none)."""

    def response_variables(self, model: tf.Module) -> list[tf.Variable]:
        """The variables of the `RESPONSE` group (none: one group of every weight)."""
        del model
        return []

    def weight_phases(self, tune: bool) -> tuple[Phase, ...]:
        """The updates of one weight step (perturbed only while tuning)."""
        return (Phase(name="", group=WEIGHTS, perturb=tune),)


class DeltaStn(Stn):
    """Delta-STN: centred gates, general and response updates, linearised response update."""

    name = "delta_stn"
    train_steps = 5

    def hnet_input(self, unconstrained: tf.Tensor, current: tf.Tensor) -> tf.Tensor:
        return centred_hnet_input(unconstrained, current)

    def init(self, model: tf.Module) -> None:
        """Zero gate kernels: the response path outputs nothing at first."""
        for layer in _stn_layers(model):
            layer.gate_kernel.assign(tf.zeros_like(layer.gate_kernel))

    def response_variables(self, model: tf.Module) -> list[tf.Variable]:
        return [v for layer in _stn_layers(model) for v in layer.response_variables()]

    def weight_phases(self, tune: bool) -> tuple[Phase, ...]:
        general = Phase(name="", group=WEIGHTS, perturb=False)
        if not tune:
            # At Delta = 0 the response parameters get no gradient: the frozen-hyperparameter
            # baseline is the general network alone.
            return (general,)
        return general, Phase(name="response_", group=RESPONSE, perturb=True, linearize=True)


METHODS = {method.name: method for method in (Stn, DeltaStn)}


def recorded_method(results: Mapping[str, Any]) -> str:
    """The method named in a run's results.json (runs from before methods existed: "stn")."""
    return ((results.get("config") or {}).get("trainer") or {}).get("method", "stn")


def make_method(name: str) -> Stn:
    """The method called `name` ("stn" or "delta_stn")."""
    if name not in METHODS:
        raise ValueError(f"--method must be one of {sorted(METHODS)}, received {name!r}.")
    return METHODS[name]()
