"""The store, its experiments and the life of a run: opened, guarded, ended; outages told
from other errors."""

from __future__ import annotations

import functools
import os
import re
import subprocess
import traceback
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import mlflow
from mlflow.entities import RunTag

from tlsweep import interrupts
from tlsweep.config import TrackingConfig
from tlsweep.errors import find_cause
from tlsweep.redaction import redact, redact_url
from tlsweep.tracking._artifacts import artifact_writes

DEFAULT_STORE_DIR = Path("mlruns")


def tracking_uri(cfg: TrackingConfig | None = None) -> str:
    """Config, then ``$MLFLOW_TRACKING_URI``, then ``sqlite:///mlruns/mlflow.db`` (absolute)."""
    if cfg is not None and cfg.uri:
        return cfg.uri
    if env := os.environ.get("MLFLOW_TRACKING_URI"):
        return env
    return f"sqlite:///{(DEFAULT_STORE_DIR / 'mlflow.db').resolve()}"


def connect(cfg: TrackingConfig | None = None) -> str:
    """Point MLflow at the store (creating a local SQLite store's folder). Returns the URI."""
    uri = tracking_uri(cfg)
    if db := sqlite_path(uri):
        db.parent.mkdir(parents=True, exist_ok=True)
    mlflow.set_tracking_uri(uri)
    return uri


def experiment_id(name: str) -> str:
    """The id of the experiment ``name``, created (artifacts beside a SQLite store) if new."""
    client = mlflow.MlflowClient()
    experiment = client.get_experiment_by_name(name)
    if experiment is not None:
        return experiment.experiment_id
    location = None
    if db := sqlite_path(mlflow.get_tracking_uri()):
        slug = re.sub(r"[^A-Za-z0-9_.-]+", "_", name)
        location = (db.parent / "artifacts" / slug).resolve().as_uri()
    try:
        return client.create_experiment(name, artifact_location=location)
    except mlflow.exceptions.MlflowException:  # created meanwhile by another process
        return client.get_experiment_by_name(name).experiment_id


def sqlite_path(uri: str) -> Path | None:
    if not uri.startswith("sqlite:///"):
        return None
    return Path(uri.removeprefix("sqlite:///")) if uri != "sqlite:///:memory:" else None


CONTINUES_RUN_TAG = "tlsweep.continues_run"  # a promoted sweep trial: the run it continues


@contextmanager
def start_run(
    experiment: str,
    run_name: str,
    *,
    parent_run_id: str | None = None,
    tags: Mapping[str, str] | None = None,
) -> Iterator[str]:
    """An MLflow run that always ends: FINISHED, or FAILED/KILLED with its error recorded.

    Call `connect` first. A run nested under ``parent_run_id`` works whether or not the parent
    is the active run in this process (workers on other machines share one parent).
    """
    parent = {"mlflow.parentRunId": parent_run_id} if parent_run_id else {}
    run = mlflow.MlflowClient().create_run(
        experiment_id(experiment),
        run_name=run_name,
        tags={**source_tags(), **parent, **(tags or {})},
    )
    run_id = run.info.run_id
    with guard_run(run_id):
        yield run_id


@functools.cache
def source_tags() -> dict[str, str]:
    """MLflow's ``mlflow.source.*`` tags: tlsweep as the entry point and, when it runs in a git
    repository, its commit, its remote (credentials scrubbed) and whether the tree has
    uncommitted changes (``tlsweep.git.dirty``: a run that cannot be checked out exactly)."""
    tags = {"mlflow.source.type": "LOCAL", "mlflow.source.name": "tlsweep"}

    def git(*args: str) -> str | None:
        try:
            done = subprocess.run(["git", *args], capture_output=True, text=True, timeout=10)
        except (OSError, subprocess.TimeoutExpired):
            return None
        return done.stdout.strip() if done.returncode == 0 else None

    commit = git("rev-parse", "HEAD")
    if commit:
        tags["mlflow.source.git.commit"] = commit
        if remote := git("config", "--get", "remote.origin.url"):
            tags["mlflow.source.git.repoURL"] = redact(remote)
        tags["tlsweep.git.dirty"] = str(bool(git("status", "--porcelain", "--untracked-files=no")))
    return tags


@contextmanager
def guard_run(run_id: str, end: bool = True) -> Iterator[None]:
    """Record an exception on ``run_id`` and end it FAILED (KILLED on Ctrl-C), or FINISHED.
    With the tracking server unreachable the run stays open, and the original exception goes
    on: the next reconciliation closes the run (`running_children`)."""
    client = mlflow.MlflowClient()
    try:
        yield
    except BaseException as exc:
        interrupts.handled(exc)  # the run's end below must not be interrupted again
        if not is_unreachable(exc):
            _end_failed(client, run_id, exc)
        raise
    if end:
        client.set_terminated(run_id, "FINISHED")


