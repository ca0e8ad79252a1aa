"""Everything MLflow: the one package that imports it.

Store: ``tracking.uri`` from the config, else ``$MLFLOW_TRACKING_URI``, else the SQLite file
``mlruns/mlflow.db`` (artifacts beside it, under ``mlruns/artifacts/``).

It records what its callers hand it (metrics, a trained model, its head, rendered tables) and
imports neither ``tlsweep.train``, ``tlsweep.model`` nor ``tlsweep.report``, nor Keras: MLflow's
Keras flavour loads Keras when it saves a model. Behind this face:

- ``_store``: the store, experiments, a run's life (opened, guarded, ended), outages;
- ``_artifacts``: files written one by one, a full disk named where it is;
- ``_system``: system metrics sampled by MLflow's monitor while a run works;
- ``_logging``: params, metrics, datasets, config, evaluation files, figures, tables;
- ``_models``: logged models, head weights, loading, the registry (champion, aliases);
- ``_read``: the read side of ``runs``, ``report``, ``compare`` and ``reproduce``.
"""

from __future__ import annotations

import os

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")

from tlsweep.tracking._artifacts import artifact_location
from tlsweep.tracking._logging import (
    MAX_PARAM_LENGTH,
    VERSIONED_PACKAGES,
    Evaluated,
    Trained,
    default_run_name,
    epoch_logger,
    log_datasets,
    log_figures,
    log_inputs,
    log_parent_metrics,
    log_report,
    log_result,
    log_table,
    log_trial_costs,
    package_versions,
    record_best,
)
from tlsweep.tracking._models import (
    HEAD_WEIGHTS,
    MODEL_TYPE,
    MODEL_URI_TAG,
    class_names,
    download_head_weights,
    load_model,
    log_head_weights,
    log_keras_model,
    model_requirements,
    register_aliases,
    register_champion,
)
from tlsweep.tracking._read import (
    LEADERBOARD_METRICS,
    child_runs_frame,
    evaluation_artifacts,
    metric_histories,
    run_data,
    run_record,
)
from tlsweep.tracking._store import (
    CONTINUES_RUN_TAG,
    DEFAULT_STORE_DIR,
    close_lost_run,
    connect,
    experiment_id,
    finish_run,
    guard_run,
    is_unreachable,
    open_parent_run,
    record_failure,
    running_children,
    set_tags,
    source_tags,
    start_run,
    sweep_tag,
    tracking_uri,
    unreachable_message,
)
from tlsweep.tracking._system import SYSTEM_PREFIX, monitor_system

__all__ = [
    "CONTINUES_RUN_TAG",
    "DEFAULT_STORE_DIR",
    "HEAD_WEIGHTS",
    "LEADERBOARD_METRICS",
    "MAX_PARAM_LENGTH",
    "MODEL_TYPE",
    "MODEL_URI_TAG",
    "SYSTEM_PREFIX",
    "VERSIONED_PACKAGES",
    "Evaluated",
    "Trained",
    "artifact_location",
    "child_runs_frame",
    "class_names",
    "close_lost_run",
    "connect",
    "default_run_name",
    "download_head_weights",
    "epoch_logger",
    "evaluation_artifacts",
    "experiment_id",
    "finish_run",
    "guard_run",
    "is_unreachable",
    "load_model",
    "log_datasets",
    "log_figures",
    "log_head_weights",
    "log_inputs",
    "log_keras_model",
    "log_parent_metrics",
    "log_report",
    "log_result",
    "log_table",
    "log_trial_costs",
    "metric_histories",
    "model_requirements",
    "monitor_system",
    "open_parent_run",
    "package_versions",
    "record_best",
    "record_failure",
    "register_aliases",
    "register_champion",
    "run_data",
    "run_record",
    "running_children",
    "set_tags",
    "source_tags",
    "start_run",
    "sweep_tag",
    "tracking_uri",
    "unreachable_message",
]
