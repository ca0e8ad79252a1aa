"""Training and evaluation: knows Keras, nothing of MLflow or Optuna (callbacks are passed in).

Two stages: the head on the frozen backbone, then optionally fine-tuning the backbone's top
layers at a low learning rate. Epoch numbers continue across stages (``initial_epoch``) so
that per-epoch metrics form one curve, and the best epoch of either stage wins.

With augmentation configured, both stages fit ``image -> augment -> classifier`` end to end
(random changes make the frozen backbone's output differ every epoch, so no cached features);
the classifier shares its weights and is what is evaluated and returned.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import keras
import numpy as np
import pandas as pd

from tlsweep import backend, interrupts, metrics
from tlsweep.config import Config, TrainConfig
from tlsweep.data import ImageData, Split
from tlsweep.features import Features
from tlsweep.model import (
    compile_classifier,
    head_of,
    make_optimizer,
    parameter_counts,
    training_model,
    unfreeze_top,
)
from tlsweep.pipeline import FeatureBatches, ImageBatches, Reshuffle, reading

HEAD_STEPS_PER_EXECUTION = 32  # on cached features: the same updates, less per-step overhead
CACHED_FEATURES, END_TO_END = "cached_features", "end_to_end"  # the head stage's path


@dataclass
class Evaluation:
    """Metrics of a model on one split."""

    loss: float
    accuracy: float
    confusion: np.ndarray  # rows: true class, columns: predicted class
    report: dict[str, Any]  # sklearn's classification_report(output_dict=True)
    report_text: str

    def metrics(self, prefix: str) -> dict[str, float]:
        """Scalar metrics, e.g. ``test_loss``, ``test_accuracy``, ``test_f1_macro``."""
        macro = self.report["macro avg"]
        return {
            f"{prefix}_loss": self.loss,
            f"{prefix}_accuracy": self.accuracy,
            f"{prefix}_precision_macro": macro["precision"],
            f"{prefix}_recall_macro": macro["recall"],
            f"{prefix}_f1_macro": macro["f1-score"],
        }


@dataclass
class TrainResult:
    """What a training run produced."""

    model: keras.Model
    history: pd.DataFrame  # one row per epoch, numbered from 1 across stages
    evaluations: dict[str, Evaluation]
    best_epoch: int
    best_value: float
    parameter_counts: dict[str, int] = field(default_factory=dict)
    backbone_changed: bool = False  # a fine-tuning stage ran

    @property
    def metrics(self) -> dict[str, float]:
        """Final metrics of the restored best weights on validation and test."""
        out: dict[str, float] = {}
        for split, evaluation in self.evaluations.items():
            out.update(evaluation.metrics(split))
        return out


def uses_feature_cache(cfg: Config) -> bool:
    """Whether the head stage can train on cached features: the cache is on and no random
    augmentation changes the frozen backbone's input (an augmenting run trains end to end)."""
    return cfg.cache.enabled and not cfg.augment.enabled


def training_path(features: Features | None) -> str:
    """The head stage's path, as recorded with a run: cached features or end to end."""
    return CACHED_FEATURES if features is not None else END_TO_END


def train(
    cfg: Config,
    data: ImageData,
    model: keras.Model,
    callbacks: Sequence[keras.callbacks.Callback] = (),
    features: Features | None = None,
    head_epochs: int | None = None,
) -> TrainResult:
    """Fit the head (then fine-tune if configured), restore the best epoch, evaluate.

    With ``features`` (the frozen part's cached outputs) the head stage trains the head alone
    on them; the classifier shares the head's weights, so it is trained all the same. An
    augmenting config (see `uses_feature_cache`) must not be given features.

    ``head_epochs``: the model's head holds weights trained for that many epochs already (a
    promoted sweep trial continues another trial's head): a configured fine-tuning stage starts
    from them at once, without the head stage; without one, the head stage trains on from
    them. Either way the epochs are numbered on from there.
    """
    if features is not None and cfg.augment.enabled:
        raise ValueError("augmenting runs train end to end: cached features cannot serve them")
    keeper = KeepBestWeights(cfg.train.early_stopping.monitor, model)
    shared = [Interruptible(), LearningRateLogger(), FailOnNaN(), keeper, *callbacks]
    history = fit_stages(model, cfg, data, shared, features, head_epochs)
    keeper.restore()
    backbone_changed = "fine_tune" in set(history["stage"])
    splits = {name: getattr(data, name) for name in ("val", "test")}
    if features is not None and not backbone_changed:  # one pass of the head over both splits
        stacked = np.concatenate([features.val, features.test])
        probabilities = predict_small(head_of(model), stacked)
        predicted = dict(zip(splits, np.split(probabilities, [len(data.val)]), strict=True))
    else:
        predicted = {
            name: predict_images(model, part, cfg.train.batch_size) for name, part in splits.items()
        }
    evaluations = {
        name: evaluate(predicted[name], part.labels, data.class_names)
        for name, part in splits.items()
    }
    return TrainResult(
        model=model,
        history=history,
        evaluations=evaluations,
        best_epoch=keeper.best_epoch + 1,
        best_value=keeper.best,
        parameter_counts=parameter_counts(model),
        backbone_changed=backbone_changed,
    )


