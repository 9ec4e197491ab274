"""Tests for the stn-train command line and the run-level checks behind it (stn_pipeline.run).

Each stn-train subprocess pays ~4 s of TensorFlow import, so the module runs only seven, starts them
all at once (in a module-scoped fixture) and each test waits for its own. The many other
misconfigurations are checked in-process through `run.validate_config` / `run.run_experiment`.
"""

import dataclasses
import glob
import json
import os
import shutil
import subprocess
import sys

import pytest

from stn_pipeline import experiments, run
from stn_pipeline.config import FLAGS, HELP, RunConfig, load_config

STN_TRAIN = os.path.join(os.path.dirname(sys.executable), "stn-train")
if not os.path.exists(STN_TRAIN):
    STN_TRAIN = shutil.which("stn-train")
ENV = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}
TIMEOUT_S = 300
OLD_MARKER = {"marker": "the previous run"}


def _fake_finished_run(logdir):
    os.makedirs(logdir)
    with open(os.path.join(logdir, run.RESULTS_FILE), "w") as handle:
        json.dump(OLD_MARKER, handle)


class _Cli:
    """Starts stn-train subprocesses concurrently and collects their results on demand.

    Output goes to files, not pipes, so a chatty run never blocks on a full pipe buffer.
    """

    def __init__(self, outdir):
        self.outdir = outdir
        self.paths = {}
        self._processes = {}
        self._results = {}

    def start(self, name, args):
        with open(os.path.join(self.outdir, f"{name}.stdout"), "w") as stdout, \
                open(os.path.join(self.outdir, f"{name}.stderr"), "w") as stderr:
            self._processes[name] = subprocess.Popen([STN_TRAIN, *args], stdout=stdout,
                                                     stderr=stderr, env=ENV)

    def result(self, name):
        """(return code, stdout, stderr) of run `name`, waiting for it to finish."""
        if name not in self._results:
            returncode = self._processes[name].wait(timeout=TIMEOUT_S)
            outputs = []
            for stream in ("stdout", "stderr"):
                with open(os.path.join(self.outdir, f"{name}.{stream}")) as handle:
                    outputs.append(handle.read())
            self._results[name] = (returncode, *outputs)
        return self._results[name]

    def stop_all(self):
        for process in self._processes.values():
            if process.poll() is None:
                process.kill()
                process.wait()


@pytest.fixture(scope="module")
def cli(tmp_path_factory):
    """The seven stn-train runs of this module, started together."""
    root = tmp_path_factory.mktemp("cli")
    runner = _Cli(str(tmp_path_factory.mktemp("cli_output")))
    paths = runner.paths
    paths.update({name: str(root / name) for name in (
        "ok", "flagfile", "refuse", "unknown", "negative", "missing")})
    (root / "afile").write_text("a regular file\n")
    paths["unwritable"] = str(root / "afile" / "logdir")
    # A plain successful run.
    runner.start("ok", ["--experiment=relu_toy", "--epochs=3", "--log_every=10",
                        f"--logdir={paths['ok']}"])
    # Flags from a file, rerun with --overwrite into a logdir that holds a finished run.
    _fake_finished_run(paths["flagfile"])
    flagfile = root / "flags.cfg"
    flagfile.write_text(f"--experiment=relu_toy\n--epochs=2\n--warmup_epochs=1\n--toy_width=8\n"
                        f"--toy_train_size=512\n--logdir={paths['flagfile']}\n")
    runner.start("flagfile", [f"--flagfile={flagfile}", "--overwrite"])
    # Failing runs.
    _fake_finished_run(paths["refuse"])
    runner.start("refuse", [f"--logdir={paths['refuse']}"])
    runner.start("unknown", ["--experiment=no_such_experiment", f"--logdir={paths['unknown']}"])
    runner.start("negative", ["--batch_size=-4", f"--logdir={paths['negative']}"])
    runner.start("unwritable", [f"--logdir={paths['unwritable']}"])
    runner.start("missing", ["--experiment=relu_toy"])
    yield runner
    runner.stop_all()


def _load(logdir, name):
    with open(os.path.join(logdir, name)) as handle:
        return json.load(handle)


# --------------------------------------------------------------------------- successful runs


def test_run_writes_results_config_and_flags(cli):
    returncode, stdout, stderr = cli.result("ok")
    assert returncode == 0, stderr[-3000:]
    logdir = cli.paths["ok"]
    for name in ("results.json", "config.json", "flags.txt"):
        assert os.path.isfile(os.path.join(logdir, name)), name
    assert glob.glob(os.path.join(logdir, "events.out.tfevents.*"))
    config = load_config(os.path.join(logdir, "config.json"))
    # Flags given are set; flags left unset take the experiment's registered defaults.
    assert config == experiments.default_config("relu_toy", epochs=3, log_every=10)
    assert config.schedule.epochs == 3 and config.loop.log_every == 10
    results = _load(logdir, "results.json")
    assert results["epochs_run"] == 3
    assert results["config"] == _load(logdir, "config.json")
    assert results["final_hparams"]["input_range"] > 0
    assert "val_loss" in results and "test_loss" in results
    flags_text = open(os.path.join(logdir, "flags.txt")).read()
    assert "--epochs=3" in flags_text.splitlines()
    assert f"--logdir={logdir}" in flags_text.splitlines()
    assert "done:" in stdout
    assert "Traceback" not in stderr


