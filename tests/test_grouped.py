"""Many heads in one step (tlsweep.grouped): each head of a group trains exactly as it would
alone, stops on its own, fails on its own; configs that cannot share a group are refused."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import keras
import numpy as np
import pandas as pd
import pytest

from tlsweep.config import Config
from tlsweep.data import ImageData, Split
from tlsweep.features import Features
from tlsweep.grouped import GroupMismatchError, check_group, group_key, train_group
from tlsweep.model import build_head, head_of
from tlsweep.pipeline import FeatureBatches
from tlsweep.train import EpochCallback, TrainResult, train

DIM, CLASSES = 64, 3
ROWS = {"train": 301, "val": 90, "test": 60}  # 301: a short last batch at every batch size here
EPOCHS = 4
BASE = ("train.batch_size=16", f"train.epochs={EPOCHS}", "head.dropout=0.0")


@pytest.fixture(scope="module")
def inputs() -> tuple[ImageData, Features]:
    """Random features and labels; the images behind them are never read."""
    rng = np.random.default_rng(0)
    x = {k: rng.normal(size=(n, DIM)).astype("float32") for k, n in ROWS.items()}
    y = {k: rng.integers(0, CLASSES, n) for k, n in ROWS.items()}

    def split(name: str) -> Split:
        return Split(np.zeros((ROWS[name], 1, 1, 3), "uint8"), y[name], 1)

    names = tuple("abc")
    data = ImageData(split("train"), split("val"), split("test"), names, "random", {})
    return data, Features(x["train"], x["val"], x["test"], status="hit")


def classifier(cfg: Config) -> keras.Model:
    """A classifier whose frozen part is the identity: features in, the head on them."""
    features = keras.Input((DIM,))
    return keras.Model(features, build_head((DIM,), cfg.head, CLASSES)(features))


def twins(cfgs: Sequence[Config], seed: int = 1) -> tuple[list[keras.Model], list[keras.Model]]:
    """Two classifiers per config, one to train alone and one grouped, each pair built after
    the same seeding: the same initial weights and the same dropout seeds."""
    pairs = []
    for index, cfg in enumerate(cfgs):
        built = []
        for _ in range(2):
            keras.utils.set_random_seed(seed + index)
            built.append(classifier(cfg))
        pairs.append(built)
    alone, grouped = ([pair[i] for pair in pairs] for i in range(2))
    for a, g in zip(alone, grouped, strict=True):
        for x, y in zip(weights(a), weights(g), strict=True):
            np.testing.assert_array_equal(x, y)
    return alone, grouped


def first_rows(inputs: tuple[ImageData, Features], n: int) -> tuple[ImageData, Features]:
    """The first ``n`` training examples only (validation and test unchanged)."""
    data, features = inputs
    train = Split(data.train.items[:n], data.train.labels[:n], data.train.size)
    return (
        ImageData(train, data.val, data.test, data.class_names, data.fingerprint, {}),
        Features(features.train[:n], features.val, features.test, status="hit"),
    )


def weights(model: keras.Model) -> list[np.ndarray]:
    return [np.array(keras.ops.convert_to_numpy(w)) for w in head_of(model).weights]


def results(outcomes: Sequence[TrainResult | Exception]) -> list[TrainResult]:
    for outcome in outcomes:
        if isinstance(outcome, Exception):
            raise outcome
    return list(outcomes)  # type: ignore[arg-type]


def assert_same_training(alone: TrainResult, grouped: TrainResult) -> None:
    """Same weights, the same history row for row, the same best epoch and evaluations."""
    for a, g in zip(weights(alone.model), weights(grouped.model), strict=True):
        np.testing.assert_allclose(g, a, rtol=1e-5, atol=1e-6)
    pd.testing.assert_frame_equal(grouped.history, alone.history, rtol=1e-5, atol=1e-6)
    assert grouped.best_epoch == alone.best_epoch
    assert grouped.best_value == pytest.approx(alone.best_value, rel=1e-5, abs=1e-6)
    for name, value in alone.metrics.items():
        assert grouped.metrics[name] == pytest.approx(value, rel=1e-5, abs=1e-6), name
    assert grouped.parameter_counts == alone.parameter_counts


class Watch(keras.callbacks.Callback):
    """Records another model's head weights at the end of every epoch of its own head."""

    def __init__(self, target: keras.Model) -> None:
        super().__init__()
        self.target = target
        self.epochs: dict[int, list[np.ndarray]] = {}

    def on_epoch_end(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
        self.epochs[epoch + 1] = weights(self.target)


class StopAt(keras.callbacks.Callback):
    """Stops its model at the end of epoch ``epoch`` (from 1), as a pruner's callback does."""

    def __init__(self, epoch: int) -> None:
        super().__init__()
        self.epoch = epoch

    def on_epoch_end(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
        if epoch + 1 == self.epoch:
            self.model.stop_training = True


# --- a head in a group trains as it would alone ------------------------------------------------


@pytest.mark.backend
@pytest.mark.parametrize(
    "optimizer", ["optimizer=adam", "optimizer=sgd", "optimizer=adamw"], ids=lambda o: o[10:]
)
def test_a_head_in_a_group_trains_exactly_as_alone(
    make_config: Callable[..., Config], inputs: tuple[ImageData, Features], optimizer: str
) -> None:
    """Different units and learning rates in one group; "alone" is `train.train`, the
    single-head path a cached trial takes (its own compiled head and optimizer). sgd carries
    momentum (0.9) and adamw weight decay: both act per head too."""
    data, features = inputs
    heads = [(8, 1e-3), (32, 3e-3), (16, 1e-2)]
    cfgs = [
        make_config(
            *BASE,
            optimizer,
            f"head.dense_units={units}",
            f"optimizer.learning_rate={rate}",
            "train.early_stopping.patience=null",
        )
        for units, rate in heads
    ]
    alone_models, grouped_models = twins(cfgs)
    alone_logs: list[list[dict[str, float]]] = [[] for _ in cfgs]
    grouped_logs: list[list[dict[str, float]]] = [[] for _ in cfgs]

    def sink(into: list[dict[str, float]]) -> EpochCallback:
        return EpochCallback(lambda epoch, metrics: into.append({"epoch": epoch, **metrics}))

    alone = [
        train(cfg, data, model, [sink(logs)], features)
        for cfg, model, logs in zip(cfgs, alone_models, alone_logs, strict=True)
    ]
    callbacks = [[sink(logs)] for logs in grouped_logs]
    grouped = results(train_group(cfgs, data, grouped_models, features, callbacks))

    for a, g in zip(alone, grouped, strict=True):
        assert len(g.history) == EPOCHS
        assert_same_training(a, g)
    for a, g in zip(alone_logs, grouped_logs, strict=True):  # what a tracker would log
        assert pd.DataFrame(g).columns.tolist() == pd.DataFrame(a).columns.tolist()
        pd.testing.assert_frame_equal(pd.DataFrame(g), pd.DataFrame(a), rtol=1e-5, atol=1e-6)
    assert [g.history["learning_rate"].iloc[0] for g in grouped] == pytest.approx(
        [rate for _, rate in heads]
    )


@pytest.mark.backend
def test_heads_with_dropout_draw_the_masks_they_would_alone(
    make_config: Callable[..., Config], inputs: tuple[ImageData, Features]
) -> None:
    """Each head runs its own Dropout layer with its own seed, one draw per step as alone:
    with full batches only (JAX pads a short last one), the same masks and the same training."""
    data, features = first_rows(inputs, 288)  # 18 batches of 16
    cfgs = [
        make_config(*BASE, f"head.dense_units={units}", f"head.dropout={rate}")
        for units, rate in ((8, 0.5), (16, 0.2))
    ]
    alone_models, grouped_models = twins(cfgs)
    alone = [train(c, data, m, features=features) for c, m in zip(cfgs, alone_models, strict=True)]
    grouped = results(train_group(cfgs, data, grouped_models, features))
    for a, g in zip(alone, grouped, strict=True):
        assert_same_training(a, g)


# --- stopping ----------------------------------------------------------------------------------


@pytest.mark.backend
def test_a_head_that_stops_early_keeps_its_best_weights_while_the_others_train_on(
    make_config: Callable[..., Config], inputs: tuple[ImageData, Features]
) -> None:
    """Head 0 (patience 1 on val_loss, a rate that overfits at once) stops before the end:
    its history ends there, its weights stay as they were from then on, its best epoch's
    weights are restored; head 1 trains every epoch. Both match their lone runs."""
    data, features = inputs
    cfgs = [
        make_config(
            *BASE,
            "head.dense_units=16",
            "optimizer.learning_rate=0.01",
            "train.early_stopping.monitor=val_loss",
            "train.early_stopping.patience=1",
        ),
        make_config(*BASE, "head.dense_units=8", "train.early_stopping.patience=null"),
    ]
    alone_models, grouped_models = twins(cfgs)
    alone = [
        train(cfg, data, m, features=features) for cfg, m in zip(cfgs, alone_models, strict=True)
    ]
    stop = len(alone[0].history)
    assert stop < EPOCHS, "the setting no longer stops early: choose another"

    watch = Watch(grouped_models[0])
    grouped = results(train_group(cfgs, data, grouped_models, features, [[], [watch]]))

    assert grouped[0].history["epoch"].tolist() == list(range(1, stop + 1))
    assert grouped[1].history["epoch"].tolist() == list(range(1, EPOCHS + 1))
    frozen = watch.epochs[stop]
    for epoch in range(stop + 1, EPOCHS + 1):  # the others trained on; head 0 did not move
        for before, now in zip(frozen, watch.epochs[epoch], strict=True):
            np.testing.assert_array_equal(now, before)
    assert grouped[0].best_epoch < stop  # and then its best weights came back
    for a, g in zip(alone, grouped, strict=True):
        assert_same_training(a, g)


@pytest.mark.backend
def test_heads_stop_by_the_hook_or_their_own_callbacks_and_the_fit_ends_with_the_last(
    make_config: Callable[..., Config],
    inputs: tuple[ImageData, Features],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """``should_stop`` prunes head 0 after epoch 1, head 1's own callback stops it after
    epoch 2 (``model.stop_training``, as the sweep's pruning callback does): no epoch runs
    after that, though 4 were asked for."""
    data, features = inputs
    cfgs = [make_config(*BASE, "train.early_stopping.patience=null") for _ in range(2)]
    _, models = twins(cfgs)
    epochs_run: list[int] = []
    original = FeatureBatches.set_epoch
    monkeypatch.setattr(
        FeatureBatches,
        "set_epoch",
        lambda self, epoch: (epochs_run.append(epoch), original(self, epoch))[1],
    )
    asked: list[tuple[int, int, Mapping[str, float]]] = []

    def should_stop(head: int, epoch: int, metrics: Mapping[str, float]) -> bool:
        asked.append((head, epoch, metrics))
        return head == 0 and epoch == 0

    outcomes = train_group(cfgs, data, models, features, [[], [StopAt(2)]], should_stop)

    assert [len(r.history) for r in results(outcomes)] == [1, 2]
    assert sorted(set(epochs_run)) == [0, 1]
    # asked about running heads only, and not about a head that its callback stopped
    assert [(head, epoch) for head, epoch, _ in asked] == [(0, 0), (1, 0)]
    assert set(asked[0][2]) == {"loss", "accuracy", "val_loss", "val_accuracy", "learning_rate"}


@pytest.mark.backend
def test_a_head_whose_loss_becomes_nan_fails_alone(
    make_config: Callable[..., Config], inputs: tuple[ImageData, Features]
) -> None:
    """A diverging head is that head's failure (the error a lone run raises); its neighbour
    trains every epoch, unharmed."""
    data, features = inputs
    cfgs = [
        make_config(*BASE, "optimizer=sgd", "optimizer.learning_rate=1e30"),
        make_config(*BASE, "optimizer=sgd", "train.early_stopping.patience=null"),
    ]
    _, models = twins(cfgs)
    failed, trained = train_group(cfgs, data, models, features)
    assert isinstance(failed, FloatingPointError)
    assert "loss became nan at epoch 1" in str(failed)
    assert isinstance(trained, TrainResult)
    assert len(trained.history) == EPOCHS
    assert np.isfinite(trained.history[["loss", "val_loss"]].to_numpy()).all()


# --- which configs share a group ---------------------------------------------------------------


def test_configs_differing_only_in_the_head_share_a_group_key(
    make_config: Callable[..., Config],
) -> None:
    a = make_config(*BASE)
    b = make_config(
        *BASE,
        "head.dense_units=512",
        "head.dropout=0.5",
        "optimizer.learning_rate=0.01",
        "train.early_stopping.patience=5",
        "train.early_stopping.monitor=val_loss",
    )
    assert group_key(a) == group_key(b)
    check_group([a, b])


@pytest.mark.parametrize(
    ("override", "field"),
    [
        ("train.batch_size=32", "train.batch_size"),
        ("train.epochs=2", "train.epochs"),
        ("optimizer=sgd", "optimizer.momentum"),  # adam -> sgd: the first field that differs
        ("optimizer=adamw", "optimizer.name"),
        ("head.pooling=max", "head.pooling"),
        ("seed=7", "seed"),
    ],
)
def test_mismatched_configs_are_refused_naming_the_field(
    make_config: Callable[..., Config], override: str, field: str
) -> None:
    a, b = make_config(*BASE), make_config(*BASE, override)
    assert group_key(a) != group_key(b)
    with pytest.raises(GroupMismatchError) as caught:
        check_group([a, a, b])
    message = str(caught.value)
    assert "\n" not in message
    assert f"{field} differs" in message
    assert "head 2" in message


@pytest.mark.parametrize(
    ("override", "reason"),
    [
        ("train.fine_tune.epochs=1", "fine-tunes"),
        ("augment.flip=horizontal", "cached features"),
        ("cache.enabled=false", "cached features"),
    ],
)
def test_trials_that_need_more_than_the_head_are_refused(
    make_config: Callable[..., Config],
    inputs: tuple[ImageData, Features],
    override: str,
    reason: str,
) -> None:
    data, features = inputs
    cfgs = [make_config(*BASE), make_config(*BASE, override)]
    with pytest.raises(GroupMismatchError, match=reason):
        train_group(cfgs, data, [classifier(c) for c in cfgs], features)
