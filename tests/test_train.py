"""Training: determinism, early stopping with the best weights restored, fine-tuning, evaluation.

One shared run (module fixture) of the tiny config with early stopping (patience 1) and a
two-epoch fine-tuning stage; a second identical run (slow) checks that training repeats exactly.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import keras
import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import accuracy_score, confusion_matrix, log_loss

from tlsweep.backend import configure_devices, seed_everything
from tlsweep.config import Config
from tlsweep.data import ImageData, load_data
from tlsweep.features import Features
from tlsweep.model import backbone_of, build_classifier
from tlsweep.train import (
    KeepBestWeights,
    TrainResult,
    ValidationOnFeatures,
    predict_images,
    predict_small,
    train,
    training_path,
    uses_feature_cache,
)

pytestmark = pytest.mark.backend  # runs on every Keras backend in CI

SHARED = (
    "train.epochs=5",
    "train.early_stopping.patience=1",
    "train.fine_tune.epochs=2",
    "train.fine_tune.unfreeze_layers=5",
)


class WeightRecorder(keras.callbacks.Callback):
    """Every variable of the model at the end of every epoch (epochs numbered from 1)."""

    def __init__(self) -> None:
        super().__init__()
        self.epochs: dict[int, dict[str, np.ndarray]] = {}

    def on_epoch_end(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
        self.epochs[epoch + 1] = _snapshot(self.model)


def _snapshot(model: keras.Model) -> dict[str, np.ndarray]:
    return {v.path: keras.ops.convert_to_numpy(v).copy() for v in model.weights}


@dataclass
class Trained:
    cfg: Config
    data: ImageData
    model: keras.Model
    result: TrainResult
    initial: dict[str, np.ndarray]
    epochs: dict[int, dict[str, np.ndarray]]

    @property
    def history(self) -> pd.DataFrame:
        return self.result.history


def train_fresh(cfg: Config) -> Trained:
    """Seeds, data, model and training, in the order a run uses them."""
    keras.backend.clear_session()
    seed_everything(cfg.seed, cfg.train.deterministic)
    configure_devices(cfg.train.mixed_precision)
    data = load_data(cfg.data, cfg.backbone.input_size)
    model = build_classifier(cfg.backbone, cfg.head, data.num_classes)
    initial = _snapshot(model)
    recorder = WeightRecorder()
    result = train(cfg, data, model, [recorder])
    return Trained(cfg, data, model, result, initial, recorder.epochs)


@pytest.fixture(scope="module")
def trained(make_shared_config: Callable[..., Config]) -> Trained:
    return train_fresh(make_shared_config(*SHARED))


def _stages(history: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
    return history[history["stage"] == "head"], history[history["stage"] == "fine_tune"]


# --- history -------------------------------------------------------------------------------


def test_history_has_one_row_per_epoch(trained: Trained) -> None:
    history = trained.history
    for column in ("epoch", "stage", "loss", "accuracy", "val_loss", "val_accuracy"):
        assert column in history.columns
    assert "learning_rate" in history.columns
    assert history["epoch"].tolist() == list(range(1, len(history) + 1))
    assert history[["loss", "val_loss", "accuracy", "val_accuracy"]].notna().all().all()
    assert set(trained.epochs) == set(history["epoch"])


def test_fine_tuning_epochs_continue_after_the_head_stage(trained: Trained) -> None:
    head, tuned = _stages(trained.history)
    assert len(head) >= 1
    assert len(tuned) == trained.cfg.train.fine_tune.epochs == 2
    # head rows first, then fine-tuning rows numbered on from where the head stage stopped
    assert trained.history["stage"].tolist() == ["head"] * len(head) + ["fine_tune"] * 2
    assert tuned["epoch"].tolist() == [len(head) + 1, len(head) + 2]


def test_learning_rate_is_logged_per_stage(trained: Trained) -> None:
    head, tuned = _stages(trained.history)
    assert head["learning_rate"].tolist() == pytest.approx([1e-3] * len(head), rel=1e-6)
    assert tuned["learning_rate"].tolist() == pytest.approx([1e-5] * len(tuned), rel=1e-6)


# --- early stopping and the best weights ---------------------------------------------------


def test_early_stopping_stops_the_head_stage(trained: Trained) -> None:
    head, _ = _stages(trained.history)
    assert len(head) < trained.cfg.train.epochs, "expected val_accuracy to stall (patience 1)"
    best_in_head = int(np.argmax(head["val_accuracy"].to_numpy())) + 1
    assert len(head) == best_in_head + trained.cfg.train.early_stopping.patience


def test_best_epoch_is_the_best_val_accuracy(trained: Trained) -> None:
    history, result = trained.history, trained.result
    values = history["val_accuracy"].to_numpy()
    assert result.best_epoch == int(np.argmax(values)) + 1  # the first epoch reaching the max
    assert result.best_value == pytest.approx(values.max())
    assert result.evaluations["val"].accuracy == pytest.approx(values.max(), abs=1e-6)
    assert result.metrics["val_accuracy"] == pytest.approx(values.max(), abs=1e-6)


def test_best_weights_are_restored(trained: Trained) -> None:
    best = trained.epochs[trained.result.best_epoch]
    last = trained.epochs[max(trained.epochs)]
    final = _snapshot(trained.model)
    assert trained.result.best_epoch < max(trained.epochs), "expected a best epoch before the end"
    assert any(not np.array_equal(best[k], last[k]) for k in best)
    for key, value in final.items():
        np.testing.assert_array_equal(value, best[key], err_msg=key)


# --- fine-tuning ---------------------------------------------------------------------------


def test_fine_tuning_recompiles_with_a_fresh_optimizer(trained: Trained) -> None:
    optimizer = trained.model.optimizer
    lr = float(keras.ops.convert_to_numpy(optimizer.learning_rate))
    assert lr == pytest.approx(trained.cfg.train.fine_tune.learning_rate)
    steps = math.ceil(len(trained.data.train) / trained.cfg.train.batch_size)
    assert int(keras.ops.convert_to_numpy(optimizer.iterations)) == 2 * steps


def test_fine_tuning_trains_the_top_but_never_batchnorm(trained: Trained) -> None:
    backbone = backbone_of(trained.model)
    batchnorm = [x for x in backbone.layers if isinstance(x, keras.layers.BatchNormalization)]
    assert not any(layer.trainable for layer in batchnorm)
    unfrozen = [layer for layer in backbone.layers if layer.trainable and layer.weights]
    assert 1 <= len(unfrozen) <= trained.cfg.train.fine_tune.unfreeze_layers
    unfrozen_paths = {w.path for layer in unfrozen for w in layer.weights}
    backbone_paths = {w.path for w in backbone.weights}
    head_rows, _ = _stages(trained.history)
    end_of_head = trained.epochs[len(head_rows)]
    end_of_tuning = trained.epochs[max(trained.epochs)]
    changed = {
        path
        for path in backbone_paths
        if not np.array_equal(trained.initial[path], end_of_tuning[path])
    }
    assert changed, "fine-tuning changed no backbone weight"
    assert changed <= unfrozen_paths  # BatchNorm statistics and frozen layers never move
    for path in backbone_paths:  # the head stage moved no backbone weight at all
        np.testing.assert_array_equal(end_of_head[path], trained.initial[path], err_msg=path)
    counts = trained.result.parameter_counts
    assert counts["trainable_params"] > 16 * 1280 + 16 + 16 * 10 + 10


# --- evaluation ----------------------------------------------------------------------------


@pytest.mark.parametrize("split", ["val", "test"])
def test_evaluation_matches_sklearn(trained: Trained, split: str) -> None:
    evaluation = trained.result.evaluations[split]
    part = getattr(trained.data, split)
    names = trained.data.class_names
    n = len(names)
    probabilities = predict_images(trained.model, part, 64).astype("float64")
    probabilities /= probabilities.sum(axis=1, keepdims=True)  # float32 rounding
    predicted = probabilities.argmax(axis=1)
    assert evaluation.confusion.shape == (n, n)
    assert evaluation.confusion.sum() == len(part)
    np.testing.assert_array_equal(
        evaluation.confusion.sum(axis=1), np.bincount(part.labels, minlength=n)
    )
    np.testing.assert_array_equal(
        evaluation.confusion, confusion_matrix(part.labels, predicted, labels=range(n))
    )
    assert evaluation.accuracy == pytest.approx(accuracy_score(part.labels, predicted))
    assert evaluation.accuracy == pytest.approx(np.trace(evaluation.confusion) / len(part))
    assert evaluation.loss == pytest.approx(
        log_loss(part.labels, probabilities, labels=range(n)), rel=1e-4
    )
    report = evaluation.report
    for index, name in enumerate(names):
        assert set(report[name]) >= {"precision", "recall", "f1-score", "support"}
        assert report[name]["support"] == int((part.labels == index).sum())
        assert name in evaluation.report_text
    assert report["accuracy"] == pytest.approx(evaluation.accuracy)
    metrics = evaluation.metrics(split)
    assert metrics[f"{split}_accuracy"] == evaluation.accuracy
    assert metrics[f"{split}_f1_macro"] == pytest.approx(report["macro avg"]["f1-score"])
    assert set(metrics) == {
        f"{split}_{m}" for m in ("loss", "accuracy", "precision_macro", "recall_macro", "f1_macro")
    }


# --- determinism ---------------------------------------------------------------------------


@pytest.mark.slow  # a second full training (~25 s); the CLI end-to-end test repeats a run too
def test_same_config_trains_identically(
    trained: Trained, make_shared_config: Callable[..., Config]
) -> None:
    again = train_fresh(make_shared_config(*SHARED))
    pd.testing.assert_frame_equal(again.history, trained.history, check_exact=True)
    assert again.result.metrics == trained.result.metrics
    assert again.result.metrics["test_accuracy"] == trained.result.metrics["test_accuracy"]
    assert again.result.best_epoch == trained.result.best_epoch
    for key, value in _snapshot(again.model).items():
        np.testing.assert_array_equal(value, _snapshot(trained.model)[key], err_msg=key)


@pytest.mark.slow
def test_another_seed_trains_differently(
    trained: Trained, make_shared_config: Callable[..., Config]
) -> None:
    """The control for the determinism test: the comparison does see differences."""
    other = train_fresh(make_shared_config(*SHARED, "seed=7"))
    assert other.history["loss"].iloc[0] != trained.history["loss"].iloc[0]
    assert other.result.evaluations["test"].loss != trained.result.evaluations["test"].loss


# --- augmentation: end to end, never on cached features --------------------------------------

TINY_CUSTOM = (
    "backbone=custom",
    "backbone._target_=custom_backbones:tiny_convnet",
    "backbone.preprocess=tf",
    "~backbone.options.alpha",
    "data.classes=[0,1,2]",
    "data.train_limit=90",
    "data.test_limit=30",
)


class FittedModels(keras.callbacks.Callback):
    """The names of the layers of every model ``fit`` trains, stage by stage."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[list[str]] = []

    def on_train_begin(self, logs: dict[str, Any] | None = None) -> None:
        self.seen.append([layer.name for layer in self.model.layers])


