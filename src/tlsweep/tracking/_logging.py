"""What a run records: params, per-epoch and final metrics, datasets, its config and data,
evaluation files, figures and tables. Everything is handed in by the caller."""

from __future__ import annotations

import json
import sys
import tempfile
from collections.abc import Callable, Mapping, Sequence
from importlib import metadata
from pathlib import Path
from typing import Any, Protocol

import mlflow
import numpy as np
import pandas as pd

from tlsweep import backend
from tlsweep.config import Config, flatten, to_yaml
from tlsweep.data import ImageData
from tlsweep.redaction import redact
from tlsweep.tracking._artifacts import artifact_writes, upload
from tlsweep.tracking._store import set_tags

VERSIONED_PACKAGES = ("keras", "optuna", "mlflow", "numpy", "pillow", "tlsweep")  # + backend
MAX_PARAM_LENGTH = 6000


class Evaluated(Protocol):
    """A model's evaluation on one split (``tlsweep.train.Evaluation``)."""

    @property
    def confusion(self) -> np.ndarray: ...  # rows: true class, columns: predicted class

    @property
    def report(self) -> Mapping[str, Any]: ...  # sklearn's classification_report as a dict

    @property
    def report_text(self) -> str: ...


class Trained(Protocol):
    """What `log_result` records of a training (``tlsweep.train.TrainResult``)."""

    @property
    def metrics(self) -> Mapping[str, float]: ...  # val_* and test_* of the best epoch

    @property
    def history(self) -> pd.DataFrame: ...  # one row per epoch

    @property
    def evaluations(self) -> Mapping[str, Evaluated]: ...  # split -> evaluation

    @property
    def best_epoch(self) -> int: ...


def default_run_name(cfg: Config) -> str:
    """E.g. ``resnet50-flatten-u512-do0.1-bs30``."""
    h = cfg.head
    return (
        f"{cfg.backbone.name}-{h.pooling}-u{h.dense_units}-do{h.dropout:g}-bs{cfg.train.batch_size}"
    )


def epoch_logger(run_id: str) -> Callable[[int, Mapping[str, float]], None]:
    """``log(epoch, metrics)``: an epoch's metrics (loss, accuracy, val_*, learning_rate) with
    step=epoch+1. The caller calls it every epoch (a Keras callback: ``train.EpochCallback``)."""

    def log(epoch: int, metrics: Mapping[str, float]) -> None:
        mlflow.log_metrics(dict(metrics), step=epoch + 1, run_id=run_id)

    return log


@artifact_writes
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
            "keras.backend": backend.name(),
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
        upload(run_id, Path(tmp))


def _param_value(value: Any) -> str:
    text = json.dumps(value) if isinstance(value, list | dict) else str(value)
    return text if len(text) <= MAX_PARAM_LENGTH else text[: MAX_PARAM_LENGTH - 3] + "..."


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


def package_versions() -> dict[str, str]:
    """Installed versions of the packages a run depends on, the Keras backend's included."""
    versions = {"python": sys.version.split()[0]}
    for name in (*VERSIONED_PACKAGES, *backend.PACKAGES[backend.name()]):
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions


@artifact_writes
def log_result(run_id: str, result: Trained, class_names: Sequence[str]) -> None:
    """Final metrics (``val_*`` as ``best_val_*``, ``best_epoch``, ``epochs_run``), the
    history and the evaluation artifacts of a trained model (see `write_evaluation`)."""
    final = {f"best_{k}" if k.startswith("val_") else k: v for k, v in result.metrics.items()}
    final.update(best_epoch=result.best_epoch, epochs_run=len(result.history))
    mlflow.log_metrics(final, run_id=run_id)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        result.history.to_csv(folder / "history.csv", index=False)
        (folder / "evaluation").mkdir()
        for split, evaluation in result.evaluations.items():
            write_evaluation(folder / "evaluation", split, evaluation, class_names)
        upload(run_id, folder)


def write_evaluation(
    folder: Path, split: str, evaluation: Evaluated, class_names: Sequence[str]
) -> None:
    """Confusion matrix (CSV with class names; PNG for the test split) and the report: the
    files `tlsweep.tracking.evaluation_artifacts` reads back."""
    from tlsweep.plots import confusion_matrix_figure

    table = pd.DataFrame(evaluation.confusion, index=list(class_names), columns=list(class_names))
    table.index.name = "true \\ predicted"
    table.to_csv(folder / f"{split}_confusion_matrix.csv")
    if split == "test":
        figure = confusion_matrix_figure(evaluation.confusion, class_names, f"{split} set")
        figure.savefig(folder / f"{split}_confusion_matrix.png", dpi=100)
    (folder / f"{split}_classification_report.txt").write_text(evaluation.report_text)
    (folder / f"{split}_classification_report.json").write_text(json.dumps(dict(evaluation.report)))


@artifact_writes
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


def log_trial_costs(run_id: str, costs: Mapping[str, float]) -> None:
    """A trial's measured costs (``latency_ms``, ``params``) as metrics of its run."""
    if costs:
        mlflow.log_metrics({k: float(v) for k, v in costs.items()}, run_id=run_id)


@artifact_writes
def log_table(
    run_id: str, table: pd.DataFrame, name: str, renderings: Mapping[str, str] | None = None
) -> None:
    """A table as ``NAME.csv``, and each rendering the caller made of it as ``NAME.SUFFIX``
    (``{"md": ..., "html": ...}``): a sweep's leaderboard, its Pareto front."""
    client = mlflow.MlflowClient()
    with tempfile.TemporaryDirectory() as tmp:
        csv = Path(tmp) / f"{name}.csv"
        table.to_csv(csv, index=False)
        client.log_artifact(run_id, str(csv))
    for suffix, text in (renderings or {}).items():
        client.log_text(run_id, text, f"{name}.{suffix}")


@artifact_writes
def log_report(run_id: str, page: str, name: str = "report.html") -> str:
    """Log an HTML page on the run; returns its artifact URI."""
    client = mlflow.MlflowClient()
    client.log_text(run_id, page, name)
    return f"{client.get_run(run_id).info.artifact_uri}/{name}"
