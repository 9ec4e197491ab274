"""Hyperparameter declarations and the module that holds, perturbs and constrains them.

An STN tunes each hyperparameter in an unconstrained space, `unconstrained_value` in R, and maps
it to its range with a bijector. Training perturbs it per example:

    hnet_input_i = unconstrained_value + softplus(unconstrained_scale) * eps_i,  eps_i ~ N(0, 1)
    value_i      = bijector(hnet_input_i)       (floored for discrete hyperparameters)

`hnet_input` feeds the STN layer gates and is never floored; `value` drives dropout rates and
augmentation strengths.

Fixed hyperparameters (`fixed=`) are not tuned: they are constant columns appended to every
sample's values, so they still act on the model and data, but they are not inputs of the
hypernetwork (`hnet_input` has the tuned columns only) and have no variables.

#### References
MacKay et al., Self-Tuning Networks, ICLR 2019, https://arxiv.org/abs/1903.03088
"""

from __future__ import annotations

import dataclasses
import math
from typing import Sequence

import tensorflow as tf
import tensorflow_probability as tfp

from stn_pipeline.seeds import stream_seed

__all__ = ["BOUNDED", "DISCRETE", "POSITIVE", "HParam", "HParamSample", "HyperParameters"]

tfb = tfp.bijectors

BOUNDED = "bounded"  # (minimum, maximum), stretched sigmoid
POSITIVE = "positive"  # (minimum, inf), minimum + softplus
DISCRETE = "discrete"  # floor of a bounded value
_KINDS = (BOUNDED, POSITIVE, DISCRETE)


@dataclasses.dataclass(frozen=True)
class HParam:
    """Declaration of one tuned hyperparameter.

    Attributes:
      name: unique, non-empty identifier (used in logs, summaries and exports).
      minimum: lower end of the range (exclusive).
      maximum: upper end of the range (exclusive); `None` for `kind=POSITIVE`.
      init: initial constrained value, strictly inside the range.
      scale_init: initial perturbation scale sigma (in unconstrained units), > 0.
      kind: `BOUNDED`, `POSITIVE` or `DISCRETE`.
      per_example: True draws one perturbation per example; False shares one draw by the batch.
    """

    name: str
    minimum: float
    maximum: float | None
    init: float
    scale_init: float = 0.5
    kind: str = BOUNDED
    per_example: bool = True

    def __post_init__(self):
        where = f"HParam(name={self.name!r})"
        if not isinstance(self.name, str) or not self.name.strip():
            raise ValueError(f"HParam name must be a non-empty string, received {self.name!r}.")
        if self.kind not in _KINDS:
            raise ValueError(f"{where}: kind must be one of {_KINDS}, received {self.kind!r}.")
        if self.kind == POSITIVE:
            if self.maximum is not None:
                raise ValueError(f"{where}: a positive hyperparameter has no maximum, "
                                 f"received maximum={self.maximum}.")
        elif self.maximum is None or not self.minimum < self.maximum:
            raise ValueError(f"{where}: minimum must be < maximum, received "
                             f"minimum={self.minimum}, maximum={self.maximum}.")
        upper = math.inf if self.maximum is None else self.maximum
        if not self.minimum < self.init < upper:
            raise ValueError(f"{where}: init must lie strictly inside ({self.minimum}, {upper}), "
                             f"received init={self.init}.")
        if not self.scale_init > 0:
            raise ValueError(f"{where}: scale_init must be > 0, received {self.scale_init}.")

    def bijector(self) -> tfb.Bijector:
        """Maps the unconstrained real line onto this hyperparameter's range."""
        if self.kind == POSITIVE:
            return tfb.Chain([tfb.Shift(float(self.minimum)), tfb.Softplus()])
        return tfb.Sigmoid(low=float(self.minimum), high=float(self.maximum))


