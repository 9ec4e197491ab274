"""The tuning study harness (benchmarks/study): sampler, commands, scheduling, records, report.

No training: runs are fake folders with hand-written results.json and fake processes.
"""

from __future__ import annotations

import json
import math
import os
import pathlib
import sys

import numpy as np
import pytest

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "benchmarks"))
from study import arms, plots, records, runner, summary  # noqa: E402

from stn_pipeline import experiments  # noqa: E402
from stn_pipeline.hparams import DISCRETE, POSITIVE, HParam  # noqa: E402

SPECS = [HParam("rate", 0.0, 0.9, 0.05), HParam("holes", 0.0, 4.0, 1.0, kind=DISCRETE),
         HParam("decay", 0.0, None, 1e-4, kind=POSITIVE)]


def _settings(tmp_path, **overrides) -> arms.StudySettings:
    values = dict(experiment="cifar_cnn", dataset="folder:/data", epochs=2,
                  rundir=str(tmp_path / "runs"), max_examples=2560)
    return arms.StudySettings(**{**values, **overrides})


def _finish(logdir: str, **results) -> None:
    """A fake finished run: a folder with a hand-written results.json."""
    os.makedirs(logdir, exist_ok=True)
    content = {"best_epoch": 2, "val_loss": 1.5, "val_accuracy": 0.4, "test_loss": 1.6,
               "test_accuracy": 0.38, "wall_time_s": 120.0, "final_hparams": {"rate": 0.3},
               "initial_hparams": {"rate": 0.05}, "config": {"epochs": 2, "seed": 0},
               "epoch_val_losses": [1.7, 1.5], "trajectory": [{"step": 50, "rate": 0.1}]}
    with open(os.path.join(logdir, "results.json"), "w") as handle:
        json.dump({**content, **results}, handle)


def test_parse_arms():
    assert arms.parse_arms("tuned, random:4,replay") == [("tuned", 1), ("random", 4),
                                                         ("replay", 1)]
    for bad in ("random", "random:0", "random:x", "tuned:2", "bogus", "tuned,tuned", ""):
        with pytest.raises(ValueError, match="--arms"):
            arms.parse_arms(bad)


def test_sampler_respects_ranges_kinds_and_log_scale():
    samples = [arms.sample_hparams(SPECS, seed=0, trial=t) for t in range(4000)]
    rate = np.array([s["rate"] for s in samples])
    holes = np.array([s["holes"] for s in samples])
    decay = np.array([s["decay"] for s in samples])
    assert rate.min() > 0.0 and rate.max() < 0.9
    assert abs(np.mean(rate < 0.45) - 0.5) < 0.03 and abs(np.mean(rate < 0.225) - 0.25) < 0.03
    assert set(holes.tolist()) == {0.0, 1.0, 2.0, 3.0}  # the integers floor((0, 4)) can take
    assert all(abs(np.mean(holes == k) - 0.25) < 0.03 for k in range(4))
    # Log-uniform over [1e-6, 1e-2] (2 decades either side of 1e-4): each decade holds a
    # quarter of the samples; a uniform over that range would put 99% above 1e-4.
    assert decay.min() >= 1e-6 and decay.max() <= 1e-2
    for bound, fraction in ((1e-5, 0.25), (1e-4, 0.5), (1e-3, 0.75)):
        assert abs(np.mean(decay < bound) - fraction) < 0.03, bound


def test_sampler_is_fixed_per_seed_and_trial():
    first = arms.sample_hparams(SPECS, seed=1, trial=2)
    arms.sample_hparams(SPECS, seed=1, trial=0)  # other draws do not move trial 2
    assert arms.sample_hparams(SPECS, seed=1, trial=2) == first
    assert arms.sample_hparams(SPECS, seed=1, trial=3) != first
    assert arms.sample_hparams(SPECS, seed=2, trial=2) != first
    u = np.random.default_rng([1, 2]).uniform(size=3)  # one uniform per hparam, in order
    assert first["rate"] == pytest.approx(0.9 * u[0])
    assert first["holes"] == math.floor(4.0 * u[1])
    assert first["decay"] == pytest.approx(10.0 ** (-6.0 + 4.0 * u[2]))


def test_sampler_on_alexnet_declarations():
    specs = experiments.hparam_specs(experiments.RunConfig(experiment="cifar_alexnet")).tuned
    sample = arms.sample_hparams(specs, seed=0, trial=0)
    assert list(sample) == [spec.name for spec in specs]
    for spec in specs:
        assert spec.minimum <= sample[spec.name] < spec.maximum
    assert sample["cutout_length"] == int(sample["cutout_length"])


