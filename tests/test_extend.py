"""Extending a finished run and resuming with changed flags (issue 16).

The relu_toy runs (1024 training points: 8 weight steps an epoch) start together in a
module-scoped fixture, as test_cli does: `ten` (--epochs=10, then extended to 20 by a test),
`twenty` (the same seed and settings, --epochs=20 uninterrupted) and `early` (--patience=1,
which stops early). `--nonmono=1` makes the learning rate decay inside epochs 11-20 with this
seed, so the extension must carry on the decay record to match the uninterrupted run.
"""

import glob
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf

from stn_pipeline import experiments, resume
from stn_pipeline.config import ConfigError
from stn_pipeline.schedule import Schedule, ScheduleConfig
from stn_pipeline_scripts import train as train_script

TOY = ["--experiment=relu_toy", "--toy_train_size=1024", "--deterministic", "--threads=1",
       "--log_every=8"]
ENV = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
TIMEOUT_S = 600


def _start(logdir, outdir, *flags):
    """Starts stn-train; output goes to files (a full pipe would block a chatty run)."""
    with open(f"{outdir}.stderr", "w") as stderr:
        return subprocess.Popen([sys.executable, "-m", "stn_pipeline_scripts.train", *TOY,
                                 f"--logdir={logdir}", *flags], env=ENV,
                                stdout=subprocess.DEVNULL, stderr=stderr)


def _finish(process, outdir):
    returncode = process.wait(timeout=TIMEOUT_S)
    with open(f"{outdir}.stderr") as handle:
        return returncode, handle.read()


def _results(logdir):
    with open(os.path.join(logdir, "results.json")) as handle:
        return json.load(handle)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("extend")
    flags = {"ten": ["--nonmono=1", "--epochs=10"], "twenty": ["--nonmono=1", "--epochs=20"],
             "early": ["--patience=1", "--epochs=20"]}
    processes = {name: _start(root / name, root / f"{name}_first", *args)
                 for name, args in flags.items()}
    for name, process in processes.items():
        returncode, stderr = _finish(process, root / f"{name}_first")
        assert returncode == 0, stderr[-3000:]
    return {name: str(root / name) for name in flags} | {"root": str(root)}


def _run_main(*args):
    """stn-train's main in this process; returns its one-line exit message."""
    argv = train_script.FLAGS(["stn-train", *args])
    try:
        with pytest.raises(SystemExit) as exited:
            train_script.main(argv)
    finally:
        train_script.FLAGS.unparse_flags()
    return str(exited.value.code)


def _event_steps(logdir):
    """Every (tag, step) written to the run's event files, as read from the raw records."""
    pairs = []
    for path in sorted(glob.glob(os.path.join(logdir, "events.out.tfevents.*"))):
        for event in tf.compat.v1.train.summary_iterator(path):
            pairs.extend((value.tag, event.step) for value in event.summary.value)
    return pairs


def _expected_rates(history, nonmono, factor=0.1):
    """The learning rate of every tuning epoch by the non-monotone rule, from the losses alone."""
    tuning = [entry for entry in history if entry["phase"] == "tune"]
    rates, rate = [], tuning[0]["learning_rate"]
    for index, entry in enumerate(tuning):
        rates.append(rate)
        earlier = [e["val_loss"] for e in tuning[:index]]
        if len(earlier) > nonmono and entry["val_loss"] > min(earlier[:-nonmono]):
            rate = np.float32(rate * factor)  # the optimizer holds the rate as float32
    return rates


