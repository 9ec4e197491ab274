r"""Throughput and peak memory of the STN training cycle against a plain network.

    /root/stnvenv/bin/python benchmarks/throughput.py [--models=cifar_cnn,cifar_alexnet] \
        [--steps=N] [--reps=R] [--jit] [--nomemory] [--noprofile] [--noablation] [--nowrite]

The default run takes about 5-10 minutes on 2 cores (more on a loaded machine); --jit adds the
XLA variants (about 2 minutes more, mostly compilation).

What is measured, per model (`cifar_cnn`, `cifar_alexnet`), batch 128, CIFAR-shaped inputs:

  * STN: the compiled `StnTrainer.weight_step` / `hyper_step` in the paper's cycle of 2 weight
    steps + 1 hyper step. Images of a cycle = the images of its 3 steps (3 x 128); the table also
    gives the images/s of the weight steps alone and of the hyper step alone.
  * plain: the same architecture with ordinary layers and FIXED dropout 0.05
    (`plain_models.py`), momentum-SGD step compiled with `tf.function`.
  Both run in the same process on the same uint8 [128, 32, 32, 3] numpy batches (normalised in
  the graph), compiled and warmed up first, then timed in R repetitions of N units each, a unit
  being one STN cycle or 3 plain steps (the same images); units are interleaved one by one,
  alternating which goes first, so load changes on a shared machine hit both. Figures are
  medians over repetitions; the ratios are medians of the per-repetition ratios. The best
  repetition of each is also reported (the least-disturbed one, on a loaded machine).
  * --jit: the same steps compiled with `jit_compile=True` (XLA), timed in the same repetitions.
  * memory (subprocesses, one per configuration): `ru_maxrss` after warm-up and N cycles (3N
    plain steps), and of an idle process that imported TensorFlow and ran one op.
  * profile (subprocess): wall time of the pieces of a step (augmentation, forward, forward +
    backward, update, non-finite guard) and a `tf.profiler` trace of the steps, whose op times
    are summed by part of the network and by op kind.
  * ablation (subprocess): the STN steps with the PREVIOUS form of each speed-up the library
    adopted from this benchmark (commit f81dbee) re-implemented here (`ABLATIONS`), timed against
    the current library and the plain step in the same rounds.
  The plain step is also timed with `tf.nn.bias_add` biases (Keras style), a weaker baseline.

The script prints the tables and rewrites the part of BENCHMARKS.md between
`<!-- throughput:start -->` and `<!-- throughput:end -->` (creating the file if needed).
"""

from __future__ import annotations

import collections
import datetime
import glob
import json
import os
import platform
import re
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # before TensorFlow is imported

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402
from absl import app, flags  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import plain_models  # noqa: E402

from stn_pipeline import layers as stn_layers  # noqa: E402
from stn_pipeline import optimizers as stn_optimizers  # noqa: E402
from stn_pipeline import trainer as trainer_module  # noqa: E402
from stn_pipeline.hparams import HyperParameters  # noqa: E402
from stn_pipeline.models import alexnet as alexnet_module  # noqa: E402
from stn_pipeline.models import cifar_cnn as cifar_cnn_module  # noqa: E402
from stn_pipeline.models.alexnet import CifarAlexNet, alexnet_hparams  # noqa: E402
from stn_pipeline.models.cifar_cnn import CifarCnn, cifar_cnn_hparams  # noqa: E402
from stn_pipeline.trainer import StnTrainer, TrainerConfig  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_list("models", ["cifar_cnn", "cifar_alexnet"], "Models to benchmark.")
flags.DEFINE_integer("steps", 0, "Units per repetition: STN cycles (2 weight + 1 hyper step), "
                     "interleaved with as many plain units of 3 steps. 0: the per-model default.")
flags.DEFINE_integer("reps", 0, "Timed repetitions per model. 0: the per-model default.")
flags.DEFINE_integer("batch_size", 128, "Examples per step.")
flags.DEFINE_bool("jit", False, "Also time jit_compile=True (XLA) variants of both steps.")
flags.DEFINE_bool("memory", True, "Measure peak RSS, one subprocess per configuration.")
flags.DEFINE_bool("profile", True, "Profile the pieces of the steps (in a subprocess).")
flags.DEFINE_bool("ablation", True, "Time the previous forms of the library's speed-ups "
                  "against its current steps (in a subprocess).")
flags.DEFINE_bool("write", True, "Rewrite the throughput section of BENCHMARKS.md.")
flags.DEFINE_string("output", os.path.join(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__))), "BENCHMARKS.md"), "The markdown file to update.")
flags.DEFINE_string("child", "", "Internal: 'memory', 'profile' or 'ablation'.")
flags.DEFINE_string("child_model", "", "Internal: the model of a child process.")
flags.DEFINE_string("child_kind", "", "Internal: idle, stn, plain, stn_jit or plain_jit.")

IMAGE_SHAPE = (32, 32, 3)
NUM_CLASSES = 10
# CIFAR-10 training-set statistics in [0, 255] units (the values only set the input scale).
MEAN = (125.31, 122.95, 113.87)
STD = (62.99, 62.09, 66.70)
# Per-model defaults: STN cycles per timed block and repetitions (keeps the default run short).
DEFAULTS = {"cifar_cnn": dict(steps=10, reps=7), "cifar_alexnet": dict(steps=2, reps=7)}
START_MARK, END_MARK = "<!-- throughput:start -->", "<!-- throughput:end -->"
RESULT_PREFIX = "RESULT_JSON "


# --------------------------------------------------------------------------------- building


def build_stn(name: str, batch_size: int) -> StnTrainer:
    """The STN model, hyperparameters and trainer of experiment `name` (default settings)."""
    del batch_size  # any batch size works; the steps are compiled with a free batch dimension
    if name == "cifar_cnn":
        specs, model_class = cifar_cnn_hparams(), CifarCnn
    elif name == "cifar_alexnet":
        specs, model_class = alexnet_hparams(), CifarAlexNet
    else:
        raise ValueError(f"Unknown model {name!r}; expected cifar_cnn or cifar_alexnet.")
    hparams = HyperParameters(specs, seed=0)
    model = model_class(IMAGE_SHAPE, NUM_CLASSES, MEAN, STD, specs, seed=0)
    return StnTrainer(model, hparams, tf.TensorSpec([None, *IMAGE_SHAPE], tf.uint8),
                      tf.TensorSpec([None], tf.int64), TrainerConfig())


def build_plain(name: str, jit: bool = False, bias_add: bool = False) -> plain_models.PlainTrainer:
    """The plain (fixed-dropout) counterpart of `name` and its compiled step."""
    factory = {"cifar_cnn": plain_models.plain_cifar_cnn,
               "cifar_alexnet": plain_models.plain_alexnet}[name]
    model = factory(IMAGE_SHAPE, NUM_CLASSES, MEAN, STD, rate=0.05, seed=0, bias_add=bias_add)
    return plain_models.PlainTrainer(model, tf.TensorSpec([None, *IMAGE_SHAPE], tf.uint8),
                                     tf.TensorSpec([None], tf.int64), jit_compile=jit)


