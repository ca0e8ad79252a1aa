"""Everything MLflow: the one module that imports it.

Store: ``tracking.uri`` from the config, else ``$MLFLOW_TRACKING_URI``, else the SQLite file
``mlruns/mlflow.db`` (artifacts beside it, under ``mlruns/artifacts/``).
"""

from __future__ import annotations

import json
import os
import re
import sys
import tempfile
import traceback
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from importlib import metadata
from pathlib import Path
from typing import Any

import keras
import numpy as np

from tlsweep.config import Config, TrackingConfig, flatten, to_yaml
from tlsweep.data import ImageData
from tlsweep.errors import UserError
from tlsweep.train import Evaluation, TrainResult

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

import mlflow
from mlflow.models import ModelSignature
from mlflow.types import Schema, TensorSpec

DEFAULT_STORE_DIR = Path("mlruns")
VERSIONED_PACKAGES = ("tensorflow", "keras", "optuna", "mlflow", "numpy", "tlsweep")
MAX_PARAM_LENGTH = 6000


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
    cfg: Config,
    *,
    run_name: str | None = None,
    parent_run_id: str | None = None,
    tags: Mapping[str, str] | None = None,
) -> Iterator[str]:
    """An MLflow run that always ends: FINISHED, or FAILED/KILLED with its error recorded."""
    connect(cfg.tracking)
    run = mlflow.start_run(
        experiment_id=experiment_id(cfg.tracking.experiment),
        run_name=run_name or cfg.tracking.run_name or default_run_name(cfg),
        parent_run_id=parent_run_id,
        nested=parent_run_id is not None,
        tags=dict(tags or {}),
    )
    run_id = run.info.run_id
    try:
        yield run_id
    except BaseException as exc:
        status = "KILLED" if isinstance(exc, KeyboardInterrupt) else "FAILED"
        record_failure(run_id, exc)
        mlflow.end_run(status)
        raise
    else:
        mlflow.end_run("FINISHED")


def record_failure(run_id: str, exc: BaseException) -> None:
    """Tag the run with the error and keep the traceback as ``error.txt``."""
    client = mlflow.MlflowClient()
    message = f"{type(exc).__name__}: {exc}"[:5000]
    client.set_tag(run_id, "error", message)
    text = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
    client.log_text(run_id, text, "error.txt")


def default_run_name(cfg: Config) -> str:
    """E.g. ``resnet50-flatten-u512-do0.1-bs30``."""
    h = cfg.head
    return (
        f"{cfg.backbone.name}-{h.pooling}-u{h.dense_units}-do{h.dropout:g}-bs{cfg.train.batch_size}"
    )


class EpochLogger(keras.callbacks.Callback):
    """Logs every epoch's metrics (loss, accuracy, val_*, learning_rate) with step=epoch."""

    def __init__(self, run_id: str) -> None:
        super().__init__()
        self.run_id = run_id

    def on_epoch_end(self, epoch: int, logs: Mapping[str, Any] | None = None) -> None:
        metrics = {k: float(v) for k, v in (logs or {}).items() if np.isscalar(v)}
        mlflow.log_metrics(metrics, step=epoch + 1, run_id=self.run_id)


def log_inputs(run_id: str, cfg: Config, data: ImageData, counts: Mapping[str, int]) -> None:
    """Params: the flattened config, the data actually used, model size and versions."""
    params: dict[str, Any] = flatten(cfg)
    params.update(
        {
            "data.fingerprint": data.fingerprint,
            "data.num_classes": data.num_classes,
            **{f"data.n_{split}": n for split, n in data.counts.items()},
            **{f"model.{key}": value for key, value in counts.items()},
            **{f"version.{name}": version for name, version in package_versions().items()},
            "keras.backend": keras.backend.backend(),
        }
    )
    mlflow.log_params({k: _param_value(v) for k, v in params.items()}, run_id=run_id)
    client = mlflow.MlflowClient()
    client.log_text(run_id, to_yaml(cfg), "config.yaml")
    client.log_dict(
        run_id,
        {"class_names": list(data.class_names), "split_fingerprints": data.split_fingerprints},
        "data.json",
    )


