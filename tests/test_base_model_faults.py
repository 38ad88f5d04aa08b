"""Base-model training under faults: a killed training resumes to the weights of an uninterrupted
one, a damaged cache entry is moved aside and trained again, and two writers of one base model
end with one intact entry that both use."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from trainables.cli.base_model import (
    DamagedCheckpointError,
    _save_if_absent,
    _write_temp,
    load_checkpoint,
    partial_checkpoint_path,
    prepare,
)
from trainables.cli.compose import load_run_config

ROOT = Path(__file__).resolve().parents[1]


def _args(data: Path, cache: Path, epochs: int) -> list[str]:
    # One thread everywhere: the killed subprocess and the in-process runs must add in one order.
    return [f"data.root={data}", "data.val_size=100", "data.batch_size=32", f"model.pretrain.epochs={epochs}",
            f"cache_dir={cache}", "progress=false", "threads=1"]


@pytest.fixture
def keep_threads() -> Iterator[None]:
    """prepare() sets torch's thread count from ``threads=``; give the other tests theirs back."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def _prepare(data: Path, cache: Path, epochs: int) -> tuple[dict, Path, dict, list[str]]:
    lines: list[str] = []
    model, _, path, meta = prepare(load_run_config(_args(data, cache, epochs)), log=lines.append)
    return model.state_dict(), path, meta, lines


def _assert_same_weights(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), f"{name}: max |diff| {(a[name].float() - b[name].float()).abs().max()}"


def _pretrain_cmd(data: Path, cache: Path, epochs: int) -> list[str]:
    return [sys.executable, "-m", "trainables.pretrain", *_args(data, cache, epochs)]


def _env() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}


