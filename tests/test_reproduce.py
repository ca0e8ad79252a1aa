"""Reproduce a logged run: retrain from its record, compare metrics, warn about differences."""

from __future__ import annotations

import math
import os
from pathlib import Path

import mlflow
import pandas as pd
import pytest

from tlsweep.config import Config, load_config, to_yaml
from tlsweep.errors import UserError
from tlsweep.reproduce import (
    COMPARED,
    Reproduction,
    compare_metrics,
    config_of,
    differences,
    reproduce,
)


def record(**changes) -> dict:
    base = {
        "params": {
            "data.fingerprint": "abc123",
            "version.keras": "3.4.1",
            "version.tensorflow": "2.17.0",
            "version.python": "3.11.9",
            "keras.backend": "tensorflow",
            "head.dropout": "0.3",
        },
        "metrics": {"test_accuracy": 0.9},
        "tags": {},
        "status": "FINISHED",
        "run_name": "trial-3",
        "experiment": "quickstart",
        "config_yaml": to_yaml(Config()),
    }
    for key, value in changes.items():
        if isinstance(value, dict):
            base[key] = {**base[key], **value}
        else:
            base[key] = value
    return base


# --- differences ---------------------------------------------------------------------------------


def test_identical_records_have_no_warnings() -> None:
    assert differences(record(), record()) == []


def test_data_fingerprint_difference_is_reported() -> None:
    notes = differences(record(), record(params={"data.fingerprint": "def456"}))
    assert len(notes) == 1
    assert "data fingerprint differs" in notes[0]
    assert "abc123" in notes[0] and "def456" in notes[0]


def test_version_differences_are_reported() -> None:
    again = record(params={"version.keras": "3.5.0", "keras.backend": "jax"})
    notes = differences(record(), again)
    assert "version.keras differs: 3.4.1 -> 3.5.0" in notes
    assert "keras.backend differs: tensorflow -> jax" in notes
    assert len(notes) == 2
    missing = record()
    del missing["params"]["version.tensorflow"]
    assert differences(record(), missing) == ["version.tensorflow differs: 2.17.0 -> None"]


def test_unrelated_param_differences_are_not_warnings() -> None:
    assert differences(record(), record(params={"head.dropout": "0.5"})) == []


def test_pruned_or_unfinished_originals_are_noted() -> None:
    pruned = record(tags={"tlsweep.trial_state": "PRUNED"})
    assert any("pruned" in note for note in differences(pruned, record()))
    failed = record(status="FAILED")
    assert differences(failed, record()) == ["the original run is FAILED"]


# --- comparing metrics ---------------------------------------------------------------------------


def test_compare_metrics_side_by_side() -> None:
    original = {"best_val_accuracy": 0.8, "test_accuracy": 0.75, "best_epoch": 3, "other": 1.0}
    again = {"best_val_accuracy": 0.8, "test_accuracy": 0.70, "best_epoch": 3}
    table = compare_metrics(original, again)
    assert table["metric"].tolist() == ["best_val_accuracy", "test_accuracy", "best_epoch"]
    assert table["abs_diff"].tolist() == pytest.approx([0.0, 0.05, 0.0])
    assert set(table["metric"]) <= set(COMPARED)


def test_matches_needs_every_metric_within_tolerance() -> None:
    table = compare_metrics({"test_accuracy": 0.75}, {"test_accuracy": 0.70})
    assert not Reproduction("a", "b", table, tolerance=0.0).matches
    assert Reproduction("a", "b", table, tolerance=0.06).matches
    missing = compare_metrics({"test_accuracy": 0.75, "test_loss": 0.5}, {"test_accuracy": 0.75})
    assert math.isnan(missing["abs_diff"].iloc[1])
    assert not Reproduction("a", "b", missing, tolerance=1.0).matches  # a missing metric fails


def test_config_of_keeps_the_config_and_logs_beside_the_original() -> None:
    cfg = load_config(["head.dropout=0.1", "tracking.uri=sqlite:////elsewhere/mlflow.db"])
    cfg_record = record(config_yaml=to_yaml(cfg))
    rebuilt = config_of(cfg_record)
    assert rebuilt.head.dropout == 0.1
    assert rebuilt.tracking.experiment == "quickstart"
    assert rebuilt.tracking.run_name == "reproduce-trial-3"
    assert rebuilt.tracking.uri is None  # never a logged URI


def test_unknown_run_is_a_user_error() -> None:
    with pytest.raises(UserError, match="no MLflow run 0123456789abcdef"):
        reproduce("0123456789abcdef")


def test_run_without_config_is_a_user_error() -> None:
    client = mlflow.MlflowClient(tracking_uri=os.environ["MLFLOW_TRACKING_URI"])
    run = client.create_run(client.create_experiment("bare"))
    client.set_terminated(run.info.run_id)
    with pytest.raises(UserError, match=r"no config\.yaml"):
        reproduce(run.info.run_id)


# --- an actual reproduction ----------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.backend  # determinism, per backend: the same config twice, identical metrics
def test_reproduce_matches_exactly(tmp_path: Path) -> None:
    from tlsweep.experiment import run

    cfg = load_config(
        [
            "data=digits",
            "data.classes=[0,1,2]",
            "data.train_limit=120",
            "data.test_limit=60",
            "backbone=resnet50",  # random ResNet50 features separate digits: the head learns
            "backbone.weights=null",
            "backbone.input_size=32",
            "head.dense_units=64",
            "optimizer.learning_rate=0.0003",
            "train.epochs=2",
            "tracking.experiment=repro",
            "tracking.log_model=false",
            f"cache.dir={tmp_path / 'features'}",
        ]
    )
    original = run(cfg)
    result = reproduce(original.run_id)

    client = mlflow.MlflowClient(tracking_uri=os.environ["MLFLOW_TRACKING_URI"])
    history = client.get_metric_history(original.run_id, "val_loss")
    assert len({m.value for m in history}) == 2  # it trained: the comparison is not vacuous

    assert result.original_run_id == original.run_id
    assert result.run_id != original.run_id
    assert result.matches
    assert sorted(result.table["metric"]) == sorted(COMPARED)
    assert (result.table["abs_diff"] == 0.0).all()
    assert result.warnings == []

    first, again = client.get_run(original.run_id), client.get_run(result.run_id)
    assert again.data.tags["tlsweep.reproduces"] == original.run_id
    assert again.info.experiment_id == first.info.experiment_id
    assert again.info.run_name == f"reproduce-{first.info.run_name}"
    assert again.info.status == "FINISHED"
    # The original computed the features, the reproduction read them back: same numbers.
    assert first.data.params["feature_cache"] == "miss"
    assert again.data.params["feature_cache"] == "hit"
    ignored = {"tracking.run_name", "feature_cache"}
    assert {k: v for k, v in again.data.params.items() if k not in ignored} == {
        k: v for k, v in first.data.params.items() if k not in ignored
    }
    table = pd.DataFrame(result.table)
    assert table.loc[table["metric"] == "test_accuracy", "original"].item() == pytest.approx(
        original.metrics["test_accuracy"]
    )