def log_result(run_id: str, result: TrainResult, data: ImageData, cfg: Config) -> None:
    """Final metrics, history, evaluation artifacts and (if configured) the model."""
    client = mlflow.MlflowClient()
    final = {f"best_{k}" if k.startswith("val_") else k: v for k, v in result.metrics.items()}
    final.update(best_epoch=result.best_epoch, epochs_run=len(result.history))
    mlflow.log_metrics(final, run_id=run_id)
    with tempfile.TemporaryDirectory() as tmp:
        history_csv = Path(tmp) / "history.csv"
        result.history.to_csv(history_csv, index=False)
        client.log_artifact(run_id, str(history_csv))
        for split, evaluation in result.evaluations.items():
            _log_evaluation(client, run_id, split, evaluation, data.class_names, Path(tmp))
    if cfg.tracking.log_model:
        log_model(run_id, result.model)


def log_model(run_id: str, model: keras.Model, name: str = "model") -> str:
    """Log the raw-image model (Keras flavour, signature, explicit pip requirements)."""
    size = model.input_shape[1]
    classes = model.output_shape[-1]
    signature = ModelSignature(
        inputs=Schema([TensorSpec(np.dtype("float32"), (-1, size, size, 3), "image")]),
        outputs=Schema([TensorSpec(np.dtype("float32"), (-1, classes), "probabilities")]),
    )
    with _active(run_id):
        info = mlflow.keras.log_model(
            model, name=name, signature=signature, pip_requirements=model_requirements()
        )
    return info.model_uri


def load_model(model_uri: str) -> Any:
    """Load a logged model with ``mlflow.pyfunc``."""
    connect()
    try:
        return mlflow.pyfunc.load_model(model_uri)
    except mlflow.exceptions.MlflowException as exc:
        raise UserError(f"cannot load model {model_uri}: {str(exc).splitlines()[0]}") from None


def package_versions() -> dict[str, str]:
    """Installed versions of the packages a run depends on."""
    versions = {"python": sys.version.split()[0]}
    for name in VERSIONED_PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions


def model_requirements() -> list[str]:
    """Pinned pip requirements of a logged Keras model (skips MLflow's slow inference)."""
    backend = keras.backend.backend()
    backend_package = {"tensorflow": "tensorflow", "jax": "jax", "torch": "torch"}[backend]
    return [
        f"keras=={metadata.version('keras')}",
        f"{backend_package}=={metadata.version(backend_package)}",
        f"numpy=={metadata.version('numpy')}",
    ]


def _log_evaluation(
    client: mlflow.MlflowClient,
    run_id: str,
    split: str,
    evaluation: Evaluation,
    class_names: tuple[str, ...],
    tmp: Path,
) -> None:
    import pandas as pd

    from tlsweep.plots import confusion_matrix_figure

    table = pd.DataFrame(evaluation.confusion, index=list(class_names), columns=list(class_names))
    table.index.name = "true \\ predicted"
    csv = tmp / f"{split}_confusion_matrix.csv"
    table.to_csv(csv)
    png = tmp / f"{split}_confusion_matrix.png"
    confusion_matrix_figure(evaluation.confusion, class_names, f"{split} set").savefig(png, dpi=100)
    for path in (csv, png):
        client.log_artifact(run_id, str(path), "evaluation")
    client.log_text(run_id, evaluation.report_text, f"evaluation/{split}_classification_report.txt")
    client.log_dict(run_id, evaluation.report, f"evaluation/{split}_classification_report.json")


@contextmanager
def _active(run_id: str) -> Iterator[None]:
    """Make ``run_id`` the active run for fluent-only APIs, restoring whatever was active."""
    active = mlflow.active_run()
    if active is not None and active.info.run_id == run_id:
        yield
        return
    with mlflow.start_run(run_id=run_id, nested=active is not None):
        yield


def _sqlite_path(uri: str) -> Path | None:
    if not uri.startswith("sqlite:///"):
        return None
    return Path(uri.removeprefix("sqlite:///")) if uri != "sqlite:///:memory:" else None


def _param_value(value: Any) -> str:
    text = json.dumps(value) if isinstance(value, list | dict) else str(value)
    return text if len(text) <= MAX_PARAM_LENGTH else text[: MAX_PARAM_LENGTH - 3] + "..."