def predict_images(model: keras.Model, split: Split, batch_size: int) -> np.ndarray:
    """``model.predict`` over a split's images, streamed from where they are stored."""
    if len(split) == 0:
        return np.zeros((0, model.output_shape[-1]), dtype="float32")
    batches = ImageBatches(split, batch_size)
    with reading(batches):
        return np.asarray(model.predict(batches, verbose=0, callbacks=[Interruptible()]))


def predict_small(model: keras.Model, inputs: np.ndarray, batch_size: int = 256) -> np.ndarray:
    """``model.predict`` for a small model used once (a trial's head on cached features):
    direct calls in inference mode, without the compiled function ``predict`` traces for
    every new model (~0.2 s, against a few milliseconds for the calls themselves)."""
    chunks = (
        np.asarray(inputs[i : i + batch_size], "float32") for i in range(0, len(inputs), batch_size)
    )
    parts = [keras.ops.convert_to_numpy(model(batch, training=False)) for batch in chunks]
    return np.concatenate(parts).astype("float32", copy=False)


def fit_stages(
    model: keras.Model,
    cfg: Config,
    data: ImageData,
    callbacks: Sequence[keras.callbacks.Callback],
    features: Features | None = None,
    head_epochs: int | None = None,
) -> pd.DataFrame:
    """Head stage, then the optional fine-tuning stage; one history across both.

    A callback with a true ``stop_run`` attribute (e.g. a pruner) also skips the second stage.
    Without features, both stages fit `training_model` (the classifier, augmented if configured).
    ``head_epochs``: the head was trained that long already (see `train`).
    """
    tc = cfg.train
    if head_epochs is not None and tc.fine_tune.epochs:
        return fine_tune_stage(model, cfg, data, callbacks, done=head_epochs)
    start = head_epochs or 0

    def image_batches() -> tuple[ImageBatches, ImageBatches]:  # a stage on images
        train = ImageBatches(data.train, tc.batch_size, shuffle=True, seed=cfg.seed)
        return train, ImageBatches(data.val, tc.batch_size)

    full = training_model(model, cfg.augment, cfg.seed)
    head_callbacks = list(callbacks)
    head_val: ImageBatches | None = None
    if features is None:
        trained = full
        head_train, head_val = image_batches()
    else:
        trained = head_of(model)
        head_train = FeatureBatches(
            features.train, data.train.labels, tc.batch_size, shuffle=True, seed=cfg.seed
        )
        # validated by `ValidationOnFeatures`, first among the callbacks
        head_callbacks.insert(0, ValidationOnFeatures(features.val, data.val.labels))
    steps = 1 if features is None else backend.steps_per_execution(HEAD_STEPS_PER_EXECUTION)
    compile_classifier(trained, make_optimizer(cfg.optimizer), steps_per_execution=steps)
    with reading(*(b for b in (head_train, head_val) if b is not None)):
        head = trained.fit(
            head_train,
            validation_data=head_val,
            initial_epoch=start,
            epochs=start + tc.epochs,
            verbose=0,
            shuffle=False,
            callbacks=[Reshuffle(head_train), *head_callbacks, early_stopping(tc)],
        )
    frames = [_history_frame(head, stage="head")]
    done = head.epoch[-1] + 1 if head.epoch else start
    halted = any(getattr(callback, "stop_run", False) for callback in callbacks)
    if tc.fine_tune.epochs and not halted:
        frames.append(fine_tune_stage(model, cfg, data, callbacks, done, full))
    return pd.concat(frames, ignore_index=True)