def test_augmenting_run_trains_end_to_end_and_returns_the_plain_classifier(
    make_config: Callable[..., Config],
) -> None:
    from tlsweep.model import AUGMENT

    cfg = make_config(*TINY_CUSTOM, "augment=light", "train.fine_tune.epochs=1")
    assert not uses_feature_cache(cfg)
    assert training_path(None) == "end_to_end"
    data = load_data(cfg.data, cfg.backbone.input_size)
    model = build_classifier(cfg.backbone, cfg.head, data.num_classes)
    fitted = FittedModels()
    result = train(cfg, data, model, [fitted])
    assert len(fitted.seen) == 2  # the head stage and the fine-tuning stage
    assert all(AUGMENT in names and model.name in names for names in fitted.seen)
    assert result.model is model
    assert AUGMENT not in [layer.name for layer in result.model.layers]
    assert list(result.history["stage"]) == ["head", "fine_tune"]


def test_augmenting_config_refuses_cached_features(make_config: Callable[..., Config]) -> None:
    cfg = make_config(*TINY_CUSTOM, "augment.flip=horizontal")
    assert not uses_feature_cache(cfg)
    assert uses_feature_cache(make_config(*TINY_CUSTOM))
    assert not uses_feature_cache(make_config(*TINY_CUSTOM, "cache.enabled=false"))
    empty = np.zeros((0, 8), "float32")
    with pytest.raises(ValueError, match="end to end"):
        train(cfg, None, None, features=Features(empty, empty, empty, status="hit"))  # type: ignore[arg-type]


