"""Shared by the training benchmarks: building the STN and plain trainers, interleaved timing
and peak-memory subprocesses.

A *unit* of work is one STN cycle (2 weight steps + 1 hyper step) or, for a plain network, 3
steps: the same images. Contenders run their units interleaved one by one, alternating which
goes first, so load changes on a shared machine hit all of them alike.
"""

from __future__ import annotations

import json
import os
import resource
import statistics
import subprocess
import sys
import time

import numpy as np
import tensorflow as tf
from absl import app, flags

import plain_models
from stn_pipeline import precision as precision_lib
from stn_pipeline.hparams import HyperParameters
from stn_pipeline.models.alexnet import CifarAlexNet, alexnet_hparams
from stn_pipeline.models.cifar_cnn import CifarCnn, cifar_cnn_hparams
from stn_pipeline.trainer import StnTrainer, TrainerConfig

IMAGE_SHAPE = (32, 32, 3)
NUM_CLASSES = 10
# CIFAR-10 training-set statistics in [0, 255] units (the values only set the input scale).
MEAN = (125.31, 122.95, 113.87)
STD = (62.99, 62.09, 66.70)
MODELS = {"cifar_cnn": (cifar_cnn_hparams, CifarCnn, plain_models.plain_cifar_cnn),
          "cifar_alexnet": (alexnet_hparams, CifarAlexNet, plain_models.plain_alexnet)}
IMAGES = tf.TensorSpec([None, *IMAGE_SHAPE], tf.uint8)
LABELS = tf.TensorSpec([None], tf.int64)
RESULT_PREFIX = "RESULT_JSON "
# STN cycles per timed repetition (and per memory child): a repetition takes a few seconds.
UNITS = {"cifar_cnn": 10, "cifar_alexnet": 2}


def define_flags(section: str, reps: int) -> None:
    """The flags every training benchmark shares; `section` names its part of BENCHMARKS.md."""
    flags.DEFINE_list("models", list(MODELS), "Models to benchmark.")
    flags.DEFINE_integer("steps", 0, "Units per repetition (STN cycles; 0: the model's default).")
    flags.DEFINE_integer("reps", reps, "Timed repetitions per model.")
    flags.DEFINE_integer("batch_size", 128, "Examples per step.")
    flags.DEFINE_bool("write", True, f"Rewrite the {section} section of BENCHMARKS.md.")


def check_models(models: list[str]) -> None:
    unknown = [m for m in models if m not in MODELS]
    if unknown:
        raise app.UsageError(f"Unknown models {unknown}; choose from {sorted(MODELS)}.")


def build_stn(name: str, precision: str = "float32") -> StnTrainer:
    """The STN trainer of experiment `name` (default settings) at `precision`."""
    specs_fn, model_class, _ = MODELS[name]
    specs = specs_fn()
    model = model_class(IMAGE_SHAPE, NUM_CLASSES, MEAN, STD, specs, seed=0)
    precision_lib.apply_precision(model, precision)
    return StnTrainer(model, HyperParameters(specs, seed=0), IMAGES, LABELS, TrainerConfig())


def build_plain(name: str, bias_add: bool = False) -> plain_models.PlainTrainer:
    """The plain (fixed-dropout) counterpart of `name` and its compiled step."""
    model = MODELS[name][2](IMAGE_SHAPE, NUM_CLASSES, MEAN, STD, rate=0.05, seed=0,
                            bias_add=bias_add)
    return plain_models.PlainTrainer(model, IMAGES, LABELS)


def jit_steps(trainer: StnTrainer) -> tuple:
    """`jit_compile=True` versions of the trainer's weight and hyper steps (same variables)."""
    # pylint: disable=protected-access
    return (tf.function(trainer._weight_step, input_signature=[IMAGES, LABELS], jit_compile=True),
            tf.function(trainer._hyper_step, input_signature=[IMAGES, LABELS], jit_compile=True))