def jit_steps(trainer: StnTrainer):
    """`jit_compile=True` versions of the trainer's weight and hyper steps (same variables)."""
    signature = [trainer.input_spec, trainer.target_spec]
    # pylint: disable=protected-access
    return (tf.function(trainer._weight_step, input_signature=signature, jit_compile=True),
            tf.function(trainer._hyper_step, input_signature=signature, jit_compile=True))


def plain_jit_step(trainer: plain_models.PlainTrainer):
    signature = [tf.TensorSpec([None, *IMAGE_SHAPE], tf.uint8), tf.TensorSpec([None], tf.int64)]
    step = trainer._train_step  # pylint: disable=protected-access
    return tf.function(step, input_signature=signature, jit_compile=True)


def make_batches(batch_size: int, count: int = 4, seed: int = 0):
    """`count` random uint8 image batches with int64 labels, as eager tensors."""
    rng = np.random.default_rng(seed)
    return [(tf.constant(rng.integers(0, 256, (batch_size, *IMAGE_SHAPE), dtype=np.uint8)),
             tf.constant(rng.integers(0, NUM_CLASSES, batch_size, dtype=np.int64)))
            for _ in range(count)]


def param_count(variables) -> int:
    return int(sum(np.prod(v.shape) for v in variables))


# --------------------------------------------------------------------------------- timing


class Contender:
    """One configuration being timed. Its unit of work is one STN cycle (weight, weight, hyper
    step) or, for a plain network, 3 steps: the same number of images."""

    def __init__(self, label: str, weight_step, hyper_step=None):
        self.label = label
        self.weight_step = weight_step
        self.hyper_step = hyper_step
        self.compile_seconds = 0.0
        self.runs: list[dict] = []
        self._times = {"weight": 0.0, "hyper": 0.0}
        self._units = 0
        self._next = 0

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

    def median(self, key: str) -> float:
        return statistics.median(r[key] for r in self.runs)

    def best(self, key: str) -> float:
        return max(r[key] for r in self.runs)


def run_interleaved(contenders: list[Contender], batches, units: int, batch_size: int,
                    rep: int) -> dict:
    """One repetition: `units` units of each contender, interleaved unit by unit, alternating
    which contender goes first, so that load changes of a shared machine hit all of them."""
    for i in range(units):
        order = contenders if (rep + i) % 2 == 0 else contenders[::-1]
        for contender in order:
            contender.unit(batches)
    return {c.label: c.close_run(batch_size) for c in contenders}


def time_model(name: str, cycles: int, reps: int, batch_size: int, jit: bool) -> dict:
    """Times STN and plain (and their XLA variants) in interleaved repetitions."""
    batches = make_batches(batch_size)
    stn = build_stn(name, batch_size)
    plain = build_plain(name)
    plain_bias_add = build_plain(name, bias_add=True)
    contenders = [Contender("stn", stn.weight_step, stn.hyper_step),
                  Contender("plain", plain.train_step),
                  Contender("plain_bias_add", plain_bias_add.train_step)]
    if jit:
        weight_jit, hyper_jit = jit_steps(stn)
        contenders += [Contender("stn_jit", weight_jit, hyper_jit),
                       Contender("plain_jit", plain_jit_step(plain))]
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
    pair_ratios, weight_ratios, jit_pair_ratios, bias_add_ratios = [], [], [], []
    for rep in range(reps):
        results = run_interleaved(contenders, batches, cycles, batch_size, rep)
        pair_ratios.append(results["stn"]["ips"] / results["plain"]["ips"])
        bias_add_ratios.append(results["stn"]["ips"] / results["plain_bias_add"]["ips"])
        weight_ratios.append(results["stn"]["weight_ips"] / results["plain"]["ips"])
        if "stn_jit" in results and "plain_jit" in results:
            jit_pair_ratios.append(results["stn_jit"]["ips"] / results["plain_jit"]["ips"])
        print(f"  {name} rep {rep + 1}/{reps}: " + ", ".join(
            f"{label} {r['ips']:.0f} img/s" for label, r in results.items())
            + f", cycle ratio {pair_ratios[-1]:.3f}", flush=True)
    summary = {"model": name, "cycles": cycles, "reps": reps, "batch_size": batch_size,
               "stn_params": param_count(stn.weights),
               "plain_params": param_count(plain.weights),
               "cycle_ratio": statistics.median(pair_ratios),
               "cycle_ratio_range": [min(pair_ratios), max(pair_ratios)],
               "weight_ratio": statistics.median(weight_ratios),
               "bias_add_cycle_ratio": statistics.median(bias_add_ratios),
               "jit_errors": errors, "contenders": {}}
    if jit_pair_ratios:
        summary["jit_cycle_ratio"] = statistics.median(jit_pair_ratios)
    for c in contenders:
        entry = {"ips": c.median("ips"), "best_ips": c.best("ips"),
                 "ips_range": [min(r["ips"] for r in c.runs), max(r["ips"] for r in c.runs)],
                 "compile_seconds": c.compile_seconds}
        if c.is_stn:
            entry.update({k: c.median(k) for k in ("weight_ips", "hyper_ips", "train_ips")})
            entry["best_weight_ips"] = c.best("weight_ips")
        summary["contenders"][c.label] = entry
    # Best-of figures: the least-disturbed repetition of each (a load-robust cross-check).
    summary["best_cycle_ratio"] = (summary["contenders"]["stn"]["best_ips"]
                                   / summary["contenders"]["plain"]["best_ips"])
    return summary


# --------------------------------------------------------------------------------- children


def run_child(args: list[str], timeout: float = 900.0) -> dict:
    """Runs this script as a child with `args`; returns the JSON it prints (or an error).

    The child is started through `sh`, which forks it (no `exec`): on Linux a process started by
    fork + exec straight from this one inherits this process's peak RSS in its `ru_maxrss`
    (the kernel keeps the old address space's high-water mark across execve), so every child
    would report at least the parent's peak.
    """
    command = ["/bin/sh", "-c", '"$0" "$@"; exit $?', sys.executable,
               os.path.abspath(__file__), *args]
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


def max_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux: KiB