def test_extension_continues_the_uninterrupted_run(runs):
    ten, twenty = runs["ten"], runs["twenty"]
    before = _results(ten)
    assert before["epochs_run"] == 10 and not before["stopped_early"]
    # The same command with a larger budget, and two settings that may change on resume.
    returncode, stderr = _finish(_start(ten, os.path.join(runs["root"], "extension"),
                                        "--nonmono=1", "--epochs=20", "--checkpoint_every=16",
                                        "--keep_checkpoints=5"),
                                 os.path.join(runs["root"], "extension"))
    assert returncode == 0, stderr[-3000:]
    changed = [line for line in stderr.splitlines() if "resuming with changed settings" in line]
    assert len(changed) == 1, changed
    for change in ("--epochs 10 -> 20", "--checkpoint_every 0 -> 16", "--keep_checkpoints 3 -> 5"):
        assert change in changed[0]
    extended, uninterrupted = _results(ten), _results(twenty)
    assert extended["epochs_run"] == 20 and extended["weight_steps"] == 160
    assert [e["epoch"] for e in extended["history"]] == list(range(1, 21))
    assert extended["history"][:10] == before["history"]  # epochs 1-10 are the original's
    assert extended["trajectory"][:len(before["trajectory"])] == before["trajectory"]
    # Epochs 11-20 follow the uninterrupted run (within float rounding; bitwise in practice).
    for mine, theirs in zip(extended["history"], uninterrupted["history"], strict=True):
        assert mine.keys() == theirs.keys() and mine["phase"] == theirs["phase"]
        np.testing.assert_allclose([mine[k] for k in sorted(mine) if k != "phase"],
                                   [theirs[k] for k in sorted(theirs) if k != "phase"],
                                   rtol=1e-6)
    np.testing.assert_allclose([list(p.values()) for p in extended["trajectory"]],
                               [list(p.values()) for p in uninterrupted["trajectory"]], rtol=1e-6)
    r, r_uninterrupted = (run["final_hparams"]["input_range"] for run in (extended, uninterrupted))
    assert abs(r - r_uninterrupted) < 1e-4
    assert extended["best_epoch"] == uninterrupted["best_epoch"]
    # The decay record carries on: the rate decays inside the extension, by the rule.
    rates = [e["learning_rate"] for e in extended["history"] if e["phase"] == "tune"]
    assert len(set(rates[-10:])) > 1, "the settings no longer decay inside the extension"
    np.testing.assert_allclose(rates, _expected_rates(extended["history"], nonmono=1), rtol=1e-6)
    # A new export version; TensorBoard sees every step of every tag once.
    assert extended["export_path"].endswith(os.path.join("export", "2"))
    pairs = _event_steps(ten)
    assert len(pairs) == len(set(pairs)), sorted(p for p in set(pairs) if pairs.count(p) > 1)
    steps = sorted(step for tag, step in pairs if tag == "hparam/input_range")
    assert steps == list(range(8, 161, 8))


@pytest.mark.parametrize("flag, stored", [("--seed=1", "--seed: 0 -> 1"),
                                          ("--weight_lr=0.01", "--weight_lr: 0.003 -> 0.01")])
def test_a_setting_that_changes_the_run_is_refused_in_one_line(runs, flag, stored):
    logdir = runs["twenty"]
    with open(os.path.join(logdir, "results.json")) as handle:
        results_text = handle.read()
    message = _run_main(f"--logdir={logdir}", "--epochs=30", flag)
    assert message.startswith("stn-train: error:") and "\n" not in message
    assert stored in message and "--overwrite" in message
    assert f"--init_from={logdir}/checkpoints/ckpt-160" in message
    with open(os.path.join(logdir, "results.json")) as handle:
        assert handle.read() == results_text
    assert not glob.glob(logdir + ".old-*")


def test_a_finished_run_with_the_same_budget_says_how_to_extend(runs):
    message = _run_main(f"--logdir={runs['twenty']}")  # no flags: the stored settings
    assert message.startswith("stn-train: error:") and "\n" not in message
    assert "holds a finished run (reached --epochs=20: 20 epochs, 160 weight steps)" in message
    assert "larger --epochs (now 20)" in message


def test_an_early_stopped_run_extends_only_with_extend(runs):
    logdir = runs["early"]
    before = _results(logdir)
    assert before["stopped_early"] and before["epochs_run"] < 20
    message = _run_main(f"--logdir={logdir}", "--epochs=30")
    assert "stopped early after" in message and "--extend" in message and "\n" not in message
    assert _results(logdir) == before
    outdir = os.path.join(runs["root"], "early_extension")
    returncode, stderr = _finish(_start(logdir, outdir, "--extend"), outdir)
    assert returncode == 0, stderr[-3000:]
    extended = _results(logdir)
    assert extended["history"][:before["epochs_run"]] == before["history"]
    # Patience (1) counts again from the lift: the run stops at the first tuning epoch after it
    # that does not improve on the best loss so far.
    losses = [e["val_loss"] for e in extended["history"]]
    after = range(before["epochs_run"], len(losses))
    assert len(after) >= 1 and extended["stopped_early"]
    assert all(losses[i] < min(losses[:i]) for i in after[:-1])
    assert losses[after[-1]] >= min(losses[:after[-1]])


