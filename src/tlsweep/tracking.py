"""Everything MLflow: the one module that imports it.

Store: ``tracking.uri`` from the config, else ``$MLFLOW_TRACKING_URI``, else the SQLite file
``mlruns/mlflow.db`` (artifacts beside it, under ``mlruns/artifacts/``).
"""

from __future__ import annotations

import functools
import json
import os
import re
import subprocess
import sys
import tempfile
import traceback
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any, ParamSpec, TypeVar
from urllib.parse import urlparse
from urllib.request import url2pathname

import numpy as np
import pandas as pd

from tlsweep import backend, interrupts
from tlsweep.config import Config, TrackingConfig, flatten, to_yaml
from tlsweep.data import ImageData
from tlsweep.errors import NO_SPACE, UserError, find_cause
from tlsweep.redaction import redact, redact_url

if TYPE_CHECKING:  # keras (and so TensorFlow) loads only when a model is touched
    import keras

    from tlsweep.train import Evaluation, TrainResult

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")

import mlflow
from mlflow.entities import RunTag
from mlflow.models import ModelSignature
from mlflow.types import Schema, TensorSpec

P = ParamSpec("P")
R = TypeVar("R")
DEFAULT_STORE_DIR = Path("mlruns")
VERSIONED_PACKAGES = ("keras", "optuna", "mlflow", "numpy", "pillow", "tlsweep")  # + backend
MAX_PARAM_LENGTH = 6000
MODEL_URI_TAG = "tlsweep.model_uri"
HEAD_WEIGHTS = "head/head.weights.h5"
LEADERBOARD_METRICS = (
    "test_accuracy",
    "test_loss",
    "test_f1_macro",
    "best_val_accuracy",
    "best_val_loss",
    "best_epoch",
    "epochs_run",
)


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
    if db := _sqlite_path(uri):
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
    if db := _sqlite_path(mlflow.get_tracking_uri()):
        slug = re.sub(r"[^A-Za-z0-9_.-]+", "_", name)
        location = (db.parent / "artifacts" / slug).resolve().as_uri()
    try:
        return client.create_experiment(name, artifact_location=location)
    except mlflow.exceptions.MlflowException:  # created meanwhile by another process
        return client.get_experiment_by_name(name).experiment_id


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


def _artifact_writes(function: Callable[P, R]) -> Callable[P, R]:
    """Name the run's artifact store in a "no space left" error: MLflow's copies raise it
    naming the local file they copy from, or nothing. The wrapped function's first argument
    is the run id."""

    @functools.wraps(function)
    def writing(*args: P.args, **kwargs: P.kwargs) -> R:
        try:
            return function(*args, **kwargs)
        except OSError as exc:
            if exc.errno not in NO_SPACE:
                raise
            where = artifact_location(str(args[0]))
            if exc.filename and str(exc.filename).startswith(where):
                raise
            raise OSError(exc.errno, exc.strerror, where) from exc

    return writing


def _upload(run_id: str, folder: Path, artifact_path: str | None = None) -> None:
    """Log every file under ``folder`` one by one: MLflow writes each file to a staging file
    and moves it into place, where ``log_artifacts`` copies a tree directly and leaves a
    half-written file behind when the disk fills."""
    client = mlflow.MlflowClient()
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        parent = path.parent.relative_to(folder).as_posix()
        where = "/".join(part for part in (artifact_path, parent) if part and part != ".")
        client.log_artifact(run_id, str(path), where or None)


def artifact_location(run_id: str) -> str:
    """Where a run's artifacts are written: a local path for a ``file:`` store, else its URI."""
    uri = mlflow.MlflowClient().get_run(run_id).info.artifact_uri
    return url2pathname(urlparse(uri).path) if uri.startswith("file:") else uri


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


@_artifact_writes
def record_failure(run_id: str, exc: BaseException) -> None:
    """Tag the run with the error and keep the traceback as ``error.txt``."""
    client = mlflow.MlflowClient()
    message = redact(f"{type(exc).__name__}: {exc}")[:5000]
    client.set_tag(run_id, "error", message)
    text = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
    client.log_text(run_id, redact(text), "error.txt")