def test_plan_puts_tuned_first_and_adds_it_for_dependents(tmp_path):
    settings = _settings(tmp_path)
    runs = arms.plan_runs(settings, [("frozen", 1), ("random", 2), ("final", 1)], [0, 1], SPECS)
    assert [(r.arm, r.seed, r.trial) for r in runs] == [
        ("tuned", 0, None), ("tuned", 1, None), ("frozen", 0, None), ("frozen", 1, None),
        ("random", 0, 0), ("random", 0, 1), ("random", 1, 0), ("random", 1, 1),
        ("final", 0, None), ("final", 1, None)]
    assert runs[-1].after == runs[1].logdir and runs[0].after is None
    assert len({r.logdir for r in runs}) == len(runs)
    # Trials do not depend on how many are planned.
    more = arms.plan_runs(settings, [("random", 3)], [0], SPECS)
    assert more[1].sampled == runs[5].sampled


def _flags(line):
    return dict(entry[2:].split("=", 1) for entry in line if entry.startswith("--"))


def test_command_of_each_arm(tmp_path):
    settings = _settings(tmp_path, extra_flags=("--batch_size=64",))
    plan = {(r.arm, r.trial): r for r in arms.plan_runs(
        settings, [("tuned", 1), ("delta_stn", 1), ("frozen", 1), ("plain", 1), ("random", 1),
                   ("replay", 1), ("final", 1)], [3], SPECS)}
    tuned = plan["tuned", None]
    _finish(tuned.logdir, final_hparams={"rate": 0.25, "holes": 2.7, "decay": 3e-4})
    lines = {key: _flags(arms.command(run, settings, SPECS)) for key, run in plan.items()}
    for key, flag in lines.items():
        assert flag["seed"] == "3" and flag["threads"] == "1" and flag["epochs"] == "2"
        assert flag["max_examples"] == "2560" and flag["batch_size"] == "64"
        assert flag["logdir"] == plan[key].logdir and "precision" not in flag
    assert set(lines["tuned", None]) == {"experiment", "dataset", "epochs", "seed", "threads",
                                         "logdir", "max_examples", "batch_size"}
    assert lines["delta_stn", None]["method"] == "delta_stn"
    assert lines["frozen", None]["tune"] == "false" and "network" not in lines["frozen", None]
    assert lines["plain", None]["network"] == "plain" and "hparams" not in lines["plain", None]
    assert lines["replay", None]["network"] == "plain"
    assert lines["replay", None]["replay"] == tuned.logdir
    assert lines["final", None]["hparams"] == "rate=0.25,holes=2.5,decay=0.0003"
    sampled = plan["random", 0].sampled
    assert lines["random", 0]["network"] == "plain"
    assert lines["random", 0]["hparams"] == (f"rate={sampled['rate']!r},"
                                             f"holes={sampled['holes'] + 0.5},"
                                             f"decay={sampled['decay']!r}")
    bf16 = _settings(tmp_path, precision="mixed_bfloat16")
    assert _flags(arms.command(tuned, bf16, SPECS))["precision"] == "mixed_bfloat16"


class _FakeProcess:
    """Finishes after `polls` polls, writing results.json unless it fails."""

    def __init__(self, run, polls, code, started):
        self.run, self.polls, self.code = run, polls, code
        started.append(run.name)

    def poll(self):
        self.polls -= 1
        if self.polls > 0:
            return None
        if self.code == 0:
            _finish(self.run.logdir)
        else:
            with open(self.run.logdir + ".log", "a") as log:
                log.write("Traceback ...\nRuntimeError: boom\n")
        return self.code