def fine_tune_stage(
    model: keras.Model,
    cfg: Config,
    data: ImageData,
    callbacks: Sequence[keras.callbacks.Callback],
    done: int,
    full: keras.Model | None = None,
) -> pd.DataFrame:
    """The fine-tuning stage: the top ``unfreeze_layers`` of the backbone unfrozen, the model
    recompiled at the stage's learning rate, its epochs numbered on from ``done``. ``full``:
    what the head stage fitted end to end (the classifier, or its augmenting wrapper), if it
    did."""
    tc = cfg.train
    if full is None:
        full = training_model(model, cfg.augment, cfg.seed)
    unfreeze_top(model, tc.fine_tune.unfreeze_layers)
    compile_classifier(full, make_optimizer(cfg.optimizer, tc.fine_tune.learning_rate))
    train_ds = ImageBatches(data.train, tc.batch_size, shuffle=True, seed=cfg.seed)
    val_ds = ImageBatches(data.val, tc.batch_size)
    with reading(train_ds, val_ds):
        tuned = full.fit(
            train_ds,
            validation_data=val_ds,
            initial_epoch=done,
            verbose=0,
            shuffle=False,
            epochs=done + tc.fine_tune.epochs,
            callbacks=[Reshuffle(train_ds), *callbacks, early_stopping(tc)],
        )
    return _history_frame(tuned, stage="fine_tune")


def evaluate(
    probabilities: np.ndarray, labels: np.ndarray, class_names: Sequence[str]
) -> Evaluation:
    """Loss, accuracy, per-class report and confusion matrix (scikit-learn) of predictions."""
    from sklearn.metrics import classification_report, confusion_matrix

    probabilities = np.asarray(probabilities, "float64")
    predicted = probabilities.argmax(axis=1)
    picked = np.clip(probabilities[np.arange(len(labels)), labels], 1e-7, 1.0)
    classes = list(range(len(class_names)))
    kwargs = {"labels": classes, "target_names": list(class_names), "zero_division": 0}
    return Evaluation(
        loss=float(-np.log(picked).mean()),
        accuracy=float((predicted == labels).mean()),
        confusion=confusion_matrix(labels, predicted, labels=classes),
        report=classification_report(labels, predicted, output_dict=True, **kwargs),
        report_text=classification_report(labels, predicted, digits=4, **kwargs),
    )


class EpochCallback(keras.callbacks.Callback):
    """Hands every epoch's scalar metrics to ``sink(epoch, metrics)`` (e.g. a tracker)."""

    def __init__(self, sink: Callable[[int, Mapping[str, float]], None]) -> None:
        super().__init__()
        self.sink = sink

    def on_epoch_end(self, epoch: int, logs: Mapping[str, Any] | None = None) -> None:
        self.sink(epoch, {k: float(v) for k, v in (logs or {}).items() if np.isscalar(v)})


