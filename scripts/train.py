"""stn-train: train a Self-Tuning Network.

  stn-train --experiment=relu_toy --logdir=/tmp/stn/toy
  stn-train --experiment=cifar_cnn --dataset=folder:$HOME/data/cifar10 --logdir=/tmp/stn/cnn

Every flag left unset takes the experiment's registered default. `--flagfile=FILE` reads flags
from a file (one `--name=value` per line); the run saves its own as `<logdir>/flags.txt`.
"""

from __future__ import annotations

import dataclasses
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # keep TensorFlow's C++ start-up chatter out

import tensorflow as tf  # noqa: E402
from absl import app, flags, logging  # noqa: E402

from stn_pipeline import distribute, experiments  # noqa: E402
from stn_pipeline.run import ConfigError, run_experiment  # noqa: E402
from stn_pipeline.training import NonFiniteError  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_string("experiment", "relu_toy", f"One of {sorted(experiments.EXPERIMENTS)}.")
flags.DEFINE_string("logdir", None, "Folder for TensorBoard logs, results.json and exports.")
flags.DEFINE_bool("overwrite", False, "Move an existing run in --logdir aside and start anew.")
flags.DEFINE_string("init_from", None, "Start from a trainer checkpoint, e.g. one written by a "
                    "reloaded trainer export: tf.train.Checkpoint(trainer=loaded).write(path).")
flags.DEFINE_bool("restore_fallback", False,
                  "Resume from the previous checkpoint when the newest one is damaged.")

_HELP = {
    "seed": "Seed of initialisation, data order, perturbations and masks.",
    "batch_size": "Examples per weight and hyper step.",
    "epochs": "Maximum number of epochs.",
    "max_steps": "Cap on weight steps (0: none); also --max_cycles.",
    "warmup_epochs": "Epochs of weight steps only before tuning starts.",
    "train_steps": "Weight steps per cycle.",
    "hyper_steps": "Hyper steps per cycle.",
    "weight_optimizer": "'sgd' (momentum 0.9) or 'adam'.",
    "weight_lr": "Learning rate of the model weights.",
    "hyper_lr": "Adam learning rate of the hyperparameters.",
    "scale_lr": "Adam learning rate of the perturbation scales.",
    "tau": "Entropy weight of the hyper loss.",
    "tune": "False freezes the hyperparameters at their initial values (the baseline).",
    "tune_scales": "Learn the perturbation scales.",
    "nonmono": "Window (epochs) of the non-monotone learning-rate decay; 0 disables it.",
    "patience": "Early stopping after this many epochs without improvement; 0 disables it.",
    "log_every": "Weight steps between progress lines and summaries.",
    "checkpoint_every": "Weight steps between resume checkpoints (0: only at epoch ends).",
    "keep_checkpoints": "How many resume checkpoints to keep.",
    "on_nan": "'stop' (exit non-zero) or 'skip' (skip and count) a non-finite step.",
    "nan_at_step": "Test hook: make the weight loss NaN at this weight step (0: never).",
    "hparam_inits": "Initial values, e.g. 'dropout0=0.2,cutout_length=8'.",
    "precision": "'float32' or 'mixed_bfloat16' (STN layers' matmuls and convolutions in "
                 "bfloat16, variables and losses float32; README 'Precision').",
    "toy_depth": "relu_toy: number of hidden layers.",
    "toy_width": "relu_toy: units per hidden layer.",
    "toy_r0": "relu_toy: initial input half-width r.",
    "toy_train_size": "relu_toy: number of training points.",
    "dataset": "'cifar10' (or any TFDS image classification name) or 'folder:<dir>'.",
    "data_dir": "TFDS data folder.",
    "valid_fraction": "Part of the training split held out for hyper steps and selection.",
    "max_examples": "Use only the first N training (and test) examples; 0: all.",
}
_DEFINE = {bool: flags.DEFINE_bool, int: flags.DEFINE_integer, float: flags.DEFINE_float,
           str: flags.DEFINE_string}
for _field in dataclasses.fields(experiments.RunConfig):
    if _field.name in _HELP:
        _kind = type(_field.default) if _field.default is not None else str
        _DEFINE[_kind](_field.name, None, _HELP[_field.name] + " Default: the experiment's.")
