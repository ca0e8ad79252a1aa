"""One tracked training run: config -> data -> model -> train -> MLflow.

``run`` is the single-run entry point: everything that can be refused (config values, data,
weights) is checked in ``prepare`` before the MLflow run starts, so bad input never leaves a
run behind; anything failing later ends the run as FAILED with its error recorded. A sweep
trial instead opens its child run first and calls ``prepare`` and ``execute`` inside it.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import keras
import yaml

from tlsweep import tracking
from tlsweep.backbones import BackboneCache
from tlsweep.backend import clear_state, configure_devices, seed_everything
from tlsweep.config import Config, to_config
from tlsweep.data import ImageData, load_run_data
from tlsweep.features import Features, cached_features
from tlsweep.grouped import Outcome, train_group
from tlsweep.model import build_classifier, build_trunk, head_of, parameter_counts
from tlsweep.train import (
    EpochCallback,
    TrainResult,
    train,
    training_path,
    uses_feature_cache,
)

DataLoader = Callable[[Config], ImageData]
ModelPolicy = bool | Callable[[TrainResult], bool] | None
WEIGHTS_DIGEST_PARAM = "backbone.weights_sha256"
TRAIN_PATH_PARAM = "train.path"  # cached_features | end_to_end (the head stage's path)


@dataclass(frozen=True)
class Prepared:
    """Data and an untrained model, ready for `execute`."""

    data: ImageData
    model: keras.Model
    device: str
    backbone_digest: str  # content hash of the backbone's weights (part of the cache key)


@dataclass(frozen=True)
class RunResult:
    run_id: str
    metrics: dict[str, float]
    train_result: TrainResult


def prepare(
    cfg: Config,
    load: DataLoader = load_run_data,
    backbones: BackboneCache | None = None,
    fresh: bool = True,
) -> Prepared:
    """Fresh Keras state, seeds, devices, data and the model: the same sequence every time, so
    that a run repeats exactly, whether its backbone is built anew or reused from ``backbones``
    (the seed is set again before the rest of the model is built).

    Garbage is collected only when a backbone is about to be built: a trial that reuses one
    leaves little behind (a head, an optimizer), and a full collection among TensorFlow's
    objects costs about half a second. ``fresh=False`` keeps the Keras state (the other
    members of a group of heads, built after the first: `prepare_group`)."""
    reusing = backbones is not None and backbones.holds(cfg.backbone, cfg.seed)
    if fresh:
        clear_state(free_memory=not reusing)
    seed_everything(cfg.seed, cfg.train.deterministic)
    device = configure_devices(cfg.train.mixed_precision)
    data = load(cfg)
    backbones = backbones or BackboneCache(capacity=0)
    backbone, digest = backbones.get(cfg.backbone, cfg.seed)
    trunk = backbones.derived(
        cfg.backbone,
        cfg.seed,
        f"trunk:{cfg.head.pooling}",
        lambda: build_trunk(cfg.backbone, cfg.head.pooling, backbone),
    )
    seed_everything(cfg.seed, cfg.train.deterministic)
    model = build_classifier(cfg.backbone, cfg.head, data.num_classes, trunk=trunk)
    return Prepared(data=data, model=model, device=device, backbone_digest=digest)


def execute(
    run_id: str,
    cfg: Config,
    prepared: Prepared,
    callbacks: Sequence[keras.callbacks.Callback] = (),
    log_model: ModelPolicy = None,
    head_epochs: int | None = None,
) -> TrainResult:
    """Train a prepared model inside the run ``run_id`` and record everything, the machine's
    use too (``tracking.system_metrics``). ``head_epochs``: the model's head was trained
    that many epochs already (see `tlsweep.train.train`).

    ``log_model``: None follows ``tracking.log_model``; a callable decides from the result.
    When the backbone stayed frozen, a sweep's best-so-far trial stores only its head's weights:
    `materialize_model` assembles the full model when it is needed.
    """
    with tracking.monitor_system(run_id, enabled=cfg.tracking.system_metrics):
        data, model = prepared.data, prepared.model
        head_stage = head_epochs is None or not cfg.train.fine_tune.epochs
        features = (  # an augmenting run trains end to end: feature_cache=off
            cached_features(cfg, model, data, weights_sha256=prepared.backbone_digest)
            if uses_feature_cache(cfg) and head_stage
            else None
        )
        _log_inputs(run_id, cfg, prepared, features)
        logger = EpochCallback(tracking.epoch_logger(run_id))
        result = train(cfg, data, model, [logger, *callbacks], features, head_epochs)
        tracking.log_result(run_id, result, data.class_names)
        _log_model(run_id, result, data.class_names, _stored_model(cfg, result, log_model))
    return result


def prepare_group(
    cfgs: Sequence[Config], load: DataLoader = load_run_data, backbones: BackboneCache | None = None
) -> list[Prepared]:
    """`prepare` for each config of a group of heads (`tlsweep.grouped`): the Keras state is
    cleared once, then each model is built after seeding, exactly as a lone trial builds its
    own, on the trunk they share (``backbones``)."""
    backbones = backbones or BackboneCache()
    return [prepare(cfg, load, backbones, fresh=index == 0) for index, cfg in enumerate(cfgs)]


def execute_group(
    run_ids: Sequence[str],
    cfgs: Sequence[Config],
    prepared: Sequence[Prepared],
    callbacks: Sequence[Sequence[keras.callbacks.Callback]],
    log_model: Sequence[ModelPolicy],
) -> list[Outcome]:
    """`execute` for a group of head-only runs on the same cached features (`group_key`):
    the heads train as one model (`train_group`), each recorded in its own run as `execute`
    records a lone one. One outcome per run: its `TrainResult`, or the exception that failed
    it alone (a NaN loss, an error in one of its callbacks or while logging it); an interrupt
    or an outage stops the whole group and is raised."""
    first, data = cfgs[0], prepared[0].data
    with contextlib.ExitStack() as monitors:
        for run_id, cfg in zip(run_ids, cfgs, strict=True):
            monitors.enter_context(
                tracking.monitor_system(run_id, enabled=cfg.tracking.system_metrics)
            )
        features = cached_features(
            first, prepared[0].model, data, weights_sha256=prepared[0].backbone_digest
        )
        for run_id, cfg, one in zip(run_ids, cfgs, prepared, strict=True):
            _log_inputs(run_id, cfg, one, features)
        own = [
            [EpochCallback(tracking.epoch_logger(run_id)), *extra]
            for run_id, extra in zip(run_ids, callbacks, strict=True)
        ]
        outcomes = train_group(cfgs, data, [p.model for p in prepared], features, own)
        return [
            _record_outcome(run_id, cfg, outcome, data.class_names, policy)
            for run_id, cfg, outcome, policy in zip(run_ids, cfgs, outcomes, log_model, strict=True)
        ]


def _record_outcome(
    run_id: str, cfg: Config, outcome: Outcome, class_names: Sequence[str], policy: ModelPolicy
) -> Outcome:
    """Log one head's result as `execute` logs a lone run's; a failure to log it is that
    head's outcome (an outage is everyone's: raised)."""
    if isinstance(outcome, Exception):
        return outcome
    try:
        tracking.log_result(run_id, outcome, class_names)
        _log_model(run_id, outcome, class_names, _stored_model(cfg, outcome, policy))
    except Exception as exc:
        if tracking.is_unreachable(exc):
            raise
        return exc
    return outcome


def _log_inputs(run_id: str, cfg: Config, prepared: Prepared, features: Features | None) -> None:
    tracking.set_tags(run_id, {"device": prepared.device})
    tracking.log_inputs(
        run_id,
        cfg,
        prepared.data,
        parameter_counts(prepared.model),
        feature_cache=features.status if features else "off",
        extra={
            WEIGHTS_DIGEST_PARAM: prepared.backbone_digest,
            TRAIN_PATH_PARAM: training_path(features),
        },
    )


def _stored_model(cfg: Config, result: TrainResult, log_model: ModelPolicy) -> str:
    """What the run stores: "full" (the raw-image model), "head" (its weights only) or "none".
    A sweep's predicate (callable) picks best-so-far trials: their head suffices unless the
    backbone was fine-tuned. None or a bool: the whole model or nothing."""
    keep_model = log_model(result) if callable(log_model) else log_model
    if keep_model is None:
        return "full" if cfg.tracking.log_model else "none"
    if keep_model:
        return "full" if result.backbone_changed or not callable(log_model) else "head"
    return "none"


def _log_model(run_id: str, result: TrainResult, class_names: Sequence[str], stored: str) -> None:
    if stored == "full":
        tracking.log_keras_model(run_id, result.model, class_names)
    elif stored == "head":
        tracking.log_head_weights(run_id, head_of(result.model))


def materialize_model(
    run_id: str, backbones: BackboneCache | None = None, cfg: Config | None = None
) -> str | None:
    """The URI of ``run_id``'s full raw-image model, logging it first if the run stored only
    its head: the backbone is rebuilt, checked against the weight hash the run recorded, and
    joined with the head's trained weights. None: the run has neither.

    ``cfg``: the config the run trained, as the caller composed it (a sweep's summary). None
    reads back the config the run logged; a config can name code to import (a custom
    backbone's ``_target_``), so only do that for stores you trust."""
    record = tracking.run_record(run_id)
    if uri := record["tags"].get(tracking.MODEL_URI_TAG):
        return uri
    head_weights = tracking.download_head_weights(run_id)
    if head_weights is None:
        return None
    cfg = cfg or to_config(yaml.safe_load(record["config_yaml"]))
    clear_state()
    seed_everything(cfg.seed, cfg.train.deterministic)
    configure_devices(cfg.train.mixed_precision)
    backbone, digest = (backbones or BackboneCache(capacity=0)).get(cfg.backbone, cfg.seed)
    if digest != record["params"].get(WEIGHTS_DIGEST_PARAM):
        raise RuntimeError(
            f"the rebuilt {cfg.backbone.name} backbone differs from run {run_id}'s "
            "(weights file changed, or another Keras version); retrain with tlsweep reproduce"
        )
    seed_everything(cfg.seed, cfg.train.deterministic)
    class_names = tracking.class_names(run_id)
    model = build_classifier(cfg.backbone, cfg.head, len(class_names), backbone=backbone)
    head_of(model).load_weights(head_weights)
    return tracking.log_keras_model(run_id, model, class_names)


def run(
    cfg: Config,
    *,
    callbacks: Sequence[keras.callbacks.Callback] = (),
    tags: Mapping[str, str] | None = None,
    head: tuple[str, int] | None = None,
) -> RunResult:
    """Train ``cfg`` as one MLflow run; returns the run id and final metrics. ``head``: a file
    of trained head weights to start from and the epochs they were trained for (a promoted
    sweep trial, reproduced: see `train_head`)."""
    prepared = prepare(cfg)
    if head is not None:
        head_of(prepared.model).load_weights(head[0])
    tracking.connect(cfg.tracking)
    name = cfg.tracking.run_name or tracking.default_run_name(cfg)
    with tracking.start_run(cfg.tracking.experiment, name, tags=tags) as run_id:
        result = execute(
            run_id, cfg, prepared, callbacks, head_epochs=None if head is None else head[1]
        )
    return RunResult(run_id=run_id, metrics=result.metrics, train_result=result)


def train_head(cfg: Config, path: str) -> int:
    """Train ``cfg`` untracked, as its run trained, and save the head's trained weights (best
    epoch) to ``path`` (``.weights.h5``): what a promoted trial started from. Returns the
    epochs it trained."""
    prepared = prepare(cfg)
    features = (
        cached_features(cfg, prepared.model, prepared.data, weights_sha256=prepared.backbone_digest)
        if uses_feature_cache(cfg)
        else None
    )
    result = train(cfg, prepared.data, prepared.model, [], features)
    head_of(result.model).save_weights(path)
    return len(result.history)