def test_flagfile_is_read(cli):
    returncode, _, stderr = cli.result("flagfile")
    assert returncode == 0, stderr[-3000:]
    config = load_config(os.path.join(cli.paths["flagfile"], "config.json"))
    assert config.schedule.epochs == 2
    assert config.toy.width == 8
    assert config.toy.train_size == 512 and config.schedule.warmup_epochs == 1
    assert _load(cli.paths["flagfile"], "results.json")["epochs_run"] == 2


def test_overwrite_moves_the_previous_run_aside(cli):
    returncode, _, stderr = cli.result("flagfile")  # that run used --overwrite
    assert returncode == 0, stderr[-3000:]
    logdir = cli.paths["flagfile"]
    aside = glob.glob(logdir + ".old-*")
    assert len(aside) == 1, aside
    assert _load(aside[0], "results.json") == OLD_MARKER  # the old run is kept, not deleted
    new_results = _load(logdir, "results.json")
    assert new_results != OLD_MARKER and new_results["epochs_run"] == 2


# ------------------------------------------------------------------------------ failing runs


@pytest.mark.parametrize("name, flag", [
    ("unknown", "--experiment"),
    ("negative", "--batch_size"),
    ("unwritable", "--logdir"),
    ("missing", "--logdir"),
    ("refuse", "--logdir"),
])
def test_bad_settings_exit_non_zero_with_one_line_naming_the_flag(cli, name, flag):
    returncode, _, stderr = cli.result(name)
    assert returncode != 0
    assert "Traceback" not in stderr, stderr[-3000:]
    last_line = stderr.strip().splitlines()[-1]
    assert last_line.startswith("stn-train: error:"), last_line
    assert flag in last_line, last_line


def test_refused_rerun_leaves_the_previous_run_alone(cli):
    returncode, _, _ = cli.result("refuse")
    assert returncode != 0
    logdir = cli.paths["refuse"]
    assert "--overwrite" in cli.result("refuse")[2].strip().splitlines()[-1]
    assert _load(logdir, "results.json") == OLD_MARKER
    assert os.listdir(logdir) == ["results.json"]
    assert not glob.glob(logdir + ".old-*")


def test_invalid_settings_touch_no_logdir(cli):
    for name in ("negative", "unknown"):
        assert cli.result(name)[0] != 0
        assert not os.path.exists(cli.paths[name]), name


# --------------------------------------------------------------------- in-process validation


def _config(**changes):
    return experiments.default_config("relu_toy", **changes)


def test_defaults_are_valid():
    run.validate_config(_config())


@pytest.mark.parametrize("field, value", [
    ("batch_size", 0), ("batch_size", -1), ("epochs", 0), ("train_steps", 0), ("log_every", 0),
    ("toy_depth", 0), ("toy_width", -3), ("toy_train_size", 0), ("weight_lr", 0.0),
    ("hyper_lr", -1e-3), ("scale_lr", 0.0), ("toy_r0", 0.0), ("max_steps", -1),
    ("warmup_epochs", -1), ("hyper_steps", -1), ("nonmono", -1), ("patience", -1),
    ("max_examples", -5), ("tau", -0.1), ("valid_fraction", 0.0), ("valid_fraction", 1.0),
    ("weight_optimizer", "rmsprop"),
])
def test_out_of_range_settings_are_refused_naming_the_flag(field, value):
    with pytest.raises(run.ConfigError, match=rf"^--{field}\b.*{value}"):
        _config(**{field: value})


@pytest.mark.parametrize("field, value", [
    ("weight_lr", 0.0), ("tau", -0.1), ("toy_width", -3), ("valid_fraction", 1.0),
    ("keep_checkpoints", 0), ("weight_optimizer", "rmsprop"),
])
def test_validate_config_names_the_flag_of_a_config_built_by_hand(field, value):
    # A configuration built without `override` (by hand, from config.json) is checked by the run.
    part, name = FLAGS[field]
    config = _config()
    if part is None:
        config = dataclasses.replace(config, **{name: value})
    else:
        config = dataclasses.replace(config, **{part: dataclasses.replace(
            getattr(config, part), **{name: value})})
    with pytest.raises(run.ConfigError, match=rf"^--{field}\b.*{value}"):
        run.validate_config(config)