def test_scheduler_resumes_reuses_and_waits_for_tuned(tmp_path):
    settings = _settings(tmp_path)
    runs = arms.plan_runs(settings, [("tuned", 1), ("frozen", 1), ("replay", 1), ("final", 1)],
                          [0, 1], SPECS)
    logdir = {(r.arm, r.seed): r.logdir for r in runs}
    _finish(logdir["frozen", 0])  # finished: reused
    os.makedirs(logdir["frozen", 1])  # interrupted: rerun (resumes)
    started, finished, lines = [], [], []

    def start(run):
        if run.after is not None:
            assert arms.read_results(run.after) is not None, run.name
        polls = 3 if run.arm == "tuned" else 1
        return _FakeProcess(run, polls, 1 if run.logdir == logdir["tuned", 1] else 0, started)

    # Three slots: one frees up (frozen) while the tuned runs still run; replay must wait.
    failed = runner.run_all(runs, start, parallel=3, sleep=lambda s: None,
                            on_finished=lambda run: finished.append(run.name),
                            report=lines.append)
    name = lambda arm, seed: os.path.basename(logdir[arm, seed])  # noqa: E731
    assert started[:2] == [name("tuned", 0), name("tuned", 1)]
    assert name("frozen", 0) not in started
    assert f"{name('frozen', 1)}: resumed" in lines
    assert sorted(started) == sorted([name("tuned", 0), name("tuned", 1), name("frozen", 1),
                                      name("replay", 0), name("final", 0)])
    assert failed[logdir["tuned", 1]] == "exit 1: RuntimeError: boom"
    assert "tuned run" in failed[logdir["replay", 1]] and logdir["final", 1] in failed
    assert len(failed) == 3 and name("final", 0) in finished


def test_failure_line_names_a_rejected_flag(tmp_path):
    log = tmp_path / "run.log"
    log.write_text("I0000 cudart_stub.cc:31] no GPU\nFATAL Flags parsing error: Unknown command "
                   "line flag 'network'\nPass --helpshort or --helpfull to see help on flags.\n")
    line = runner.failure_line(str(log))
    assert "rejects a flag" in line and "Unknown command line flag 'network'" in line
    assert "\n" not in line
    log.write_text("step 10\nValueError: bad\n\n")
    assert runner.failure_line(str(log)) == "ValueError: bad"


def test_mismatched_finished_run_is_not_reused(tmp_path):
    settings = _settings(tmp_path)
    run = arms.plan_runs(settings, [("tuned", 1)], [0], SPECS)[0]
    assert runner.mismatch(run, settings, {"config": {"epochs": 2, "seed": 0}}) is None
    problem = runner.mismatch(run, settings, {"config": {"epochs": 20, "seed": 0}})
    assert "--epochs=20 (study: 2)" in problem and "--rundir" in problem


def test_records_content_merge_and_atomic_write(tmp_path):
    settings = _settings(tmp_path)
    runs = arms.plan_runs(settings, [("tuned", 1), ("plain", 1), ("random", 1)], [0], SPECS)
    history = [{"epoch": 1, "phase": "warmup", "val_loss": 1.9, "val_accuracy": 0.3,
                "learning_rate": 0.01}, {"epoch": 2, "phase": "tuning", "val_loss": 1.4,
                                         "val_accuracy": 0.4, "learning_rate": 0.01}]
    _finish(runs[0].logdir, history=history, num_parameters=250000)
    _finish(runs[2].logdir, wall_time_s=90.0)  # plain (runs[1]) never finished
    entries = records.collect(runs, settings, SPECS)
    tuned, trial = entries
    assert (tuned["arm"], tuned["seed"], tuned["trial"], trial["arm"], trial["trial"]) == (
        "tuned", 0, None, "random", 0)
    assert tuned["hparams"] == {"rate": 0.3} and tuned["num_parameters"] == 250000
    assert tuned["val_losses"] == [1.9, 1.4]
    assert tuned["trajectory"] == [{"step": 0, "rate": 0.05}, {"step": 50, "rate": 0.1}]
    assert trial["hparams"] == runs[2].sampled and trial["minutes"] == 1.5
    assert trial["val_losses"] == [1.7, 1.5] and "trajectory" not in trial
    for key in ("experiment", "epochs", "max_examples", "precision", "best_epoch", "val_loss",
                "test_loss", "test_accuracy"):
        assert key in trial
    path = str(tmp_path / "out" / "records.json")
    old = [dict(tuned, test_loss=9.0), dict(tuned, seed=7)]
    records.write(path, {"command": "x"}, records.merge(old, entries))
    loaded = records.load(path)
    assert loaded["study"] == {"command": "x"}
    assert [(e["seed"], e["test_loss"]) for e in loaded["runs"]] == [(7, 1.6), (0, 1.6), (0, 1.6)]
    assert os.listdir(tmp_path / "out") == ["records.json"]  # no temporary left behind


