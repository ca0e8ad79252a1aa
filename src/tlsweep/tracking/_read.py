"""The read side, for ``tlsweep runs``, ``report``, ``compare`` and ``reproduce``: a run's
record, metric histories, evaluation files, a sweep's child runs."""

from __future__ import annotations

import json
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import mlflow
import pandas as pd

from tlsweep.errors import UserError
from tlsweep.redaction import redact_url
from tlsweep.tracking._store import sqlite_path

LEADERBOARD_METRICS = (
    "test_accuracy",
    "test_loss",
    "test_f1_macro",
    "best_val_accuracy",
    "best_val_loss",
    "best_epoch",
    "epochs_run",
)


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


def run_data(run_id: str) -> dict[str, Any]:
    """A run's name, status, experiment, params, final metrics and tags (any run, no config
    needed). An unknown id is a `UserError`; a SQLite store that does not exist is not created."""
    uri = mlflow.get_tracking_uri()
    if (db := sqlite_path(uri)) and not db.exists():
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
    """The first split in ``splits`` the run evaluated (see `write_evaluation`): ``split``,
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
