"""Training under tf.distribute, all in subprocesses: the CPU is split into logical devices
before TensorFlow initialises (pytest's process has initialised it), and multi-worker jobs
need one process per worker.
"""

from __future__ import annotations

import json
import os
import pathlib
import re
import signal
import socket
import subprocess
import sys
import time

import pytest

from stn_pipeline import distribute

HERE = pathlib.Path(__file__).resolve().parent
ENV = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")


def _done_line(output: str) -> dict:
    """The final hyperparameters from stn-train's last line."""
    match = re.search(r"final hyperparameters (\{.*\})", output)
    assert match, output[-3000:]
    return json.loads(match.group(1).replace("'", '"'))


def _free_ports(count: int) -> list[int]:
    sockets = [socket.socket() for _ in range(count)]
    for s in sockets:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


def _start_workers(logdir, tmp_path, flags, count=2):
    """`count` stn-train processes forming one multi_worker job on 127.0.0.1."""
    workers = [f"127.0.0.1:{port}" for port in _free_ports(count)]
    processes = []
    for index in range(count):
        temp = tmp_path / f"tmp{index}"  # where a non-chief's temporary logdir goes
        temp.mkdir()
        tf_config = {"cluster": {"worker": workers}, "task": {"type": "worker", "index": index}}
        env = dict(ENV, TF_CONFIG=json.dumps(tf_config), TMPDIR=str(temp))
        command = [sys.executable, "-m", "stn_pipeline_scripts.train", f"--logdir={logdir}",
                   "--strategy=multi_worker", "--threads=1", *flags]
        processes.append(subprocess.Popen(command, env=env, stdout=subprocess.PIPE,
                                          stderr=subprocess.PIPE, text=True))
    return processes


def _stop(processes):
    for process in processes:
        if process.poll() is None:
            process.kill()
            process.wait()


@pytest.fixture(scope="module")
def image_folder(image_folder_factory):
    """24x24 RGB, 3 classes: 72 training images (57 train, 15 valid), 12 test."""
    return image_folder_factory("distribute", shape=(24, 24, 3),
                                per_class={"train": 24, "test": 4}).root


def test_mirrored_replicas_stay_in_sync_and_match_one_device(image_folder):
    """See distributed_checks.py: identical variables on both replicas after every weight and
    hyper step (toy and CNN), distinct per-example samples per replica, one shared draw per
    global batch, and agreement with a single device."""
    result = subprocess.run([sys.executable, str(HERE / "distributed_checks.py"),
                             str(image_folder)], env=ENV, capture_output=True,
                            text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    # No hyperparameter noise (tune=False): only float32 summation order differs, which
    # 20 Adam steps amplify to ~1e-4 of the weights' scale.
    assert report["toy_weight_rel_diff"] < 1e-3
    # Evaluation and an unperturbed hyper step from the same state: round-off only.
    assert report["cnn_eval_and_hyper_step_rel_diff"] < 1e-5
    # Tuned: per-replica noise streams differ from the single device's, so the hyperparameter
    # paths agree only statistically; 40 cycles move r from 1.0 to ~1.87 in both.
    single, mirrored = report["toy_tuned_single"][0], report["toy_tuned_mirrored"][0]
    assert single > 1.5 and abs(single - mirrored) < 0.05


def test_mirrored_cli_runs_toy_and_cnn(image_folder, tmp_path):
    runs = {"toy": ["--experiment=relu_toy", "--epochs=3"],
            "cnn": ["--experiment=cifar_cnn", f"--dataset=folder:{image_folder}",
                    "--batch_size=8", "--epochs=2", "--log_every=2"]}
    for name, flags in runs.items():
        logdir = tmp_path / name
        result = subprocess.run(
            [sys.executable, "-m", "stn_pipeline_scripts.train", f"--logdir={logdir}",
             "--strategy=mirrored", "--cpu_devices=2", *flags],
            env=ENV, capture_output=True, text=True, timeout=300)
        assert result.returncode == 0, result.stderr[-3000:]
        results = json.loads((logdir / "results.json").read_text())
        assert results["final_hparams"] == _done_line(result.stdout)
        assert (logdir / "export").is_dir() and (logdir / "checkpoints" / "best").is_dir()


def test_mirrored_killed_run_resumes_as_if_uninterrupted(tmp_path):
    flags = ["--experiment=relu_toy", "--epochs=6", "--checkpoint_every=32", "--log_every=16",
             "--strategy=mirrored", "--cpu_devices=2", "--deterministic"]

    def train(logdir, wait=True):
        command = [sys.executable, "-m", "stn_pipeline_scripts.train", f"--logdir={logdir}",
                   *flags]
        if not wait:
            return subprocess.Popen(command, env=ENV, stdout=subprocess.DEVNULL,
                                    stderr=subprocess.DEVNULL)
        return subprocess.run(command, env=ENV, capture_output=True, text=True, timeout=300)

    a, b = tmp_path / "a", tmp_path / "b"
    assert train(a).returncode == 0
    process = train(b, wait=False)
    deadline = time.time() + 120
    while not (b / "checkpoints" / "ckpt-96.index").exists():
        assert time.time() < deadline and process.poll() is None, "no checkpoint appeared"
        time.sleep(0.02)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert not (b / "results.json").exists()
    resumed = train(b)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming at weight step" in resumed.stderr
    first, second = (json.loads((d / "results.json").read_text()) for d in (a, b))
    assert second["final_hparams"] == first["final_hparams"]
    assert second["val_loss"] == first["val_loss"]


def test_mirrored_rejects_a_batch_not_divisible_by_the_replicas(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "stn_pipeline_scripts.train", f"--logdir={tmp_path / 'x'}",
         "--strategy=mirrored", "--cpu_devices=2", "--batch_size=63"],
        env=ENV, capture_output=True, text=True, timeout=120)
    assert result.returncode != 0
    assert "--batch_size=63 (the global batch) must be a multiple of the 2 replicas" in \
        result.stderr


