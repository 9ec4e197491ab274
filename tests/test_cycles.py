"""Several cycles per compiled call (`--cycles_per_execution`): the same steps as one call per
step, one trace for every call, the non-finite guard inside the call, call-boundary logging,
checkpoints and bitwise resumes."""

from __future__ import annotations

import dataclasses
import glob
import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf
from tensorboard.backend.event_processing import event_accumulator

from stn_pipeline import checkpoints, experiments, run
from stn_pipeline.config import ConfigError
from stn_pipeline.trainer import CYCLE_STATUS, StnTrainer
from stn_pipeline.training import NonFiniteError
from test_resume import assert_same_final_checkpoint, kill_when

ENV = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
NAN_BATCH = 4  # 0-based index of the poisoned training batch: weight step 5


def _toy(**flags):
    config = experiments.default_config("relu_toy", **flags)
    experiment = experiments.build_experiment(config)
    trainer = StnTrainer(experiment.model, experiment.hparams, experiment.input_spec,
                         experiment.target_spec, config.trainer, seed=config.seed)
    return trainer, experiment.data


def _poisoned(train: tf.data.Dataset, index: int) -> tf.data.Dataset:
    """`train` with NaN inputs in batch `index` (a corrupt example would do the same)."""
    def poison(i, batch):
        inputs, targets = batch
        return tf.where(i == index, inputs * np.nan, inputs), targets

    return train.enumerate().map(poison)


def _single_steps(trainer, train, hyper, first_step, count, train_steps=2, hyper_steps=1):
    """What the loop does with one call per step (the reference)."""
    for step in range(first_step + 1, first_step + count + 1):
        out = trainer.weight_step(*next(train))
        if step % train_steps == 0:
            for _ in range(hyper_steps):
                trainer.hyper_step(*next(hyper))
    return out


def _assert_same_state(a: StnTrainer, b: StnTrainer, rtol=1e-5):
    variables_a, variables_b = a.trainer_variables(), b.trainer_variables()
    assert len(variables_a) == len(variables_b) > 10
    for x, y in zip(variables_a, variables_b):
        np.testing.assert_allclose(x.numpy(), y.numpy(), rtol=rtol, atol=1e-7, err_msg=x.name)


def test_cycles_match_single_steps_and_trace_once():
    # Each its own datasets: a second iterator of a seeded shuffle draws another order.
    reference, ref_data = _toy()
    trainer, data = _toy()
    ref_train, ref_hyper = iter(ref_data.train), iter(ref_data.hyper)
    train, hyper = iter(data.train), iter(data.hyper)
    # Calls of 8 steps (4 cycles), then 3 and 3: starting and ending in the middle of a cycle.
    first = 0
    for count in (8, 3, 3):
        expected = _single_steps(reference, ref_train, ref_hyper, first, count)
        out = trainer.run_cycles(train, hyper, first_step=first, weight_steps=count,
                                 train_steps=2, hyper_steps=1, stop_on_nan=True)
        assert CYCLE_STATUS[int(out["status"])] == "running"
        assert int(out["weight_steps"]) == count
        assert int(out["hyper_steps"]) == (first + count) // 2 - first // 2
        np.testing.assert_allclose(out["weight"]["loss"], expected["loss"], rtol=1e-5)
        _assert_same_state(reference, trainer)
        first += count
    # The iterators moved exactly as far as the reference's.
    np.testing.assert_array_equal(next(train)[0], next(ref_train)[0])
    np.testing.assert_array_equal(next(hyper)[0], next(ref_hyper)[0])
    assert trainer.compiled_cycles.experimental_get_tracing_count() == 1


@pytest.mark.parametrize("stop_on_nan", [True, False])
def test_non_finite_step_inside_a_call_is_not_applied(stop_on_nan):
    reference, ref_data = _toy()
    trainer, data = _toy()
    train, hyper = iter(_poisoned(data.train, NAN_BATCH)), iter(data.hyper)
    ref_train = iter(_poisoned(ref_data.train, NAN_BATCH))
    ref_hyper = iter(ref_data.hyper)
    out = trainer.run_cycles(train, hyper, first_step=0, weight_steps=8, train_steps=2,
                             hyper_steps=1, stop_on_nan=stop_on_nan)
    if stop_on_nan:
        # Weight step 5 failed: steps 1-4 and the hyper steps of cycles 1-2 were applied.
        assert CYCLE_STATUS[int(out["status"])] == "weight"
        assert (int(out["weight_steps"]), int(out["hyper_steps"])) == (5, 2)
        assert not np.isfinite(float(out["weight"]["loss"]))
        # As 5 single steps, the 5th not applied (its noise drawn); nothing after it ran.
        _single_steps(reference, ref_train, ref_hyper, 0, 5)
    else:
        assert CYCLE_STATUS[int(out["status"])] == "running"
        assert (int(out["weight_steps"]), int(out["skipped"])) == (8, 1)
        # The reference skips the same step: weight_step does not apply a non-finite update.
        _single_steps(reference, ref_train, ref_hyper, 0, 8)
    _assert_same_state(reference, trainer)
    assert all(np.all(np.isfinite(v.numpy())) for v in trainer.trainer_variables()
               if v.dtype.is_floating)
    np.testing.assert_array_equal(next(train)[0], next(ref_train)[0])