def _entry(arm, seed, test_loss, accuracy, val_loss=1.0, trial=None, minutes=10.0):
    return {"experiment": "cifar_cnn", "arm": arm, "seed": seed, "trial": trial, "epochs": 2,
            "max_examples": 0, "precision": "float32", "best_epoch": 2, "val_loss": val_loss,
            "test_loss": test_loss, "test_accuracy": accuracy, "minutes": minutes,
            "num_parameters": 1000, "hparams": {}}


REPORT_RUNS = [
    _entry("tuned", 0, 0.80, 0.70, minutes=10.0), _entry("tuned", 1, 0.90, 0.60, minutes=12.0),
    _entry("frozen", 0, 0.90, 0.65), _entry("frozen", 1, 0.95, 0.58),
    _entry("random", 0, 0.85, 0.60, val_loss=0.9, trial=0, minutes=5.0),
    _entry("random", 0, 0.88, 0.61, val_loss=0.8, trial=1, minutes=6.0),
    _entry("random", 1, 0.99, 0.50, val_loss=0.7, trial=0, minutes=7.0),
    _entry("random", 1, 0.70, 0.75, val_loss=0.75, trial=1, minutes=8.0),
]


def test_report_gains_by_hand():
    gains = summary.gains(REPORT_RUNS)
    # frozen: 0.90 - 0.80, 0.95 - 0.90; accuracy 0.70 - 0.65, 0.60 - 0.58.
    assert gains["frozen"][0] == pytest.approx((0.10, 0.05))
    assert gains["frozen"][1] == pytest.approx((0.05, 0.02))
    # Random search's answer: the lowest validation loss (trial 1 of seed 0, trial 0 of seed 1).
    assert gains[summary.BEST_RANDOM][0] == pytest.approx((0.08, 0.09))
    assert gains[summary.BEST_RANDOM][1] == pytest.approx((0.09, 0.10))
    section = summary.tuning_section({"commands": ["python benchmarks/tuning.py --seeds=0,1"],
                                      "machine": "test machine", "parallel": 2}, REPORT_RUNS,
                                     {"val loss": "benchmarks/results/x_val_loss.png"})
    frozen_row = next(l for l in section.splitlines() if l.startswith("| frozen | 2 | 0: "))
    # mean gain 0.075; relative (0.10 / 0.90 + 0.05 / 0.95) / 2 = 8.2%; accuracy 0.035.
    assert "| +0.0750 | +8.2% | +0.0350 | 2 of 2 seeds |" in frozen_row
    random_row = next(l for l in section.splitlines() if l.startswith(f"| {summary.BEST_RANDOM} | 2 | 0: "))
    assert "0: +0.0800, 1: +0.0900 | +0.0850 |" in random_row
    tuned_row = next(l for l in section.splitlines() if l.startswith("| tuned | 2 |"))
    assert "| 0.8500 [0.8000-0.9000] | 0.6500 [0.6000-0.7000] | 11.0 [10.0-12.0] |" in tuned_row
    # Random search: 5 + 6 and 7 + 8 minutes per seed, mean 13, against 11 per tuned run.
    assert "took 13.0 min per seed in total, 1.18x the tuned run" in section
    assert "![val loss](benchmarks/results/x_val_loss.png)" in section
    assert "`python benchmarks/tuning.py --seeds=0,1` (test machine)" in section


def test_report_names_the_machines_of_the_runs():
    one = [dict(entry, machine="cpu A") for entry in REPORT_RUNS]
    assert "All runs on: cpu A." in summary.tuning_section({}, one, {})
    two = one[:2] + [dict(entry, machine="cpu B") for entry in one[2:4]]
    section = summary.tuning_section({}, two, {})
    assert "Runs on more than one machine (their minutes do not compare):" in section
    assert "- cpu A: tuned s0, tuned s1" in section and "- cpu B: frozen s0, frozen s1" in section
    trial = dict(REPORT_RUNS[4], machine="cpu A")
    assert "- cpu A: tuned s0, tuned s1, random t0 s0" in summary.tuning_section(
        {}, two + [trial], {})


def test_report_refuses_mixed_experiments():
    with pytest.raises(ValueError, match="2 experiments"):
        summary.tuning_section({}, REPORT_RUNS + [dict(REPORT_RUNS[0], experiment="relu_toy")],
                               {})