@pytest.mark.slow
def test_multi_worker_cifar_slice(cifar_folder, tmp_path):
    logdir = tmp_path / "run"
    flags = ["--experiment=cifar_cnn", f"--dataset=folder:{cifar_folder}",
             "--max_examples=1280", "--batch_size=64", "--epochs=2", "--log_every=4",
             "--worker_timeout=120"]
    processes = _start_workers(logdir, tmp_path, flags)
    try:
        outputs = [process.communicate(timeout=600) for process in processes]
    finally:
        _stop(processes)
    for process, (_, stderr) in zip(processes, outputs):
        assert process.returncode == 0, stderr[-3000:]
    chief, other = (_done_line(stdout) for stdout, _ in outputs)
    assert chief == other
    results = json.loads((logdir / "results.json").read_text())
    assert results["final_hparams"] == chief and results["hyper_steps"] > 0
    # Only the chief wrote: the other worker's temporary logdir (stn-worker-1-*) is gone.
    assert not list((tmp_path / "tmp1").glob("stn-*")), list((tmp_path / "tmp1").iterdir())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run", "tmp0", "tmp1"]
    assert "stn-worker-1-" in outputs[1][1]  # its logging names the temporary logdir


@pytest.mark.parametrize("signum", [signal.SIGKILL, signal.SIGSTOP], ids=["killed", "frozen"])
def test_lost_worker_fails_the_job_with_a_clear_message(signum, tmp_path):
    """A killed worker, or a frozen one (alive, connected, silent), fails the job: the peer
    health checks and the collective timeout (--worker_timeout) end the wait."""
    logdir = tmp_path / "run"
    flags = ["--experiment=relu_toy", "--epochs=1000", "--log_every=8", "--worker_timeout=20"]
    processes = _start_workers(logdir, tmp_path, flags)
    try:
        deadline = time.time() + 180
        while not list(logdir.glob("events.out.tfevents.*")):  # training has started
            assert time.time() < deadline and processes[0].poll() is None, "no start"
            time.sleep(0.2)
        time.sleep(3)
        processes[1].send_signal(signum)
        start = time.time()
        _, stderr = processes[0].communicate(timeout=240)
        elapsed = time.time() - start
    finally:
        _stop(processes)
    assert processes[0].returncode != 0
    assert "stn-train: error: the multi_worker job lost a worker" in stderr, stderr[-3000:]
    assert elapsed < 240
    print(f"chief exited {elapsed:.0f}s after signal {signum}: {stderr.strip().splitlines()[-1]}")


def test_strategy_names_are_checked():
    with pytest.raises(ValueError, match="--strategy must be one of"):
        distribute.make_strategy("parameter_server")
    assert distribute.make_strategy("default") is None
    assert distribute.is_chief(None)
