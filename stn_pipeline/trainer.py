"""`StnTrainer`: the compiled weight step, hyper step and evaluation of a Self-Tuning Network.

The one invariant that makes it an STN: in a weight step ONE perturbed hyperparameter sample is
drawn per example, inside the compiled step, and that same sample drives the example's
augmentation, its dropout rates and the gates of every STN layer. A hyper step sees clean
validation inputs in evaluation mode, so the hyperparameters get gradient only through the gates,
and values and scales are updated from one forward/backward pass without any weight gradient.

Every step has one body, written for the replica context of a `tf.distribute` strategy and run
through `strategy.run`. Without a strategy the default one is used: its `run` is a plain call and
its all-reduce an identity, so the single-device step is the same code at no extra cost. Each
replica's loss is its share of the global-batch mean (per-example losses summed and divided by
the global batch size), so the all-reduced SUM of the replicas' gradients is the gradient of the
global mean, which every replica applies identically; the finite guard sees the reduced values,
so all replicas skip or apply a step together.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Sequence

import tensorflow as tf
from absl import logging

from stn_pipeline import distribute, methods, optimizers
from stn_pipeline.hparams import HParamSample, HyperParameters
from stn_pipeline.linearize import linearized
from stn_pipeline.models.base import StnModel
from stn_pipeline.seeds import stream_seed

__all__ = ["CYCLE_STATUS", "StnTrainer", "TrainerConfig"]


def _all_finite(tensors) -> tf.Tensor:
    # One pass per tensor: a NaN or inf anywhere makes its sum non-finite.
    return tf.reduce_all([tf.math.is_finite(tf.reduce_sum(t)) for t in tensors if t is not None])


def _global_sum(value):
    """Sum over the replicas (an identity on one replica); call in a replica context."""
    context = tf.distribute.get_replica_context()
    # On one replica there is nothing to reduce. Skipping the op also keeps the steps savable:
    # all_reduce carries a custom gradient that SavedModel cannot trace outside `strategy.run`.
    # An empty structure (a model without metrics) has nothing to reduce either.
    if context.num_replicas_in_sync == 1 or not tf.nest.flatten(value):
        return value
    return context.all_reduce(tf.distribute.ReduceOp.SUM, value)


def _gather(value):
    """`value` of every replica, concatenated along axis 0 (itself on one replica)."""
    context = tf.distribute.get_replica_context()
    return value if context.num_replicas_in_sync == 1 else context.all_gather(value, axis=0)


@dataclasses.dataclass(frozen=True, kw_only=True)
class TrainerConfig:
    """Optimisation settings of `StnTrainer`.

    Attributes:
      weight_optimizer: "sgd" (momentum 0.9) or "adam" for the model weights.
      weight_lr: learning rate of the weights.
      hyper_lr: Adam learning rate of the unconstrained hyperparameter values.
      scale_lr: Adam learning rate of the unconstrained perturbation scales.
      tau: entropy weight; the hyper loss is validation loss - tau * entropy.
      tune: False freezes the hyperparameters: no perturbation in weight steps (the baseline),
        and `hyper_step` only measures the validation loss, changing nothing.
      tune_scales: learn the perturbation scales in hyper steps (which are then perturbed).
      method: "stn" or "delta_stn" (`methods`); Delta-STN's response parameters get their own
        optimizer of the same kind and learning rate as the weights.
    """

    weight_optimizer: str = "sgd"
    weight_lr: float = 0.01
    hyper_lr: float = 3e-3
    scale_lr: float = 3e-3
    tau: float = 1e-3
    tune: bool = True
    tune_scales: bool = True
    method: str = "stn"


# `status` of `StnTrainer.run_cycles`: all steps ran, or which kind of step ended the call.
CYCLE_STATUS = ("running", "weight", "hyper", "hparams")

# A parameter group: the optimizer that updates it and its variables, in the optimizer's order.
Update = tuple[tf.Module, Sequence[tf.Variable]]


class StnTrainer(tf.Module):
    """Owns a model, its hyperparameters and three optimizers; exposes compiled steps.

    Steps take a batch `(inputs, targets)` of any batch size and return dicts of scalars (and, for
    weight steps, the [B, H] per-example hyperparameter values, for histograms). On one replica
    they compile once: their input signatures fix dtype and trailing shape, leaving the batch
    dimension free. With several replicas they take the per-replica batches of `distribute`.
    """

    def __init__(self, model: StnModel, hparams: HyperParameters, input_spec: tf.TensorSpec,
                 target_spec: tf.TensorSpec, config: TrainerConfig = TrainerConfig(), *,
                 seed: int = 0, name: str | None = None,
                 strategy: tf.distribute.Strategy | None = None):
        """Constructs a `StnTrainer`.

        Args:
          model: an `StnModel` whose variables are all created (build it eagerly).
          hparams: the tuned hyperparameters; their variables are never trained by weight steps.
          input_spec: spec of one batch of raw inputs, batch dimension None.
          target_spec: spec of one batch of targets, batch dimension None.
          config: optimisation settings.
          seed: run seed; augmentation and dropout masks draw from its "step" stream.
          name: module name.
          strategy: a `tf.distribute` strategy, or None for the current one (the default
            strategy outside any scope: one device). The model and hyperparameters must have
            been built, and this trainer constructed, in its `scope()`.
        """
        super().__init__(name=name)
        self.model = model
        self.hparams = hparams
        self.config = config
        self.input_spec = input_spec
        self.target_spec = target_spec
        hparam_refs = {v.ref() for v in hparams.variables}
        # Select by object identity: names of TF2 variables are not unique.
        weights = [v for v in model.trainable_variables if v.ref() not in hparam_refs]
        if not weights:
            raise ValueError(f"{type(model).__name__} has no trainable variables; build it first.")
        self.method = methods.make_method(config.method)
        self.method.init(model)
        response_refs = {v.ref() for v in self.method.response_variables(model)}
        # Every weight (STN), or Delta-STN's general parameters; the response ones apart.
        self.weights = [v for v in weights if v.ref() not in response_refs]
        self.weight_optimizer = optimizers.make_optimizer(
            config.weight_optimizer, self.weights, config.weight_lr, name="weight_optimizer")
        self.response_optimizer = None
        if response_refs:
            self.response_weights = [v for v in weights if v.ref() in response_refs]
            self.response_optimizer = optimizers.make_optimizer(
                config.weight_optimizer, self.response_weights, config.weight_lr,
                name="response_optimizer")
        self.hyper_optimizer = optimizers.Adam([hparams.unconstrained_value], config.hyper_lr,
                                               name="hyper_optimizer")
        self.scale_optimizer = optimizers.Adam([hparams.unconstrained_scale], config.scale_lr,
                                               name="scale_optimizer")
        self.step_generator = tf.random.Generator.from_seed(stream_seed(seed, "step"))
        self.tau = tf.Variable(float(config.tau), trainable=False, name="tau")
        self.strategy = strategy or tf.distribute.get_strategy()
        self.weight_step = self._compile(self._weight_step)
        self.hyper_step = self._compile(self._hyper_step)
        self.evaluate = self._compile(self._evaluate)
        self.hyperparameters = tf.function(self._hyperparameters, input_signature=[])
        # Several cycles per call (`run_cycles`); traced on first use only.
        self.compiled_cycles = tf.function(self._cycles)
        self._cycle_specs = None

    @property
    def weight_optimizers(self) -> list[tf.Module]:
        """The optimizers of the weights (the learning-rate schedule acts on all of them)."""
        return [o for o in (self.weight_optimizer, self.response_optimizer) if o is not None]

    def _group(self, name: str) -> Update:
        """The optimizer and variables of the parameter group `name` (`methods.WEIGHTS`...)."""
        if name == methods.RESPONSE:
            return self.response_optimizer, self.response_weights
        return self.weight_optimizer, self.weights

    @property
    def replicated(self) -> bool:
        """True when steps run on several replicas (and take per-replica batches)."""
        return self.strategy.num_replicas_in_sync > 1

    def distribute(self, dataset: tf.data.Dataset):
        """`dataset` (of global batches) as the steps take it: per-replica when replicated."""
        if not self.replicated:
            return dataset
        return self.strategy.distribute_datasets_from_function(distribute.input_fn(dataset))

    def _cross_replica(self, replica_fn: Callable) -> Callable:
        """`replica_fn` run on every replica through `strategy.run` (not compiled).

        Replica functions all-reduce what they return, so every replica holds the same values
        and the first local one is the result.
        """
        def step(inputs, targets):
            outputs = self.strategy.run(replica_fn, args=(inputs, targets))
            return tf.nest.map_structure(
                lambda value: self.strategy.experimental_local_results(value)[0], outputs)

        return step

    def _compile(self, replica_fn: Callable) -> Callable:
        """A compiled step running `replica_fn` on every replica (`_cross_replica`)."""
        step = self._cross_replica(replica_fn)
        if self.replicated:
            # Per-replica pieces carry concrete shapes; relax them instead of retracing per shape.
            return tf.function(step, reduce_retracing=True)
        return tf.function(step, input_signature=[self.input_spec, self.target_spec])

    # Replica step bodies: each runs in a replica context (see the module docstring).

    def _descend(self, loss_fn: Callable, updates: Sequence[Update], allowed=True):
        """One all-reduced, finite-guarded gradient step of the parameter groups `updates`.

        `loss_fn()` returns `(loss, extras)`: this replica's share of the loss to descend and
        anything else to return. The step is applied only when the summed loss and every summed
        gradient are finite, on every replica alike, and `allowed` (a flag: the earlier updates
        of the same weight step were finite). Returns (summed loss, extras, finite): a tensor
        flag, so that several steps can run inside one compiled call.

        Steps are built from this and `hparams.sample`; a training method (`methods`) only
        changes what `loss_fn` feeds the model and which `updates` it descends.
        """
        variables = [v for _, group in updates for v in group]
        with tf.GradientTape(watch_accessed_variables=False) as tape:
            tape.watch(variables)
            loss, extras = loss_fn()
        gradients = tape.gradient(loss, variables)
        loss, gradients = _global_sum((loss, gradients))
        finite = _all_finite([loss] + gradients)
        start = 0
        apply = tf.logical_and(finite, allowed)
        for optimizer, group in updates:
            optimizer.apply_replicated(gradients[start:start + len(group)], apply)
            start += len(group)
        return loss, extras, finite

    def _global_batch_size(self, targets) -> tuple[tf.Tensor, tf.Tensor]:
        local_size = tf.shape(targets)[0]
        return local_size, _global_sum(tf.cast(local_size, tf.float32))

    def _mean_metrics(self, targets, outputs, global_size) -> dict[str, tf.Tensor]:
        sums = {k: tf.reduce_sum(v) for k, v in self.model.metrics(targets, outputs).items()}
        return {k: v / global_size for k, v in _global_sum(sums).items()}

    def _weight_step(self, inputs, targets):
        """One weight step: the method's updates (`methods.Phase`) of its parameter groups.

        Each update draws its hyperparameters (per example when perturbed), augments the batch
        and runs the model with that one sample; the first update's loss and metrics are the
        step's. Per-example noise, augmentation and masks come from per-replica streams
        (generators made in the strategy scope); shared hyperparameters get one draw per global
        batch. An update is applied only when its loss and every gradient are finite and so
        were the step's earlier updates' (a skipped step changes nothing); the returned
        `finite` flag (all updates) tells the loop to stop or count a skipped step.
        """
        local_size, global_size = self._global_batch_size(targets)
        results, finite = {}, tf.constant(True)
        for phase in self.method.weight_phases(self.config.tune):
            sample = self.method.prepare(self.hparams.sample(local_size, perturb=phase.perturb),
                                         self.hparams)
            loss, outputs, phase_finite, phase_targets = self._fit_phase(
                inputs, targets, sample, phase, global_size, allowed=finite)
            finite = tf.logical_and(finite, phase_finite)
            if not results:
                results.update(self._mean_metrics(phase_targets, outputs, global_size))
            results[f"{phase.name}loss"] = loss
        return {**results, "finite": finite, "hparam_values": _gather(sample.values)}

    def _fit_phase(self, inputs, targets, sample: HParamSample, phase, global_size, allowed):
        """Augments with `sample` and descends the phase's group; the prediction is linearised
        in the hypernet input around zero when the phase says so."""
        seeds = self.step_generator.make_seeds(2)
        inputs, targets = self.model.augment(inputs, targets, sample, seeds[:, 0])

        def predict(hnet_input):
            return self.model(inputs, dataclasses.replace(sample, hnet_input=hnet_input),
                              training=True, seed=seeds[:, 1])

        def loss_fn():
            outputs = (linearized(predict, sample.hnet_input) if phase.linearize
                       else predict(sample.hnet_input))
            losses = self.model.training_loss(targets, outputs, sample)  # loss terms: training only
            return tf.reduce_sum(losses) / global_size, outputs

        loss, outputs, finite = self._descend(loss_fn, [self._group(phase.group)], allowed)
        return loss, outputs, finite, targets

    def _hyper_step(self, inputs, targets):
        """One Adam step of hyperparameter values (and scales) on a clean validation batch.

        Skipped (and flagged through `finite`) when the loss or a gradient is not finite. With
        `tune=False` it changes nothing (no update, no noise drawn) and only measures.
        """
        hparams, config = self.hparams, self.config
        local_size, global_size = self._global_batch_size(targets)
        replicas = tf.distribute.get_replica_context().num_replicas_in_sync
        updates = []
        if config.tune:
            updates.append((self.hyper_optimizer, [hparams.unconstrained_value]))
            if config.tune_scales:
                updates.append((self.scale_optimizer, [hparams.unconstrained_scale]))
        else:
            logging.warning("StnTrainer(tune=False): hyper_step leaves the hyperparameters and "
                            "scales unchanged.")  # once per trace

        def loss_fn():
            sample = self.method.prepare(
                hparams.sample(local_size, perturb=config.tune and config.tune_scales), hparams)
            outputs = self.model(self.model.preprocess(inputs), sample, training=False, seed=None)
            loss = tf.reduce_sum(self.model.loss(targets, outputs)) / global_size
            entropy = hparams.entropy()
            # The entropy term is global: each replica carries 1/replicas of it.
            hyper_loss = loss - self.tau * entropy / replicas
            return hyper_loss, (loss, entropy, outputs)

        hyper_loss, (loss, entropy, outputs), finite = self._descend(loss_fn, updates)
        return {"loss": _global_sum(loss), "hyper_loss": hyper_loss, "entropy": entropy,
                **self._mean_metrics(targets, outputs, global_size), "finite": finite}

    def _evaluate(self, inputs, targets):
        """Sums of loss and metrics at the current, unperturbed hyperparameters (eval mode)."""
        sample = self.method.prepare(self.hparams.sample(tf.shape(targets)[0], perturb=False),
                                     self.hparams)
        outputs = self.model(self.model.preprocess(inputs), sample, training=False, seed=None)
        sums = {"loss": tf.reduce_sum(self.model.loss(targets, outputs))}
        for key, value in self.model.metrics(targets, outputs).items():
            sums[key] = tf.reduce_sum(value)
        sums["count"] = tf.cast(tf.shape(targets)[0], tf.float32)
        return _global_sum(sums)

    def _hyperparameters(self):
        """The current constrained values, perturbation scales and names."""
        return {"values": self.hparams.constrained(), "scales": self.hparams.scale(),
                "names": tf.constant(self.hparams.names)}

    def run_cycles(self, train_batches, hyper_batches, *, first_step: int, weight_steps: int,
                   train_steps: int, hyper_steps: int, stop_on_nan: bool) -> dict:
        """Weight steps and the hyper steps of the cycles they complete, in one compiled call.

        Runs up to `weight_steps` weight steps on batches drawn from the iterator
        `train_batches`, numbered from `first_step + 1`; after each one whose number is a
        multiple of `train_steps` (a cycle's end), `hyper_steps` hyper steps on batches of
        `hyper_batches`. Batches, seeds and updates follow the order of the same steps called
        one by one. A step whose loss or gradient is not finite is not applied (as
        `weight_step` and `hyper_step`); with `stop_on_nan` the call ends at it, otherwise it
        is counted in `skipped`. Non-finite hyperparameters after a cycle always end the call.
        Every argument but the iterators is passed as a tensor: one trace serves every call.

        Returns:
          `weight` and `hyper`: the outputs of the last weight and hyper step (the latter all
          zeros when none ran); `weight_steps` and `hyper_steps`: how many ran (a failing one
          included); `skipped`; `status`: one of `CYCLE_STATUS` (0: all ran).
        """
        if self._cycle_specs is None:
            self._cycle_specs = self._step_output_specs()
        return self.compiled_cycles(
            train_batches, hyper_batches, tf.constant(first_step, tf.int64),
            tf.constant(weight_steps, tf.int32), tf.constant(train_steps, tf.int64),
            tf.constant(hyper_steps, tf.int32), tf.constant(stop_on_nan))

    def _step_output_specs(self):
        """Specs of what the weight and the hyper step return (loop variables of `_cycles`)."""
        weight_step = self._cross_replica(self._weight_step)
        hyper_step = self._cross_replica(self._hyper_step)
        # A trace only, never run: plain tensors go to every replica alike.
        traced = tf.function(lambda x, y: (weight_step(x, y), hyper_step(x, y)))
        outputs = traced.get_concrete_function(self.input_spec, self.target_spec)
        return tf.nest.map_structure(lambda t: tf.TensorSpec(t.shape, t.dtype),
                                     outputs.structured_outputs)

    def _cycles(self, train_batches, hyper_batches, first_step, weight_steps, train_steps,
                hyper_steps, stop_on_nan):
        """The body of `run_cycles`: nested while loops in the cross-replica context."""
        weight_step = self._cross_replica(self._weight_step)
        hyper_step = self._cross_replica(self._hyper_step)
        specs = self._cycle_specs
        initial = tf.nest.map_structure(
            lambda s: tf.zeros([d or 0 for d in s.shape.as_list()], s.dtype), specs)
        invariants = tf.nest.map_structure(lambda s: s.shape, specs)
        running, scalar = CYCLE_STATUS.index("running"), tf.TensorShape([])

        def failed(finite, status, skipped, code):
            """The status and skip count after a step with this `finite` flag."""
            bad = tf.logical_not(finite)
            status = tf.where(bad & stop_on_nan, CYCLE_STATUS.index(code), status)
            return status, skipped + tf.cast(bad & tf.logical_not(stop_on_nan), tf.int64)

        def hyper_body(count, status, skipped, hyper_out):
            hyper_out = hyper_step(*next(hyper_batches))
            status, skipped = failed(hyper_out["finite"], status, skipped, "hyper")
            return count + 1, status, skipped, hyper_out

        def weight_body(done, hyper_done, status, skipped, weight_out, hyper_out):
            weight_out = weight_step(*next(train_batches))
            status, skipped = failed(weight_out["finite"], status, skipped, "weight")
            done += 1
            at_cycle_end = (first_step + tf.cast(done, tf.int64)) % train_steps == 0
            cycle = tf.where(at_cycle_end & (status == running), hyper_steps, 0)
            count, status, skipped, hyper_out = tf.while_loop(
                lambda count, status, *_: (count < cycle) & (status == running), hyper_body,
                (0, status, skipped, hyper_out),
                shape_invariants=(scalar, scalar, scalar, invariants[1]))
            finite = tf.reduce_all(tf.math.is_finite(self.hparams.constrained()))
            status = tf.where((count > 0) & (status == running) & tf.logical_not(finite),
                              CYCLE_STATUS.index("hparams"), status)
            return done, hyper_done + count, status, skipped, weight_out, hyper_out

        done, hyper_done, status, skipped, weight_out, hyper_out = tf.while_loop(
            lambda done, _, status, *__: (done < weight_steps) & (status == running),
            weight_body, (0, 0, running, tf.constant(0, tf.int64), *initial),
            shape_invariants=(scalar,) * 4 + invariants)
        return {"weight": weight_out, "hyper": hyper_out, "weight_steps": done,
                "hyper_steps": hyper_done, "skipped": skipped, "status": status}

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
