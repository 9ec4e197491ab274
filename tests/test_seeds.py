"""Independent random streams: every consumer of randomness draws from its own stream of --seed."""

import itertools

import numpy as np
import pytest
import tensorflow as tf

from stn_pipeline.hparams import HParam, HyperParameters
from stn_pipeline.models import ReluToy
from stn_pipeline.seeds import STREAMS, stream_seed
from stn_pipeline.trainer import StnTrainer, TrainerConfig


def test_streams_are_distinct_reproducible_and_follow_the_run_seed():
    seeds = {(seed, stream): stream_seed(seed, stream)
             for seed, stream in itertools.product(range(3), STREAMS)}
    assert len(set(seeds.values())) == len(seeds)  # no two (seed, stream) pairs collide
    assert all(0 <= value < 2 ** 32 for value in seeds.values())
    assert stream_seed(1, "step") == seeds[(1, "step")]
    with pytest.raises(ValueError, match="Unknown random stream 'dropout'"):
        stream_seed(0, "dropout")


def test_perturbation_and_step_generators_differ_for_one_seed():
    hparams = HyperParameters([HParam("input_range", 0.0, None, 1.0, kind="positive")], seed=0)
    trainer = StnTrainer(ReluToy(depth=1, width=4), hparams, tf.TensorSpec([None, 1], tf.float32),
                         tf.TensorSpec([None, 1], tf.float32), TrainerConfig(), seed=0)
    perturbation = hparams.generator.normal([1000]).numpy()
    step = trainer.step_generator.normal([1000]).numpy()
    assert abs(np.corrcoef(perturbation, step)[0, 1]) < 0.15

