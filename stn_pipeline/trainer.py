"""`StnTrainer`: the compiled weight step, hyper step and evaluation of a Self-Tuning Network.

The one invariant that makes it an STN: in a weight step ONE perturbed hyperparameter sample is
drawn per example, inside the compiled step, and that same sample drives the example's
augmentation, its dropout rates and the gates of every STN layer. A hyper step sees clean
validation inputs in evaluation mode, so the hyperparameters get gradient only through the gates,
and values and scales are updated from one forward/backward pass without any weight gradient.
"""

from __future__ import annotations

import dataclasses

import tensorflow as tf

from stn_pipeline import distribute, optimizers
from stn_pipeline.hparams import HyperParameters
from stn_pipeline.models.base import StnModel
from stn_pipeline.seeds import stream_seed

__all__ = ["StnTrainer", "TrainerConfig"]


def _all_finite(tensors) -> tf.Tensor:
    # One pass per tensor: a NaN or inf anywhere makes its sum non-finite.
    return tf.reduce_all([tf.math.is_finite(tf.reduce_sum(t)) for t in tensors if t is not None])


@dataclasses.dataclass(frozen=True)
class TrainerConfig:
    """Optimisation settings of `StnTrainer`.

    Attributes:
      weight_optimizer: "sgd" (momentum 0.9) or "adam" for the model weights.
      weight_lr: learning rate of the weights.
      hyper_lr: Adam learning rate of the unconstrained hyperparameter values.
      scale_lr: Adam learning rate of the unconstrained perturbation scales.
      tau: entropy weight; the hyper loss is validation loss - tau * entropy.
      tune: False freezes the hyperparameters: no perturbation in weight steps (the baseline).
      tune_scales: learn the perturbation scales in hyper steps (which are then perturbed).
      seed: run seed; augmentation and dropout masks draw from its "step" stream.
    """

    weight_optimizer: str = "sgd"
    weight_lr: float = 0.01
    hyper_lr: float = 3e-3
    scale_lr: float = 3e-3
    tau: float = 1e-3
    tune: bool = True
    tune_scales: bool = True
    seed: int = 0