def plain_jit_step(trainer: plain_models.PlainTrainer):
    step = trainer._train_step  # pylint: disable=protected-access
    return tf.function(step, input_signature=[IMAGES, LABELS], jit_compile=True)


def make_batches(batch_size: int, count: int = 4, seed: int = 0) -> list:
    """`count` random uint8 image batches with int64 labels, as eager tensors."""
    rng = np.random.default_rng(seed)
    return [(tf.constant(rng.integers(0, 256, (batch_size, *IMAGE_SHAPE), dtype=np.uint8)),
             tf.constant(rng.integers(0, NUM_CLASSES, batch_size, dtype=np.int64)))
            for _ in range(count)]


def param_count(variables) -> int:
    return int(sum(np.prod(v.shape) for v in variables))


class Contender:
    """One configuration being timed: an STN (weight and hyper step) or a plain train step."""

    def __init__(self, label: str, weight_step, hyper_step=None):
        self.label = label
        self.weight_step = weight_step
        self.hyper_step = hyper_step
        self.compile_seconds = 0.0
        self.runs: list[dict] = []
        self._times = {"weight": 0.0, "hyper": 0.0}
        self._units = 0
        self._next = 0
        self._last_loss = None

    @property
    def is_stn(self) -> bool:
        return self.hyper_step is not None

    def warm_up(self, batches, calls: int = 2) -> None:
        """Compiles (timed) and runs `calls` more units' worth of steps."""
        x, y = batches[0]
        start = time.perf_counter()
        self.weight_step(x, y)
        if self.is_stn:
            self.hyper_step(x, y)
        self.compile_seconds = time.perf_counter() - start
        for _ in range(calls):
            self.weight_step(x, y)["loss"].numpy()
            if self.is_stn:
                self.hyper_step(x, y)["loss"].numpy()

    def _call(self, step, batches, key: str) -> dict:
        x, y = batches[self._next % len(batches)]
        self._next += 1
        start = time.perf_counter()
        out = step(x, y)  # eager calls of compiled functions on CPU return when done
        self._times[key] += time.perf_counter() - start
        return out

    def unit(self, batches) -> None:
        """Runs and times one unit of work."""
        if self.is_stn:
            self._call(self.weight_step, batches, "weight")
            self._call(self.weight_step, batches, "weight")
            out = self._call(self.hyper_step, batches, "hyper")
        else:
            for _ in range(3):
                out = self._call(self.weight_step, batches, "weight")
        self._units += 1
        self._last_loss = out["loss"]

    def close_run(self, batch_size: int) -> dict:
        """Images/s of the units since the last call; the run is kept for the medians."""
        loss = float(self._last_loss)
        if not np.isfinite(loss):
            raise FloatingPointError(f"{self.label}: non-finite loss {loss}.")
        weight, hyper, units = self._times["weight"], self._times["hyper"], self._units
        result = {"ips": 3 * units * batch_size / (weight + hyper), "seconds": weight + hyper}
        if self.is_stn:
            result.update({"weight_ips": 2 * units * batch_size / weight,
                           "hyper_ips": units * batch_size / hyper,
                           "train_ips": 2 * units * batch_size / (weight + hyper)})
        self.runs.append(result)
        self._times = {"weight": 0.0, "hyper": 0.0}
        self._units = 0
        return result

    def summary(self) -> dict:
        """Medians over the runs, the best run and the compile time."""
        keys = [k for k in self.runs[0] if k.endswith("ips")]
        entry = {k: statistics.median(r[k] for r in self.runs) for k in keys}
        entry.update({"best_ips": max(r["ips"] for r in self.runs),
                      "ips_range": [min(r["ips"] for r in self.runs),
                                    max(r["ips"] for r in self.runs)],
                      "compile_seconds": self.compile_seconds})
        return entry