def _stored(tmp_path, **settings):
    config = experiments.default_config("relu_toy", **settings)
    return resume.StoredRun(logdir=str(tmp_path), config=config, results=None, latest=None)


def test_flags_left_out_keep_their_stored_values(tmp_path):
    stored = _stored(tmp_path, toy_width=8, seed=3, epochs=10)
    requested = experiments.default_config("relu_toy", epochs=20)  # seed, width: defaults
    config = resume.resumed_config(stored, requested, given=["epochs"])
    assert (config.toy.width, config.seed, config.schedule.epochs) == (8, 3, 20)
    with pytest.raises(ConfigError, match=r"--seed: 3 -> 0; --toy_width: 8 -> 32"):
        resume.resumed_config(stored, requested)  # a config built in Python: all of it given


def test_schedule_settings_do_not_change_on_resume(tmp_path):
    stored = _stored(tmp_path, patience=5)
    for flag, value in (("patience", 6), ("nonmono", 2), ("hyper_lr", 0.1)):
        requested = experiments.default_config("relu_toy", **{"patience": 5, flag: value})
        with pytest.raises(ConfigError, match=f"--{flag}"):
            resume.resumed_config(stored, requested, given=[flag])


def test_flags_file_keeps_the_stored_lines_not_given_again():
    stored = "--experiment=relu_toy\n--epochs=10\n--toy_width=8\n--notune\n--threads=1\n"
    given = "--epochs=20\n--tune\n--threads=2\n"
    assert resume.merge_flag_lines(stored, given) == (
        "--experiment=relu_toy\n--toy_width=8\n--epochs=20\n--tune\n--threads=2\n")


def _feed(schedule, losses, rate):
    for loss in losses:
        _, rate = schedule.end_epoch(loss, rate)
    return rate


def test_lifted_patience_counts_from_the_lift():
    # patience 2: best at loss 1.0 (first epoch), then 2 epochs without improvement: stop.
    schedule = Schedule(ScheduleConfig(patience=2, nonmono=0))
    _feed(schedule, [1.0, 1.5, 1.2], 0.1)
    assert "no improvement for 2" in schedule.stop_reason
    schedule.lift()
    _feed(schedule, [1.1], 0.1)  # one epoch without improvement after the lift: goes on
    assert schedule.stop_reason == ""
    _feed(schedule, [1.3], 0.1)  # the second: stops again
    assert "no improvement for 2" in schedule.stop_reason
    carried = Schedule(schedule.config, **schedule.state())  # what a checkpoint carries
    assert carried == schedule


def test_lifted_rate_floor_stops_at_the_next_decay():
    # nonmono 1, floor 1e-3, factor 0.1; rate 1e-3 decays to 1e-4 at the third loss (3 > 1).
    schedule = Schedule(ScheduleConfig(nonmono=1, patience=0, min_lr=1e-3))
    rate = _feed(schedule, [1.0, 0.5, 3.0], 1e-3)
    assert rate == pytest.approx(1e-4) and "learning rate" in schedule.stop_reason
    schedule.lift()
    rate = _feed(schedule, [0.4], rate)  # below the floor, no decay: trains on
    assert schedule.stop_reason == ""
    _feed(schedule, [2.0], rate)  # 2.0 > min(1.0, 0.5, 3.0): decays again: stops
    assert "learning rate" in schedule.stop_reason


def test_an_attempt_that_never_trained_does_not_block_other_settings(tmp_path):
    """The README's offline path: the TFDS attempt fails on its data and leaves config.json;
    rerunning with a local folder (other settings) must start, not be refused as a resume."""
    logdir = tmp_path / "run"
    logdir.mkdir()
    failed = experiments.default_config("relu_toy", seed=3)
    (logdir / "config.json").write_text(json.dumps(failed.to_dict()))
    assert resume.read_stored_run(str(logdir)) is None
    (logdir / "checkpoints").mkdir()  # a run that trained is still protected
    tf.train.Checkpoint(v=tf.Variable(1.0)).save(str(logdir / "checkpoints" / "ckpt"))
    assert resume.read_stored_run(str(logdir)).config == failed