class StnTrainer(tf.Module):
    """Owns a model, its hyperparameters and three optimizers; exposes compiled steps.

    Steps take a batch `(inputs, targets)` of any batch size and return dicts of scalars (and, for
    weight steps, the [B, H] per-example hyperparameter values, for histograms). They compile once:
    their input signatures fix dtype and trailing shape, leaving the batch dimension free.
    """

    def __init__(self, model: StnModel, hparams: HyperParameters, input_spec: tf.TensorSpec,
                 target_spec: tf.TensorSpec, config: TrainerConfig = TrainerConfig(),
                 name: str | None = None, strategy: tf.distribute.Strategy | None = None):
        """Constructs a `StnTrainer`.

        Args:
          model: an `StnModel` whose variables are all created (build it eagerly).
          hparams: the tuned hyperparameters; their variables are never trained by weight steps.
          input_spec: spec of one batch of raw inputs, batch dimension None.
          target_spec: spec of one batch of targets, batch dimension None.
          config: optimisation settings.
          name: module name.
          strategy: a `tf.distribute` strategy, or None (one device). With a strategy, the model
            and hyperparameters must have been built, and this trainer constructed, in its
            `scope()`; steps then take the per-replica batches of `distribute(dataset)`.
        """
        super().__init__(name=name)
        self.model = model
        self.hparams = hparams
        self.config = config
        self.input_spec = input_spec
        self.target_spec = target_spec
        hparam_refs = {v.ref() for v in hparams.variables}
        # Select by object identity: names of TF2 variables are not unique.
        self.weights = [v for v in model.trainable_variables if v.ref() not in hparam_refs]
        if not self.weights:
            raise ValueError(f"{type(model).__name__} has no trainable variables; build it first.")
        self.weight_optimizer = optimizers.make_optimizer(
            config.weight_optimizer, self.weights, config.weight_lr, name="weight_optimizer")
        self.hyper_optimizer = optimizers.Adam([hparams.unconstrained_value], config.hyper_lr,
                                               name="hyper_optimizer")
        self.scale_optimizer = optimizers.Adam([hparams.unconstrained_scale], config.scale_lr,
                                               name="scale_optimizer")
        self.step_generator = tf.random.Generator.from_seed(stream_seed(config.seed, "step"))
        self.tau = tf.Variable(float(config.tau), trainable=False, name="tau")
        # Added to the weight loss; 0 except when a test sets it to NaN to exercise the guards.
        self.loss_offset = tf.Variable(0.0, trainable=False, name="loss_offset")
        self.strategy = strategy
        if strategy is None:
            signature = [input_spec, target_spec]
            self.weight_step = tf.function(self._weight_step, input_signature=signature)
            self.hyper_step = tf.function(self._hyper_step, input_signature=signature)
            self.evaluate = tf.function(self._evaluate, input_signature=signature)
        else:
            self.weight_step = self._replicated(self._replica_weight_step)
            self.hyper_step = self._replicated(self._replica_hyper_step)
            self.evaluate = self._replicated(self._replica_evaluate)
        self.hyperparameters = tf.function(self._hyperparameters, input_signature=[])

    def distribute(self, dataset: tf.data.Dataset):
        """`dataset` (of global batches) as the steps take it: per-replica under a strategy."""
        if self.strategy is None:
            return dataset
        return self.strategy.distribute_datasets_from_function(distribute.input_fn(dataset))

    def _replicated(self, replica_fn):
        """A compiled step running `replica_fn` on every replica through `strategy.run`.

        Replica functions all-reduce what they return, so every replica holds the same values
        and the first local one is the result.
        """
        def step(inputs, targets):
            outputs = self.strategy.run(replica_fn, args=(inputs, targets))
            return tf.nest.map_structure(
                lambda value: self.strategy.experimental_local_results(value)[0], outputs)

        # Per-replica pieces carry concrete shapes; relax them instead of retracing per shape.
        return tf.function(step, reduce_retracing=True)

    def _mean_metrics(self, targets, outputs) -> dict[str, tf.Tensor]:
        return {k: tf.reduce_mean(v) for k, v in self.model.metrics(targets, outputs).items()}

    def _weight_step(self, inputs, targets):
        """One SGD/Adam step of the model weights on a per-example perturbed batch.

        The update is applied only when the loss and every gradient are finite; the returned
        `finite` flag tells the loop (which stops or counts a skipped step).
        """
        batch_size = tf.shape(targets)[0]
        sample = self.hparams.sample(batch_size, perturb=self.config.tune)
        seeds = self.step_generator.make_seeds(2)
        inputs, targets = self.model.augment(inputs, targets, sample, seeds[:, 0])
        with tf.GradientTape(watch_accessed_variables=False) as tape:
            tape.watch(self.weights)
            outputs = self.model(inputs, sample, training=True, seed=seeds[:, 1])
            loss = tf.reduce_mean(self.model.loss(targets, outputs)) + self.loss_offset
        gradients = tape.gradient(loss, self.weights)
        finite = _all_finite([loss] + gradients)
        if finite:
            self.weight_optimizer.apply(gradients)
        return {"loss": loss, **self._mean_metrics(targets, outputs), "finite": finite,
                "hparam_values": sample.values}

    def _hyper_step(self, inputs, targets):
        """One Adam step of hyperparameter values (and scales) on a clean validation batch.

        Skipped (and flagged through `finite`) when the loss or a gradient is not finite.
        """
        hparams = self.hparams
        variables = [hparams.unconstrained_value, hparams.unconstrained_scale]
        with tf.GradientTape(watch_accessed_variables=False) as tape:
            tape.watch(variables)
            sample = hparams.sample(tf.shape(targets)[0], perturb=self.config.tune_scales)
            outputs = self.model(self.model.preprocess(inputs), sample, training=False, seed=None)
            loss = tf.reduce_mean(self.model.loss(targets, outputs))
            entropy = hparams.entropy()
            hyper_loss = loss - self.tau * entropy
        value_gradient, scale_gradient = tape.gradient(hyper_loss, variables)
        finite = _all_finite([hyper_loss, value_gradient, scale_gradient])
        if finite:
            self.hyper_optimizer.apply([value_gradient])
            if self.config.tune_scales:
                self.scale_optimizer.apply([scale_gradient])
        return {"loss": loss, "hyper_loss": hyper_loss, "entropy": entropy,
                **self._mean_metrics(targets, outputs), "finite": finite}

    def _evaluate(self, inputs, targets):
        """Sums of loss and metrics at the current, unperturbed hyperparameters (eval mode)."""
        sample = self.hparams.sample(tf.shape(targets)[0], perturb=False)
        outputs = self.model(self.model.preprocess(inputs), sample, training=False, seed=None)
        sums = {"loss": tf.reduce_sum(self.model.loss(targets, outputs))}
        for key, value in self.model.metrics(targets, outputs).items():
            sums[key] = tf.reduce_sum(value)
        sums["count"] = tf.cast(tf.shape(targets)[0], tf.float32)
        return sums

    def _hyperparameters(self):
        """The current constrained values, perturbation scales and names."""
        return {"values": self.hparams.constrained(), "scales": self.hparams.scale(),
                "names": tf.constant(self.hparams.names)}

    # Replica step bodies (`tf.distribute`). The loss of each replica is its share of the global
    # batch mean -- per-example losses summed and divided by the global batch size -- so the
    # all-reduced SUM of the replicas' gradients is the gradient of the global mean loss, which
    # every replica then applies identically (`apply_replicated`).

    def _global_sum(self, value):
        if not tf.nest.flatten(value):  # e.g. a model without metrics; all_reduce needs a value
            return value
        return tf.distribute.get_replica_context().all_reduce(tf.distribute.ReduceOp.SUM, value)

    def _summed_metrics(self, targets, outputs, global_size) -> dict[str, tf.Tensor]:
        sums = {k: tf.reduce_sum(v) for k, v in self.model.metrics(targets, outputs).items()}
        return {k: v / global_size for k, v in self._global_sum(sums).items()}

    def _replica_weight_step(self, inputs, targets):
        context = tf.distribute.get_replica_context()
        replicas = float(context.num_replicas_in_sync)
        local_size = tf.shape(targets)[0]
        global_size = self._global_sum(tf.cast(local_size, tf.float32))
        # Per-example noise, augmentation and masks come from per-replica streams (generators
        # made in the strategy scope); shared hyperparameters get one draw per global batch.
        sample = self.hparams.sample(local_size, perturb=self.config.tune)
        seeds = self.step_generator.make_seeds(2)
        inputs, targets = self.model.augment(inputs, targets, sample, seeds[:, 0])
        with tf.GradientTape(watch_accessed_variables=False) as tape:
            tape.watch(self.weights)
            outputs = self.model(inputs, sample, training=True, seed=seeds[:, 1])
            loss = (tf.reduce_sum(self.model.loss(targets, outputs)) / global_size
                    + self.loss_offset / replicas)
        gradients = tape.gradient(loss, self.weights)
        loss, gradients = self._global_sum((loss, gradients))
        finite = _all_finite([loss] + gradients)
        self.weight_optimizer.apply_replicated(gradients, finite)
        return {"loss": loss, **self._summed_metrics(targets, outputs, global_size),
                "finite": finite, "hparam_values": context.all_gather(sample.values, axis=0)}

    def _replica_hyper_step(self, inputs, targets):
        hparams = self.hparams
        replicas = float(tf.distribute.get_replica_context().num_replicas_in_sync)
        local_size = tf.shape(targets)[0]
        global_size = self._global_sum(tf.cast(local_size, tf.float32))
        variables = [hparams.unconstrained_value, hparams.unconstrained_scale]
        with tf.GradientTape(watch_accessed_variables=False) as tape:
            tape.watch(variables)
            sample = hparams.sample(local_size, perturb=self.config.tune_scales)
            outputs = self.model(self.model.preprocess(inputs), sample, training=False, seed=None)
            loss = tf.reduce_sum(self.model.loss(targets, outputs)) / global_size
            entropy = hparams.entropy()
            # The entropy term is global: each replica carries 1/replicas of it.
            hyper_loss = loss - self.tau * entropy / replicas
        value_gradient, scale_gradient = tape.gradient(hyper_loss, variables)
        loss, hyper_loss, value_gradient, scale_gradient = self._global_sum(
            (loss, hyper_loss, value_gradient, scale_gradient))
        finite = _all_finite([hyper_loss, value_gradient, scale_gradient])
        self.hyper_optimizer.apply_replicated([value_gradient], finite)
        if self.config.tune_scales:
            self.scale_optimizer.apply_replicated([scale_gradient], finite)
        return {"loss": loss, "hyper_loss": hyper_loss, "entropy": entropy,
                **self._summed_metrics(targets, outputs, global_size), "finite": finite}

    def _replica_evaluate(self, inputs, targets):
        return self._global_sum(self._evaluate(inputs, targets))

    def evaluate_dataset(self, dataset: tf.data.Dataset) -> dict[str, float]:
        """Mean loss and metrics over a finite dataset of batches (eager loop over batches)."""
        totals: dict[str, float] = {}
        for inputs, targets in self.distribute(dataset):
            for key, value in self.evaluate(inputs, targets).items():
                totals[key] = totals.get(key, 0.0) + float(value)
        count = totals.pop("count", 0.0)
        if not count:
            raise ValueError("evaluate_dataset: the dataset is empty.")
        return {key: value / count for key, value in totals.items()}

    def trainer_variables(self) -> list[tf.Variable]:
        """Every variable that determines the trainer's future, generator states included."""
        return list(self.variables) + [self.hparams.generator.state, self.step_generator.state]

    def state_variables(self) -> list[tf.Variable]:
        """Every variable whose value determines the model's predictions (for best-state copies)."""
        return list(self.model.variables) + list(self.hparams.variables)