def test_keep_best_weights_restores_layers_a_later_stage_unfroze() -> None:
    """Best epoch in the head stage, then fine-tuning changes a layer that was frozen: the
    restore brings back both the head and the unfrozen layer as they were at the best epoch."""
    inputs = keras.Input((2,))
    lower = keras.layers.Dense(2, name="lower")
    upper = keras.layers.Dense(1, name="upper")
    model = keras.Model(inputs, upper(lower(inputs)))
    lower.trainable = False
    keep = KeepBestWeights("val_accuracy", model)
    keep.set_model(model)
    keep.on_train_begin()
    upper.kernel.assign(np.full((2, 1), 1.0))
    keep.on_epoch_end(0, {"val_accuracy": 0.9})
    at_best = {v.path: keras.ops.convert_to_numpy(v).copy() for v in model.weights}
    upper.kernel.assign(np.full((2, 1), 2.0))
    keep.on_epoch_end(1, {"val_accuracy": 0.5})
    lower.trainable = True  # the fine-tuning stage
    keep.on_train_begin()
    lower.kernel.assign(np.full((2, 2), 3.0))
    keep.on_epoch_end(2, {"val_accuracy": 0.7})
    keep.restore()
    assert keep.best_epoch == 0
    for variable in model.weights:
        np.testing.assert_array_equal(keras.ops.convert_to_numpy(variable), at_best[variable.path])


