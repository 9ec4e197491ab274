"""Runs that survive: kill-and-resume equality, damaged checkpoints, NaN guards, logdir clashes,
and bad flag combinations."""

from __future__ import annotations

import glob
import itertools
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import tensorflow as tf
from tensorboard.backend.event_processing import event_accumulator

from stn_pipeline import checkpoints, experiments, run
from stn_pipeline.config import load_config
from stn_pipeline.trainer import StnTrainer
from stn_pipeline.training import NonFiniteError
from stn_pipeline_scripts import train as train_script

TOY = ["--experiment=relu_toy", "--epochs=12", "--checkpoint_every=64", "--deterministic",
       "--log_every=16"]
ENV = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")


def _train(logdir, *flags, wait=True):
    command = [sys.executable, "-m", "stn_pipeline_scripts.train", *TOY, f"--logdir={logdir}",
               *flags]
    if not wait:
        return subprocess.Popen(command, env=ENV, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
    return subprocess.run(command, env=ENV, capture_output=True, text=True, timeout=300)


def _variables(path):
    reader = tf.train.load_checkpoint(path)
    names = [n for n in reader.get_variable_to_shape_map()
             if "OBJECT_GRAPH" not in n and "train_seconds" not in n]
    return {n: reader.get_tensor(n) for n in names}


def _toy_config(**overrides) -> experiments.RunConfig:
    settings = dict(epochs=12, checkpoint_every=64, log_every=16)
    settings.update(overrides)
    return experiments.default_config("relu_toy", **settings)


def _nan_inputs_at(monkeypatch, step: int) -> None:
    """Trainers built from now on get a batch of NaN inputs at weight step `step` (1-based, of
    this process), as a corrupt example would: the loss and gradients turn non-finite."""
    build = StnTrainer.__init__

    def build_then_wrap(self, *args, **kwargs):
        build(self, *args, **kwargs)
        compiled, calls = self.weight_step, itertools.count(1)

        def weight_step(inputs, targets):
            if next(calls) == step:
                inputs = inputs * float("nan")
            return compiled(inputs, targets)

        self.weight_step = weight_step

    monkeypatch.setattr(StnTrainer, "__init__", build_then_wrap)


def kill_when(process, condition, timeout: float = 120.0) -> None:
    """SIGKILLs a training subprocess as soon as `condition()` holds (e.g. a checkpoint exists)."""
    deadline = time.time() + timeout
    while not condition():
        assert time.time() < deadline and process.poll() is None, "no checkpoint appeared"
        time.sleep(0.02)
    process.send_signal(signal.SIGKILL)
    process.wait()


def assert_same_final_checkpoint(a, b) -> dict:
    """The newest checkpoints of runs `a` and `b` have the same name and bitwise equal values."""
    final_a = tf.train.latest_checkpoint(str(a / "checkpoints"))
    final_b = tf.train.latest_checkpoint(str(b / "checkpoints"))
    assert os.path.basename(final_a) == os.path.basename(final_b)
    variables_a, variables_b = _variables(final_a), _variables(final_b)
    assert variables_a.keys() == variables_b.keys() and len(variables_a) > 20
    for name, value in variables_a.items():
        np.testing.assert_array_equal(value, variables_b[name], err_msg=name)
    return variables_a


def test_killed_run_resumes_bitwise(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    assert _train(a).returncode == 0
    kill_when(_train(b, wait=False), lambda: (b / "checkpoints" / "ckpt-192.index").exists())
    assert not (b / "results.json").exists()
    resumed = _train(b)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "resuming at weight step" in resumed.stderr
    assert_same_final_checkpoint(a, b)
    with open(a / "results.json") as fa, open(b / "results.json") as fb:
        results_a, results_b = json.load(fa), json.load(fb)
    assert results_a["final_hparams"] == results_b["final_hparams"]
    assert results_a["trajectory"] == results_b["trajectory"]
    assert results_a["history"] == results_b["history"]  # epoch records survive the kill
    assert results_a["best_epoch"] == results_b["best_epoch"]
    # TensorBoard's reader sees each step once, in order, across both processes' event files.
    steps_a = [e.step for e in _scalar_events(a, "hparam/input_range")]
    steps_b = [e.step for e in _scalar_events(b, "hparam/input_range")]
    assert steps_b == steps_a and steps_b == sorted(set(steps_b))


def _scalar_events(logdir, tag):
    # size_guidance 0 keeps every event (the default samples 10 per tag); orphaned events of a
    # killed process are purged by TensorBoard's reader when the resumed run writes lower steps.
    events = event_accumulator.EventAccumulator(str(logdir),
                                                size_guidance={event_accumulator.TENSORS: 0})
    events.Reload()
    return events.Tensors(tag)


def test_nan_stops_with_step_and_keeps_last_checkpoint(tmp_path, monkeypatch):
    logdir = str(tmp_path / "nan")
    _nan_inputs_at(monkeypatch, 150)
    with pytest.raises(NonFiniteError, match="weight step 150"):
        run.run_experiment(_toy_config(), logdir)
    latest = tf.train.latest_checkpoint(os.path.join(logdir, "checkpoints"))
    assert latest.endswith("ckpt-128")
    values = _variables(latest)
    floats = [v for v in values.values() if isinstance(v, np.ndarray) and v.dtype.kind == "f"]
    assert floats and all(np.all(np.isfinite(v)) for v in floats)
    assert not os.path.exists(os.path.join(logdir, "results.json"))


def test_nan_skip_mode_counts_and_finishes(tmp_path, monkeypatch):
    _nan_inputs_at(monkeypatch, 150)
    results = run.run_experiment(_toy_config(on_nan="skip", epochs=6), str(tmp_path / "skip"))
    assert results["skipped_nonfinite_steps"] == 1
    assert np.isfinite(results["val_loss"])
    skipped = _scalar_events(tmp_path / "skip", "train/skipped_nonfinite_steps")
    assert [e.step for e in skipped] == [150]


def test_damaged_checkpoint_is_named_and_fallback_resumes(tmp_path, monkeypatch):
    logdir = str(tmp_path / "damaged")
    _nan_inputs_at(monkeypatch, 150)
    with pytest.raises(NonFiniteError):  # leaves a run with checkpoints 64 and 128
        run.run_experiment(_toy_config(), logdir)
    monkeypatch.undo()
    newest = os.path.join(logdir, "checkpoints", "ckpt-128.data-00000-of-00001")
    with open(newest, "r+b") as handle:
        handle.truncate(os.path.getsize(newest) // 2)
    with pytest.raises(checkpoints.CheckpointError, match="ckpt-128.*--restore_fallback"):
        run.run_experiment(_toy_config(), logdir)
    results = run.run_experiment(_toy_config(), logdir, restore_fallback=True)
    assert results["weight_steps"] == 12 * 32
    assert tf.train.latest_checkpoint(os.path.join(logdir, "checkpoints")).endswith("ckpt-384")


def test_failed_save_keeps_previous_checkpoint(tmp_path, monkeypatch):
    logdir = str(tmp_path / "full")
    original = tf.train.CheckpointManager.save
    calls = []

    def save_until_disk_full(self, checkpoint_number=None, **kwargs):
        calls.append(checkpoint_number)
        if len(calls) > 1:
            raise tf.errors.ResourceExhaustedError(None, None, "No space left on device")
        return original(self, checkpoint_number=checkpoint_number, **kwargs)

    monkeypatch.setattr(tf.train.CheckpointManager, "save", save_until_disk_full)
    with pytest.raises(checkpoints.CheckpointError, match="No space left.*ckpt-32 is intact"):
        run.run_experiment(_toy_config(), logdir)
    monkeypatch.undo()
    assert _variables(os.path.join(logdir, "checkpoints", "ckpt-32"))


def test_logdir_with_another_configuration_is_refused_then_moved_aside(tmp_path, monkeypatch):
    logdir = str(tmp_path / "clash")
    _nan_inputs_at(monkeypatch, 70)
    with pytest.raises(NonFiniteError):
        run.run_experiment(_toy_config(), logdir)
    with pytest.raises(run.ConfigError, match="--toy_width: 32 -> 16"):
        run.run_experiment(_toy_config(toy_width=16), logdir)
    run.prepare_logdir(logdir, overwrite=True)
    aside = glob.glob(logdir + ".old-*")
    assert len(aside) == 1 and os.path.exists(os.path.join(aside[0], "checkpoints"))
    assert load_config(os.path.join(aside[0], "config.json")).toy.width == 32
    assert os.path.isdir(logdir) and not os.listdir(logdir)


@pytest.fixture
def parsed_flags():
    """Parses stn-train's flags in this process; restores them afterwards."""
    def parse(*args):
        return train_script.FLAGS(["stn-train", *args])

    yield parse
    train_script.FLAGS.unparse_flags()


def test_cli_nan_and_clash_messages_are_one_line_and_exit_nonzero(tmp_path, monkeypatch,
                                                                   parsed_flags):
    logdir = tmp_path / "cli"
    _nan_inputs_at(monkeypatch, 70)
    # stn-train's main, in this process (so that the fault can be injected): it exits with the
    # one-line message as its status, which Python prints to stderr with exit code 1.
    argv = parsed_flags(*[f for f in TOY if f != "--deterministic"], f"--logdir={logdir}")
    with pytest.raises(SystemExit) as exited:
        train_script.main(argv)
    message = str(exited.value.code)
    assert message.startswith("stn-train: error: non-finite") and "\n" not in message
    assert "weight step 70" in message
    assert "--log_every=16" in (logdir / "flags.txt").read_text()
    clash = _train(logdir, "--toy_depth=2")
    assert clash.returncode != 0 and "Traceback" not in clash.stderr
    assert "--toy_depth: 3 -> 2" in clash.stderr.strip().splitlines()[-1]


BAD = [
    (dict(batch_size=0), "--batch_size"),
    (dict(batch_size=-3), "--batch_size"),
    (dict(epochs=0), "--epochs"),
    (dict(train_steps=0), "--train_steps"),
    (dict(hyper_steps=-1), "--hyper_steps"),
    (dict(hyper_steps=0, tune=True), "--hyper_steps=0"),
    (dict(warmup_epochs=12, epochs=12), "--warmup_epochs"),
    (dict(valid_fraction=0.0), "--valid_fraction"),
    (dict(valid_fraction=1.0), "--valid_fraction"),
    (dict(weight_lr=0.0), "--weight_lr"),
    (dict(hyper_lr=-1e-3), "--hyper_lr"),
    (dict(tau=-1.0), "--tau"),
    (dict(weight_optimizer="rmsprop"), "--weight_optimizer"),
    (dict(on_nan="ignore"), "--on_nan"),
    (dict(log_every=0), "--log_every"),
    (dict(keep_checkpoints=0), "--keep_checkpoints"),
    (dict(checkpoint_every=-5), "--checkpoint_every"),
    (dict(toy_r0=-1.0), "--toy_r0"),
    (dict(hparams="input_range=-2"), "--hparams: .*input_range"),
    (dict(hparams="dropout9=0.1"), "--hparams: unknown hyperparameter 'dropout9'; available: "
                                   "input_range"),
    (dict(hparams="input_range=wide"), "NAME=number"),
    (dict(network="plain", tune=True), "--network=plain has no hypernetwork"),
    (dict(network="stn", replay="/nonexistent/run"), "--replay trains the plain network"),
    (dict(replay="/nonexistent/run"), "--replay=/nonexistent/run: no such run folder"),
    (dict(experiment="nope"), "--experiment"),
    (dict(dataset=" "), "--dataset"),
]


@pytest.mark.parametrize("overrides, flag", BAD, ids=[str(b[0]) for b in BAD])
def test_bad_settings_fail_before_any_work(overrides, flag, tmp_path):
    with pytest.raises(run.ConfigError, match=flag.replace("[", r"\[")):
        # Out-of-range values are refused as the configuration is built, the others by the run.
        run.run_experiment(_toy_config(**overrides), str(tmp_path / "never"))
    assert not (tmp_path / "never").exists()  # refused before the logdir was even made


def test_cli_bad_init_is_one_line(tmp_path):
    result = _train(tmp_path / "x", "--hparams=input_range=0")
    assert result.returncode != 0 and "Traceback" not in result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("stn-train: error:") and "input_range" in last and "0.0" in last
