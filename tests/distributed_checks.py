"""Checks of STN semantics under `MirroredStrategy` over 2 logical CPU devices.

Run as a script by tests/test_distribute.py, in its own process: the CPU must be split into
logical devices before TensorFlow initialises, which pytest's shared process has done already.
Prints one JSON line of measurements; any failed check raises (non-zero exit).

  python tests/distributed_checks.py <image_folder>
"""

from __future__ import annotations

import json
import sys

import numpy as np
import tensorflow as tf

from stn_pipeline import distribute, experiments
from stn_pipeline.hparams import HParam, HyperParameters
from stn_pipeline.trainer import StnTrainer


def build(config, strategy):
    with distribute.scope(strategy):
        experiment = experiments.build_experiment(config)
        trainer = StnTrainer(experiment.model, experiment.hparams, experiment.input_spec,
                             experiment.target_spec, config.trainer, seed=config.seed,
                             strategy=strategy)
    return experiment, trainer


def assert_replicas_equal(strategy, variables):
    for variable in variables:
        copies = [v.numpy() for v in strategy.experimental_local_results(variable)]
        assert len(copies) == 2, variable.name
        for copy in copies[1:]:
            np.testing.assert_array_equal(copy, copies[0], err_msg=variable.name)


def train(trainer, experiment, steps):
    """`steps` weight steps, each followed by a hyper step; the replica checks after each."""
    data = experiment.data
    train_batches = iter(trainer.distribute(data.train))
    hyper_batches = iter(trainer.distribute(data.hyper))
    out = None
    for _ in range(steps):
        out = trainer.weight_step(*next(train_batches))
        if trainer.replicated:
            assert_replicas_equal(trainer.strategy, trainer.state_variables())
        trainer.hyper_step(*next(hyper_batches))
        if trainer.replicated:
            assert_replicas_equal(trainer.strategy, trainer.state_variables())
    return out


def semantics(strategy, config, steps):
    """Identical state on every replica after every step; distinct per-example samples."""
    experiment, trainer = build(config, strategy)
    out = train(trainer, experiment, steps)
    values = out["hparam_values"].numpy()  # all-gathered: replica 0's rows, then replica 1's
    half = len(values) // 2
    assert values.shape[0] == config.data.batch_size
    assert not np.allclose(values[:half], values[half:]), "replicas drew the same samples"
    assert len(np.unique(values[:, 0])) > half, "per-example samples repeat"
    return trainer


def shared_draws(strategy):
    """A shared hyperparameter gets one draw for the global batch; a per-example one does not."""
    specs = [HParam("shared", 0.0, 1.0, 0.5, per_example=False), HParam("own", 0.0, 1.0, 0.5)]
    with strategy.scope():
        hparams = HyperParameters(specs, seed=3)
    def replica_draw():
        return hparams.sample(4).values

    @tf.function
    def draw():
        return strategy.run(replica_draw)


    for _ in range(3):
        samples = strategy.experimental_local_results(draw())
        rows = np.concatenate([sample.numpy() for sample in samples])
        assert len(np.unique(rows[:, 0])) == 1, rows
        assert len(np.unique(rows[:, 1])) == len(rows), rows


def matches_single_device(strategy, config, steps):
    """With tune=False no hyperparameter noise is drawn, so a replicated run must equal the
    single-device run up to float32 summation order (the loss is summed per replica, then
    across replicas). Returns the largest weight difference relative to the weights' scale."""
    config = config.override(tune=False)
    weights = []
    for candidate in (None, strategy):
        experiment, trainer = build(config, candidate)
        train(trainer, experiment, steps)
        weights.append([v.numpy() for v in trainer.weights])
    return max(float(np.max(np.abs(a - b)) / (np.max(np.abs(a)) + 1e-12))
               for a, b in zip(*weights))


def same_evaluation_and_hyper_step(strategy, config):
    """From the same initial state, evaluation (sums over replicas, uneven last batch) and a
    hyper step without perturbation (tune_scales=False) are deterministic: both must match
    the single-device ones to float32 round-off. Returns the largest relative difference."""
    config = config.override(tune_scales=False)
    runs = []
    for candidate in (None, strategy):
        experiment, trainer = build(config, candidate)
        evaluation = trainer.evaluate_dataset(experiment.data.valid)
        trainer.hyper_step(*next(iter(trainer.distribute(experiment.data.hyper))))
        runs.append([evaluation["loss"], evaluation["accuracy"],
                     *experiment.hparams.unconstrained_value.numpy().tolist()])
    single, replicated = np.array(runs[0]), np.array(runs[1])
    return float(np.max(np.abs(single - replicated) / (np.abs(single) + 1e-12)))


def tuned_hparams(strategy, config, steps):
    """Final hyperparameters of a tuned run, replicated and single-device: they differ because
    the replicas draw their per-example noise from per-replica streams (a different but
    equally distributed sample), so they agree only statistically."""
    results = []
    for candidate in (None, strategy):
        experiment, trainer = build(config, candidate)
        train(trainer, experiment, steps)
        results.append(experiment.hparams.constrained().numpy().tolist())
    return results


def main(folder):
    distribute.configure_cpu_devices(2)
    strategy = distribute.make_strategy("mirrored")
    assert strategy.num_replicas_in_sync == 2
    toy = experiments.default_config("relu_toy", batch_size=64, hyper_lr=0.03)
    cnn = experiments.default_config("cifar_cnn", dataset=f"folder:{folder}", batch_size=8)
    report = {}
    semantics(strategy, toy, steps=8)
    semantics(strategy, cnn, steps=3)
    shared_draws(strategy)
    report["toy_weight_rel_diff"] = matches_single_device(strategy, toy, steps=20)
    # Not comparable to round-off: dropout and pixel-drop masks come from per-replica streams.
    report["cnn_weight_rel_diff_random_masks"] = matches_single_device(strategy, cnn, steps=3)
    report["cnn_eval_and_hyper_step_rel_diff"] = same_evaluation_and_hyper_step(strategy, cnn)
    single, replicated = tuned_hparams(strategy, toy, steps=40)
    report["toy_tuned_single"], report["toy_tuned_mirrored"] = single, replicated
    print(json.dumps(report))


if __name__ == "__main__":
    main(sys.argv[1])
