"""Trial artifacts (`tlsweep.sweep._artifacts`): the folder, whole-file writes, a full disk,
and the confusion matrix each trial attaches."""

from __future__ import annotations

import errno
import io
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import optuna
import pytest
from optuna.artifacts import download_artifact, get_all_artifact_meta

from tlsweep.errors import UserError, full_disk, full_disk_message
from tlsweep.sweep import _artifacts
from tlsweep.sweep._artifacts import ArtifactFolder, open_folder, upload_confusion_matrix
from tlsweep.sweepspec import SweepSettings
from tlsweep.train import Evaluation, TrainResult

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@pytest.fixture
def store_dir(tmp_path: Path) -> Path:
    """An empty folder for a store (``tmp_path`` also holds the test's ``mlruns/``)."""
    folder = tmp_path / "store"
    folder.mkdir()
    return folder


def result_with(*splits: str) -> TrainResult:
    """A training result that evaluated ``splits`` (only the confusion matrices matter)."""
    confusion = np.array([[5, 1, 0], [0, 4, 2], [1, 0, 6]])
    evaluations = {
        split: Evaluation(loss=0.5, accuracy=0.8, confusion=confusion, report={}, report_text="")
        for split in splits
    }
    return TrainResult(
        model=None,  # type: ignore[arg-type]
        history=None,  # type: ignore[arg-type]
        evaluations=evaluations,
        best_epoch=1,
        best_value=0.8,
    )


def test_a_write_is_whole_and_leaves_no_partial_file(store_dir: Path) -> None:
    folder = ArtifactFolder(store_dir)
    folder.write("abc-123", io.BytesIO(b"content"))
    assert (store_dir / "abc-123").read_bytes() == b"content"
    assert folder.open_reader("abc-123").read() == b"content"
    assert sorted(p.name for p in store_dir.iterdir()) == ["abc-123"]
    folder.remove("abc-123")
    assert not any(store_dir.iterdir())


@pytest.mark.parametrize("artifact_id", ["../escape", "/etc/passwd", ".hidden", "a/b"])
def test_ids_that_leave_the_folder_are_refused(store_dir: Path, artifact_id: str) -> None:
    with pytest.raises(ValueError, match="invalid artifact id"):
        ArtifactFolder(store_dir / "inner").write(artifact_id, io.BytesIO(b"x"))
    assert not any(store_dir.iterdir())


def test_a_full_disk_names_the_artifact_and_leaves_nothing(
    store_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """What the objective then does with it: `full_disk` finds it, and the one line names the
    file (tests/test_full_disk.py shows that path for every other write)."""

    def no_space(source, target) -> None:
        target.write(b"half")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(_artifacts, "shutil", SimpleNamespace(copyfileobj=no_space))
    with pytest.raises(OSError) as exc:
        ArtifactFolder(store_dir).write("abc-123", io.BytesIO(b"content"))
    found = full_disk(exc.value)
    assert found is not None and found.filename == str(store_dir / "abc-123")
    assert f"no space left on device writing {store_dir / 'abc-123'}" in full_disk_message(found)
    assert not any(store_dir.iterdir())  # neither the artifact nor its partial copy


def test_a_real_full_disk_leaves_no_partial_file(small_filesystem: Path, fill_disk) -> None:
    """On a real full disk (a tmpfs): the error names the file, nothing half-written stays."""
    folder = ArtifactFolder(small_filesystem)
    filler = fill_disk(small_filesystem)
    with pytest.raises(OSError) as exc:
        folder.write("abc-123", io.BytesIO(b"x" * 200_000))
    assert full_disk(exc.value) is not None
    assert exc.value.filename == str(small_filesystem / "abc-123")
    assert sorted(p.name for p in small_filesystem.iterdir()) == [filler.name]


def test_the_folder_is_created_beside_the_storage(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'db' / 'optuna.db'}"
    folder = open_folder(SweepSettings(), url)
    assert folder.path == tmp_path / "db" / "optuna-artifacts" and folder.path.is_dir()


def test_a_folder_that_cannot_be_made_is_a_user_error(tmp_path: Path) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    settings = SweepSettings(artifacts=str(blocker / "artifacts"))
    with pytest.raises(UserError) as exc:
        open_folder(settings, "sqlite:///unused.db")
    message = str(exc.value)
    assert "cannot write the artifact folder" in message and "sweep.artifacts" in message
    assert str(blocker / "artifacts") in message and "\n" not in message


@pytest.mark.parametrize(("splits", "drawn"), [(("val", "test"), "test"), (("val",), "val")])
def test_each_trial_attaches_its_confusion_matrix(
    tmp_path: Path, store_dir: Path, splits: tuple[str, ...], drawn: str
) -> None:
    store = ArtifactFolder(store_dir)
    study = optuna.create_study()
    trial = study.ask()
    artifact_id = upload_confusion_matrix(trial, store, result_with(*splits), ("0", "1", "2"))
    (meta,) = get_all_artifact_meta(trial)
    assert meta.artifact_id == artifact_id
    assert (meta.filename, meta.mimetype) == (f"{drawn}_confusion_matrix.png", "image/png")
    copy = tmp_path / "copy.png"
    download_artifact(artifact_store=store, artifact_id=artifact_id, file_path=str(copy))
    assert copy.read_bytes().startswith(PNG_SIGNATURE)


def test_a_trial_with_no_evaluation_attaches_nothing(store_dir: Path) -> None:
    study = optuna.create_study()
    trial = study.ask()
    assert upload_confusion_matrix(trial, ArtifactFolder(store_dir), result_with(), ()) is None
    assert not any(store_dir.iterdir())


def test_the_recorded_folder_is_found_while_it_exists(tmp_path: Path) -> None:
    study = optuna.create_study()
    assert _artifacts.recorded_folder(study) is None
    _artifacts.record_folder(study, ArtifactFolder(tmp_path / "store"))
    assert _artifacts.recorded_folder(study) is None  # recorded, but not there
    (tmp_path / "store").mkdir()
    found = _artifacts.recorded_folder(study)
    assert found is not None and found.path == tmp_path / "store"


@pytest.mark.slow
def test_a_full_artifact_disk_stops_the_sweep_and_queues_the_trial_again(
    tmp_path: Path, write_sweep, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A real trial whose confusion matrix meets a full disk: not the trial's fault, so it is
    queued again with the same values and the sweep stops with the one-line outage."""
    from optuna.trial import TrialState

    from tlsweep.errors import OutageError
    from tlsweep.sweep import load_study, run_sweep
    from tlsweep.sweepspec import load_sweep

    def no_space(source, target) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    path = write_sweep(
        tmp_path / "full",
        {"head.dropout": "choice(0.0, 0.5)"},
        {"study_name": "full", "pruner": "none", "n_trials": 1},
    )
    spec = load_sweep(str(path))
    monkeypatch.setattr(_artifacts, "shutil", SimpleNamespace(copyfileobj=no_space))
    with pytest.raises(OutageError) as exc:
        run_sweep(spec)
    folder = tmp_path / "full" / "optuna-artifacts"
    assert str(exc.value).startswith(f"no space left on device writing {folder}/")
    study = load_study("full", spec.settings.storage)
    failed, retry = study.trials
    assert (failed.state, retry.state) == (TrialState.FAIL, TrialState.WAITING)
    assert failed.user_attrs["fail_reason"] == "the disk was full"
    assert retry.params == failed.params
    assert not any(folder.iterdir())