def test_predict_small_matches_predict_in_inference_mode() -> None:
    keras.utils.set_random_seed(0)
    head = keras.Sequential(
        [keras.Input((6,)), keras.layers.Dropout(0.5), keras.layers.Dense(3, "softmax")]
    )
    inputs = np.random.default_rng(0).normal(size=(11, 6)).astype("float16")
    got = predict_small(head, inputs, batch_size=4)  # three calls, the last one short
    assert got.shape == (11, 3) and got.dtype == np.float32
    expected = head.predict(inputs.astype("float32"), batch_size=4, verbose=0)
    np.testing.assert_allclose(got, expected, rtol=1e-6, atol=1e-7)  # no dropout applied


def test_validation_on_features_logs_what_keras_validation_logs() -> None:
    rng = np.random.default_rng(1)
    x, y = rng.normal(size=(40, 5)).astype("float32"), rng.integers(0, 3, 40)
    x_val, y_val = rng.normal(size=(13, 5)).astype("float32"), rng.integers(0, 3, 13)

    def fitted(**kwargs: Any) -> dict[str, list[float]]:
        keras.utils.set_random_seed(0)
        head = keras.Sequential(
            [keras.Input((5,)), keras.layers.Dense(8, "relu"), keras.layers.Dense(3, "softmax")]
        )
        head.compile("adam", "sparse_categorical_crossentropy", metrics=["accuracy"])
        return head.fit(x, y, batch_size=8, epochs=3, shuffle=False, verbose=0, **kwargs).history

    by_keras = fitted(validation_data=(x_val, y_val), validation_batch_size=4)
    direct = fitted(callbacks=[ValidationOnFeatures(x_val, y_val)])
    assert list(direct) == list(by_keras)
    assert direct["val_accuracy"] == by_keras["val_accuracy"]  # exactly: float32, as Keras
    np.testing.assert_allclose(direct["val_loss"], by_keras["val_loss"], rtol=1e-5)
    assert len(set(direct["val_loss"])) == 3, "a value per epoch, following the training"