def _poison_relu_toy(monkeypatch, index: int) -> None:
    """relu_toy runs built from now on get NaN inputs in training batch `index` (0-based)."""
    build, defaults = experiments.EXPERIMENTS["relu_toy"]

    def build_poisoned(config):
        experiment = build(config)
        experiment.data = dataclasses.replace(experiment.data,
                                              train=_poisoned(experiment.data.train, index))
        return experiment

    monkeypatch.setitem(experiments.EXPERIMENTS, "relu_toy", (build_poisoned, defaults))


def test_run_stops_inside_a_call_naming_the_step(tmp_path, monkeypatch):
    logdir = str(tmp_path / "nan")
    _poison_relu_toy(monkeypatch, 149)
    config = experiments.default_config("relu_toy", epochs=12, checkpoint_every=64,
                                        cycles_per_execution=8)
    with pytest.raises(NonFiniteError, match="weight-step loss .* at weight step 150 "):
        run.run_experiment(config, logdir)
    assert tf.train.latest_checkpoint(os.path.join(logdir, "checkpoints")).endswith("ckpt-128")
    assert not os.path.exists(os.path.join(logdir, "results.json"))


def test_logs_and_checkpoints_fall_on_call_ends(tmp_path, monkeypatch):
    saved = []
    save = checkpoints.RunCheckpoints.save
    monkeypatch.setattr(checkpoints.RunCheckpoints, "save",
                        lambda self, step: saved.append(step) or save(self, step))
    logdir = tmp_path / "calls"
    # 32 steps per epoch, calls of 3 cycles (6 steps): 6, 12, ..., 30, then 32 (shortened).
    config = experiments.default_config("relu_toy", epochs=3, cycles_per_execution=3,
                                        log_every=16, checkpoint_every=20)
    results = run.run_experiment(config, str(logdir))
    # Each multiple of 16 (and the last step) rounded up to the end of the call holding it.
    events = event_accumulator.EventAccumulator(str(logdir),
                                                size_guidance={event_accumulator.TENSORS: 0})
    events.Reload()
    assert [e.step for e in events.Tensors("hparam/input_range")] == [18, 32, 50, 64, 82, 96]
    # Multiples of 20 at the end of their call, and every epoch end.
    assert saved == [24, 32, 44, 62, 64, 82, 96]
    assert results["weight_steps"] == 96 and results["hyper_steps"] == 16  # 1 tuning epoch


def test_relu_toy_r_agrees_with_one_step_per_call(tmp_path):
    """The acceptance check: the same r at the end with 8 cycles per call as with 1."""
    ends = [run.run_experiment(experiments.default_config("relu_toy", cycles_per_execution=n),
                               str(tmp_path / f"n{n}"))["final_hparams"]["input_range"]
            for n in (1, 8)]
    assert ends[0] > 1.5  # r did move from 1.0 towards 2
    assert abs(ends[0] - ends[1]) < 1e-3


def _train(logdir, *flags, wait=True):
    command = [sys.executable, "-m", "stn_pipeline_scripts.train", "--experiment=relu_toy",
               "--epochs=8", "--deterministic", "--cycles_per_execution=3",
               "--checkpoint_every=20", "--threads=1", f"--logdir={logdir}", *flags]
    if not wait:
        return subprocess.Popen(command, env=ENV, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
    return subprocess.run(command, env=ENV, capture_output=True, text=True, timeout=300)


def test_killed_run_resumes_bitwise_at_a_call_boundary(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    assert _train(a).returncode == 0
    process = _train(b, wait=False)

    def newest():
        steps = [int(re.search(r"ckpt-(\d+)", p).group(1))
                 for p in glob.glob(str(b / "checkpoints" / "ckpt-*.index"))]
        return max(steps, default=0)

    # In the fourth epoch (steps 97-128): 100 rounded up to 102.
    kill_when(process, lambda: newest() >= 100)
    assert not (b / "results.json").exists()
    resumed = _train(b)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "resuming at weight step" in resumed.stderr
    assert_same_final_checkpoint(a, b)
    assert os.path.basename(tf.train.latest_checkpoint(str(a / "checkpoints"))) == "ckpt-256"
    with open(a / "results.json") as fa, open(b / "results.json") as fb:
        results_a, results_b = json.load(fa), json.load(fb)
    for key in ("final_hparams", "trajectory", "history", "best_epoch"):
        assert results_a[key] == results_b[key], key


def test_mirrored_cycles_match_one_step_per_call(tmp_path):
    """Under MirroredStrategy on 2 logical CPUs (a subprocess: devices are split before
    TensorFlow starts), 4 cycles per call end where 1 does."""
    finals = []
    for n in (1, 4):
        result = subprocess.run(
            [sys.executable, "-m", "stn_pipeline_scripts.train", "--experiment=relu_toy",
             "--epochs=3", "--strategy=mirrored", "--cpu_devices=2", "--threads=1",
             f"--cycles_per_execution={n}", f"--logdir={tmp_path / str(n)}"],
            env=ENV, capture_output=True, text=True, timeout=300)
        assert result.returncode == 0, result.stderr[-3000:]
        with open(tmp_path / str(n) / "results.json") as handle:
            finals.append(json.load(handle)["final_hparams"]["input_range"])
    assert finals[0] != pytest.approx(1.0, abs=0.05)  # tuning moved r
    assert finals[1] == pytest.approx(finals[0], abs=1e-5)


def test_cycles_per_execution_below_one_is_refused(tmp_path):
    with pytest.raises(ConfigError, match="--cycles_per_execution must be > 0"):
        run.run_experiment(experiments.default_config("relu_toy", cycles_per_execution=0),
                           str(tmp_path / "never"))
