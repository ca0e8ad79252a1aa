"""One tracked training run: config -> data -> model -> train -> MLflow.

Everything that can be refused (config values, data, weights) is checked before the MLflow
run starts, so bad input never leaves a run behind; anything failing later ends the run as
FAILED with its error recorded.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import keras

from tlsweep import tracking
from tlsweep.config import Config
from tlsweep.data import load_data
from tlsweep.model import build_classifier, parameter_counts
from tlsweep.train import TrainResult, configure_devices, seed_everything, train


@dataclass(frozen=True)
class RunResult:
    run_id: str
    metrics: dict[str, float]
    train_result: TrainResult


def run(
    cfg: Config,
    *,
    callbacks: Sequence[keras.callbacks.Callback] = (),
    parent_run_id: str | None = None,
    tags: Mapping[str, str] | None = None,
) -> RunResult:
    """Train ``cfg`` and record it in MLflow; returns the run id and final metrics."""
    seed_everything(cfg.seed, cfg.train.deterministic)
    device = configure_devices(cfg.train.mixed_precision)
    data = load_data(cfg.data, cfg.backbone.input_size)
    model = build_classifier(cfg.backbone, cfg.head, data.num_classes)
    run_tags = {"device": device, **(tags or {})}
    with tracking.start_run(cfg, parent_run_id=parent_run_id, tags=run_tags) as run_id:
        tracking.log_inputs(run_id, cfg, data, parameter_counts(model))
        result = train(cfg, data, model, [tracking.EpochLogger(run_id), *callbacks])
        tracking.log_result(run_id, result, data, cfg)
    return RunResult(run_id=run_id, metrics=result.metrics, train_result=result)