def test_validate_config_rejects_unknown_experiment():
    with pytest.raises(run.ConfigError, match=r"--experiment='nope'"):
        run.validate_config(_config(experiment="nope"))


def test_config_errors_reach_the_command_line_as_one_line(tmp_path, monkeypatch):
    # stn-train turns the errors of building a run into one line and a non-zero exit.
    from stn_pipeline_scripts import train
    try:
        train.FLAGS(["stn-train", "--experiment=relu_toy", "--tau=-1",
                     f"--logdir={tmp_path / 'run'}"])
        with pytest.raises(SystemExit) as exited:
            train.main(["stn-train"])
    finally:
        train.FLAGS.unparse_flags()
    assert exited.value.code == "stn-train: error: --tau must be >= 0, received -1.0."
    assert not (tmp_path / "run").exists()


def test_config_round_trips_through_json():
    config = experiments.default_config("cifar_cnn", data_dir="/data", tune=False, nonmono=3,
                                        toy_r0=1.5, hparams="dropout0=0.2", on_nan="skip")
    written = json.loads(json.dumps(config.to_dict()))
    assert RunConfig.from_dict(written) == config
    assert written["trainer"]["tune"] is False and written["data"]["data_dir"] == "/data"
    assert RunConfig.from_dict(written).toy.r0 == 1.5
    with pytest.raises(run.ConfigError, match="no_such"):
        RunConfig.from_dict({**written, "trainer": {**written["trainer"], "no_such": 1}})


def test_flat_config_json_of_earlier_runs_is_read():
    flat = {"experiment": "relu_toy", "epochs": 4, "weight_lr": 0.5, "toy_width": 8,
            "nan_at_step": 0}
    config = RunConfig.from_dict(flat)
    assert (config.schedule.epochs, config.trainer.weight_lr, config.toy.width) == (4, 0.5, 8)


def test_every_setting_has_one_flag_name_and_help():
    config = experiments.default_config("relu_toy")
    flat = config.as_flags()
    assert set(flat) == set(FLAGS) == set(HELP)
    assert flat["weight_lr"] == config.trainer.weight_lr and flat["toy_depth"] == config.toy.depth
    assert config.override(**flat) == config
    with pytest.raises(TypeError):  # keyword-only, frozen
        RunConfig("relu_toy")  # noqa
    with pytest.raises(run.ConfigError, match="unknown settings.*nan_at_step"):
        config.override(nan_at_step=3)


def _tiny_config():
    """A relu_toy run of two weight steps."""
    return _config(epochs=1, warmup_epochs=0, toy_train_size=128, batch_size=64, toy_depth=1,
                   toy_width=4, log_every=1000)


def test_run_experiment_validates_before_touching_the_logdir(tmp_path):
    logdir = tmp_path / "never"
    with pytest.raises(run.ConfigError, match="--epochs"):
        run.run_experiment(_config(epochs=0), str(logdir))
    assert not logdir.exists()


def test_run_experiment_rejects_a_logdir_under_a_file(tmp_path):
    (tmp_path / "afile").write_text("x")
    logdir = tmp_path / "afile" / "logdir"
    with pytest.raises(run.ConfigError, match=rf"--logdir={logdir} is not writable"):
        run.run_experiment(_tiny_config(), str(logdir))


def test_run_experiment_refuses_a_finished_run(tmp_path):
    logdir = str(tmp_path / "run")
    _fake_finished_run(logdir)
    with pytest.raises(run.ConfigError, match=rf"--logdir={logdir} already holds.*--overwrite"):
        run.run_experiment(_tiny_config(), logdir)
    assert _load(logdir, run.RESULTS_FILE) == OLD_MARKER
    assert os.listdir(logdir) == [run.RESULTS_FILE]
    assert not glob.glob(logdir + ".old-*")


def test_overwrite_keeps_every_previous_run(tmp_path, monkeypatch):
    # Two --overwrite reruns within the same second (the resolution of the `.old-<timestamp>`
    # suffix) must both keep the run they replace ("moved aside, never deleted") and must not
    # crash with an OSError. Simulate the first move having happened this very second.
    stamp = "20250101-120000"
    monkeypatch.setattr(run.time, "strftime", lambda *args: stamp)
    logdir = str(tmp_path / "run")
    os.makedirs(f"{logdir}.old-{stamp}")
    with open(os.path.join(f"{logdir}.old-{stamp}", run.RESULTS_FILE), "w") as handle:
        json.dump({"run": 0}, handle)
    os.makedirs(logdir)
    with open(os.path.join(logdir, run.RESULTS_FILE), "w") as handle:
        json.dump({"run": 1}, handle)
    run.run_experiment(_tiny_config(), logdir, overwrite=True)
    kept = sorted(_load(path, run.RESULTS_FILE)["run"] for path in glob.glob(logdir + ".old-*"))
    assert kept == [0, 1]