def test_plots_name_the_missing_extra(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    monkeypatch.setitem(sys.modules, "matplotlib.pyplot", None)
    with pytest.raises(plots.MissingMatplotlib, match=r"pip install -e '\.\[benchmarks\]'"):
        plots.plot_val_losses(REPORT_RUNS, str(tmp_path / "v.png"))
    assert not (tmp_path / "v.png").exists()


def test_plots_write_png_files(tmp_path):
    runs = [dict(REPORT_RUNS[0], val_losses=[1.2, 1.0], trajectory=[
        {"step": 0, "rate": 0.05, "holes": 1.0}, {"step": 50, "rate": 0.1, "holes": 2.0}]),
        dict(REPORT_RUNS[4], val_losses=[1.3, 1.1])]
    try:
        plots.pyplot()
    except plots.MissingMatplotlib:  # this environment lacks the extra: the error is the contract
        with pytest.raises(plots.MissingMatplotlib):
            plots.plot_trajectories(runs[0], str(tmp_path / "t.png"))
        return
    plots.plot_trajectories(runs[0], str(tmp_path / "t.png"))
    plots.plot_val_losses(runs, str(tmp_path / "v.png"))
    for name in ("t.png", "v.png"):
        assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


class _EndlessProcess:
    def __init__(self):
        self.terminated = False

    def poll(self):
        return -15 if self.terminated else None

    def terminate(self):
        self.terminated = True

    def wait(self):
        return -15


def test_interrupted_study_stops_its_runs(tmp_path):
    runs = arms.plan_runs(_settings(tmp_path), [("tuned", 1)], [0, 1], SPECS)
    processes, lines = [], []

    def interrupt(seconds):
        raise KeyboardInterrupt

    def start(run):
        processes.append(_EndlessProcess())
        return processes[-1]

    with pytest.raises(KeyboardInterrupt):
        runner.run_all(runs, start, parallel=2, sleep=interrupt, report=lines.append)
    assert len(processes) == 2 and all(p.terminated for p in processes)
    assert sum("stopped (rerun the study to resume it)" in line for line in lines) == 2


def test_minutes_add_up_over_resumed_sessions(tmp_path):
    settings = _settings(tmp_path)
    runs = arms.plan_runs(settings, [("tuned", 1)], [0], SPECS)
    now = [0.0]

    def interrupt_after_a_minute(seconds):
        now[0] += 60.0
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        runner.run_all(runs, lambda run: _EndlessProcess(), parallel=1,
                       sleep=interrupt_after_a_minute, report=lambda line: None,
                       clock=lambda: now[0])

    def ninety_seconds(seconds):
        now[0] += 90.0

    runner.run_all(runs, lambda run: _FakeProcess(run, 1, 0, []), parallel=1,
                   sleep=ninety_seconds, report=lambda line: None, clock=lambda: now[0])
    # results.json says 120 s (its last session); the run cost 60 + 90 s over two sessions.
    assert runner.elapsed_minutes(runs[0].logdir) == pytest.approx(2.5)
    assert records.collect(runs, settings, SPECS)[0]["minutes"] == pytest.approx(2.5)


def test_records_restore_finished_runs_into_an_empty_rundir(tmp_path):
    # A study recorded on one machine, resumed on another whose rundir is empty.
    settings = _settings(tmp_path)
    runs = arms.plan_runs(settings, [("tuned", 1), ("frozen", 1), ("replay", 1)], [0], SPECS)
    tuned, frozen, replay = runs
    _finish(tuned.logdir, config={"epochs": 2, "seed": 0})
    _finish(frozen.logdir, config={"epochs": 20, "seed": 0})  # another study's settings
    runner.set_elapsed_minutes(tuned.logdir, 7.5)
    entries = records.collect(runs, settings, SPECS)
    moved = _settings(tmp_path / "elsewhere")
    runs = arms.plan_runs(moved, [("tuned", 1), ("frozen", 1), ("replay", 1)], [0], SPECS)
    assert records.restore(runs, moved, entries) == [runs[0]]
    assert arms.read_results(runs[0].logdir) == arms.read_results(tuned.logdir)
    assert arms.read_results(runs[1].logdir) is None  # mismatched settings: trains again
    started = []
    runner.run_all(runs, lambda run: _FakeProcess(run, 1, 0, started), parallel=2,
                   sleep=lambda s: None, report=lambda line: None)
    assert sorted(started) == sorted([runs[1].name, runs[2].name])  # the tuned run is reused
    restored = records.collect(runs, moved, SPECS)[0]
    assert restored["minutes"] == pytest.approx(7.5) and restored["trajectory"] == entries[0][
        "trajectory"]
    assert records.restore(runs, moved, entries) == []  # present now: nothing to restore