def default_run_name(cfg: Config) -> str:
    """E.g. ``resnet50-flatten-u512-do0.1-bs30``."""
    h = cfg.head
    return (
        f"{cfg.backbone.name}-{h.pooling}-u{h.dense_units}-do{h.dropout:g}-bs{cfg.train.batch_size}"
    )


def epoch_logger(run_id: str) -> keras.callbacks.Callback:
    """A Keras callback logging every epoch's metrics (loss, accuracy, val_*, learning_rate)
    with step=epoch+1."""
    from tlsweep.train import EpochCallback

    def log(epoch: int, metrics: Mapping[str, float]) -> None:
        mlflow.log_metrics(dict(metrics), step=epoch + 1, run_id=run_id)

    return EpochCallback(log)


@_artifact_writes
def log_inputs(
    run_id: str,
    cfg: Config,
    data: ImageData,
    counts: Mapping[str, int],
    feature_cache: str = "off",
    extra: Mapping[str, Any] | None = None,
) -> None:
    """Params: the flattened config, the data actually used, model size, versions, and the
    training path (``feature_cache``: hit, miss or off)."""
    params: dict[str, Any] = flatten(cfg)
    params["feature_cache"] = feature_cache
    params.update(extra or {})
    params.update(
        {
            "data.fingerprint": data.fingerprint,
            "data.num_classes": data.num_classes,
            **{f"data.n_{split}": n for split, n in data.counts.items()},
            **{f"model.{key}": value for key, value in counts.items()},
            **{f"version.{name}": version for name, version in package_versions().items()},
            "keras.backend": _keras_backend(),
        }
    )
    mlflow.log_params({k: redact(_param_value(v)) for k, v in params.items()}, run_id=run_id)
    log_datasets(run_id, cfg, data)
    described = {
        "class_names": list(data.class_names),
        "split_fingerprints": data.split_fingerprints,
    }
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "config.yaml").write_text(redact(to_yaml(cfg)))
        (Path(tmp) / "data.json").write_text(json.dumps(described, indent=2))
        _upload(run_id, Path(tmp))


def log_datasets(run_id: str, cfg: Config, data: ImageData) -> None:
    """The splits as MLflow dataset inputs (the UI's Datasets column and filter): name, digest
    (the split's fingerprint), source, row count, and context train, val or test."""
    from mlflow.entities import Dataset, DatasetInput, InputTag

    source = {"source": cfg.data.source, "path": cfg.data.path, "classes": data.class_names}
    inputs = [
        DatasetInput(
            dataset=Dataset(
                name=cfg.data.name,
                digest=fingerprint[:36],  # MLflow's limit
                source_type="local" if cfg.data.path else cfg.data.source,
                source=redact(json.dumps(source, default=str)),
                profile=json.dumps({"num_rows": data.counts.get(split, 0)}),
            ),
            tags=[InputTag(key="mlflow.data.context", value=split)],
        )
        for split, fingerprint in sorted(data.split_fingerprints.items())
    ]
    client = mlflow.MlflowClient()
    for attempt in range(3):
        try:
            client.log_inputs(run_id, datasets=inputs)
            return
        except mlflow.exceptions.MlflowException as exc:
            # MLflow creates a dataset on first use without a lock: two runs logging the same
            # new dataset at once collide on its unique key; the loser's retry finds it made.
            if attempt == 2 or "unique" not in str(exc).lower():
                raise


