"""The README's "API in five minutes" example runs as written and tunes something."""

from __future__ import annotations

import pathlib
import re

import numpy as np
import tensorflow as tf

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"


def _api_example() -> str:
    section = README.read_text().split("## The API in five minutes", 1)[1]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_readme_api_example_runs_and_moves_the_hyperparameters(capsys):
    rng = np.random.default_rng(0)
    images = rng.normal(size=(64, 784)).astype(np.float32)
    labels = rng.integers(0, 10, size=64).astype(np.int64)
    train = tf.data.Dataset.from_tensor_slices((images, labels)).batch(16)
    valid = iter(tf.data.Dataset.from_tensor_slices((images, labels)).batch(16).repeat())
    namespace = {"train_batches": train, "valid_batches": valid}
    exec(compile(_api_example(), str(README), "exec"), namespace)  # noqa: S102 -- our own README
    final = namespace["hparams"].as_dict()
    assert set(final) == {"dropout", "noise"}
    # 2 hyper steps (Adam, lr 3e-3) moved both away from their initial values.
    assert abs(final["dropout"] - 0.05) > 1e-5 and abs(final["noise"] - 0.1) > 1e-5
    assert "dropout" in capsys.readouterr().out
