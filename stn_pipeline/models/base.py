"""The contract between a user's model and `StnTrainer`.

A model is a `tf.Module` that owns its network AND the way its inputs are prepared, because in an
STN the per-example hyperparameters reach both: augmentation strengths and dropout rates come from
`sample.values`, STN gates from `sample.hnet_input`. Subclass `StnModel` and implement `__call__`;
override `preprocess`/`augment` when inputs need more than a float cast.
"""

from __future__ import annotations

import tensorflow as tf

from stn_pipeline.hparams import HParamSample

__all__ = ["StnClassifier", "StnModel", "StnRegressor"]


class StnModel(tf.Module):
    """Base class of models trained by `StnTrainer`.

    Methods the trainer calls, all inside compiled steps:
      preprocess(inputs): deterministic input preparation for evaluation and hyper steps.
      augment(inputs, targets, sample, seed): per-example perturbation for weight steps; returns
        prepared inputs and (possibly changed) targets. Default: `preprocess`, targets unchanged.
      __call__(inputs, sample, training, seed): outputs for prepared inputs.
      loss(targets, outputs): per-example losses, shape [B] (hyper steps and evaluation).
      training_loss(targets, outputs, sample): per-example losses of weight steps, which may
        depend on the sample (loss-term hyperparameters). Default: `loss`.
      metrics(targets, outputs): dict of per-example metrics, each [B] (averaged by the trainer).
    """

    def preprocess(self, inputs: tf.Tensor) -> tf.Tensor:
        return tf.cast(inputs, tf.float32)

    def augment(self, inputs: tf.Tensor, targets: tf.Tensor, sample: HParamSample,
                seed: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
        del sample, seed  # Unused: no augmentation by default.
        return self.preprocess(inputs), targets

    def loss(self, targets: tf.Tensor, outputs: tf.Tensor) -> tf.Tensor:
        raise TypeError(f"{type(self).__name__} must define loss(targets, outputs) or derive "
                        "from StnClassifier / StnRegressor.")

    def training_loss(self, targets: tf.Tensor, outputs: tf.Tensor,
                      sample: HParamSample) -> tf.Tensor:
        del sample  # Unused: no loss-term hyperparameters by default.
        return self.loss(targets, outputs)

    def metrics(self, targets: tf.Tensor, outputs: tf.Tensor) -> dict[str, tf.Tensor]:
        del targets, outputs  # Unused: no metric beyond the loss by default.
        return {}


class StnClassifier(StnModel):
    """Outputs are logits [B, K]; targets are integer class indices [B]."""

    def loss(self, targets, outputs):
        return tf.nn.sparse_softmax_cross_entropy_with_logits(tf.cast(targets, tf.int32), outputs)

    def metrics(self, targets, outputs):
        predicted = tf.argmax(outputs, axis=-1, output_type=tf.int32)
        return {"accuracy": tf.cast(tf.equal(predicted, tf.cast(targets, tf.int32)), tf.float32)}


class StnRegressor(StnModel):
    """Squared error, summed over output features."""

    def loss(self, targets, outputs):
        error = tf.reshape(outputs - tf.cast(targets, outputs.dtype), [tf.shape(outputs)[0], -1])
        return tf.reduce_sum(tf.square(error), axis=-1)