@_artifact_writes
def log_result(
    run_id: str, result: TrainResult, data: ImageData, cfg: Config, stored_model: str = "full"
) -> None:
    """Final metrics, history, evaluation artifacts and the model: ``stored_model`` is "full"
    (the raw-image model), "head" (the head's weights only: small) or "none"."""
    client = mlflow.MlflowClient()
    final = {f"best_{k}" if k.startswith("val_") else k: v for k, v in result.metrics.items()}
    final.update(best_epoch=result.best_epoch, epochs_run=len(result.history))
    mlflow.log_metrics(final, run_id=run_id)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        result.history.to_csv(folder / "history.csv", index=False)
        (folder / "evaluation").mkdir()
        for split, evaluation in result.evaluations.items():
            _write_evaluation(folder / "evaluation", split, evaluation, data.class_names)
        _upload(run_id, Path(tmp))
    if stored_model == "full":
        log_keras_model(run_id, result.model, data.class_names)
    elif stored_model == "head":
        from tlsweep.model import head_of

        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / HEAD_WEIGHTS.split("/")[-1]
            head_of(result.model).save_weights(path)
            client.log_artifact(run_id, str(path), HEAD_WEIGHTS.split("/")[0])


@_artifact_writes
def log_keras_model(
    run_id: str, model: keras.Model, class_names: Sequence[str], name: str = "model"
) -> str:
    """Log the raw-image model (Keras flavour, signature, explicit pip requirements).

    The class names travel in the model's metadata; the model URI is kept as a run tag.
    """
    size = model.input_shape[1]
    classes = model.output_shape[-1]
    signature = ModelSignature(
        inputs=Schema([TensorSpec(np.dtype("float32"), (-1, size, size, 3), "image")]),
        outputs=Schema([TensorSpec(np.dtype("float32"), (-1, classes), "probabilities")]),
    )
    client = mlflow.MlflowClient()
    with tempfile.TemporaryDirectory() as tmp:
        local = Path(tmp) / name
        mlflow.keras.save_model(
            model,
            str(local),
            signature=signature,
            pip_requirements=model_requirements(),
            metadata={"class_names": list(class_names)},
        )
        _upload(run_id, local, name)
    model_uri = f"runs:/{run_id}/{name}"
    client.set_tag(run_id, MODEL_URI_TAG, model_uri)
    return model_uri


def download_head_weights(run_id: str) -> str | None:
    """Local path of the run's head weights (a temporary download), or None."""
    client = mlflow.MlflowClient()
    if not any(f.path == HEAD_WEIGHTS for f in client.list_artifacts(run_id, "head")):
        return None
    return client.download_artifacts(run_id, HEAD_WEIGHTS, tempfile.mkdtemp(prefix="tlsweep-"))


def class_names(run_id: str) -> list[str]:
    """The class names a run was trained on (its ``data.json``)."""
    return list(mlflow.artifacts.load_dict(f"runs:/{run_id}/data.json")["class_names"])


def load_model(model_uri: str) -> Any:
    """Load a logged model with ``mlflow.pyfunc``."""
    connect()
    try:
        return mlflow.pyfunc.load_model(model_uri)
    except mlflow.exceptions.MlflowException as exc:
        raise UserError(f"cannot load model {model_uri}: {str(exc).splitlines()[0]}") from None


def package_versions() -> dict[str, str]:
    """Installed versions of the packages a run depends on, the Keras backend's included."""
    versions = {"python": sys.version.split()[0]}
    for name in (*VERSIONED_PACKAGES, *backend.PACKAGES[_keras_backend()]):
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions


def model_requirements() -> list[str]:
    """Pinned pip requirements of a logged Keras model (skips MLflow's slow inference)."""
    return backend.model_requirements(package_versions())


def _keras_backend() -> str:
    import keras

    return keras.backend.backend()


# --- sweeps: the parent run, the leaderboard, the champion -------------------------------------


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


def finish_run(run_id: str, status: str = "FINISHED") -> None:
    mlflow.MlflowClient().set_terminated(run_id, status)


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


def child_runs_frame(parent_run_id: str) -> pd.DataFrame:
    """The child runs of a sweep: run id, status and final metrics."""
    client = mlflow.MlflowClient()
    parent = client.get_run(parent_run_id)
    runs = client.search_runs(
        [parent.info.experiment_id],
        filter_string=f"tags.mlflow.parentRunId = '{parent_run_id}'",
        max_results=50_000,
    )
    rows = [
        {
            "run_id": r.info.run_id,
            "run_status": r.info.status,
            **{k: v for k, v in r.data.metrics.items() if k in LEADERBOARD_METRICS},
        }
        for r in runs
    ]
    return pd.DataFrame(rows, columns=["run_id", "run_status", *LEADERBOARD_METRICS])


