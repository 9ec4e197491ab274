"""Independent random streams derived from the one `--seed`.

Each consumer of randomness (the order of training batches, of hyper-step batches, the
hyperparameter perturbation noise, the augmentation and dropout masks of weight steps) draws from
its own stream, so that changing how much one of them draws never shifts the others. A stream's
seed depends only on the run seed and the stream's name, never on which other streams exist.
"""

from __future__ import annotations

import zlib

import numpy as np

__all__ = ["STREAMS", "stream_seed"]

STREAMS = ("train_batches", "hyper_batches", "perturbation", "step")


def stream_seed(seed: int, stream: str) -> int:
    """The seed of stream `stream` (one of `STREAMS`) of a run seeded with `seed`, in [0, 2**32).

    `np.random.SeedSequence` mixes the run seed with a fixed code of the stream's name (its
    CRC-32), so distinct streams get statistically independent seeds.
    """
    if stream not in STREAMS:
        raise ValueError(f"Unknown random stream {stream!r}; known: {STREAMS}.")
    sequence = np.random.SeedSequence([int(seed), zlib.crc32(stream.encode())])
    return int(sequence.generate_state(1, dtype=np.uint32)[0])
