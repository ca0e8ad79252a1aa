"""Shared fixtures: offline, tiny configs composed with Hydra, a fresh MLflow store per test."""

from __future__ import annotations

import os

os.environ.setdefault("KERAS_BACKEND", "tensorflow")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ["MLFLOW_DISABLE_TELEMETRY"] = "true"

from collections.abc import Callable, Sequence
from pathlib import Path

import pytest

from tlsweep.config import Config, load_config

# Small and offline: random weights, 32x32 digits, a narrow MobileNetV2, one epoch.
TINY = (
    "data=digits",
    "backbone=mobilenet_v2",
    "backbone.weights=null",
    "backbone.input_size=32",
    "+backbone.options.alpha=0.35",
    "head.dense_units=16",
    "train.epochs=1",
    "train.batch_size=64",
)


@pytest.fixture(autouse=True)
def _isolated_store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Every test gets its own working directory and SQLite tracking store."""
    monkeypatch.chdir(tmp_path)
    uri = f"sqlite:///{tmp_path / 'mlruns' / 'mlflow.db'}"
    (tmp_path / "mlruns").mkdir()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    return tmp_path


@pytest.fixture
def make_config() -> Callable[..., Config]:
    """``make_config("head.dropout=0.1")``: the tiny config plus overrides, validated."""

    def make(*overrides: str, base: Sequence[str] = TINY) -> Config:
        return load_config([*base, *overrides])

    return make
