"""The trainer as a SavedModel: it keeps training, without stn_pipeline, exactly as the library."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import tensorflow as tf

from stn_pipeline import data, experiments, run, trainer_export
from stn_pipeline_scripts import export as export_cli

# Runs in a process that never imports stn_pipeline: 5 weight steps and 1 hyper step on the
# saved batches, then writes the state back as a checkpoint.
_DRIVER = textwrap.dedent("""
    import sys
    import numpy as np
    import tensorflow as tf
    tf.config.experimental.enable_op_determinism()
    export_dir, batches, out = sys.argv[1:4]
    trainer = tf.saved_model.load(export_dir)
    batch = np.load(batches)
    for k in range(5):
        trainer.weight_step(batch[f"images{k}"], batch[f"labels{k}"])
    trainer.hyper_step(batch["valid_images"], batch["valid_labels"])
    try:
        # (NumPy arrays are converted to the signature's dtype; a tensor's dtype is checked.)
        trainer.weight_step(tf.constant(batch["images0"], tf.float32), batch["labels0"])
        sys.exit("a float image batch was accepted")
    except TypeError as error:  # the signature wants uint8 images
        assert "Can not cast" in str(error), error
    tf.train.Checkpoint(trainer=trainer).write(out)
    assert "stn_pipeline" not in sys.modules
""")


@pytest.fixture(scope="module")
def cifar_run(cifar_folder, tmp_path_factory):
    """A short cifar_cnn run on a slice of the shared CIFAR-10, with resume checkpoints."""
    logdir = str(tmp_path_factory.mktemp("trainer_export") / "run")
    config = experiments.default_config("cifar_cnn", dataset=f"folder:{cifar_folder}",
                                        max_examples=640, batch_size=32, epochs=2, log_every=8)
    run.run_experiment(config, logdir)
    splits = data.load_splits(config.data.dataset, max_examples=640)
    train = list(data.eval_batches(splits.train, 32).take(5))
    valid = next(iter(data.eval_batches(splits.valid, 32)))
    arrays = {f"{kind}{k}": t.numpy() for k, (x, y) in enumerate(train)
              for kind, t in (("images", x), ("labels", y))}
    arrays.update(valid_images=valid[0].numpy(), valid_labels=valid[1].numpy())
    return logdir, arrays


def _library_trainer(logdir):
    trainer = export_cli.rebuild_trainer(logdir)
    latest = tf.train.latest_checkpoint(os.path.join(logdir, "checkpoints"))
    tf.train.Checkpoint(trainer=trainer).read(latest).expect_partial()
    return trainer


def test_reloaded_trainer_trains_like_the_library(cifar_run, tmp_path):
    logdir, arrays = cifar_run
    export_dir = trainer_export.export_trainer(logdir, export_cli.rebuild_trainer(logdir), "latest")
    batches = str(tmp_path / "batches.npz")
    np.savez(batches, **arrays)
    written = str(tmp_path / "reloaded" / "ckpt")
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
    result = subprocess.run([sys.executable, "-c", _DRIVER, export_dir, batches, written],
                            capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]

    tf.config.experimental.enable_op_determinism()
    library = _library_trainer(logdir)
    before = [v.numpy() for v in library.weights] + [library.hparams.unconstrained_value.numpy()]
    for k in range(5):
        library.weight_step(arrays[f"images{k}"], arrays[f"labels{k}"])
    library.hyper_step(arrays["valid_images"], arrays["valid_labels"])

    reloaded = export_cli.rebuild_trainer(logdir)
    tf.train.Checkpoint(trainer=reloaded).read(written).assert_existing_objects_matched()
    pairs = list(zip(library.trainer_variables(), reloaded.trainer_variables()))
    assert len(pairs) > 30
    # Same state, batches and generator state. Not always bitwise: the loaded graph is optimised
    # (op fusion, reduction order of the gate-gradient matmuls) apart from the Python-traced one,
    # which moves float32 values by a few ulps; the gate kernels (sums over batch and space,
    # values ~1e-2) differ by up to ~3e-8 after 5 steps, far below what one step moves them.
    for mine, theirs in pairs:
        np.testing.assert_allclose(mine.numpy(), theirs.numpy(), rtol=1e-6, atol=1e-7,
                                   err_msg=mine.name)
    after = [v.numpy() for v in library.weights] + [library.hparams.unconstrained_value.numpy()]
    assert all(not np.array_equal(b, a) for b, a in zip(before[-1:], after[-1:]))
    assert sum(not np.array_equal(b, a) for b, a in zip(before, after)) >= len(before) - 1

    # stn-train continues from the state the reloaded trainer wrote back.
    config = experiments.RunConfig.from_dict(_config(logdir))
    results = run.run_experiment(config.override(epochs=2), str(tmp_path / "next"),
                                 init_from=written)
    expected = dict(zip(reloaded.hparams.names, reloaded.hparams.constrained().numpy().tolist()))
    assert results["initial_hparams"] == expected


def _config(logdir):
    with open(os.path.join(logdir, "config.json")) as handle:
        return json.load(handle)


def test_stn_export_cli_writes_trainer_versions(cifar_run):
    logdir, _ = cifar_run
    command = [sys.executable, "-m", "stn_pipeline_scripts.export", f"--logdir={logdir}",
               "--what=trainer", "--source=best"]
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
    first = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)
    second = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)
    assert first.returncode == 0 and second.returncode == 0, first.stderr[-2000:]
    versions = sorted(os.listdir(os.path.join(logdir, "trainer_export")))
    assert len(versions) >= 2 and all(v.isdigit() for v in versions)
    loaded = tf.saved_model.load(os.path.join(logdir, "trainer_export", versions[-1]))
    assert set(loaded.signatures) >= {"weight_step", "hyper_step", "evaluate", "hyperparameters"}
    names = [n.decode() for n in loaded.hyperparameters()["names"].numpy()]
    assert names == ["dropout0", "dropout1", "dropout2", "pixel_drop"]