class ValidationOnFeatures(keras.callbacks.Callback):
    """The ``val_loss`` and ``val_accuracy`` that ``fit(validation_data=...)`` would add to each
    epoch's logs, computed by direct calls of the head on in-memory validation features.

    ``fit`` would trace an evaluation function for every new head (~0.25 s, more than the
    head's whole validation); this costs milliseconds. Put it first: the callbacks after it
    (early stopping, pruning, the tracker) read the values from the same logs.
    """

    def __init__(self, features: np.ndarray, labels: np.ndarray) -> None:
        super().__init__()
        self.features = features
        self.labels = np.asarray(labels)
        # Keras' own metric objects: their float32 total / count is what fit's validation
        # reports, bit for bit, on every backend (a backend's mean may round otherwise).
        self.accuracy = keras.metrics.SparseCategoricalAccuracy()
        self.loss = keras.metrics.Mean()

    def on_epoch_end(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
        if logs is None:
            return
        probabilities = predict_small(self.model, self.features)
        self.accuracy.reset_state()
        self.accuracy.update_state(self.labels, probabilities)
        self.loss.reset_state()
        self.loss.update_state(
            keras.losses.sparse_categorical_crossentropy(self.labels, probabilities)
        )
        logs["val_accuracy"] = float(keras.ops.convert_to_numpy(self.accuracy.result()))
        logs["val_loss"] = float(keras.ops.convert_to_numpy(self.loss.result())) + sum(
            float(keras.ops.convert_to_numpy(x)) for x in self.model.losses
        )


class LearningRateLogger(keras.callbacks.Callback):
    """Adds ``learning_rate`` to each epoch's logs (before the other callbacks see them)."""

    def on_epoch_end(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
        if logs is not None:
            logs["learning_rate"] = float(
                keras.ops.convert_to_numpy(self.model.optimizer.learning_rate)
            )


class Interruptible(keras.callbacks.Callback):
    """A safe point every batch for a signal whose interruption was swallowed where it
    landed (see `tlsweep.interrupts`)."""

    def on_train_batch_end(self, batch: int, logs: dict[str, Any] | None = None) -> None:
        interrupts.raise_pending()

    def on_test_batch_end(self, batch: int, logs: dict[str, Any] | None = None) -> None:
        interrupts.raise_pending()

    def on_predict_batch_end(self, batch: int, logs: dict[str, Any] | None = None) -> None:
        interrupts.raise_pending()


class FailOnNaN(keras.callbacks.Callback):
    """Turns a NaN or infinite loss into an error (a failed run), not a silent stop.

    Not Keras's ``TerminateOnNaN(raise_error=True)``: that one reads the loss after every
    batch, a device-to-host copy per step; an epoch's mean loss is NaN whenever a batch's was.
    """

    def on_epoch_end(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
        loss = (logs or {}).get("loss")
        if loss is not None and not np.isfinite(loss):
            raise FloatingPointError(f"loss became {loss} at epoch {epoch + 1}")


class KeepBestWeights(keras.callbacks.Callback):
    """Remembers the classifier's weights at the best epoch, across both stages' ``fit``.

    Only variables that some stage trains are copied (the head; in fine-tuning, also the
    unfrozen layers): frozen variables never change, and copying a whole backbone every epoch
    cost more than the head's epoch itself. A variable first trained by a later stage is
    recorded as that stage begins, which is its value at any earlier best epoch.
    """

    def __init__(self, monitor: str, target: keras.Model) -> None:
        super().__init__()
        self.monitor = monitor
        self.target = target  # the whole classifier, whichever sub-model a stage fits
        self.minimize = metrics.direction(monitor) == "minimize"
        self.best = float("inf") if self.minimize else float("-inf")
        self.best_epoch = -1
        self._saved: dict[int, tuple[keras.Variable, np.ndarray]] = {}

    def on_train_begin(self, logs: dict[str, Any] | None = None) -> None:
        if self.best_epoch >= 0:  # a later stage: remember the newly trainable variables
            for variable in self.target.trainable_variables:
                self._saved.setdefault(id(variable), (variable, _value(variable)))

    def on_epoch_end(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
        value = (logs or {}).get(self.monitor)
        if value is None:
            raise KeyError(f"monitor {self.monitor!r} is not among the logged metrics {logs}")
        if (value < self.best) if self.minimize else (value > self.best):
            self.best, self.best_epoch = float(value), epoch
            for variable in self.target.trainable_variables:
                self._saved[id(variable)] = (variable, _value(variable))

    def restore(self) -> None:
        for variable, value in self._saved.values():
            variable.assign(value)


def _value(variable: keras.Variable) -> np.ndarray:
    return np.array(keras.ops.convert_to_numpy(variable))  # a copy, not a view


def early_stopping(tc: TrainConfig) -> keras.callbacks.EarlyStopping:
    """Keras's early stopping on ``train.early_stopping.monitor``, in that metric's direction;
    no patience set: it never stops (the best epoch's weights are still restored)."""
    es = tc.early_stopping
    patience = es.patience if es.patience is not None else tc.epochs + tc.fine_tune.epochs
    return keras.callbacks.EarlyStopping(
        monitor=es.monitor, patience=patience, mode=metrics.keras_mode(es.monitor)
    )


def _history_frame(history: keras.callbacks.History, stage: str) -> pd.DataFrame:
    frame = pd.DataFrame(history.history)
    frame.insert(0, "epoch", [e + 1 for e in history.epoch])
    frame.insert(1, "stage", stage)
    return frame
