"""The fit loop's overhead over back-to-back compiled cycles, at 1 and N cycles per call.

  python benchmarks/loop_overhead.py [--cycles=48] [--reps=3] [--per_call=8] [--threads=1]

cifar_cnn (default settings, batch 128) on an in-memory dataset of random images. Four
contenders run the same number of STN cycles (2 weight + 1 hyper step) from the same trainer:
`training.fit` with `cycles_per_execution` 1 and N (its own train time, `LoopState.train_seconds`:
the epoch's loop without the end-of-epoch evaluation), and tight loops calling the compiled
steps one by one, or `StnTrainer.run_cycles` with N cycles, back to back with one host sync at
the end. Repetitions rotate the order; ratios are medians over repetitions of same-repetition
pairs. Rewrites the `loop_overhead` section of BENCHMARKS.md.
"""

from __future__ import annotations

import os
import statistics
import sys
import tempfile
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402
from absl import app, flags, logging  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from report import machine_line, replace_section  # noqa: E402

from stn_pipeline.hparams import HyperParameters  # noqa: E402
from stn_pipeline.models import CifarCnn, cifar_cnn_hparams  # noqa: E402
from stn_pipeline.schedule import ScheduleConfig  # noqa: E402
from stn_pipeline.summaries import RunLogger  # noqa: E402
from stn_pipeline.trainer import StnTrainer  # noqa: E402
from stn_pipeline.training import LoopOptions, LoopState, RunData, fit  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_integer("cycles", 48, "STN cycles per contender and repetition (a multiple of "
                     "--per_call).")
flags.DEFINE_integer("reps", 3, "Repetitions.")
flags.DEFINE_integer("per_call", 8, "Cycles per compiled call (N).")
flags.DEFINE_integer("threads", 1, "TensorFlow intra- and inter-op threads.")
flags.DEFINE_bool("write", True, "Rewrite the loop_overhead section of BENCHMARKS.md.")

BATCH = 128


def _trainer_and_data(cycles: int) -> tuple[StnTrainer, RunData]:
    specs = cifar_cnn_hparams()
    model = CifarCnn((32, 32, 3), 10, (125.0,) * 3, (63.0,) * 3, specs, seed=0)
    trainer = StnTrainer(model, HyperParameters(specs, seed=0),
                         tf.TensorSpec([None, 32, 32, 3], tf.uint8), tf.TensorSpec([None], tf.int64))
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, [16 * BATCH, 32, 32, 3]).astype(np.uint8)
    labels = rng.integers(0, 10, [16 * BATCH]).astype(np.int64)
    batches = tf.data.Dataset.from_tensor_slices((images, labels)).cache()
    infinite = batches.repeat().batch(BATCH, drop_remainder=True)
    data = RunData(train=infinite, hyper=infinite, valid=batches.take(BATCH).batch(BATCH),
                   test=None, steps_per_epoch=2 * cycles, batch_size=BATCH)
    return trainer, data


def _fit_seconds(trainer, data, per_call: int, logdir: str) -> float:
    schedule = ScheduleConfig(epochs=1, warmup_epochs=0)
    options = LoopOptions(cycles_per_execution=per_call)  # log_every 50, as cifar_cnn
    state = LoopState()
    fit(trainer, data, schedule, RunLogger(logdir), options, loop_state=state)
    return float(state.train_seconds.numpy())


