"""Small `tf.Module` optimizers whose state is plain, checkpointable, exportable variables.

The trainer owns three of them (weights, hyperparameter values, perturbation scales). Keeping them
as modules with slots created eagerly in `__init__` means no variable is ever created inside a
compiled step, the whole state goes into `tf.train.Checkpoint` and a SavedModel as-is, and the
learning rate is a variable that schedules change without retracing.
"""

from __future__ import annotations

from typing import Sequence

import tensorflow as tf

__all__ = ["Adam", "Momentum", "make_optimizer"]


class _Optimizer(tf.Module):
    """Base: holds the variables it updates and a learning-rate variable."""

    def __init__(self, variables: Sequence[tf.Variable], learning_rate: float, name: str | None):
        super().__init__(name=name)
        if not learning_rate > 0:
            raise ValueError(f"{type(self).__name__}: learning_rate must be > 0, "
                             f"received {learning_rate}.")
        self._targets = list(variables)
        with self.name_scope:
            self.learning_rate = tf.Variable(float(learning_rate), trainable=False,
                                             name="learning_rate")
            self.iterations = tf.Variable(0, dtype=tf.int64, trainable=False, name="iterations")

    def _slots(self, tag: str) -> list[tf.Variable]:
        with self.name_scope:
            return [tf.Variable(tf.zeros_like(v), trainable=False, name=tag) for v in self._targets]

    def apply(self, gradients: Sequence[tf.Tensor]) -> None:
        """Applies one update; `gradients[i]` belongs to the i-th variable given at construction."""
        if len(gradients) != len(self._targets):
            raise ValueError(f"{type(self).__name__}: {len(gradients)} gradients for "
                             f"{len(self._targets)} variables.")
        self.iterations.assign_add(1)
        for index, (gradient, variable) in enumerate(zip(gradients, self._targets)):
            if gradient is not None:
                # Each subclass defines `_update(index, gradient, variable)`, its update rule.
                self._update(index, tf.convert_to_tensor(gradient), variable)

    def apply_replicated(self, gradients: Sequence[tf.Tensor], condition: tf.Tensor) -> None:
        """`apply` from the replica context of a `tf.distribute` strategy, if `condition`.

        `gradients` and `condition` must be identical on every replica (all-reduced). A replica
        may not assign a mirrored variable itself, so one `merge_call` hands the update to
        `strategy.extended.update`, which runs it on each device against that device's copies
        of the variables and slots: identical inputs give identical copies, with no further
        communication. The condition is applied there, since a synchronisation point inside
        control flow (`if` around `merge_call`) is not supported.
        """
        gradients = [tf.convert_to_tensor(g) for g in gradients]

        def local_update(_, condition, *local_gradients):
            def update():
                self.apply(local_gradients)
                return tf.constant(True)

            return tf.cond(condition, update, lambda: tf.constant(False))

        def merged(strategy, condition, *gradients):
            return strategy.extended.update(self._targets[0], local_update,
                                            args=(condition, *gradients), group=True)

        tf.distribute.get_replica_context().merge_call(merged, args=(condition, *gradients))


class Momentum(_Optimizer):
    """SGD with heavy-ball momentum: v = m v + g; w -= lr v (PyTorch's convention, as ORIG)."""

    def __init__(self, variables: Sequence[tf.Variable], learning_rate: float = 0.01,
                 momentum: float = 0.9, name: str | None = None):
        super().__init__(variables, learning_rate, name)
        self.momentum = float(momentum)
        self.velocity = self._slots("velocity")

    def _update(self, index, gradient, variable):
        # TensorFlow's fused kernel does exactly v = m v + g; w -= lr v, in about half the time
        # of the same arithmetic in separate ops (benchmarks/throughput.py).
        tf.raw_ops.ResourceApplyMomentum(
            var=variable.handle, accum=self.velocity[index].handle,
            lr=tf.cast(self.learning_rate, variable.dtype), grad=gradient,
            momentum=tf.constant(self.momentum, variable.dtype))


class Adam(_Optimizer):
    """Adam (Kingma and Ba, 2015) with bias correction."""

    def __init__(self, variables: Sequence[tf.Variable], learning_rate: float = 3e-3,
                 beta1: float = 0.9, beta2: float = 0.999, epsilon: float = 1e-8,
                 name: str | None = None):
        super().__init__(variables, learning_rate, name)
        self.beta1, self.beta2, self.epsilon = float(beta1), float(beta2), float(epsilon)
        self.first_moment = self._slots("m")
        self.second_moment = self._slots("v")

    def _update(self, index, gradient, variable):
        m, v = self.first_moment[index], self.second_moment[index]
        m.assign(self.beta1 * m + (1.0 - self.beta1) * gradient)
        v.assign(self.beta2 * v + (1.0 - self.beta2) * tf.square(gradient))
        step = tf.cast(self.iterations, tf.float32)
        corrected_lr = (self.learning_rate * tf.sqrt(1.0 - self.beta2 ** step)
                        / (1.0 - self.beta1 ** step))
        variable.assign_sub(corrected_lr * m / (tf.sqrt(v) + self.epsilon))


def make_optimizer(kind: str, variables: Sequence[tf.Variable], learning_rate: float,
                   name: str | None = None) -> _Optimizer:
    """`kind` is "sgd" (momentum 0.9) or "adam"."""
    if kind == "sgd":
        return Momentum(variables, learning_rate, name=name)
    if kind == "adam":
        return Adam(variables, learning_rate, name=name)
    raise ValueError(f"Unknown optimizer {kind!r}; expected 'sgd' or 'adam'.")