def vm_hwm_mib() -> float | None:
    """Peak RSS of this address space from /proc (a cross-check of ru_maxrss)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return None


def child_memory(name: str, kind: str, cycles: int, batch_size: int) -> dict:
    """Peak RSS of one configuration after warm-up and `cycles` cycles (3 x cycles plain steps)."""
    tf.reduce_sum(tf.ones([4])).numpy()  # start the runtime and its thread pools
    if kind == "idle":
        return {"kind": kind, "max_rss_mib": max_rss_mib(), "vm_hwm_mib": vm_hwm_mib()}
    batches = make_batches(batch_size)
    if kind.startswith("stn"):
        stn = build_stn(name, batch_size)
        steps = jit_steps(stn) if kind == "stn_jit" else (stn.weight_step, stn.hyper_step)
        contender = Contender(kind, *steps)
    else:
        plain = build_plain(name)
        contender = Contender(kind, plain_jit_step(plain) if kind == "plain_jit"
                              else plain.train_step)
    contender.warm_up(batches)
    for _ in range(cycles):
        contender.unit(batches)
    contender.close_run(batch_size)
    return {"kind": kind, "max_rss_mib": max_rss_mib(), "vm_hwm_mib": vm_hwm_mib()}


# Op kinds of the trace breakdown, matched against the op type (first match wins).
OP_KINDS = [
    ("conv forward", r"Conv2D$|FusedConv2D"),
    ("conv backprop", r"Conv2DBackprop"),
    ("matmul", r"MatMul"),
    ("split/concat/slice copies", r"^(Split|SplitV|ConcatV2|Concat|Slice|StridedSlice|"
                                  r"StridedSliceGrad|Pack|Unpack|Tile)$"),
    ("bias add (+grad)", r"BiasAdd"),
    ("pooling", r"MaxPool"),
    ("random", r"Random|RngReadAndSkip|StatelessRandom"),
    ("variable writes", r"Assign|ResourceApply"),
    ("element-wise & reductions", r"."),
]
COMPUTE_KINDS = ("conv forward", "conv backprop", "matmul")
# Parts of the network, matched against the op's name scope (first match wins).
# A scope opened twice in one graph gets a suffix: "dropout_1/".
PARTS = [
    ("conv layers", r"(^|/)conv\d+(_\d+)?/"),
    ("fc layers", r"(^|/)(fc\d+|dense|logits)(_\d+)?/"),
    ("dropout", r"(^|/)dropout(_\d+)?/"),
    ("augment + hparam sample", r"(^|/)(augment|sample)(_\d+)?/"),
    ("optimizer update", r"(^|/)update(_\d+)?/"),
    ("other (relu, pool, loss, ...)", r"."),
]


def _scoped(function, scope):
    """Wraps `function` in a name scope: names ops for the profile, computes the same thing."""
    def wrapper(*args, **kwargs):
        with tf.name_scope(scope(args[0]) if callable(scope) else scope):
            return function(*args, **kwargs)
    wrapper.__wrapped__ = function
    return wrapper


def label_stn_ops() -> None:
    """Profile child only: puts STN layers, dropout, augmentation and updates in name scopes.

    The library's modules do not open name scopes in `__call__`, so without this the trace cannot
    tell a conv layer's element-wise ops from dropout's. Only op names change.
    """
    for cls in (stn_layers.StnConv2D, stn_layers.StnDense):
        cls.__call__ = _scoped(cls.__call__, lambda self: self.name)
    for module in (cifar_cnn_module, alexnet_module):
        module.dropout = _scoped(module.dropout, "dropout")
    for cls in (CifarCnn, CifarAlexNet):
        cls.augment = _scoped(cls.augment, "augment")
    HyperParameters.sample = _scoped(HyperParameters.sample, "sample")
    for cls in (stn_optimizers.Momentum, stn_optimizers.Adam):
        # pylint: disable-next=protected-access
        cls.apply = _scoped(stn_optimizers._Optimizer.apply, "update")


def trace_ops(function, batches, calls: int) -> dict:
    """Per-step op time (median over `calls` traced calls) by op kind, by part, and top ops."""
    from tensorflow.tsl.profiler.protobuf import xplane_pb2  # pylint: disable=g-import-not-at-top
    logdir = tempfile.mkdtemp(prefix="stn_bench_trace_")
    try:
        tf.profiler.experimental.start(logdir)
        for i in range(calls):
            function(*batches[i % len(batches)])
        tf.profiler.experimental.stop()
        files = glob.glob(os.path.join(logdir, "**", "*.xplane.pb"), recursive=True)
        space = xplane_pb2.XSpace()
        with open(max(files, key=os.path.getmtime), "rb") as f:
            space.ParseFromString(f.read())
    finally:
        shutil.rmtree(logdir, ignore_errors=True)
    pattern = re.compile(r"^([^:]+):([A-Za-z0-9_]+)$")  # "scope/op_name:OpType"
    durations = collections.defaultdict(list)
    for plane in space.planes:
        for line in plane.lines:
            if not line.name.startswith("tf_Compute"):
                continue
            for event in line.events:
                match = pattern.match(plane.event_metadata[event.metadata_id].name)
                if match:
                    durations[(match.group(1), match.group(2))].append(event.duration_ps * 1e-9)
    # An op runs once per step: the median over calls drops one-off slow calls.
    per_op = {key: statistics.median(values) for key, values in durations.items()}
    kinds, parts = collections.Counter(), collections.Counter()
    layer_overhead = collections.Counter()  # non-conv/matmul op time inside conv and fc layers
    for (op_name, op_type), ms in per_op.items():
        kind = next(k for k, p in OP_KINDS if re.search(p, op_type))
        part = next(k for k, p in PARTS if re.search(p, op_name))
        kinds[kind] += ms
        parts[part] += ms
        if part in ("conv layers", "fc layers") and kind not in COMPUTE_KINDS:
            layer_overhead[part] += ms
    top = sorted(per_op.items(), key=lambda kv: -kv[1])[:8]
    return {"total_ms": sum(per_op.values()), "kinds": dict(kinds), "parts": dict(parts),
            "layer_overhead": dict(layer_overhead),
            "top": [[f"{name}:{op_type}", ms] for (name, op_type), ms in top]}


def interleaved_ms(functions: list, calls: int, reps: int) -> list[float]:
    """Best (lowest) over `reps` rounds of the mean wall ms of `calls` calls of each
    (function, args).

    Each round times every function once, alternating the order, so slow phases of a shared
    machine hit all of them; other jobs only ever add time, so the least-disturbed round is the
    most faithful estimate of a piece's own cost (as `timeit` recommends).
    """
    for function, args_list in functions:
        function(*args_list[0])
    times = [[] for _ in functions]
    for rep in range(reps):
        order = list(enumerate(functions))
        for index, (function, args_list) in (order if rep % 2 == 0 else order[::-1]):
            start = time.perf_counter()
            for i in range(calls):
                out = function(*args_list[i % len(args_list)])
            tf.nest.map_structure(lambda t: t.numpy() if hasattr(t, "numpy") else t, out)
            times[index].append((time.perf_counter() - start) / calls * 1e3)
    return [min(t) for t in times]


def child_profile(name: str, batch_size: int) -> dict:
    """Wall time of the pieces of STN and plain steps, and traced op times by kind and part."""
    label_stn_ops()
    heavy = name == "cifar_alexnet"
    calls, reps, trace_calls = (2, 7, 4) if heavy else (5, 9, 8)
    batches = make_batches(batch_size)
    stn = build_stn(name, batch_size)
    plain = build_plain(name)
    model, hparams, config = stn.model, stn.hparams, stn.config
    signature = [stn.input_spec, stn.target_spec]

    # The pieces of StnTrainer._weight_step, in its order.
    def stn_augment(inputs, targets):
        sample = hparams.sample(tf.shape(targets)[0], perturb=config.tune)
        seeds = stn.step_generator.make_seeds(2)
        return model.augment(inputs, targets, sample, seeds[:, 0])[0]

    def stn_forward_loss(inputs, targets):
        sample = hparams.sample(tf.shape(targets)[0], perturb=config.tune)
        seeds = stn.step_generator.make_seeds(2)
        inputs, targets = model.augment(inputs, targets, sample, seeds[:, 0])
        outputs = model(inputs, sample, training=True, seed=seeds[:, 1])
        return tf.reduce_mean(model.loss(targets, outputs))

    def stn_gradients(inputs, targets):
        with tf.GradientTape(watch_accessed_variables=False) as tape:
            tape.watch(stn.weights)
            loss = stn_forward_loss(inputs, targets)
        return loss, tape.gradient(loss, stn.weights)

    def consumed(gradients_fn):
        """forward + backward whose gradients are reduced in the graph: returning 47M gradient
        values as outputs would cost output buffers the real step does not pay."""
        def run(inputs, targets):
            loss, gradients = gradients_fn(inputs, targets)
            return loss + 0.0 * tf.add_n([tf.reduce_sum(g) for g in gradients])
        return run

    def stn_hyper_forward(inputs, targets):
        sample = hparams.sample(tf.shape(targets)[0], perturb=config.tune_scales)
        outputs = model(model.preprocess(inputs), sample, training=False, seed=None)
        return tf.reduce_mean(model.loss(targets, outputs))

    def unfused_update(*gradients):
        for index, (gradient, variable) in enumerate(zip(gradients, stn.weights)):
            momentum_update_unfused(stn.weight_optimizer, index, gradient, variable)

    compiled = lambda f: tf.function(f, input_signature=signature)  # noqa: E731
    _, stn_grads = compiled(stn_gradients)(*batches[0])
    _, plain_grads = tf.function(plain.gradients)(*batches[0])
    stn_update = tf.function(lambda *g: stn.weight_optimizer.apply(g))
    stn_update_unfused = tf.function(unfused_update)
    plain_update = tf.function(lambda *g: plain.optimizer.apply(g))
    plain_unfused = plain_models.PlainMomentum(plain.weights, fused=False)
    plain_update_unfused = tf.function(lambda *g: plain_unfused.apply(g))
    guard = getattr(trainer_module, "_all_finite", None)  # the trainer's non-finite guard
    pieces = [
        ("stn", "augment + hparam sample", compiled(stn_augment), batches),
        ("stn", "forward (augment + net + loss)", compiled(stn_forward_loss), batches),
        ("stn", "forward + backward (no update)", compiled(consumed(stn_gradients)), batches),
        ("stn", "weight step (compiled, library)", stn.weight_step, batches),
        ("stn", "update alone: library Momentum", stn_update, [stn_grads]),
        ("stn", "update alone: unfused rule (2 assigns)", stn_update_unfused, [stn_grads]),
    ]
    if guard is not None:
        pieces += [
            ("stn", "non-finite guard alone: library _all_finite(gradients)",
             tf.function(lambda *g: guard(list(g))), [stn_grads]),
            ("stn", "non-finite guard alone: element-wise is_finite + reduce_all",
             tf.function(lambda *g: all_finite_elementwise(list(g))), [stn_grads])]
    pieces += [
        ("stn", "hyper step forward (eval, no grad)", compiled(stn_hyper_forward), batches),
        ("stn", "hyper step (compiled, library)", stn.hyper_step, batches),
        ("plain", "forward (net + loss)", tf.function(plain.forward), batches),
        ("plain", "forward + backward (no update)", tf.function(consumed(plain.gradients)),
         batches),
        ("plain", "train step", plain.train_step, batches),
        ("plain", "update alone: fused momentum (as the library)", plain_update, [plain_grads]),
        ("plain", "update alone: unfused rule (2 assigns)", plain_update_unfused,
         [plain_grads]),
    ]
    best = interleaved_ms([(f, args) for _, _, f, args in pieces], calls, reps)
    times = [[who, label, ms] for (who, label, _, _), ms in zip(pieces, best)]
    traces = {"stn weight step": trace_ops(stn.weight_step, batches, trace_calls),
              "stn hyper step": trace_ops(stn.hyper_step, batches, trace_calls),
              "plain step": trace_ops(plain.train_step, batches, trace_calls)}
    return {"model": name, "pieces": times, "traces": traces}


# ------------------------------------------------------------------ ablation: library choices
#
# Commit f81dbee adopted three changes this benchmark measured: StnConv2D as two convolutions on
# the kernel halves, the fused momentum kernel, and a one-pass non-finite guard. The ablation
# re-implements the PREVIOUS form of each here and times it against the current library, so the
# gain of each change stays measured as the library evolves. The replacements compute the same
# function (checked in `child_ablation`) and are installed only while a variant's steps are traced,
# in the ablation child process.


def conv_call_stacked(self, inputs, hnet_input):
    """StnConv2D.__call__ before f81dbee: ONE convolution on the stacked kernel [W_e | W_h], then
    split of the [B, H', W', 2C] output: y = c (e + b_e) + g_w r + g_b b_h (and, backwards, a
    concat of the two paths' gradients)."""
    both = tf.nn.conv2d(inputs, self.kernel, self.stride, self.padding)
    elementary, response = tf.split(both, 2, axis=-1)
    bias_e, bias_h = tf.split(self.bias, 2)
    weight_gate, bias_gate = self.gates(hnet_input)
    return (self.elementary_scale * (elementary + bias_e) + weight_gate[:, None, None, :] * response
            + bias_gate[:, None, None, :] * bias_h)


def conv_call_two_convs(self, inputs, hnet_input):
    """StnConv2D.__call__ as two convolutions on the kernel halves with c folded into W_e, b_e
    (the form adopted in f81dbee): e = conv(x, c W_e) + c b_e; r = conv(x, W_h);
    y = e + g_w r + g_b b_h."""
    kernel_e, kernel_h = tf.split(self.kernel, 2, axis=-1)
    bias_e, bias_h = tf.split(self.bias, 2)
    weight_gate, bias_gate = self.gates(hnet_input)
    scale = self.elementary_scale
    elementary = tf.nn.conv2d(inputs, scale * kernel_e, self.stride, self.padding) + scale * bias_e
    response = tf.nn.conv2d(inputs, kernel_h, self.stride, self.padding)
    return (elementary + weight_gate[:, None, None, :] * response
            + (bias_gate * bias_h)[:, None, None, :])


def momentum_update_unfused(self, index, gradient, variable):
    """Momentum._update before f81dbee: v = m v + g; w -= lr v as two assignments (three
    full-size temporaries), instead of the single ResourceApplyMomentum kernel."""
    velocity = self.velocity[index]
    velocity.assign(self.momentum * velocity + gradient)
    variable.assign_sub(self.learning_rate * velocity)


def all_finite_elementwise(tensors) -> tf.Tensor:
    """The non-finite guard before f81dbee: is_finite on every element, reduce_all of the bool
    tensors (one [N] bool temporary per gradient)."""
    return tf.reduce_all([tf.reduce_all(tf.math.is_finite(t)) for t in tensors if t is not None])


def all_finite_by_sum(tensors) -> tf.Tensor:
    """The one-pass guard (as adopted in f81dbee): a NaN or inf anywhere makes the sum
    non-finite; finite values whose sum overflows float32 would also be flagged, which only skips
    a step that is diverging anyway."""
    return tf.reduce_all([tf.math.is_finite(tf.reduce_sum(t)) for t in tensors if t is not None])


# label -> (replacement of StnConv2D.__call__, of Momentum._update, of trainer._all_finite);
# None keeps the library's own.
LIBRARY = "library (current)"
ABLATIONS = {
    LIBRARY: (None, None, None),
    "conv: one stacked conv + split (pre-f81dbee)": (conv_call_stacked, None, None),
    "momentum: unfused assigns (pre-f81dbee)": (None, momentum_update_unfused, None),
    "guard: element-wise is_finite (pre-f81dbee)": (None, None, all_finite_elementwise),
    "all three pre-f81dbee forms": (conv_call_stacked, momentum_update_unfused,
                                    all_finite_elementwise),
}


def build_variant(name: str, batch_size: int, conv_call, update, guard, batches) -> StnTrainer:
    """An STN trainer whose steps are traced with the given replacements installed."""
    saved_call = stn_layers.StnConv2D.__call__
    saved_update = stn_optimizers.Momentum._update  # pylint: disable=protected-access
    saved_guard = getattr(trainer_module, "_all_finite", None)
    try:
        if conv_call is not None:
            stn_layers.StnConv2D.__call__ = conv_call
        if update is not None:
            stn_optimizers.Momentum._update = update  # pylint: disable=protected-access
        if guard is not None and saved_guard is not None:
            trainer_module._all_finite = guard  # pylint: disable=protected-access
        trainer = build_stn(name, batch_size)
        trainer.weight_step(*batches[0])  # traces now, with the replacements
        trainer.hyper_step(*batches[0])
    finally:
        stn_layers.StnConv2D.__call__ = saved_call
        stn_optimizers.Momentum._update = saved_update  # pylint: disable=protected-access
        if saved_guard is not None:
            trainer_module._all_finite = saved_guard  # pylint: disable=protected-access
    return trainer


def child_ablation(name: str, batch_size: int) -> dict:
    """Interleaved weight/hyper step times of the library and of the previous forms."""
    heavy = name == "cifar_alexnet"
    calls, reps = (2, 7) if heavy else (6, 9)
    batches = make_batches(batch_size)
    trainers = {label: build_variant(name, batch_size, *options, batches)
                for label, options in ABLATIONS.items()}
    # Same function? From one state (weights, hyperparameters, velocities copied from the library
    # trainer; the random generators are seeded alike and have been advanced alike), compare the
    # eval-mode outputs and the weights after one weight step with the library's.
    reference = trainers[LIBRARY]
    x, y = batches[1]
    for trainer in trainers.values():
        sources = reference.state_variables() + reference.weight_optimizer.velocity
        targets = trainer.state_variables() + trainer.weight_optimizer.velocity
        for target, source in zip(targets, sources):
            target.assign(source)
    sample = reference.hparams.sample(batch_size, perturb=False)
    outputs, after = {}, {}
    for label, (call, _, _) in ABLATIONS.items():
        saved = stn_layers.StnConv2D.__call__
        stn_layers.StnConv2D.__call__ = call or saved
        try:
            model = trainers[label].model
            outputs[label] = model(model.preprocess(x), sample, training=False)
        finally:
            stn_layers.StnConv2D.__call__ = saved
        trainers[label].weight_step(x, y)
        after[label] = [v.numpy() for v in trainers[label].weights]
    checks = {}
    for label in ABLATIONS:
        weight_diff = max(float(np.max(np.abs(a - b)))
                          for a, b in zip(after[label], after[LIBRARY]))
        output_diff = float(tf.reduce_max(tf.abs(outputs[label] - outputs[LIBRARY])))
        checks[label] = max(weight_diff, output_diff)
    plain = build_plain(name)
    functions = [(plain.train_step, batches)]  # timed alongside, for a same-moment ratio
    for trainer in trainers.values():
        functions += [(trainer.weight_step, batches), (trainer.hyper_step, batches)]
    best = interleaved_ms(functions, calls, reps)
    plain_ms, best = best[0], best[1:]
    rows = []
    for i, label in enumerate(trainers):
        weight_ms, hyper_ms = best[2 * i], best[2 * i + 1]
        rows.append({"variant": label, "weight_ms": weight_ms, "hyper_ms": hyper_ms,
                     "cycle_ms": 2 * weight_ms + hyper_ms, "max_abs_diff": checks[label],
                     "cycle_ratio": 3 * plain_ms / (2 * weight_ms + hyper_ms)})
    return {"model": name, "rows": rows, "plain_step_ms": plain_ms}


# --------------------------------------------------------------------------------- report


def machine_info() -> dict:
    cpu = "unknown"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    try:
        nproc = len(os.sched_getaffinity(0))
    except AttributeError:
        nproc = os.cpu_count()
    return {"nproc": nproc, "cpu": cpu, "tf": tf.__version__, "python": platform.python_version(),
            "numpy": np.__version__,
            "onednn": os.environ.get("TF_ENABLE_ONEDNN_OPTS", "default (on)"),
            "intra_op_threads": tf.config.threading.get_intra_op_parallelism_threads() or "default",
            "inter_op_threads": tf.config.threading.get_inter_op_parallelism_threads() or "default"}


def table(header: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def fmt_ratio(value: float, target: float | None = None, higher_is_better: bool = True) -> str:
    text = f"{value:.2f}x"
    if target is not None:
        ok = value >= target if higher_is_better else value <= target
        text += " (meets)" if ok else " (MISSES)"
    return text


def _piece(prof: dict, who: str, prefix: str) -> float | None:
    for entry_who, label, ms in prof.get("pieces", []):
        if entry_who == who and label.startswith(prefix):
            return ms
    return None


def findings(results: dict, memory: dict, profiles: dict, ablations: dict) -> list[str]:
    """One line per headline figure, with the verdicts against the targets."""
    lines = []
    for name, r in results.items():
        s, p = r["contenders"]["stn"], r["contenders"]["plain"]
        verdict = "meets" if r["cycle_ratio"] >= 0.5 else "MISSES"
        line = (f"**{name}**: STN cycle {s['ips']:.0f} img/s vs plain {p['ips']:.0f} img/s, "
                f"ratio {r['cycle_ratio']:.2f} ({verdict} the 0.5 target; best repetitions "
                f"{r['best_cycle_ratio']:.2f}); per weight step {r['weight_ratio']:.2f}")
        m = memory.get(name, {})
        try:
            ratio = m["stn"]["max_rss_mib"] / m["plain"]["max_rss_mib"]
            idle = m["idle"]["max_rss_mib"]
            above = (m["stn"]["max_rss_mib"] - idle) / (m["plain"]["max_rss_mib"] - idle)
            line += (f"; peak RSS {m['stn']['max_rss_mib']:.0f} vs {m['plain']['max_rss_mib']:.0f}"
                     f" MiB = {ratio:.2f}x ({'meets' if ratio <= 2.5 else 'MISSES'} the 2.5x "
                     f"target; {above:.2f}x above the {idle:.0f} MiB of an idle TF process)")
        except (KeyError, TypeError, ZeroDivisionError):
            pass
        lines.append(line + ".")
        if "stn_jit" in r["contenders"] and "plain_jit" in r["contenders"]:
            c = r["contenders"]
            stn_gain, plain_gain = c["stn_jit"]["ips"] / s["ips"], c["plain_jit"]["ips"] / p["ips"]
            lines.append(f"{name} with `jit_compile=True`: STN x{stn_gain:.2f}, plain "
                         f"x{plain_gain:.2f} images/s "
                         f"({'helps' if c['stn_jit']['ips'] > s['ips'] else 'does not help'} "
                         "the STN on this CPU).")
        elif r["jit_errors"]:
            errors = "; ".join(r["jit_errors"].values())
            lines.append(f"{name} with `jit_compile=True`: failed ({errors}).")
    for name, prof in profiles.items():
        if "error" in prof:
            continue
        sf, pf = _piece(prof, "stn", "forward ("), _piece(prof, "plain", "forward (")
        sfb = _piece(prof, "stn", "forward + backward")
        pfb = _piece(prof, "plain", "forward + backward")
        trace, plain_trace = prof["traces"]["stn weight step"], prof["traces"]["plain step"]
        total = trace["total_ms"]
        compute = sum(trace["kinds"].get(k, 0.0) for k in COMPUTE_KINDS)
        overhead = sum(trace["layer_overhead"].values())
        plain_overhead = sum(plain_trace["layer_overhead"].values())
        update = trace["parts"].get("optimizer update", 0.0)
        line = (f"{name} profile: STN/plain wall time forward {sf / pf:.2f}x, forward+backward "
                f"{sfb / pfb:.2f}x; in the STN weight step, convolutions + matmuls are "
                f"{100 * compute / total:.0f}% of op time, the STN layers' non-matmul work "
                f"(split/concat, gates, scale, their gradients) {100 * overhead / total:.0f}% "
                f"({overhead:.0f} ms vs {plain_overhead:.0f} ms of bias work in the plain step), "
                f"the momentum update {100 * update / total:.0f}%")
        guard = _piece(prof, "stn", "non-finite guard alone: library")
        guard_old = _piece(prof, "stn", "non-finite guard alone: element-wise")
        lib_update = _piece(prof, "stn", "update alone: library")
        unfused = _piece(prof, "stn", "update alone: unfused")
        if lib_update and unfused:
            line += (f"; the library's update alone takes {lib_update:.1f} ms (the unfused "
                     f"rule: {unfused:.1f} ms)")
        if guard is not None and guard_old is not None:
            line += (f"; its non-finite guard alone {guard:.1f} ms (element-wise version "
                     f"{guard_old:.1f} ms)")
        lines.append(line + ".")
    for name, ablation in ablations.items():
        if "error" in ablation or not ablation.get("rows"):
            continue
        base = ablation["rows"][0]
        effects = [f"{row['variant']} x{base['cycle_ms'] / row['cycle_ms']:.2f}"
                   for row in ablation["rows"][1:]]
        lines.append(f"{name} library choices (cycle images/s of the previous form relative to "
                     f"the current library, same rounds; below 1 means the change helped): "
                     + "; ".join(effects) + f". Same-round cycle ratio of the current library vs "
                     f"plain: {base['cycle_ratio']:.2f}.")
    return lines


# Interpretation that does not depend on one run's noise (the figures are in the tables).
NOTES = """
**What limits the STN step** (details in the profile tables below):

1. *Twice the convolution and matmul work.* Every STN layer computes both paths, the
   elementary `x W_e` and the response `x W_h`, so the forward, the input gradient and the
   filter gradient of each layer do 2x the multiply-adds of the plain layer. Convolutions and
   matmuls are most of the STN weight step's op time, and the STN/plain wall-time ratios of the
   forward and of forward + backward are about 2x. This is inherent to the structured
   best-response formulation: per-example gates make the two paths impossible to fold into one
   kernel during training (folding is what the serving export does at fixed hyperparameters).
   With 2x the work, a weight step runs at about 0.5x the plain images/s; the cycle ratio is a
   little higher because of the hyper step (3.).
2. *Element-wise work of the gated combine.* y = c (x W_e + b_e) + g_w * (x W_h) + g_b * b_h needs
   per-example gate multiplications and adds over the layer output, and, backwards, the gate
   reductions. Since f81dbee `StnConv2D` runs two convolutions on the kernel halves, with c folded
   into W_e and b_e, instead of one convolution on the stacked kernel followed by a split of the
   [B, H, W, 2C] output (and a concat of the two paths' gradients backwards); the `one stacked
   conv + split` row of the library-choices tables times the old form. This work is a visible
   share of `cifar_cnn`, whose convolutions are cheap, and a small one of AlexNet.
3. *The hyper step* is a forward plus the input-gradient half of a backward (no filter
   gradients are computed: grappler prunes them), about 0.6 of a weight step, which is why the
   cycle ratio (hyper-step images counted) is above the per-weight-step ratio.
4. *Optimizer and guard.* Since f81dbee `optimizers.Momentum` applies TensorFlow's single-kernel
   `ResourceApplyMomentum` (the same arithmetic as its former two assignments with three
   full-size temporaries, about half the time: both are timed in the pieces tables; it matters for
   AlexNet's 46.8M STN weights), and the trainer's non-finite guard sums each gradient once
   instead of materialising an `is_finite` bool per element.
5. *XLA.* `jit_compile=True` is slower than `tf.function` on this CPU for both networks, STN and
   plain (TensorFlow's kernels here are oneDNN's; XLA's CPU backend generates its own), and it
   compiles for seconds to tens of seconds: keep it off for CPU training.

Noise: the machine is shared with other jobs. Within a run, STN and plain are interleaved cycle by
cycle, yet the median cycle ratio of `cifar_cnn` was 0.47 in a run at a load average of 6-7 and
0.56 in one an hour later at 3-4 (the library also changed in between: f81dbee, whose parts the
library-choices tables measure). AlexNet steps are long, so fewer of them fit in a run and its
figures scatter more; differences under about 10% are not resolved reliably there. Best-of-rounds
timings (pieces, library choices) are the steadier figures.

Memory: the STN holds twice the weights, momentum slots and gradients of the plain net, and its
layer outputs are computed for two paths; the peak RSS ratio stays well under the 2.5x target,
partly because a TensorFlow process already uses a few hundred MiB before any model exists.
"""


def report(results: dict, memory: dict, profiles: dict, ablations: dict, info: dict,
           command: str, started: datetime.datetime, loads: tuple, elapsed: float) -> str:
    """The markdown section (also printed)."""
    out = ["## Throughput: STN training cycle vs a plain network", "",
           "`benchmarks/throughput.py` times the STN cycle (2 weight steps + 1 hyper step) of "
           "`cifar_cnn` and `cifar_alexnet` against the same architectures built from ordinary "
           "layers with a fixed channel-wise dropout of 0.05 and no augmentation "
           "(`benchmarks/plain_models.py`, momentum-SGD 0.9, compiled with `tf.function`), in "
           "the same process on the same uint8 batches, then measures peak memory in "
           "subprocesses, profiles the steps and times the library's speed-ups against their "
           "previous forms.", "",
           f"_Generated by `benchmarks/throughput.py` on {started:%Y-%m-%d %H:%M} "
           f"(took {elapsed / 60:.1f} min)._", "",
           f"Command: `{command}`", "",
           f"Machine: {info['nproc']} CPUs ({info['cpu']}), no GPU; TensorFlow {info['tf']}, "
           f"Python {info['python']}, NumPy {info['numpy']}; oneDNN {info['onednn']}; TF "
           f"intra/inter-op threads {info['intra_op_threads']}/{info['inter_op_threads']}. "
           f"Load average (1 min) at start / end: {loads[0]:.2f} / {loads[1]:.2f} "
           "(the machine is shared: absolute figures are noisy, paired ratios less so).", "",
           "Convention: an STN cycle is 2 weight steps + 1 hyper step, and its images are those "
           "of its 3 steps (3 x batch). `weight-step` is the images/s of the weight steps alone "
           "(timed inside the cycles), `train img/s` counts only the 2 x batch training images "
           "per cycle time. Ratios are STN / plain, medians of per-repetition pairs (STN and "
           "plain interleaved cycle by cycle). Targets: "
           "cycle ratio >= 0.5, peak-memory ratio <= 2.5.", ""]
    rows = []
    for name, r in results.items():
        s, p = r["contenders"]["stn"], r["contenders"]["plain"]
        lo, hi = r["cycle_ratio_range"]
        rows.append([name, f"{r['batch_size']}", f"{r['reps']} x {r['cycles']} cycles",
                     f"{s['ips']:.0f}", f"{s['weight_ips']:.0f}", f"{s['hyper_ips']:.0f}",
                     f"{s['train_ips']:.0f}", f"{p['ips']:.0f}",
                     fmt_ratio(r["cycle_ratio"], 0.5) + f" [{lo:.2f}-{hi:.2f}]",
                     fmt_ratio(r["weight_ratio"]),
                     f"{s['best_ips']:.0f} / {p['best_ips']:.0f} = {r['best_cycle_ratio']:.2f}x"])
    out += ["#### Throughput (images/s, median over repetitions)", "",
            table(["model", "batch", "timed", "STN cycle", "STN weight-step", "STN hyper-step",
                   "STN train img/s", "plain", "cycle ratio [min-max]", "weight-step ratio",
                   "best rep: STN / plain cycle"], rows), ""]
    params = [f"{n}: STN {r['stn_params'] / 1e6:.2f}M weights (two stacked paths + gates), "
              f"plain {r['plain_params'] / 1e6:.2f}M" for n, r in results.items()]
    out += ["Weights: " + "; ".join(params) + ".", ""]
    bias_add = [f"{n}: {r['contenders']['plain_bias_add']['ips']:.0f} img/s, STN cycle ratio "
                f"against it {r['bias_add_cycle_ratio']:.2f}" for n, r in results.items()]
    out += ["The plain nets add biases as `x + b`. With `tf.nn.bias_add` (what Keras layers "
            "do), grappler fuses each conv's filter and bias gradients into oneDNN's "
            "`Conv2DBackpropFilterWithBias`, slow for the 3-channel first conv here, so that "
            "baseline is weaker: " + "; ".join(bias_add) + ".", ""]

    if any("stn_jit" in r["contenders"] or r["jit_errors"] for r in results.values()):
        rows = []
        for name, r in results.items():
            c = r["contenders"]
            for base in ("stn", "plain"):
                jit = base + "_jit"
                if jit in c:
                    rows.append([name, base, f"{c[base]['ips']:.0f}", f"{c[jit]['ips']:.0f}",
                                 f"{c[jit]['ips'] / c[base]['ips']:.2f}x",
                                 f"{c[base]['compile_seconds']:.1f}",
                                 f"{c[jit]['compile_seconds']:.1f}"])
                elif jit in r["jit_errors"]:
                    rows.append([name, base, f"{c[base]['ips']:.0f}", "failed", "-", "-",
                                 r["jit_errors"][jit]])
            if "jit_cycle_ratio" in r:
                rows.append([name, "STN/plain ratio, both jit", "", "",
                             fmt_ratio(r["jit_cycle_ratio"], 0.5), "", ""])
        out += ["#### jit_compile=True (XLA) on this CPU", "",
                table(["model", "variant", "img/s tf.function", "img/s jit", "jit speed-up",
                       "first calls s (tf.function)", "first calls s (jit)"], rows), ""]

    if memory:
        rows = []
        for name, m in memory.items():
            idle = m.get("idle", {}).get("max_rss_mib")
            line = [name, f"{idle:.0f}" if idle else "?"]
            for kind in ("stn", "plain"):
                line.append(f"{m[kind]['max_rss_mib']:.0f}" if "max_rss_mib" in m.get(kind, {})
                            else m.get(kind, {}).get("error", "?"))
            try:
                stn_mib, plain_mib = m["stn"]["max_rss_mib"], m["plain"]["max_rss_mib"]
                line.append(fmt_ratio(stn_mib / plain_mib, 2.5, higher_is_better=False))
                line.append(fmt_ratio((stn_mib - idle) / (plain_mib - idle)))
            except (KeyError, TypeError, ZeroDivisionError):
                line += ["?", "?"]
            for kind in ("stn_jit", "plain_jit"):
                if kind in m:
                    line.append(f"{m[kind]['max_rss_mib']:.0f}" if "max_rss_mib" in m[kind]
                                else "failed")
            rows.append(line)
        header = ["model", "idle TF process", "STN peak", "plain peak", "peak ratio",
                  "ratio above idle"]
        if any("stn_jit" in m for m in memory.values()):
            header += ["STN jit peak", "plain jit peak"]
        out += ["#### Peak memory (ru_maxrss, MiB; one subprocess per configuration, after "
                "warm-up and the same number of cycles/steps as a timed block)", "",
                table(header, rows), "",
                "The idle process imported TensorFlow and `stn_pipeline` and ran one op; "
                "`ratio above idle` compares the models' own shares.", ""]

    out += ["#### Summary (generated from the figures of this run)", ""]
    out += [f"- {line}" for line in findings(results, memory, profiles, ablations)]
    out += ["", NOTES.strip(), ""]

    for name, prof in profiles.items():
        if "error" in prof:
            out += [f"#### Profile of {name}: failed ({prof['error']})", ""]
            continue
        pieces = {(who, label): ms for who, label, ms in prof["pieces"]}
        rows = [[who, label, f"{ms:.1f}"] for who, label, ms in prof["pieces"]]
        out += [f"#### Profile of {name}: wall time of the pieces (ms per call, best of "
                "interleaved rounds)", "",
                table(["net", "piece", "ms"], rows), ""]
        try:
            sf = pieces[("stn", "forward (augment + net + loss)")]
            sfb = pieces[("stn", "forward + backward (no update)")]
            sw = pieces[("stn", "weight step (compiled, library)")]
            pf = pieces[("plain", "forward (net + loss)")]
            pfb = pieces[("plain", "forward + backward (no update)")]
            pw = pieces[("plain", "train step")]
            out += [f"Derived: STN forward {sf:.1f} ms, backward {sfb - sf:.1f} ms, update in "
                    f"step {sw - sfb:.1f} ms; plain forward {pf:.1f} ms, backward {pfb - pf:.1f} "
                    f"ms, update in step {pw - pfb:.1f} ms. STN/plain time: forward "
                    f"{sf / pf:.2f}x, forward+backward {sfb / pfb:.2f}x, step {sw / pw:.2f}x.", ""]
        except KeyError:
            pass
        traces = prof["traces"]
        names = list(traces)
        for title, key, order in (("op kind", "kinds", [k for k, _ in OP_KINDS]),
                                  ("part of the network", "parts", [k for k, _ in PARTS])):
            rows = []
            for category in order:
                cells = []
                for trace in names:
                    ms = traces[trace][key].get(category, 0.0)
                    cells.append(f"{ms:.1f} ({100 * ms / traces[trace]['total_ms']:.0f}%)")
                rows.append([category] + cells)
            rows.append(["total op time"] + [f"{traces[t]['total_ms']:.1f}" for t in names])
            out += [f"Traced op time by {title} (ms per step, sum of per-op medians; ops on the "
                    "2 executor threads overlap, so totals exceed wall time):", "",
                    table([title] + names, rows), ""]
        rows = []
        for part in ("conv layers", "fc layers"):
            rows.append([part] + [
                f"{traces[t]['layer_overhead'].get(part, 0.0):.1f} of "
                f"{traces[t]['parts'].get(part, 0.0):.1f}" for t in names])
        out += ["Inside the layers, op time NOT in convolutions or matmuls (ms per step): the "
                "STN layers' split of the stacked output, gate and scale multiplications, sums "
                "and their gradients, and the concat of the two paths' gradients; for the plain "
                "net, bias gradients:", "", table(["part"] + names, rows), ""]
        top = traces["stn weight step"]["top"]
        out += ["Slowest ops of the STN weight step: " + "; ".join(
            f"`{op}` {ms:.1f} ms" for op, ms in top[:6]) + ".", ""]

    for name, ablation in ablations.items():
        if "error" in ablation:
            out += [f"#### Library choices, {name}: failed ({ablation['error']})", ""]
            continue
        rows = ablation["rows"]
        base = rows[0]
        table_rows = [[row["variant"], f"{row['weight_ms']:.1f}", f"{row['hyper_ms']:.1f}",
                       f"{row['cycle_ms']:.1f}", f"{base['cycle_ms'] / row['cycle_ms']:.2f}x",
                       f"{row['cycle_ratio']:.2f}x", f"{row['max_abs_diff']:.1e}"]
                      for row in rows]
        out += [f"#### Library choices, {name}: the current library vs the previous form of each "
                "change adopted in f81dbee (re-implemented in the benchmark; best of interleaved "
                "rounds; see `ABLATIONS` in throughput.py)", "",
                table(["variant", "weight step ms", "hyper step ms", "cycle ms",
                       "cycle images/s vs library", "cycle ratio vs plain",
                       "max abs diff vs library"], table_rows), "",
                f"The plain step ({ablation['plain_step_ms']:.1f} ms) was timed in the same "
                "rounds, so `cycle ratio vs plain` (3 plain steps / 1 cycle) is a same-moment "
                "estimate. `max abs diff vs library`: largest difference of eval outputs and of "
                "the weights after one weight step from the same state (float32 rounding).", ""]
    return "\n".join(out)


DEFAULT_INTRO = """# Benchmarks

Performance measurements of `stn_pipeline`. Each section is generated by a script under
`benchmarks/` and rewritten in place when the script is rerun.
"""


def write_section(path: str, body: str) -> None:
    """Replaces the text between the throughput markers, creating the file or markers if needed."""
    block = f"{START_MARK}\n{body.rstrip()}\n{END_MARK}"
    if os.path.exists(path):
        with open(path) as f:
            text = f.read()
    else:
        text = DEFAULT_INTRO
    start, end = text.find(START_MARK), text.find(END_MARK)
    if start >= 0 and end > start:
        text = text[:start] + block + text[end + len(END_MARK):]
    else:
        text = text.rstrip() + "\n\n" + block + "\n"
    with open(path, "w") as f:
        f.write(text)


# --------------------------------------------------------------------------------- main


def settings(name: str) -> tuple[int, int]:
    cycles = FLAGS.steps or DEFAULTS[name]["steps"]
    reps = FLAGS.reps or DEFAULTS[name]["reps"]
    return cycles, reps


def main(argv):
    del argv
    if FLAGS.child:
        name, kind = FLAGS.child_model, FLAGS.child_kind
        if FLAGS.child == "memory":
            result = child_memory(name, kind, settings(name)[0], FLAGS.batch_size)
        elif FLAGS.child == "profile":
            result = child_profile(name, FLAGS.batch_size)
        elif FLAGS.child == "ablation":
            result = child_ablation(name, FLAGS.batch_size)
        else:
            raise app.UsageError(f"Unknown --child={FLAGS.child!r}.")
        print(RESULT_PREFIX + json.dumps(result), flush=True)
        return

    unknown = [m for m in FLAGS.models if m not in DEFAULTS]
    if unknown:
        raise app.UsageError(f"Unknown models {unknown}; choose from {sorted(DEFAULTS)}.")
    started = datetime.datetime.now()
    clock = time.time()
    load_start = os.getloadavg()[0]
    command = "/root/stnvenv/bin/python benchmarks/throughput.py " + " ".join(sys.argv[1:])
    info = machine_info()
    print(f"Machine: {info}", flush=True)
    results, memory, profiles, ablations = {}, {}, {}, {}
    for name in FLAGS.models:
        cycles, reps = settings(name)
        print(f"[{name}] timing: {reps} repetitions x {cycles} STN cycles / {3 * cycles} plain "
              "steps", flush=True)
        results[name] = time_model(name, cycles, reps, FLAGS.batch_size, FLAGS.jit)
    for name in FLAGS.models:
        if FLAGS.memory:
            kinds = ["idle", "stn", "plain"] + (["stn_jit", "plain_jit"] if FLAGS.jit else [])
            memory[name] = {}
            for kind in kinds:
                memory[name][kind] = run_child(["--child=memory", f"--child_model={name}",
                                                f"--child_kind={kind}",
                                                f"--steps={FLAGS.steps}",
                                                f"--batch_size={FLAGS.batch_size}"])
                print(f"[{name}] memory {kind}: {memory[name][kind]}", flush=True)
        if FLAGS.profile:
            print(f"[{name}] profiling", flush=True)
            profiles[name] = run_child(["--child=profile", f"--child_model={name}",
                                        f"--batch_size={FLAGS.batch_size}"])
        if FLAGS.ablation:
            print(f"[{name}] ablation of the library's speed-ups", flush=True)
            ablations[name] = run_child(["--child=ablation", f"--child_model={name}",
                                         f"--batch_size={FLAGS.batch_size}"])
    load_end = os.getloadavg()[0]
    text = report(results, memory, profiles, ablations, info, command, started,
                  (load_start, load_end), time.time() - clock)
    print("\n" + text)
    if FLAGS.write:
        write_section(FLAGS.output, text)
        print(f"\nWrote the throughput section of {FLAGS.output}.")


if __name__ == "__main__":
    app.run(main)
