"""Training throughput of cifar_cnn: one device against MirroredStrategy over N logical CPUs.

  python benchmarks/distributed.py [--batch_size=128] [--steps=40] [--cpu_devices=2]

Each configuration runs in its own process (logical devices are fixed at TensorFlow start-up),
on synthetic 32x32x3 images, timing weight steps after a warm-up; the batch size is global.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time


def measure(strategy_name: str, cpu_devices: int, batch_size: int, steps: int) -> dict:
    import tensorflow as tf

    from stn_pipeline import distribute
    from stn_pipeline.hparams import HyperParameters
    from stn_pipeline.models.cifar_cnn import CifarCnn, cifar_cnn_hparams
    from stn_pipeline.trainer import StnTrainer

    if cpu_devices:
        distribute.configure_cpu_devices(cpu_devices)
    strategy = distribute.make_strategy(strategy_name)
    images = tf.random.stateless_uniform([batch_size * 8, 32, 32, 3], [1, 2], maxval=256,
                                         dtype=tf.int32)
    labels = tf.random.stateless_uniform([batch_size * 8], [3, 4], maxval=10, dtype=tf.int64)
    dataset = (tf.data.Dataset.from_tensor_slices((tf.cast(images, tf.uint8), labels))
               .repeat().batch(batch_size, drop_remainder=True).prefetch(4))
    specs = cifar_cnn_hparams()
    with distribute.scope(strategy):
        hparams = HyperParameters(specs)
        model = CifarCnn([32, 32, 3], 10, [125.0] * 3, [60.0] * 3, specs)
        trainer = StnTrainer(model, hparams, tf.TensorSpec([None, 32, 32, 3], tf.uint8),
                             tf.TensorSpec([None], tf.int64), strategy=strategy)
    batches = iter(trainer.distribute(dataset))
    for _ in range(5):  # compile and warm up
        float(trainer.weight_step(*next(batches))["loss"])
    start = time.perf_counter()
    for _ in range(steps):
        out = trainer.weight_step(*next(batches))
    float(out["loss"])
    seconds = time.perf_counter() - start
    replicas = strategy.num_replicas_in_sync if strategy is not None else 1
    return {"strategy": strategy_name, "replicas": replicas, "batch_size": batch_size,
            "images_per_s": round(steps * batch_size / seconds, 1),
            "traces": trainer.weight_step.experimental_get_tracing_count()}


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--batch_size", type=int, default=128)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--cpu_devices", type=int, default=2)
    parser.add_argument("--child", choices=["default", "mirrored"])
    args = parser.parse_args()
    if args.child:
        devices = args.cpu_devices if args.child == "mirrored" else 0
        print(json.dumps(measure(args.child, devices, args.batch_size, args.steps)))
        return
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
    rows = []
    for child in ("default", "mirrored"):
        output = subprocess.run([sys.executable, __file__, f"--child={child}",
                                 f"--batch_size={args.batch_size}", f"--steps={args.steps}",
                                 f"--cpu_devices={args.cpu_devices}"],
                                env=env, check=True, capture_output=True, text=True).stdout
        rows.append(json.loads(output.strip().splitlines()[-1]))
    print("| strategy | replicas | global batch | images/s |\n|---|---|---|---|")
    for row in rows:
        print(f"| {row['strategy']} | {row['replicas']} | {row['batch_size']} | "
              f"{row['images_per_s']} |")
    print(f"mirrored / default: {rows[1]['images_per_s'] / rows[0]['images_per_s']:.2f}x "
          f"(traces of the weight step: {rows[0]['traces']}, {rows[1]['traces']})")


if __name__ == "__main__":
    main()