def _tight_seconds(trainer, data, per_call: int, cycles: int) -> float:
    train, hyper = iter(data.train), iter(data.hyper)
    start = time.perf_counter()
    if per_call == 1:
        for _ in range(cycles):
            trainer.weight_step(*next(train))
            trainer.weight_step(*next(train))
            out = trainer.hyper_step(*next(hyper))
    else:
        for call in range(cycles // per_call):
            out = trainer.run_cycles(train, hyper, first_step=call * 2 * per_call,
                                     weight_steps=2 * per_call, train_steps=2, hyper_steps=1,
                                     stop_on_nan=True)["hyper"]
    float(out["loss"])  # the one host sync
    return time.perf_counter() - start


def main(argv):
    del argv  # Unused.
    tf.config.threading.set_intra_op_parallelism_threads(FLAGS.threads)
    tf.config.threading.set_inter_op_parallelism_threads(FLAGS.threads)
    logging.set_verbosity(logging.WARNING)
    n, cycles = FLAGS.per_call, FLAGS.cycles
    if cycles % n:
        raise app.UsageError(f"--cycles={cycles} must be a multiple of --per_call={n}.")
    trainer, data = _trainer_and_data(cycles)
    logdir = tempfile.mkdtemp(prefix="loop_overhead")
    contenders = {"steps": lambda: _tight_seconds(trainer, data, 1, cycles),
                  f"calls{n}": lambda: _tight_seconds(trainer, data, n, cycles),
                  "fit1": lambda: _fit_seconds(trainer, data, 1, logdir),
                  f"fit{n}": lambda: _fit_seconds(trainer, data, n, logdir)}
    for run in contenders.values():  # compile everything
        run()
    reps = []
    for rep in range(FLAGS.reps):
        names = list(contenders)
        names = names[rep % len(names):] + names[:rep % len(names)]
        reps.append({name: contenders[name]() / cycles for name in names})
        print(f"rep {rep + 1}: " + ", ".join(f"{k} {v * 1e3:.1f} ms/cycle"
                                             for k, v in reps[-1].items()), flush=True)
    median = lambda f: statistics.median(f(r) for r in reps)  # noqa: E731
    rows = [
        ("1", median(lambda r: r["steps"]), median(lambda r: r["fit1"]),
         median(lambda r: r["fit1"] / r["steps"] - 1)),
        (str(n), median(lambda r: r[f"calls{n}"]), median(lambda r: r[f"fit{n}"]),
         median(lambda r: r[f"fit{n}"] / r[f"calls{n}"] - 1)),
    ]
    gain = median(lambda r: r["fit1"] / r[f"fit{n}"])
    best = median(lambda r: r[f"fit{n}"] / min(r["steps"], r[f"calls{n}"]) - 1)
    for row in rows:
        print(f"N={row[0]}: tight {row[1] * 1e3:.1f} ms/cycle, fit {row[2] * 1e3:.1f} ms/cycle, "
              f"overhead {row[3]:+.1%}")
    print(f"fit N={n} vs fit N=1: {gain:.3f}x; fit N={n} over the faster tight loop: {best:+.1%}")
    if not FLAGS.write:
        return
    table = [f"| {r[0]} | {r[1] * 1e3:.1f} | {r[2] * 1e3:.1f} | {r[3]:+.1%} |" for r in rows]
    replace_section("loop_overhead", "\n".join([
        f"## Loop overhead: `--cycles_per_execution` N=1 vs N={n}",
        "",
        f"`python benchmarks/loop_overhead.py --cycles={cycles} --reps={FLAGS.reps} "
        f"--per_call={n} --threads={FLAGS.threads}` ({machine_line()}). cifar_cnn, batch 128, "
        f"{cycles} cycles (2 weight + 1 hyper step) per contender and repetition, on in-memory "
        "random images: `training.fit` (its train time, without the epoch-end evaluation) "
        "against a tight loop of the same compiled work (the single steps for N=1, "
        f"`StnTrainer.run_cycles` with {n} cycles per call for N={n}) synchronised once at "
        f"the end. Medians over {FLAGS.reps} repetitions of same-repetition ratios.",
        "",
        "| cycles per call | tight loop (ms/cycle) | fit (ms/cycle) | fit overhead |",
        "|---:|---:|---:|---:|",
        *table,
        "",
        f"fit at N={n} against fit at N=1: {gain:.3f}x the speed; against the faster of the "
        f"two tight loops: {best:+.1%} (target <= +3%).",
    ]))


if __name__ == "__main__":
    app.run(main)
