"""Running `stn-train` on TensorFlow's distribution engine (`tf.distribute`).

Strategies (`--strategy`):
  default       no distribution: one device, exactly the single-device trainer.
  mirrored      `tf.distribute.MirroredStrategy` over the local GPUs, or over the logical CPU
                devices when there is no GPU (`--cpu_devices=N` splits the CPU into N).
  multi_worker  `tf.distribute.MultiWorkerMirroredStrategy`, one process per machine, the
                cluster read from the `TF_CONFIG` environment variable.
  tpu           `tf.distribute.TPUStrategy` through a `TPUClusterResolver` (untested here).

Side effects follow TensorFlow's multi-worker guide: every worker runs the same program, but only
the chief writes the real logdir; other workers write to a temporary folder removed at the end.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile

import tensorflow as tf

__all__ = ["STRATEGIES", "PeerFailure", "configure_cpu_devices", "failure_reason", "input_fn",
           "is_chief", "make_strategy", "scope", "worker_logdir"]

STRATEGIES = ("default", "mirrored", "multi_worker", "tpu")

# Errors a collective raises when a peer died or stopped answering.
PeerFailure = (tf.errors.UnavailableError, tf.errors.DeadlineExceededError,
               tf.errors.CancelledError, tf.errors.AbortedError, tf.errors.InternalError)


def failure_reason(error: Exception) -> str:
    """The telling line of a TensorFlow op error (not its headline, stack or node names)."""
    lines = [line.strip() for line in str(getattr(error, "message", error)).splitlines()
             if line.strip() and not line[:1].isspace()
             and not line.startswith(("Graph execution error", "Detected at node", "[["))]
    if not lines:
        return type(error).__name__
    # E.g. "Collective ops is aborted by: ... tasks are unhealthy ...:" + "/job:worker/...task:1".
    return " ".join(lines[:2]) if lines[0].endswith(":") and len(lines) > 1 else lines[0]


def configure_cpu_devices(count: int) -> None:
    """Splits the CPU into `count` logical devices; must run before TensorFlow initialises."""
    cpu = tf.config.list_physical_devices("CPU")[0]
    try:
        tf.config.set_logical_device_configuration(
            cpu, [tf.config.LogicalDeviceConfiguration() for _ in range(count)])
    except RuntimeError as error:
        raise ValueError(f"--cpu_devices={count}: TensorFlow is initialised already "
                         f"({error}).") from None


def make_strategy(name: str, timeout_seconds: float = 0) -> tf.distribute.Strategy | None:
    """The strategy named `name`; None for "default" (the plain single-device path).

    Args:
      name: one of `STRATEGIES`.
      timeout_seconds: multi_worker only: a collective that waits longer than this for a peer
        fails (so a dead worker stops the job instead of hanging it); 0 means no timeout.
    """
    if name == "default":
        return None
    if name == "mirrored":
        if tf.config.list_logical_devices("GPU"):
            return tf.distribute.MirroredStrategy()
        cpus = [device.name for device in tf.config.list_logical_devices("CPU")]
        return tf.distribute.MirroredStrategy(devices=cpus)
    if name == "multi_worker":
        if "TF_CONFIG" not in os.environ:
            raise ValueError("--strategy=multi_worker needs the TF_CONFIG environment variable "
                             "(see the README, 'Running on several GPUs or machines').")
        options = tf.distribute.experimental.CommunicationOptions(
            timeout_seconds=timeout_seconds or None)
        return tf.distribute.MultiWorkerMirroredStrategy(communication_options=options)
    if name == "tpu":
        resolver = tf.distribute.cluster_resolver.TPUClusterResolver()
        tf.config.experimental_connect_to_cluster(resolver)
        tf.tpu.experimental.initialize_tpu_system(resolver)
        return tf.distribute.TPUStrategy(resolver)
    raise ValueError(f"--strategy must be one of {STRATEGIES}, received {name!r}.")


def scope(strategy):
    """`strategy.scope()`, or a no-op for the single-device path."""
    return strategy.scope() if strategy is not None else contextlib.nullcontext()


def _task(strategy) -> tuple[str | None, int]:
    resolver = getattr(strategy, "cluster_resolver", None)
    if resolver is None or not isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy):
        return None, 0
    return resolver.task_type, resolver.task_id or 0


def is_chief(strategy) -> bool:
    """True on the worker that owns the logdir: the "chief" task, else worker 0."""
    task_type, task_id = _task(strategy)
    if task_type is None:
        return True
    if task_type == "chief":
        return True
    has_chief = "chief" in json.loads(os.environ.get("TF_CONFIG", "{}")).get("cluster", {})
    return task_type == "worker" and task_id == 0 and not has_chief


@contextlib.contextmanager
def worker_logdir(logdir: str, strategy):
    """Yields where this worker writes: the chief `logdir`; others a temporary folder that is
    removed on exit (all workers must save, since saving may run collectives)."""
    if is_chief(strategy):
        yield logdir
        return
    task_type, task_id = _task(strategy)
    folder = tempfile.mkdtemp(prefix=f"stn-{task_type}-{task_id}-")
    try:
        yield os.path.join(folder, "run")
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def input_fn(dataset: tf.data.Dataset):
    """Turns a dataset of *global* batches into a `distribute_datasets_from_function` input.

    Every input pipeline (worker) reads the same global stream and keeps its own slice, cut
    into one piece per local replica (`InputContext`). Global replica g of R gets rows
    [n g / R, n (g + 1) / R) of a batch of n rows, so a global batch is split exactly as a
    single device would see it whole (possibly empty pieces for a short last eval batch: every
    replica still gets one element per global batch, which keeps the replicas in step).
    """

    def make(context: tf.distribute.InputContext) -> tf.data.Dataset:
        local = context.num_replicas_in_sync // context.num_input_pipelines
        first = context.input_pipeline_id * local
        total = context.num_replicas_in_sync

        def pieces(*batch):
            rows = tf.shape(batch[0], out_type=tf.int64)[0]

            def piece(index):
                start = rows * (first + index) // total
                end = rows * (first + index + 1) // total
                return tuple(part[start:end] for part in batch)

            return tf.data.Dataset.range(local).map(piece)

        return dataset.flat_map(pieces).prefetch(tf.data.AUTOTUNE)

    return make