def _end_failed(client: mlflow.MlflowClient, run_id: str, exc: BaseException) -> None:
    """End the run FAILED (KILLED on Ctrl-C) with the error recorded where it can be: a full
    artifact store loses ``error.txt``, not the end of the run; a server gone leaves the run
    to the next reconciliation."""
    try:
        record_failure(run_id, exc)
    except Exception as recording:
        if is_unreachable(recording):
            return
    status = "KILLED" if isinstance(exc, KeyboardInterrupt) else "FAILED"
    try:
        client.set_terminated(run_id, status)
    except Exception as ending:
        if not is_unreachable(ending):
            raise


def is_unreachable(exc: BaseException) -> bool:
    """Whether ``exc`` (or what it was raised from) says the tracking server could not be
    reached once MLflow's HTTP client had spent its retries (``MLFLOW_HTTP_REQUEST_MAX_RETRIES``,
    ``..._TIMEOUT``): refused or dropped connections, timeouts, retried 5xx answers. MLflow
    wraps them in a plain ``MlflowException``, raised while handling the ``requests`` error."""
    import requests

    outage = (
        requests.exceptions.ConnectionError,
        requests.exceptions.Timeout,
        requests.exceptions.RetryError,
    )
    return find_cause(exc, lambda e: isinstance(e, outage)) is not None


def unreachable_message(exc: BaseException) -> str:
    """One line for an outage: which server, and that the same command continues."""
    return (
        f"the tracking server {redact_url(tracking_uri())} is unreachable "
        f"({redact(str(exc)).splitlines()[0][:300]}); nothing is lost: run the same command "
        "again once it is back"
    )


def set_tags(run_id: str, tags: Mapping[str, Any]) -> None:
    """Set several tags on a run (one write)."""
    batch = [RunTag(key, str(value)) for key, value in tags.items()]
    mlflow.MlflowClient().log_batch(run_id, tags=batch)


@artifact_writes
def record_failure(run_id: str, exc: BaseException) -> None:
    """Tag the run with the error and keep the traceback as ``error.txt``."""
    client = mlflow.MlflowClient()
    message = redact(f"{type(exc).__name__}: {exc}")[:5000]
    client.set_tag(run_id, "error", message)
    text = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
    client.log_text(run_id, redact(text), "error.txt")


def finish_run(run_id: str, status: str = "FINISHED") -> None:
    mlflow.MlflowClient().set_terminated(run_id, status)


def open_parent_run(experiment: str, run_id: str | None, tags: Mapping[str, str]) -> str:
    """The sweep's parent run: reopened when resuming, created otherwise."""
    client = mlflow.MlflowClient()
    if run_id:
        try:
            existing = client.get_run(run_id)
        except mlflow.exceptions.MlflowException as exc:
            if is_unreachable(exc):  # not gone: a new parent run would split the sweep
                raise
            existing = None
        if existing is not None and existing.info.lifecycle_stage == "active":
            client.update_run(run_id, status="RUNNING")
            set_tags(run_id, tags)
            return run_id
    run = client.create_run(
        experiment_id(experiment), run_name=experiment, tags={**source_tags(), **tags}
    )
    client.set_tag(run.info.run_id, "tlsweep.role", "sweep")
    return run.info.run_id


def sweep_tag(experiment: str, key: str) -> str | None:
    """Tag ``key`` of the latest run carrying it in ``experiment`` (a sweep's parent run)."""
    client = mlflow.MlflowClient()
    found = client.get_experiment_by_name(experiment)
    if found is None:
        return None
    runs = client.search_runs(
        [found.experiment_id],
        filter_string=f"tags.`{key}` LIKE '%'",
        order_by=["attributes.start_time DESC"],
        max_results=1,
    )
    return runs[0].data.tags[key] if runs else None


def close_lost_run(run_id: str, reason: str) -> None:
    """End the run of a trial whose worker died: FAILED, with the reason as its error."""
    client = mlflow.MlflowClient()
    try:
        run = client.get_run(run_id)
    except mlflow.exceptions.MlflowException as exc:
        if is_unreachable(exc):
            raise
        return  # deleted: nothing to close
    set_tags(run_id, {"error": redact(reason), "tlsweep.trial_state": "FAIL"})
    if run.info.status == "RUNNING":
        client.set_terminated(run_id, "FAILED")


def running_children(parent_run_id: str) -> list[tuple[str, int | None]]:
    """The child runs of a sweep still RUNNING: (run id, trial number from its tag)."""
    client = mlflow.MlflowClient()
    parent = client.get_run(parent_run_id)
    runs = client.search_runs(
        [parent.info.experiment_id],
        filter_string=(
            f"tags.mlflow.parentRunId = '{parent_run_id}' and attributes.status = 'RUNNING'"
        ),
        max_results=50_000,
    )
    found = []
    for run in runs:
        number = run.data.tags.get("tlsweep.trial_number", "")
        found.append((run.info.run_id, int(number) if number.isdigit() else None))
    return found
