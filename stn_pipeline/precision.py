"""`--precision`: the dtype in which the STN layers compute their matmuls and convolutions.

Keras' policy names: `float32` (the default) and `mixed_bfloat16`. Under `mixed_bfloat16` every
STN layer casts its inputs and kernels to bfloat16 once per call and computes its matmuls and
convolutions there; variables, hyperparameters, scales, optimizer slots, the gated combine, the
losses, the entropy and every gradient stay float32. Checkpoints therefore hold the same float32
variables at either precision, and a run can resume at the other one.
"""

from __future__ import annotations

import functools

import tensorflow as tf
from absl import logging

from stn_pipeline.layers import StnConv2D, StnDense
from stn_pipeline.plain_layers import PlainConv2D, PlainDense

__all__ = ["PRECISIONS", "PrecisionError", "apply_precision", "check_precision",
           "compute_dtype", "cpu_bf16_flags"]

PRECISIONS = {"float32": tf.float32, "mixed_bfloat16": tf.bfloat16}
_BF16_CPU_FLAGS = ("avx512_bf16", "amx_bf16")


class PrecisionError(ValueError):
    """A precision that is unknown or that this device cannot run."""


def compute_dtype(precision: str) -> tf.DType:
    """The compute dtype of a precision name; `PrecisionError` for an unknown name."""
    if precision not in PRECISIONS:
        raise PrecisionError(f"--precision={precision!r} is unknown; choose one of "
                             f"{sorted(PRECISIONS)}.")
    return PRECISIONS[precision]


def cpu_bf16_flags(cpuinfo: str = "/proc/cpuinfo") -> list[str] | None:
    """The bfloat16 instruction sets this CPU reports (None where /proc/cpuinfo is unreadable)."""
    try:
        with open(cpuinfo) as handle:
            flags = next((line.split(":", 1)[1].split() for line in handle
                          if line.startswith("flags")), [])
    except OSError:
        return None
    return [flag for flag in _BF16_CPU_FLAGS if flag in flags]


@functools.lru_cache(maxsize=None)
def _device_problem(dtype_name: str) -> str | None:
    """Why the default device cannot run `dtype_name` matmuls and convolutions (None: it can).

    Probed once per process with a tiny matmul and convolution; a CPU without bfloat16
    instructions runs them emulated, slower than float32, which gets one warning.
    """
    dtype = tf.as_dtype(dtype_name)
    try:
        tf.matmul(tf.ones([2, 2], dtype), tf.ones([2, 2], dtype)).numpy()
        tf.nn.conv2d(tf.ones([1, 3, 3, 1], dtype), tf.ones([2, 2, 1, 1], dtype), 1, "SAME").numpy()
    except (tf.errors.OpError, TypeError) as error:
        return str(getattr(error, "message", error)).strip().splitlines()[0]
    if not tf.config.list_logical_devices("GPU") and cpu_bf16_flags() == []:
        logging.warning("%s: this CPU has no avx512_bf16/amx_bf16 instructions; TensorFlow "
                        "emulates %s, likely slower than float32.", dtype_name, dtype_name)
    return None


def check_precision(precision: str) -> tf.DType:
    """Validates `precision` on this device and returns its compute dtype.

    Raises `PrecisionError` when the name is unknown or the default device cannot run its
    matmuls and convolutions.
    """
    dtype = compute_dtype(precision)
    problem = None if dtype == tf.float32 else _device_problem(dtype.name)
    if problem:
        raise PrecisionError(f"--precision={precision}: this device cannot run {dtype.name} "
                             f"matmuls and convolutions ({problem}); use --precision=float32.")
    return dtype


_LAYERS = (StnDense, StnConv2D, PlainDense, PlainConv2D)


def apply_precision(model: tf.Module, precision: str) -> int:
    """Sets the compute dtype of every STN or plain layer of `model`; returns how many were set.

    Call it before the model's first traced call (a compiled step keeps the dtype it was traced
    with). Variables are not touched: they stay float32 at every precision.
    """
    dtype = check_precision(precision)
    layers = {id(m): m for m in (model, *model.submodules) if isinstance(m, _LAYERS)}
    if not layers and dtype != tf.float32:
        logging.warning("--precision=%s: %s has no STN or plain layers, nothing computes in %s.",
                        precision, type(model).__name__, dtype.name)
    for layer in layers.values():
        layer.compute_dtype = dtype
    return len(layers)
