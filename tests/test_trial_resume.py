"""A restarted trial continues from the furthest-advanced complete checkpoint on storage, not
only from the one Tune's (possibly stale) experiment state knows (issue 22, point 4)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

pytest.importorskip("ray")
from pyarrow.fs import LocalFileSystem  # noqa: E402
from ray.tune import Checkpoint  # noqa: E402

from trainables.ray_trainable import (  # noqa: E402
    _PROGRESS_FILE,
    _STATE_FILE,
    checkpoint_progress,
    newest_checkpoint,
)


def _write(folder: Path, stage: int, step: int, done: bool = False, payload: bytes = b"weights") -> Path:
    """A checkpoint folder as the trial's reporter writes it: state, then progress with sizes."""
    folder.mkdir(parents=True)
    (folder / _STATE_FILE).write_bytes(payload)
    progress = {**checkpoint_progress({"stage": stage, "step": step}, done=done),
                "sizes": {_STATE_FILE: len(payload)}}
    (folder / _PROGRESS_FILE).write_text(json.dumps(progress))
    return folder


def _storage(trial: Path) -> tuple:
    return LocalFileSystem(), str(trial)


def test_storage_newer_than_what_tune_restored_wins(tmp_path):
    trial = tmp_path / "trial"
    known = _write(trial / "checkpoint_000000", stage=1, step=10)
    _write(trial / "checkpoint_000001", stage=2, step=20)
    _write(trial / "checkpoint_000002", stage=3, step=30)
    chosen = newest_checkpoint(Checkpoint(str(known)), _storage(trial))
    assert Path(chosen.path).name == "checkpoint_000002"


def test_tune_knew_nothing_storage_has_a_checkpoint(tmp_path):
    trial = tmp_path / "trial"
    _write(trial / "checkpoint_000000", stage=1, step=10)
    chosen = newest_checkpoint(None, _storage(trial))
    assert chosen is not None and Path(chosen.path).name == "checkpoint_000000"


def test_progress_not_folder_number_decides(tmp_path):
    # Restored from folder 0, the trial wrote its next stage into folder 1 again, over an older
    # stage; folder 2 still holds the older run's stage 3, which the rewritten folder 1 is past.
    trial = tmp_path / "trial"
    _write(trial / "checkpoint_000000", stage=1, step=10)
    _write(trial / "checkpoint_000001", stage=4, step=40)
    _write(trial / "checkpoint_000002", stage=3, step=30)
    assert Path(newest_checkpoint(None, _storage(trial)).path).name == "checkpoint_000001"


def test_a_finished_checkpoint_beats_any_stage(tmp_path):
    trial = tmp_path / "trial"
    _write(trial / "checkpoint_000000", stage=5, step=50, done=True)
    _write(trial / "checkpoint_000001", stage=2, step=20)
    assert Path(newest_checkpoint(None, _storage(trial)).path).name == "checkpoint_000000"


def test_a_cut_upload_is_never_chosen(tmp_path):
    trial = tmp_path / "trial"
    _write(trial / "checkpoint_000000", stage=1, step=10)
    cut = _write(trial / "checkpoint_000001", stage=2, step=20, payload=b"weights of stage two")
    (cut / _STATE_FILE).write_bytes(b"weig")  # the kill came mid-upload
    _write(trial / "checkpoint_000002", stage=3, step=30)
    (trial / "checkpoint_000002" / _STATE_FILE).unlink()
    (trial / "checkpoint_000003").mkdir()  # a folder with no progress file at all
    assert Path(newest_checkpoint(None, _storage(trial)).path).name == "checkpoint_000000"


def test_no_storage_or_empty_storage_keeps_what_tune_restored(tmp_path):
    known = _write(tmp_path / "restored" / "checkpoint_000004", stage=2, step=20)
    assert newest_checkpoint(Checkpoint(str(known)), None).path == str(known)
    assert newest_checkpoint(Checkpoint(str(known)), _storage(tmp_path / "missing")).path == str(known)
    assert newest_checkpoint(None, _storage(tmp_path / "missing")) is None


def test_a_tune_trial_finds_its_own_folder_on_storage(tmp_path, ray_session):
    # The developer API the lookup relies on still answers inside a function trainable, with the
    # folder Tune writes the trial's checkpoints to (a Ray upgrade that breaks it fails here).
    from ray import tune

    from trainables.ray_trainable import _trial_storage

    def trial(config):
        fs, path = _trial_storage()
        tune.report({"path": path, "fs": fs.type_name})

    result = tune.Tuner(trial, run_config=tune.RunConfig(storage_path=str(tmp_path), name="where")).fit()[0]
    assert result.metrics["fs"] == "local"
    assert Path(result.metrics["path"]) == Path(result.path)
