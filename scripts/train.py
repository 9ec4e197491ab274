"""stn-train: train a Self-Tuning Network.

  stn-train --experiment=relu_toy --logdir=/tmp/stn/toy
  stn-train --experiment=cifar_cnn --dataset=folder:$HOME/data/cifar10 --logdir=/tmp/stn/cnn

Every flag left unset takes the experiment's registered default, or on resume (rerunning on a
`--logdir` that holds a run) the run's stored value. `--flagfile=FILE` reads flags from a file
(one `--name=value` per line); the run saves its own as `<logdir>/flags.txt`.
"""

from __future__ import annotations

import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # keep TensorFlow's C++ start-up chatter out

import tensorflow as tf  # noqa: E402
from absl import app, flags, logging  # noqa: E402

from stn_pipeline import config as config_lib  # noqa: E402
from stn_pipeline import distribute, experiments  # noqa: E402
from stn_pipeline.run import ConfigError, run_experiment  # noqa: E402
from stn_pipeline.training import NonFiniteError  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_string("experiment", "relu_toy", f"One of {sorted(experiments.EXPERIMENTS)}.")
flags.DEFINE_string("logdir", None, "Folder for TensorBoard logs, results.json and exports.")
flags.DEFINE_bool("overwrite", False, "Move an existing run in --logdir aside and start anew.")
flags.DEFINE_bool("extend", False, "Train a run that stopped early (patience, learning-rate "
                  "floor) on past its stop; a run that stopped on its budget extends with a "
                  "larger --epochs alone.")
flags.DEFINE_string("init_from", None, "Start from a trainer checkpoint, e.g. one written by a "
                    "reloaded trainer export: tf.train.Checkpoint(trainer=loaded).write(path).")
flags.DEFINE_bool("restore_fallback", False,
                  "Resume from the previous checkpoint when the newest one is damaged.")

_DEFINE = {bool: flags.DEFINE_bool, int: flags.DEFINE_integer, float: flags.DEFINE_float,
           str: flags.DEFINE_string}
# One flag per setting of the run configuration, flat (--weight_lr, --epochs, --toy_depth...).
for _name, _default in config_lib.RunConfig(experiment="").as_flags().items():
    if _name != "experiment":
        _DEFINE[type(_default) if _default is not None else str](
            _name, None, config_lib.HELP[_name] + " Default: the experiment's.")
flags.DEFINE_integer("max_cycles", None,
                     "Cap on cycles; sets --max_steps = --max_cycles * --train_steps.")
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


def given_settings() -> list[str]:
    """The settings given on the command line (or in a flagfile), by flag name."""
    names = [name for name in config_lib.FLAGS if FLAGS[name].present]
    return names + ["max_steps"] * FLAGS["max_cycles"].present


def config_from_flags() -> config_lib.RunConfig:
    """The experiment's defaults, overridden by every flag given on the command line."""
    if FLAGS.experiment not in experiments.EXPERIMENTS:
        raise ConfigError(f"--experiment={FLAGS.experiment!r} is unknown; choose one of "
                          f"{sorted(experiments.EXPERIMENTS)}.")
    given = {name: FLAGS[name].value for name in config_lib.FLAGS
             if name != "experiment" and FLAGS[name].value is not None}
    config = experiments.default_config(FLAGS.experiment, **given)
    if FLAGS.max_cycles is not None:
        if FLAGS.max_cycles < 0:
            raise ConfigError(f"--max_cycles must be >= 0, received {FLAGS.max_cycles}.")
        config = config.override(max_steps=FLAGS.max_cycles * config.schedule.train_steps)
    return config


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
                                 FLAGS.restore_fallback, FLAGS.init_from, strategy,
                                 given=given_settings(), extend=FLAGS.extend)
    except (ValueError, NonFiniteError) as error:  # ConfigError, DataError, CheckpointError...
        sys.exit(f"stn-train: error: {error}")
    except distribute.PeerFailure as error:
        if strategy is None:
            raise
        logging.error("collective failure: %s", error.message)
        sys.stderr.write(f"stn-train: error: the {FLAGS.strategy} job lost a worker or timed "
                         f"out waiting for one ({type(error).__name__}: "
                         f"{distribute.failure_reason(error)}); "
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
