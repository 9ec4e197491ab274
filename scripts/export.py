"""stn-export: write a SavedModel of a run from its checkpoints.

  stn-export --logdir=runs/cnn                       # adds runs/cnn/export/<n+1>/
  stn-export --logdir=runs/cnn --export_dir=/srv/models/cnn
  stn-export --logdir=runs/cnn --what=trainer        # adds runs/cnn/trainer_export/<n+1>/

`--what=model` (default): the inference SavedModel of a finished run's best state.
`--what=trainer`: the trainer itself (compiled weight/hyper steps, optimizer state), from the
latest resume checkpoint (`--source=latest`, also for unfinished runs) or the best state.

`stn-train` already exports at the end of every run; this rebuilds the model from the run's
config.json and results.json (no data is loaded), restores `<logdir>/checkpoints/best` and writes
the next version under `--export_dir` (default `<logdir>/export`), never overwriting one.
"""

from __future__ import annotations

import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # keep TensorFlow's C++ start-up chatter out

from absl import app, flags  # noqa: E402

from stn_pipeline import experiments, export, trainer_export  # noqa: E402
from stn_pipeline.checkpoints import CheckpointError  # noqa: E402
from stn_pipeline.trainer import StnTrainer  # noqa: E402

FLAGS = flags.FLAGS


def define_flags() -> None:
    """Defines the flags; called by `run` only (--logdir would clash with stn-train's)."""
    flags.DEFINE_string("logdir", None, "Folder of a finished stn-train run.")
    flags.DEFINE_string("export_dir", None, "Folder of export versions; default <logdir>/export "
                        "or <logdir>/trainer_export.")
    flags.DEFINE_enum("what", "model", ["model", "trainer"], "What to export.")
    flags.DEFINE_enum("source", "latest", ["latest", "best"],
                      "--what=trainer: the checkpoint to export from.")


def load_run(logdir: str, need_results: bool = False) -> tuple[experiments.RunConfig, dict]:
    """(RunConfig, results) of the run in `logdir`: the one place that reads config.json back."""
    config_json, results = export.read_run(logdir, need_results)
    return experiments.RunConfig.from_dict(config_json), results


def export_model(logdir: str, export_dir: str | None = None) -> str:
    """Exports the best state of the finished run in `logdir`; returns the version folder."""
    config, results = load_run(logdir, need_results=True)
    model, hparams = experiments.build_model(config, results.get("metadata") or {})
    return export.export_from_logdir(logdir, model, hparams, results, export_dir)


def rebuild_trainer(logdir: str) -> StnTrainer:
    """An untrained trainer of the run in `logdir` (finished or not), from config and metadata."""
    config, results = load_run(logdir)
    metadata = results.get("metadata") or {}
    model, hparams = experiments.build_model(config, metadata)
    return trainer_export.new_trainer(model, hparams, metadata, config.trainer,
                                     seed=config.seed)


def main(argv):
    if len(argv) > 1:
        sys.exit(f"stn-export: error: unexpected arguments {argv[1:]}; flags take the form "
                 "--name=value.")
    try:
        if not FLAGS.logdir:
            raise export.ExportError("--logdir is required.")
        if not os.path.isdir(FLAGS.logdir):
            raise export.ExportError(f"--logdir={FLAGS.logdir} does not exist.")
        if FLAGS.what == "trainer":
            path = trainer_export.export_trainer(FLAGS.logdir, rebuild_trainer(FLAGS.logdir),
                                                 FLAGS.source, FLAGS.export_dir)
        else:
            path = export_model(FLAGS.logdir, FLAGS.export_dir)
    except (export.ExportError, CheckpointError, ValueError) as error:
        sys.exit(f"stn-export: error: {error}")
    print(f"exported {path}")


def run():
    define_flags()
    app.run(main)


if __name__ == "__main__":
    run()
