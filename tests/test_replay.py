"""Tests for stn_pipeline.replay: reading a finished run's trajectory and the HOLD rule."""

import json

import numpy as np
import pytest
import tensorflow as tf

from stn_pipeline.replay import HParamTrajectory, ReplayError

# A run that logged every 10 weight steps and trained 25: values written by hand.
RESULTS = {
    "config": {"experiment": "cifar_cnn", "log_every": 10},
    "metadata": {"image_shape": [32, 32, 3], "class_names": list("abcdefghij")},
    "initial_hparams": {"dropout0": 0.05, "cutout_holes": 1.0},
    "final_hparams": {"dropout0": 0.5, "cutout_holes": 3.0},  # best state: must not be used
    "trajectory": [
        {"step": 10, "dropout0": 0.0625, "cutout_holes": 1.0},
        {"step": 20, "dropout0": 0.1, "cutout_holes": 2.0},
        {"step": 25, "dropout0": 0.125, "cutout_holes": 3.0},
    ],
    "weight_steps": 25,
}


def _run(tmp_path, results=RESULTS, name="run"):
    folder = tmp_path / name
    folder.mkdir()
    if results is not None:
        (folder / "results.json").write_text(json.dumps(results))
    return str(folder)


def test_hold_rule_by_hand(tmp_path):
    trajectory = HParamTrajectory.from_run(_run(tmp_path))
    assert trajectory.names == ("dropout0", "cutout_holes")
    assert trajectory.weight_steps == 25
    expected = {0: [0.05, 1.0], 9: [0.05, 1.0], 10: [0.0625, 1.0], 15: [0.0625, 1.0],
                19: [0.0625, 1.0], 20: [0.1, 2.0], 24: [0.1, 2.0], 25: [0.125, 3.0],
                40: [0.125, 3.0]}
    for step, values in expected.items():
        np.testing.assert_array_equal(trajectory.values_at(step), np.float32(values), str(step))
    assert trajectory.as_dict(20) == {"dropout0": np.float32(0.1), "cutout_holes": 2.0}


def test_logged_float32_values_replay_exactly(tmp_path):
    # results.json holds float32 values converted to Python floats; they must come back bitwise.
    value = float(np.float32(0.1234567))
    results = dict(RESULTS, initial_hparams={"dropout0": 0.05},
                   trajectory=[{"step": 7, "dropout0": value}])
    trajectory = HParamTrajectory.from_run(_run(tmp_path, results))
    assert trajectory.values_at(7)[0] == np.float32(value)


def test_columns_follow_the_requested_order(tmp_path):
    trajectory = HParamTrajectory.from_run(_run(tmp_path), experiment="cifar_cnn",
                                           names=["cutout_holes", "dropout0"],
                                           metadata={"image_shape": [32, 32, 3],
                                                     "class_names": list("0123456789")})
    np.testing.assert_array_equal(trajectory.values_at(21), np.float32([2.0, 0.1]))


def test_in_graph_lookup_matches_values_at_and_compiles_once(tmp_path):
    trajectory = HParamTrajectory.from_run(_run(tmp_path))
    step_variable = tf.Variable(0, dtype=tf.int64)
    traces = []

    @tf.function(input_signature=[])
    def current():
        traces.append(1)
        return trajectory.lookup(step_variable)

    for step in [0, 9, 10, 11, 20, 25, 1000]:
        step_variable.assign(step)
        np.testing.assert_array_equal(current().numpy(), trajectory.values_at(step))
    assert len(traces) == 1


@pytest.mark.parametrize("case, match", [
    ("missing", r"--replay=.*missing: no such run folder\.$"),
    ("unfinished", r"is unfinished: no results\.json, checkpoints up to weight step 40;"),
    ("empty", r"holds no finished run: no results\.json and no checkpoints\.$"),
    ("broken", r"cannot read results\.json"),
])
def test_unreadable_runs_get_one_line_errors(tmp_path, case, match):
    if case == "missing":
        folder = str(tmp_path / "missing")
    else:
        folder = _run(tmp_path, None)
    if case == "unfinished":
        (tmp_path / "run" / "checkpoints").mkdir()
        for step in (20, 40):
            (tmp_path / "run" / "checkpoints" / f"ckpt-{step}.index").write_text("")
    if case == "broken":
        (tmp_path / "run" / "results.json").write_text("{not json")
    with pytest.raises(ReplayError, match=match) as error:
        HParamTrajectory.from_run(folder)
    assert "\n" not in str(error.value)


@pytest.mark.parametrize("kwargs, match", [
    (dict(experiment="cifar_alexnet"), r"is a run of experiment 'cifar_cnn', not "
                                       r"'cifar_alexnet'"),
    (dict(names=["dropout0"]), r"tuned \['cutout_holes', 'dropout0'\], but the replay has "
                               r"\['dropout0'\]"),
    (dict(metadata={"image_shape": [28, 28, 1]}), r"image shape \[32, 32, 3\], but the "
                                                  r"replay's data has \[28, 28, 1\]"),
    (dict(metadata={"image_shape": [32, 32, 3], "class_names": ["a", "b"]}),
     r"number of classes 10, but the replay's data has 2"),
])
def test_mismatched_runs_are_refused(tmp_path, kwargs, match):
    with pytest.raises(ReplayError, match=match):
        HParamTrajectory.from_run(_run(tmp_path), **kwargs)


def test_malformed_trajectories_are_refused(tmp_path):
    unordered = dict(RESULTS, trajectory=[RESULTS["trajectory"][1], RESULTS["trajectory"][0]])
    with pytest.raises(ReplayError, match="steps must be increasing"):
        HParamTrajectory.from_run(_run(tmp_path, unordered, "unordered"))
    gap = dict(RESULTS, trajectory=[{"step": 10, "dropout0": 0.1}])
    with pytest.raises(ReplayError, match=r"trajectory entry 0 lacks \['cutout_holes'\]"):
        HParamTrajectory.from_run(_run(tmp_path, gap, "gap"))
    with pytest.raises(ReplayError, match="no 'initial_hparams' and 'trajectory'"):
        HParamTrajectory.from_run(_run(tmp_path, {"config": {}}, "bare"))