@_artifact_writes
def log_leaderboard(run_id: str, board: pd.DataFrame, metric: str) -> None:
    """The leaderboard as CSV, HTML and Markdown artifacts."""
    from tlsweep.report import to_html, to_markdown

    client = mlflow.MlflowClient()
    with tempfile.TemporaryDirectory() as tmp:
        csv = Path(tmp) / "leaderboard.csv"
        board.to_csv(csv, index=False)
        client.log_artifact(run_id, str(csv))
    client.log_text(run_id, to_html(board, title=f"leaderboard ({metric})"), "leaderboard.html")
    client.log_text(run_id, to_markdown(board), "leaderboard.md")


@_artifact_writes
def log_figures(run_id: str, figures: Mapping[str, Any], folder: str = "plots") -> None:
    """Matplotlib figures as PNG artifacts."""
    client = mlflow.MlflowClient()
    with tempfile.TemporaryDirectory() as tmp:
        for name, figure in figures.items():
            path = Path(tmp) / f"{name}.png"
            figure.savefig(path, dpi=100, bbox_inches="tight")
            client.log_artifact(run_id, str(path), folder)


def log_parent_metrics(run_id: str, metrics: Mapping[str, float]) -> None:
    mlflow.log_metrics({k: float(v) for k, v in metrics.items()}, run_id=run_id)


def record_best(
    run_id: str,
    trial: int,
    best_run_id: str | None,
    params: Mapping[str, Any],
    metrics: Mapping[str, float],
) -> None:
    """The best trial's number, run, params (tags: they may change on resume) and metrics."""
    tags = {
        "best.trial": trial,
        "best.run_id": best_run_id or "",
        **{f"best.{k}": v for k, v in params.items()},
    }
    set_tags(run_id, tags)
    log_parent_metrics(run_id, {"best_trial": trial, **metrics})


def register_champion(
    run_id: str,
    name: str,
    alias: str = "champion",
    description: str | None = None,
    tags: Mapping[str, Any] | None = None,
) -> str | None:
    """Register the run's full model under ``name`` and point ``alias`` at it; the version
    gets ``description`` and ``tags`` (plus the run's data fingerprint) for the registry's UI.

    Returns ``models:/NAME@ALIAS``, or None when the run holds no model.
    """
    client = mlflow.MlflowClient()
    try:
        current = client.get_model_version_by_alias(name, alias)
    except mlflow.exceptions.MlflowException:
        current = None
    if current is not None and current.run_id == run_id:
        version: str | None = current.version
    else:  # the run's existing version, if a process registered it and stopped before the alias
        version = _model_version_of_run(client, name, run_id)
        if version is None:
            return None
        client.set_registered_model_alias(name, alias, version)
    fingerprint = client.get_run(run_id).data.params.get("data.fingerprint")
    labels = {**(tags or {}), **({"data_fingerprint": fingerprint} if fingerprint else {})}
    for key, value in labels.items():
        client.set_model_version_tag(name, version, key, str(value))
    if description:
        client.update_model_version(name, version, description=description)
    return f"models:/{name}@{alias}"


def register_aliases(
    name: str, aliases: Mapping[str, str], stale_prefix: str | None = None
) -> dict[str, str]:
    """Point each alias (``pareto-1``, ``champion``...) at its run's full model under ``name``.

    ``aliases`` maps alias -> run id. A run is registered once (its existing version is
    reused, so a resumed sweep adds no duplicate versions); runs without a model get no alias.
    Aliases starting with ``stale_prefix`` that are not in ``aliases`` are removed (a front
    that shrank). Returns alias -> ``models:/NAME@ALIAS`` for the aliases set.
    """
    client = mlflow.MlflowClient()
    versions: dict[str, str | None] = {}
    uris = {}
    for alias, run_id in aliases.items():
        if run_id not in versions:
            versions[run_id] = _model_version_of_run(client, name, run_id)
        if versions[run_id] is not None:
            client.set_registered_model_alias(name, alias, versions[run_id])
            uris[alias] = f"models:/{name}@{alias}"
    if stale_prefix:
        try:
            current = client.get_registered_model(name).aliases
        except mlflow.exceptions.MlflowException:
            current = {}
        for alias in current:
            if alias.startswith(stale_prefix) and alias not in uris:
                client.delete_registered_model_alias(name, alias)
    return uris


