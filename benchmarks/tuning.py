"""Does self-tuning help? A tuned run against the SAME network frozen at its initial
hyperparameters (`--tune=false`), both at their best validation loss, on several seeds.

  python benchmarks/tuning.py --dataset=folder:$HOME/data/cifar10 --rundir=/tmp/stn_tuning \
      [--experiment=cifar_cnn] [--epochs=20] [--seeds=0,1] [--parallel=2]

Runs `stn-train` once per (seed, tune) pair, `--parallel` at a time with one thread each (runs
that already finished in --rundir are reused, so an interrupted benchmark continues), then
prints the table and rewrites the `tuning` section of BENCHMARKS.md.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time

from absl import app, flags

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from report import machine_line, replace_section  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_string("experiment", "cifar_cnn", "Experiment to compare.")
flags.DEFINE_string("dataset", None, "Dataset flag for stn-train.")
flags.DEFINE_string("rundir", "/tmp/stn_tuning", "Folder of the runs' logdirs.")
flags.DEFINE_integer("epochs", 20, "Epoch budget of every run.")
flags.DEFINE_list("seeds", ["0", "1"], "Seeds.")
flags.DEFINE_integer("parallel", 2, "Runs at a time (each with --threads=1).")


def _logdir(seed: str, tune: bool) -> str:
    return os.path.join(FLAGS.rundir, f"{FLAGS.experiment}_tune{str(tune).lower()}_s{seed}")


def _launch(seed: str, tune: bool) -> subprocess.Popen:
    logdir = _logdir(seed, tune)
    command = [sys.executable, "-m", "stn_pipeline_scripts.train",
               f"--experiment={FLAGS.experiment}", f"--dataset={FLAGS.dataset}",
               f"--epochs={FLAGS.epochs}", f"--seed={seed}", f"--tune={str(tune).lower()}",
               "--threads=1", "--log_every=200", f"--logdir={logdir}"]
    os.makedirs(FLAGS.rundir, exist_ok=True)
    return subprocess.Popen(command, stdout=subprocess.DEVNULL,
                            stderr=open(logdir + ".log", "w"))


def main(argv):
    del argv  # Unused.
    pending = [(s, t) for s in FLAGS.seeds for t in (True, False)
               if not os.path.exists(os.path.join(_logdir(s, t), "results.json"))]
    running = []
    while pending or running:
        while pending and len(running) < FLAGS.parallel:
            running.append(_launch(*pending.pop(0)))
        time.sleep(5)
        for process in [p for p in running if p.poll() is not None]:
            running.remove(process)
            if process.returncode:
                sys.exit(f"a run failed: {process.args}")
    rows, gains = [], []
    for seed in FLAGS.seeds:
        pair = {}
        for tune in (True, False):
            with open(os.path.join(_logdir(seed, tune), "results.json")) as handle:
                pair[tune] = json.load(handle)
        gains.append(pair[False]["test_loss"] - pair[True]["test_loss"])
        for tune in (True, False):
            r = pair[tune]
            final = ", ".join(f"{k}={v:.3g}" for k, v in r["final_hparams"].items())
            rows.append(f"| {seed} | {'tuned' if tune else 'frozen'} | {r['best_epoch']} | "
                        f"{r['val_loss']:.4f} | {r['val_accuracy']:.4f} | {r['test_loss']:.4f} | "
                        f"{r['test_accuracy']:.4f} | {r['wall_time_s'] / 60:.0f} | {final} |")
    body = "\n".join([
        f"## Tuning: {FLAGS.experiment}, self-tuned vs the same network frozen",
        "",
        f"`python benchmarks/tuning.py --experiment={FLAGS.experiment} --dataset=... "
        f"--epochs={FLAGS.epochs} --seeds={','.join(FLAGS.seeds)}` ({machine_line()}). Each run: "
        f"{FLAGS.epochs} epochs on the 40,000/10,000 train/validation split, test at the "
        "best-validation epoch; frozen = `--tune=false` (initial hyperparameters, no "
        f"perturbation, no hyper steps). Runs {FLAGS.parallel} at a time, one thread each.",
        "",
        "| seed | run | best epoch | val loss | val acc | test loss | test acc | minutes | final "
        "hyperparameters |",
        "|---|---|---:|---:|---:|---:|---:|---:|---|",
        *rows,
        "",
        f"Test-loss gain of tuning (frozen - tuned), mean over seeds: "
        f"{statistics.mean(gains):.4f} (per seed: {', '.join(f'{g:.4f}' for g in gains)}).",
    ])
    print(body)
    replace_section("tuning", body)


if __name__ == "__main__":
    app.run(main)