def warm_up_all(contenders: list[Contender], batches, name: str) -> dict:
    """Warms up every contender; one that fails (e.g. under XLA) is dropped and its error kept."""
    errors = {}
    for contender in list(contenders):
        try:
            contender.warm_up(batches)
        except Exception as error:  # noqa: BLE001 - an XLA failure is a result, not a crash
            errors[contender.label] = f"{type(error).__name__}: {str(error).splitlines()[0][:300]}"
            contenders.remove(contender)
            print(f"  {name}: {contender.label} failed: {errors[contender.label]}", flush=True)
            continue
        print(f"  {name}: {contender.label} compiled + first calls in "
              f"{contender.compile_seconds:.1f}s", flush=True)
    return errors


def time_interleaved(contenders: list[Contender], batches, units: int, reps: int,
                     name: str) -> list[dict]:
    """`reps` repetitions of `units` units of every contender, interleaved unit by unit;
    returns one {label: run} dict per repetition (for same-moment ratios)."""
    batch_size = int(batches[0][0].shape[0])
    repetitions = []
    for rep in range(reps):
        for i in range(units):
            order = contenders if (rep + i) % 2 == 0 else contenders[::-1]
            for contender in order:
                contender.unit(batches)
        repetitions.append({c.label: c.close_run(batch_size) for c in contenders})
        print(f"  {name} rep {rep + 1}/{reps}: " + ", ".join(
            f"{label} {r['ips']:.0f} img/s" for label, r in repetitions[-1].items()), flush=True)
    return repetitions


def median_ratio(repetitions: list[dict], top: str, bottom: str, key: str = "ips") -> float:
    """Median over repetitions of run[top][key] / run[bottom]["ips"]."""
    return statistics.median(r[top][key] / r[bottom]["ips"] for r in repetitions)


def run_child(script: str, args: list[str], timeout: float = 900.0) -> dict:
    """Runs `script` as a child with `args`; returns the JSON it prints (or an error).

    The child is started through `sh`, which forks it (no `exec`): on Linux a process started by
    fork + exec straight from this one inherits this process's peak RSS in its `ru_maxrss`
    (the kernel keeps the old address space's high-water mark across execve).
    """
    command = ["/bin/sh", "-c", '"$0" "$@"; exit $?', sys.executable, os.path.abspath(script),
               *args]
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
    try:
        proc = subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        return {"error": f"timeout after {timeout:.0f}s"}
    for line in proc.stdout.splitlines():
        if line.startswith(RESULT_PREFIX):
            return json.loads(line[len(RESULT_PREFIX):])
    tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
    return {"error": f"exit {proc.returncode}: " + " | ".join(tail)[:500]}


def print_result(result: dict) -> None:
    """What a child prints for `run_child`."""
    print(RESULT_PREFIX + json.dumps(result), flush=True)


def peak_rss_after(contender: Contender | None, batches, units: int) -> dict:
    """Peak RSS (MiB) after warming up `contender` and running `units` units (None: idle)."""
    tf.reduce_sum(tf.ones([4])).numpy()  # start the runtime and its thread pools
    if contender is not None:
        contender.warm_up(batches)
        for _ in range(units):
            contender.unit(batches)
        contender.close_run(int(batches[0][0].shape[0]))
    # Linux reports ru_maxrss in KiB.
    return {"max_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0}


def child_peak_rss(kind: str, name: str, precision: str = "float32", jit: bool = False,
                   batch_size: int = 128) -> float | str:
    """Peak RSS (MiB) of one configuration measured by `memory.py` in a subprocess, or the
    child's error text."""
    script = os.path.join(os.path.dirname(os.path.abspath(__file__)), "memory.py")
    result = run_child(script, [f"--kind={kind}", f"--model={name}", f"--precision={precision}",
                                f"--jit={jit}", f"--batch_size={batch_size}"])
    print(f"  {name} {kind} {precision}{' jit' if jit else ''}: {result}", flush=True)
    return result.get("max_rss_mib", result.get("error", "?"))