def _model_version_of_run(client: mlflow.MlflowClient, name: str, run_id: str) -> str | None:
    model_uri = client.get_run(run_id).data.tags.get(MODEL_URI_TAG)
    if not model_uri:
        return None
    try:
        existing = client.search_model_versions(f"name = '{name}' and run_id = '{run_id}'")
    except mlflow.exceptions.MlflowException:
        existing = []
    if existing:
        return str(max(int(v.version) for v in existing))
    with _quiet_unless_verbose():  # MLflow prints "Successfully registered model ..." itself
        return str(mlflow.register_model(model_uri, name).version)


@contextmanager
def _quiet_unless_verbose() -> Iterator[None]:
    """Hide what MLflow prints (not logs) on stderr, except with ``-v``."""
    import contextlib
    import io

    from tlsweep.logs import verbosity

    if verbosity() > 0:
        yield
        return
    with contextlib.redirect_stderr(io.StringIO()):
        yield


def log_trial_costs(run_id: str, costs: Mapping[str, float]) -> None:
    """A trial's measured costs (``latency_ms``, ``params``) as metrics of its run."""
    if costs:
        mlflow.log_metrics({k: float(v) for k, v in costs.items()}, run_id=run_id)


@_artifact_writes
def log_table(run_id: str, table: pd.DataFrame, name: str) -> None:
    """A table as ``NAME.csv`` and ``NAME.md`` artifacts (e.g. a sweep's Pareto front)."""
    from tlsweep.report import to_markdown

    client = mlflow.MlflowClient()
    with tempfile.TemporaryDirectory() as tmp:
        csv = Path(tmp) / f"{name}.csv"
        table.to_csv(csv, index=False)
        client.log_artifact(run_id, str(csv))
    client.log_text(run_id, to_markdown(table), f"{name}.md")


def run_record(run_id: str) -> dict[str, Any]:
    """A run's params, metrics, tags, status and logged config (for reproduce and compare)."""
    client = mlflow.MlflowClient()
    try:
        run = client.get_run(run_id)
    except mlflow.exceptions.MlflowException:
        raise UserError(
            f"no MLflow run {run_id} in {redact_url(mlflow.get_tracking_uri())}"
        ) from None
    with tempfile.TemporaryDirectory() as tmp:
        try:
            config = Path(client.download_artifacts(run_id, "config.yaml", tmp)).read_text()
        except Exception:
            raise UserError(f"run {run_id} has no config.yaml artifact to rebuild from") from None
    return {
        "params": dict(run.data.params),
        "metrics": dict(run.data.metrics),
        "tags": dict(run.data.tags),
        "status": run.info.status,
        "run_name": run.info.run_name,
        "experiment": client.get_experiment(run.info.experiment_id).name,
        "config_yaml": config,
    }


def _write_evaluation(
    folder: Path, split: str, evaluation: Evaluation, class_names: tuple[str, ...]
) -> None:
    """Confusion matrix (CSV with class names; PNG for the test split) and the report."""
    from tlsweep.plots import confusion_matrix_figure

    table = pd.DataFrame(evaluation.confusion, index=list(class_names), columns=list(class_names))
    table.index.name = "true \\ predicted"
    table.to_csv(folder / f"{split}_confusion_matrix.csv")
    if split == "test":
        figure = confusion_matrix_figure(evaluation.confusion, class_names, f"{split} set")
        figure.savefig(folder / f"{split}_confusion_matrix.png", dpi=100)
    (folder / f"{split}_classification_report.txt").write_text(evaluation.report_text)
    (folder / f"{split}_classification_report.json").write_text(json.dumps(evaluation.report))