def test_killed_base_training_resumes_to_the_weights_of_an_uninterrupted_run(tiny_fmnist, tmp_path, keep_threads):
    epochs, cache = 3, tmp_path / "killed"
    proc = subprocess.Popen(_pretrain_cmd(tiny_fmnist, cache, epochs), cwd=ROOT, env=_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 300
        while proc.poll() is None and time.time() < deadline and not list(cache.rglob("*.partial")):
            time.sleep(0.005)
        assert proc.poll() is None, f"the training ended before it could be killed: {proc.stderr.read()[-2000:]}"
        proc.send_signal(signal.SIGKILL)  # as the OOM killer or a lost node would: no clean-up runs
    finally:
        proc.wait()
    [partial] = cache.rglob("*.partial")
    kept = torch.load(partial, weights_only=True)["epoch"]
    assert 1 <= kept < epochs

    resumed, path, meta, lines = _prepare(tiny_fmnist, cache, epochs)
    assert [line for line in lines if line.startswith("resuming")] == [
        f"resuming base-model training from epoch {kept} of {epochs} ({partial})"]
    assert not partial.exists() and not list(path.parent.glob("*.tmp"))  # only the entry is left
    assert sorted(p.name for p in path.parent.iterdir()) == [path.name]

    uninterrupted, ref_path, ref_meta, ref_lines = _prepare(tiny_fmnist, tmp_path / "whole", epochs)
    assert ref_path.name == path.name and not any("resuming" in line for line in ref_lines)
    _assert_same_weights(resumed, uninterrupted)  # on CPU, one thread: equal, not close
    assert [h["val_acc"] for h in meta["history"]] == [h["val_acc"] for h in ref_meta["history"]]
    assert [h["epoch"] for h in meta["history"]] == list(range(1, epochs + 1))


def test_damaged_cache_entry_is_moved_aside_and_trained_again(tiny_fmnist, tmp_path, keep_threads):
    first, path, _, _ = _prepare(tiny_fmnist, tmp_path, 1)
    whole = path.read_bytes()
    path.write_bytes(whole[: len(whole) // 2])  # a copy cut short: a full disk, a killed rsync

    with pytest.raises(DamagedCheckpointError, match=rf"^checkpoint {re.escape(str(path))} is damaged \(.*\); delete it"):
        load_checkpoint(torch.nn.Linear(1, 1), path)

    again, path2, _, lines = _prepare(tiny_fmnist, tmp_path, 1)
    [said] = [line for line in lines if " is damaged " in line]
    [aside] = path.parent.glob(f"{path.name}.damaged-*")
    assert said.startswith(f"base model: cache entry {path} is damaged (") and f"moved it to {aside}" in said
    assert aside.read_bytes() == whole[: len(whole) // 2]  # kept to look at, never read again
    assert path2 == path and any(line.startswith("base model: trained") for line in lines)
    _assert_same_weights(again, first)
    assert not any(" is damaged " in line for line in _prepare(tiny_fmnist, tmp_path, 1)[3])  # cached now


def test_what_a_killed_writer_leaves_is_cleared(tiny_fmnist, tmp_path, keep_threads):
    # A damaged training checkpoint (say, a disk that filled up) is moved aside and training starts
    # from zero; the half-written temporary file of a dead writer on this host is removed, a live
    # writer's is not.
    reference, path, _, _ = _prepare(tiny_fmnist, tmp_path / "ref", 1)
    entry = tmp_path / "cache" / "base_models" / path.name
    entry.parent.mkdir(parents=True)
    partial = partial_checkpoint_path(entry)
    partial.write_bytes(b"PK\x03\x04 cut short")
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    host = re.sub(r"[^A-Za-z0-9_.]", "_", socket.gethostname())
    dead_tmp = entry.with_name(f"{entry.name}.partial.{host}-{dead.pid}-0badcafe.tmp")
    live_tmp = entry.with_name(f"{entry.name}.{host}-{os.getpid()}-0badcafe.tmp")
    for tmp in (dead_tmp, live_tmp):
        tmp.write_bytes(b"half")

    trained, path2, _, lines = _prepare(tiny_fmnist, tmp_path / "cache", 1)
    assert path2 == entry
    [said] = [line for line in lines if " is damaged " in line]
    assert said.startswith(f"base-model training checkpoint {partial} is damaged (") and "from epoch 0" in said
    assert not partial.exists() and len(list(entry.parent.glob(f"{partial.name}.damaged-*"))) == 1
    assert not dead_tmp.exists() and live_tmp.exists()
    _assert_same_weights(trained, reference)


def test_writer_that_finishes_second_uses_the_first_writers_entry(tiny_fmnist, tmp_path, keep_threads):
    # Fault injection: while this process trains, "another process" writes the same cache entry
    # (a stand-in with its own weights). This one stops at its next epoch's end, loads that entry,
    # and leaves it as it is.
    from trainables import build_model
    from trainables.cli.base_model import save_checkpoint

    cfg = load_run_config(_args(tiny_fmnist, tmp_path, 3))
    path: list[Path] = []
    other = build_model("small_cnn")
    with torch.no_grad():
        for p in other.parameters():
            p.fill_(0.25)

    def log(line: str) -> None:
        lines.append(line)
        if line.startswith("base model: training"):
            path.append(Path(line.split(" -> ")[-1]))
        if line.startswith("pretrain epoch 1/"):
            save_checkpoint(other, path[0], {"val_acc": 0.5, "writer": "other"})

    lines: list[str] = []
    model, _, got, meta = prepare(cfg, log=log)
    assert got == path[0] and meta["writer"] == "other"
    _assert_same_weights(model.state_dict(), other.state_dict())
    assert not any(line.startswith("pretrain epoch 2/") for line in lines)  # stopped, not trained to the end
    assert f"base model: another process wrote {got} first; using it (val_acc=0.5000)" in lines
    assert load_checkpoint(build_model("small_cnn"), got)["writer"] == "other"
    assert sorted(p.name for p in got.parent.iterdir()) == [got.name]


def test_writers_never_share_a_temporary_file_and_the_first_entry_stays(tmp_path):
    path = tmp_path / "entry.pt"
    a, b = _write_temp({"writer": "a"}, path), _write_temp({"writer": "b"}, path)
    assert a != b and a.parent == b.parent == tmp_path
    assert torch.load(a, weights_only=True) == {"writer": "a"} and torch.load(b, weights_only=True) == {"writer": "b"}
    assert _save_if_absent({"writer": "first"}, path) is True
    assert _save_if_absent({"writer": "second"}, path) is False
    assert torch.load(path, weights_only=True) == {"writer": "first"}
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([a.name, b.name, "entry.pt"])  # its own temps gone


def test_two_processes_training_one_base_model_at_once(tiny_fmnist, tmp_path):
    # Two studies sharing a cache: both train the same base model at the same time, both succeed,
    # with the same weights, and one intact entry is left, with no temporary file beside it.
    cmd = _pretrain_cmd(tiny_fmnist, tmp_path, 2)
    procs = [subprocess.Popen(cmd, cwd=ROOT, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    outs = [p.communicate(timeout=600) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [err[-2000:] for _, err in outs]
    paths = {out.strip().splitlines()[-1] for out, _ in outs}
    assert len(paths) == 1
    entry = Path(paths.pop())
    assert sorted(p.name for p in entry.parent.iterdir()) == [entry.name]
    from trainables import build_model

    assert load_checkpoint(build_model("small_cnn"), entry)["pretrain"]["epochs"] == 2
    accs = [out.strip().splitlines()[-2] for out, _ in outs]
    assert accs[0] == accs[1] and accs[0].startswith("base val_acc=")
