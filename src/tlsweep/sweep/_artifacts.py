"""Trial artifacts in Optuna's artifact store: each trial's confusion matrix, for
optuna-dashboard (``tlsweep dashboard``).

The store is a folder (`artifacts_dir`: ``sweep.artifacts``, else ``optuna-artifacts/``
beside the storage's file); the study records it (`ARTIFACTS_ATTR`) so the dashboard finds
it. Files are written whole or not at all; a full disk raises an ``OSError`` naming the file,
which the objective treats as it treats any full disk (`errors.full_disk`): the trial is
queued again and the sweep stops with one line.
"""

from __future__ import annotations

import errno
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import BinaryIO

import optuna
from optuna.artifacts import FileSystemArtifactStore, upload_artifact

from tlsweep.errors import NO_SPACE, UserError
from tlsweep.sweepspec import SweepSettings, artifacts_dir
from tlsweep.train import TrainResult

ARTIFACTS_ATTR = "tlsweep_artifacts"  # the study's artifact folder, absolute
SPLITS = ("test", "val")  # the first one a trial evaluated is drawn
ARTIFACT_ID = re.compile(r"[0-9A-Za-z_-][0-9A-Za-z_.-]*")  # Optuna's are UUIDs


class ArtifactFolder:
    """Optuna's artifact store over a folder: Optuna's `FileSystemArtifactStore` reads and
    removes; writes are whole files only (under a temporary name, then renamed)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._files = FileSystemArtifactStore(path)

    def open_reader(self, artifact_id: str) -> BinaryIO:
        return self._files.open_reader(artifact_id)

    def remove(self, artifact_id: str) -> None:
        self._files.remove(artifact_id)

    def write(self, artifact_id: str, content_body: BinaryIO) -> None:
        if not ARTIFACT_ID.fullmatch(artifact_id):
            raise ValueError(f"invalid artifact id {artifact_id!r}")
        target = self.path / artifact_id
        partial = self.path / f".{artifact_id}.partial"
        try:
            with partial.open("wb") as handle:
                shutil.copyfileobj(content_body, handle)
            partial.replace(target)
        except OSError as exc:
            partial.unlink(missing_ok=True)
            if exc.errno in NO_SPACE:  # Python's error names no file: say where
                raise OSError(exc.errno, exc.strerror, str(target)) from exc
            raise


def open_folder(settings: SweepSettings, url: str) -> ArtifactFolder:
    """The sweep's artifact store, its folder created; one that cannot be is a `UserError`."""
    folder = artifacts_dir(settings, url)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        if not os.access(folder, os.W_OK | os.X_OK):
            raise PermissionError(errno.EACCES, "permission denied")
    except OSError as exc:
        raise UserError(
            f"cannot write the artifact folder {folder} (sweep.artifacts): {exc.strerror or exc}"
        ) from None
    return ArtifactFolder(folder)


def record_folder(study: optuna.Study, folder: ArtifactFolder) -> None:
    """Remember the folder on the study, for ``tlsweep dashboard``."""
    if study.user_attrs.get(ARTIFACTS_ATTR) != str(folder.path):
        study.set_user_attr(ARTIFACTS_ATTR, str(folder.path))


def recorded_folder(study: optuna.Study) -> ArtifactFolder | None:
    """The folder the study's sweep recorded, if it still exists."""
    path = study.user_attrs.get(ARTIFACTS_ATTR)
    return ArtifactFolder(Path(path)) if path and Path(path).is_dir() else None


def upload_confusion_matrix(
    trial: optuna.Trial,
    store: ArtifactFolder,
    result: TrainResult,
    class_names: tuple[str, ...],
) -> str | None:
    """Draw the trial's confusion matrix (test split, else validation) and attach it to the
    trial as ``SPLIT_confusion_matrix.png``; returns the artifact id (None: no evaluation)."""
    from tlsweep.plots import confusion_matrix_figure

    split = next((s for s in SPLITS if s in result.evaluations), None)
    if split is None:
        return None
    title = f"trial {trial.number}, {split} set"
    figure = confusion_matrix_figure(result.evaluations[split].confusion, class_names, title)
    with tempfile.TemporaryDirectory(prefix="tlsweep-") as tmp:
        path = Path(tmp) / f"{split}_confusion_matrix.png"
        figure.savefig(path, dpi=100)
        return upload_artifact(artifact_store=store, file_path=str(path), study_or_trial=trial)