def _sqlite_path(uri: str) -> Path | None:
    if not uri.startswith("sqlite:///"):
        return None
    return Path(uri.removeprefix("sqlite:///")) if uri != "sqlite:///:memory:" else None


def _param_value(value: Any) -> str:
    text = json.dumps(value) if isinstance(value, list | dict) else str(value)
    return text if len(text) <= MAX_PARAM_LENGTH else text[: MAX_PARAM_LENGTH - 3] + "..."


# --- reports and comparisons: the read side (tlsweep report, tlsweep compare) ------------------


def run_data(run_id: str) -> dict[str, Any]:
    """A run's name, status, experiment, params, final metrics and tags (any run, no config
    needed). An unknown id is a `UserError`; a SQLite store that does not exist is not created."""
    uri = mlflow.get_tracking_uri()
    if (db := _sqlite_path(uri)) and not db.exists():
        raise UserError(f"no MLflow run {run_id} in {redact_url(uri)} (no such store yet)")
    client = mlflow.MlflowClient()
    try:
        run = client.get_run(run_id)
    except mlflow.exceptions.MlflowException:
        raise UserError(f"no MLflow run {run_id} in {redact_url(uri)}") from None
    return {
        "run_id": run.info.run_id,
        "run_name": run.info.run_name,
        "status": run.info.status,
        "experiment": client.get_experiment(run.info.experiment_id).name,
        "params": dict(run.data.params),
        "metrics": dict(run.data.metrics),
        "tags": dict(run.data.tags),
    }


def metric_histories(run_ids: Sequence[str], keys: Sequence[str]) -> pd.DataFrame:
    """Per-epoch values (step = epoch) of ``keys`` for each run: run_id, metric, step, value;
    runs in the order given."""
    client = mlflow.MlflowClient()
    rows = [
        {"run_id": run_id, "metric": key, "step": m.step, "value": m.value}
        for run_id in run_ids
        for key in keys
        for m in client.get_metric_history(run_id, key)
    ]
    frame = pd.DataFrame(rows, columns=["run_id", "metric", "step", "value"])
    order = {run_id: i for i, run_id in enumerate(run_ids)}
    frame = frame.sort_values(
        ["run_id", "metric", "step"],
        key=lambda column: column.map(order) if column.name == "run_id" else column,
        kind="stable",
    )
    return frame.reset_index(drop=True)


def evaluation_artifacts(run_id: str, splits: Sequence[str] = ("test", "val")) -> dict[str, Any]:
    """The first split in ``splits`` the run evaluated (see `_write_evaluation`): ``split``,
    ``confusion`` (a DataFrame, class names on both axes), ``png`` (the logged figure's bytes,
    or None) and ``report`` (the classification report dict, or None). Empty when none."""
    client = mlflow.MlflowClient()
    logged = {Path(f.path).name for f in client.list_artifacts(run_id, "evaluation")}
    for split in splits:
        if f"{split}_confusion_matrix.csv" not in logged:
            continue
        with tempfile.TemporaryDirectory() as tmp:
            folder = Path(client.download_artifacts(run_id, "evaluation", tmp))
            confusion = pd.read_csv(folder / f"{split}_confusion_matrix.csv", index_col=0)
            confusion.columns = [str(c) for c in confusion.columns]
            confusion.index = [str(i) for i in confusion.index]
            png = folder / f"{split}_confusion_matrix.png"
            report = folder / f"{split}_classification_report.json"
            return {
                "split": split,
                "confusion": confusion,
                "png": png.read_bytes() if png.exists() else None,
                "report": json.loads(report.read_text()) if report.exists() else None,
            }
    return {}


@_artifact_writes
def log_report(run_id: str, page: str, name: str = "report.html") -> str:
    """Log an HTML page on the run; returns its artifact URI."""
    client = mlflow.MlflowClient()
    client.log_text(run_id, page, name)
    return f"{client.get_run(run_id).info.artifact_uri}/{name}"