flags.DEFINE_integer("max_cycles", None, "Cap on cycles; sets --max_steps = --max_cycles * --train_steps.")
flags.DEFINE_integer("threads", 0, "CPU threads for TensorFlow ops (0: TensorFlow's default).")
flags.DEFINE_bool("deterministic", False, "Deterministic TensorFlow kernels (bitwise resumes).")
flags.DEFINE_enum("strategy", "default", list(distribute.STRATEGIES),
                  "tf.distribute strategy: 'default' (one device), 'mirrored' (local GPUs, or "
                  "the logical CPU devices of --cpu_devices), 'multi_worker' (one process per "
                  "machine, cluster from TF_CONFIG), 'tpu' (TPUStrategy). --batch_size is global.")
flags.DEFINE_integer("cpu_devices", 0, "Split the CPU into this many logical devices (for "
                     "--strategy=mirrored without GPUs); 0: leave it whole.")
flags.DEFINE_integer("worker_timeout", 600, "multi_worker: seconds a collective waits for a "
                     "peer before the job fails (a dead worker ends the job instead of hanging).")


def config_from_flags() -> experiments.RunConfig:
    """The experiment's defaults, overridden by every flag given on the command line."""
    if FLAGS.experiment not in experiments.EXPERIMENTS:
        raise ConfigError(f"--experiment={FLAGS.experiment!r} is unknown; choose one of "
                          f"{sorted(experiments.EXPERIMENTS)}.")
    config = experiments.default_config(FLAGS.experiment)
    given = {name: FLAGS[name].value for name in _HELP if FLAGS[name].value is not None}
    config = dataclasses.replace(config, **given)
    if FLAGS.max_cycles is not None:
        if FLAGS.max_cycles < 0:
            raise ConfigError(f"--max_cycles must be >= 0, received {FLAGS.max_cycles}.")
        config = dataclasses.replace(config, max_steps=FLAGS.max_cycles * config.train_steps)
    return config


def _reason(error: Exception) -> str:
    """The telling line of a TensorFlow op error (not its headline, stack or node names)."""
    lines = [line.strip() for line in str(getattr(error, "message", error)).splitlines()
             if line.strip() and not line[:1].isspace()
             and not line.startswith(("Graph execution error", "Detected at node", "[["))]
    if not lines:
        return type(error).__name__
    # E.g. "Collective ops is aborted by: ... tasks are unhealthy ...:" + "/job:worker/...task:1".
    return " ".join(lines[:2]) if lines[0].endswith(":") and len(lines) > 1 else lines[0]


def main(argv):
    if len(argv) > 1:
        sys.exit(f"stn-train: error: unexpected arguments {argv[1:]}; flags take the form "
                 "--name=value.")
    logging.set_verbosity(logging.INFO)
    tf.get_logger().setLevel("WARNING")  # TensorFlow's own INFO lines (checkpoint sharding...)
    if FLAGS.cpu_devices < 0:
        sys.exit(f"stn-train: error: --cpu_devices must be >= 0, received {FLAGS.cpu_devices}.")
    if FLAGS.cpu_devices:  # before anything initialises TensorFlow's devices
        distribute.configure_cpu_devices(FLAGS.cpu_devices)
    if FLAGS.deterministic:
        tf.config.experimental.enable_op_determinism()
    if FLAGS.threads:
        tf.config.threading.set_intra_op_parallelism_threads(FLAGS.threads)
        tf.config.threading.set_inter_op_parallelism_threads(FLAGS.threads)
    strategy = None
    try:
        if not FLAGS.logdir:
            raise ConfigError("--logdir is required.")
        config = config_from_flags()
        flagfile_text = FLAGS.flags_into_string()
        # Created first: MultiWorkerMirroredStrategy must exist before other TensorFlow work.
        strategy = distribute.make_strategy(FLAGS.strategy, FLAGS.worker_timeout)
        results = run_experiment(config, FLAGS.logdir, FLAGS.overwrite, flagfile_text,
                                 FLAGS.restore_fallback, FLAGS.init_from, strategy)
    except (ValueError, NonFiniteError) as error:  # ConfigError, DataError, CheckpointError...
        sys.exit(f"stn-train: error: {error}")
    except distribute.PeerFailure as error:
        if strategy is None:
            raise
        logging.error("collective failure: %s", error.message)
        sys.stderr.write(f"stn-train: error: the {FLAGS.strategy} job lost a worker or timed "
                         f"out waiting for one ({type(error).__name__}: {_reason(error)}); "
                         "restart all workers with the same flags to resume from the last "
                         "checkpoint.\n")
        sys.stderr.flush()
        # Collective threads of a broken job may block a normal interpreter exit.
        os._exit(1)
    summary = {k: round(v, 4) for k, v in results.items() if k.startswith(("val_", "test_"))}
    print(f"done: {summary} final hyperparameters {results['final_hparams']}")


def run():
    app.run(main)


if __name__ == "__main__":
    run()
