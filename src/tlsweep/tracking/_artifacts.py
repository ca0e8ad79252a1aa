"""Writing a run's files: one by one, and a full disk named where it is."""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import ParamSpec, TypeVar
from urllib.parse import urlparse
from urllib.request import url2pathname

import mlflow

from tlsweep.errors import NO_SPACE

P = ParamSpec("P")
R = TypeVar("R")


def artifact_writes(function: Callable[P, R]) -> Callable[P, R]:
    """Name the run's artifact store in a "no space left" error: MLflow's copies raise it
    naming the local file they copy from, or nothing. An error that already names a place in
    the experiment's artifact store (a logged model's, see `_upload_model`) stays as it is.
    The wrapped function's first argument is the run id."""

    @functools.wraps(function)
    def writing(*args: P.args, **kwargs: P.kwargs) -> R:
        try:
            return function(*args, **kwargs)
        except OSError as exc:
            if exc.errno not in NO_SPACE:
                raise
            if exc.filename and str(exc.filename).startswith(experiment_location(str(args[0]))):
                raise
            raise OSError(exc.errno, exc.strerror, artifact_location(str(args[0]))) from exc

    return writing


def files(folder: Path, artifact_path: str | None = None) -> Iterator[tuple[Path, str | None]]:
    """Every file under ``folder`` with the artifact folder it goes to, in a stable order."""
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        parent = path.parent.relative_to(folder).as_posix()
        where = "/".join(part for part in (artifact_path, parent) if part and part != ".")
        yield path, where or None


def upload(run_id: str, folder: Path, artifact_path: str | None = None) -> None:
    """Log every file under ``folder`` one by one: MLflow writes each file to a staging file
    and moves it into place, where ``log_artifacts`` copies a tree directly and leaves a
    half-written file behind when the disk fills."""
    client = mlflow.MlflowClient()
    for path, where in files(folder, artifact_path):
        client.log_artifact(run_id, str(path), where)


def artifact_location(run_id: str) -> str:
    """Where a run's artifacts are written: a local path for a ``file:`` store, else its URI."""
    return local_path(mlflow.MlflowClient().get_run(run_id).info.artifact_uri)


def experiment_location(run_id: str) -> str:
    """Where the artifacts of ``run_id``'s experiment (its runs' and logged models') go."""
    client = mlflow.MlflowClient()
    experiment = client.get_experiment(client.get_run(run_id).info.experiment_id)
    return local_path(experiment.artifact_location)


def local_path(uri: str) -> str:
    return url2pathname(urlparse(uri).path) if uri.startswith("file:") else uri
