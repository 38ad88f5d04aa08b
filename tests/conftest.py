"""Shared fixtures: tiny generated datasets in the real on-disk formats (no test downloads)."""

from __future__ import annotations

import gzip
import json
import struct
from pathlib import Path

import numpy as np
import pytest


def write_idx(path: Path, array: np.ndarray, gz: bool = True) -> None:
    """Write ``array`` as an IDX file (the MNIST format), gzipped as ``path.gz`` by default."""
    header = bytes([0, 0, 0x08, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    payload = header + array.astype(np.uint8).tobytes()
    if gz:
        with gzip.open(path.with_name(path.name + ".gz"), "wb") as f:
            f.write(payload)
    else:
        path.write_bytes(payload)


def learnable_images(labels: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """28x28 images a small CNN learns in a few steps: class c lights rows 2c..2c+3, plus noise."""
    images = rng.integers(0, 60, size=(len(labels), 28, 28))
    for c in range(10):
        images[labels == c, 2 * c + 2 : 2 * c + 6, 4:24] += 180
    return np.clip(images, 0, 255)


def make_learnable_fmnist(folder: Path, n_train: int = 600, n_test: int = 200, seed: int = 0) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        labels = np.arange(n) % 10
        write_idx(folder / f"{prefix}-images-idx3-ubyte", learnable_images(labels, rng))
        write_idx(folder / f"{prefix}-labels-idx1-ubyte", labels)
    return folder


@pytest.fixture(scope="session")
def tiny_fmnist(tmp_path_factory) -> Path:
    """A folder with a tiny, learnable Fashion-MNIST in IDX .gz files (600 train, 200 test)."""
    return make_learnable_fmnist(tmp_path_factory.mktemp("tiny_fmnist"))


@pytest.fixture(scope="session")
def ray_session():
    """One local Ray for every in-process test that needs it, shut down once at the end.

    Starting Ray again after ``ray.shutdown()`` in one process can leave background threads
    pointing at freed core-worker state (ray#31145): the likely cause of the SIGSEGV at exit
    (after the summary) that CI once saw; it never reproduced here, so that is inferred, not
    proven. ``search.launch.main`` uses a running session instead of starting one.
    """
    import ray

    if ray.is_initialized():  # started by something outside this fixture: not ours to end
        yield
        return
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        yield
    finally:
        ray.shutdown()


def assert_refused(capsys, code: int, musts: list[str]) -> str:
    """A command line refused bad input the house way: exit code 2 and one line on stderr,
    ``error: ...``, containing every string of ``musts``; returns that line."""
    err = capsys.readouterr().err
    assert code == 2, err
    assert err.startswith("error: ") and err.count("\n") == 1, err
    for must in musts:
        assert must in err, f"{must!r} not in {err!r}"
    return err


def child_runs(out: Path, experiment: str) -> list:
    """The MLflow child runs of the search or study whose output folder is ``out``."""
    import mlflow

    state = json.loads((out / "launch_state.json").read_text())
    client = mlflow.MlflowClient(state["tracking_uri"])
    return client.search_runs(
        [client.get_experiment_by_name(experiment).experiment_id],
        filter_string=f"tags.mlflow.parentRunId = '{state['parent_run_id']}'",
    )


def kill_after_first_finished_trial(cmd: list[str], out: Path, env: dict, cwd: Path, timeout: float = 300) -> None:
    """Run ``cmd`` (a search or study writing under ``out``) in a session of its own and SIGKILL
    that session once one trial has reported ``trial_done``: killing its process group ends
    exactly the Ray it started. Fails if the command finished before it could be killed."""
    import os
    import signal
    import subprocess
    import time

    proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    try:
        deadline = time.time() + timeout
        while time.time() < deadline and proc.poll() is None:
            if [p for p in (out / "ray").rglob("result.json") if '"trial_done": true' in p.read_text()]:
                break
            time.sleep(0.5)
        assert proc.poll() is None, f"{cmd[2]} finished before it could be killed"
        os.killpg(proc.pid, signal.SIGKILL)
    finally:
        proc.wait()


def train_small_cnn(splits, epochs: int = 1):
    """small_cnn trained ``epochs`` plain SGD passes over the in-memory ``splits.train`` in
    order (seed 0), in eval mode: a quick real base model for protocol and criterion tests."""
    import torch

    from trainables.core.models import build_model

    torch.manual_seed(0)
    model = build_model("small_cnn")
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    for _ in range(epochs):
        for i in range(0, len(splits.train), 32):
            x, y = splits.train.images[i : i + 32], splits.train.targets[i : i + 32]
            loss = torch.nn.functional.cross_entropy(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
    return model.eval()


@pytest.fixture(scope="module")
def splits(tiny_fmnist):
    """The tiny Fashion-MNIST, 100 images held out for validation, loaded once per test module."""
    from data import get_data

    return get_data("fashion_mnist", str(tiny_fmnist), val_size=100)


@pytest.fixture(scope="module")
def base(splits):
    """A 1-epoch small_cnn on ``splits``, trained once per test module (a module may override it).
    Tests copy it before pruning; module scope keeps one module's use from reaching another's."""
    return train_small_cnn(splits, epochs=1)