@dataclasses.dataclass(frozen=True)
class HParamSample:
    """A batch of hyperparameter values: row i belongs to example i.

    Attributes:
      names: hyperparameter names, the column order.
      values: [B, H + F] constrained values (floored where discrete) of the H tuned and then the F
        fixed hyperparameters. No gradient flows through the floor; values of continuous
        hyperparameters keep their gradient.
      hnet_input: [B, H] unconstrained values of the tuned ones, which feed the STN gates.
    """

    names: tuple[str, ...]
    values: tf.Tensor
    hnet_input: tf.Tensor

    def __getitem__(self, name: str) -> tf.Tensor:
        """The [B] column of constrained values of hyperparameter `name`."""
        try:
            index = self.names.index(name)
        except ValueError:
            raise KeyError(f"No hyperparameter {name!r}; known: {list(self.names)}.") from None
        return self.values[:, index]


def _replicated() -> bool:
    """True inside `strategy.run` of a (non-default) `tf.distribute` strategy."""
    return tf.distribute.has_strategy() and not tf.distribute.in_cross_replica_context()


class HyperParameters(tf.Module):
    """Tuned hyperparameters: unconstrained values, perturbation scales and their sampler.

    `seed` is the run seed: the perturbation noise draws from its own stream of it
    (`seeds.stream_seed(seed, "perturbation")`).

    `fixed` declares hyperparameters held at their `init` (floored if discrete): samples carry
    them after the tuned columns (`sample_names`), nothing else sees them.

    Variables (float32, shape [H], no batch dimension, so any batch size works):
      unconstrained_value: the tuned values, mapped to their ranges by `HParam.bijector()`.
      unconstrained_scale: sigma = softplus(unconstrained_scale) is the perturbation scale.
    """

    def __init__(self, specs: Sequence[HParam], seed: int = 0, name: str | None = None,
                 fixed: Sequence[HParam] = ()):
        super().__init__(name=name)
        specs, fixed = tuple(specs), tuple(fixed)
        if not specs:
            raise ValueError("HyperParameters needs at least one HParam.")
        names = [spec.name for spec in specs + fixed]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise ValueError(f"Duplicate hyperparameter names: {duplicates}.")
        self.specs = specs
        self.names = tuple(names[:len(specs)])
        self.fixed_specs = fixed
        self.sample_names = tuple(names)
        self.fixed_values = {s.name: float(math.floor(s.init)) if s.kind == DISCRETE else s.init
                             for s in fixed}
        self._fixed_row = tf.constant([list(self.fixed_values.values())], tf.float32,
                                      shape=[1, len(fixed)])
        self._bijectors = [spec.bijector() for spec in specs]
        init = self._unconstrained_of([s.init for s in specs])
        scale = [float(tfp.math.softplus_inverse(float(s.scale_init))) for s in specs]
        self.unconstrained_value = tf.Variable(init, dtype=tf.float32, name="unconstrained_value")
        self.unconstrained_scale = tf.Variable(scale, dtype=tf.float32, name="unconstrained_scale")
        self.generator = tf.random.Generator.from_seed(stream_seed(seed, "perturbation"))
        self._shared = tf.constant([not s.per_example for s in specs])
        self._discrete = tf.constant([s.kind == DISCRETE for s in specs])

    @property
    def size(self) -> int:
        """The number of tuned hyperparameters (the hypernet input width)."""
        return len(self.specs)

    def _unconstrained_of(self, values: Sequence[float]) -> list[float]:
        # A discrete value goes mid-way into its integer cell, so that float32 round-off (and
        # small moves) do not floor an integer to the integer below.
        start = [min(math.floor(v) + 0.5, (v + s.maximum) / 2) if s.kind == DISCRETE else v
                 for s, v in zip(self.specs, values)]
        return [float(b.inverse(float(v))) for b, v in zip(self._bijectors, start)]

    def assign_values(self, values: Sequence[float]) -> None:
        """Sets the tuned hyperparameters to [H] constrained `values` (eager only).

        A discrete value v becomes an unconstrained value whose floored image is exactly v.
        """
        self.unconstrained_value.assign(self._unconstrained_of(list(values)))

    def make_sample(self, values: tf.Tensor, hnet_input: tf.Tensor) -> HParamSample:
        """The sample of [B, H] tuned `values` and `hnet_input`, with the fixed columns added."""
        fixed = tf.broadcast_to(self._fixed_row, [tf.shape(values)[0], len(self.fixed_specs)])
        return HParamSample(self.sample_names, tf.concat([values, fixed], axis=1), hnet_input)

    def index(self, name: str) -> int:
        if name not in self.names:
            raise KeyError(f"No hyperparameter {name!r}; known: {list(self.names)}.")
        return self.names.index(name)

    def scale(self) -> tf.Tensor:
        """Perturbation scales sigma = softplus(unconstrained_scale), shape [H]."""
        return tf.math.softplus(self.unconstrained_scale)

    def to_constrained(self, unconstrained: tf.Tensor) -> tf.Tensor:
        """Maps [..., H] unconstrained values to constrained ones, flooring discrete columns."""
        unconstrained = tf.convert_to_tensor(unconstrained, tf.float32)
        columns = [b.forward(unconstrained[..., i]) for i, b in enumerate(self._bijectors)]
        values = tf.stack(columns, axis=-1)
        # The floor has zero gradient; discrete hyperparameters learn only through the gates.
        return tf.where(self._discrete, tf.floor(values), values)

    def to_unconstrained(self, values: tf.Tensor) -> tf.Tensor:
        """Inverse of the bijectors for [..., H] constrained values (no floor to undo)."""
        values = tf.convert_to_tensor(values, tf.float32)
        columns = [b.inverse(values[..., i]) for i, b in enumerate(self._bijectors)]
        return tf.stack(columns, axis=-1)

    def constrained(self) -> tf.Tensor:
        """Current constrained values, shape [H]."""
        return self.to_constrained(self.unconstrained_value)

    def as_dict(self) -> dict[str, float]:
        """Current constrained values by name (eager only)."""
        return dict(zip(self.names, self.constrained().numpy().tolist()))

    def sample(self, batch_size: tf.Tensor | int, perturb: bool = True) -> HParamSample:
        """Draws one row of hyperparameters per example.

        Args:
          batch_size: number of rows; a Python int or a scalar tensor (dynamic batch sizes work).
          perturb: if False every row is the current unperturbed value.

        Returns:
          An `HParamSample` whose tensors are differentiable with respect to both variables.
        """
        unconstrained = tf.broadcast_to(self.unconstrained_value, [batch_size, self.size])
        if perturb:
            noise = self.generator.normal([batch_size, self.size], dtype=tf.float32)
            # Shared hyperparameters reuse row 0's draw for the whole batch.
            noise = tf.where(self._shared, self._shared_noise() if _replicated() else noise[:1],
                             noise)
            unconstrained = unconstrained + self.scale() * noise
        return self.make_sample(self.to_constrained(unconstrained), unconstrained)

    def _shared_noise(self) -> tf.Tensor:
        """[1, H] noise that is the same on every replica of a `tf.distribute` strategy.

        A generator made in a strategy scope gives each replica its own stream (its key is
        hashed with the replica id), but its state -- the counter and the seed's key -- advances
        identically everywhere. So the state, read and advanced by `skip`, seeds a stateless
        draw that every replica repeats: a shared hyperparameter gets one draw per global batch.
        """
        state = self.generator.skip(self.size)
        return tf.random.stateless_normal([1, self.size], seed=tf.stack([state[0], state[-1]]),
                                          dtype=tf.float32)

    def entropy(self) -> tf.Tensor:
        """Entropy of the Gaussian perturbation: sum_j log(sigma_j * sqrt(2 pi e))."""
        return tf.reduce_sum(tf.math.log(self.scale() * math.sqrt(2.0 * math.pi * math.e)))
