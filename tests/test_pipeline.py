"""Batches for Keras: images read as needed, cached features, one order on every backend."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import keras
import numpy as np
import pytest

from tlsweep.config import Config
from tlsweep.data import ImageData, Split, load_data
from tlsweep.errors import UserError
from tlsweep.pipeline import (
    FeatureBatches,
    ImageBatches,
    Reshuffle,
    epoch_order,
    reading,
)

pytestmark = pytest.mark.backend  # runs on every Keras backend in CI


@pytest.fixture(scope="module")
def digits32(make_shared_config: Callable[..., Config]) -> ImageData:
    return load_data(make_shared_config().data, 32)


def _labels(batches) -> np.ndarray:
    return np.concatenate([batches[i][1] for i in range(len(batches))])


def test_image_batches_are_the_split_in_order(digits32: ImageData) -> None:
    split = digits32.val
    batches = ImageBatches(split, 64)
    assert len(batches) == -(-len(split) // 64)
    images, _ = batches[0]
    assert images.dtype == np.float32 and images.shape == (64, 32, 32, 3)
    np.testing.assert_array_equal(images, split.read(np.arange(64)).astype("float32"))
    np.testing.assert_array_equal(_labels(batches), split.labels)  # unshuffled: in order
    last_images, _ = batches[len(batches) - 1]
    assert len(last_images) == len(split) - 64 * (len(batches) - 1)


def test_shuffled_batches_are_a_seeded_permutation_per_epoch(digits32: ImageData) -> None:
    split = digits32.val
    batches = ImageBatches(split, 50, shuffle=True, seed=3)
    first = _labels(batches)
    np.testing.assert_array_equal(first, split.labels[epoch_order(len(split), 3, 0)])
    assert sorted(first.tolist()) == sorted(split.labels.tolist())
    assert not np.array_equal(first, split.labels)
    batches.set_epoch(1)
    second = _labels(batches)
    np.testing.assert_array_equal(second, split.labels[epoch_order(len(split), 3, 1)])
    assert not np.array_equal(second, first)
    again = ImageBatches(split, 50, shuffle=True, seed=3)
    np.testing.assert_array_equal(_labels(again), first)  # a new fit starts from epoch 0


def test_feature_batches_follow_the_image_order(digits32: ImageData) -> None:
    """A head on cached features sees the examples in the order the full model sees images."""
    split = digits32.train
    features = np.arange(len(split), dtype="float32")[:, None] * np.ones((1, 4), "float32")
    images = ImageBatches(split, 32, shuffle=True, seed=7)
    cached = FeatureBatches(features, split.labels, 32, shuffle=True, seed=7)
    for _ in range(2):
        for i in range(len(images)):
            x, y = cached[i]
            np.testing.assert_array_equal(y, images[i][1])
            np.testing.assert_array_equal(x[:, 0], images.indices(i))  # feature row = image
        images.set_epoch(images.epoch + 1)
        cached.set_epoch(cached.epoch + 1)


def test_fit_reshuffles_every_epoch(digits32: ImageData) -> None:
    """With `Reshuffle`, epoch e of ``fit`` trains in epoch_order(e) on every backend."""
    split = digits32.val
    served: list[tuple[int, int]] = []  # (epoch, batch) in the order fit asked for them

    class Recording(FeatureBatches):
        def __getitem__(self, index: int):
            served.append((self.epoch, index))
            return super().__getitem__(index)

    features = np.random.default_rng(0).normal(size=(len(split), 4)).astype("float32")
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(10, activation="softmax")])
    model.compile("sgd", "sparse_categorical_crossentropy")
    batches = Recording(features, split.labels, 100, shuffle=True, seed=1)
    orders: dict[int, np.ndarray] = {}

    class Orders(keras.callbacks.Callback):
        def on_epoch_end(self, epoch: int, logs=None) -> None:
            orders[epoch] = np.concatenate([batches.indices(i) for i in range(len(batches))])

    model.fit(batches, epochs=3, verbose=0, shuffle=False, callbacks=[Reshuffle(batches), Orders()])
    for epoch in range(3):
        np.testing.assert_array_equal(orders[epoch], epoch_order(len(split), 1, epoch))
    for epoch in range(3):  # every batch of every epoch was served in that epoch's order
        assert all((epoch, i) in served for i in range(len(batches)))
    assert served[-len(batches) :] == [(2, i) for i in range(len(batches))]


class _CountingSplit(Split):
    """A split that records which images each read asked for."""

    def read(self, indices=None) -> np.ndarray:
        self.reads.append(tuple(np.asarray(indices).tolist()))
        return super().read(indices)


def _counting_split(n: int = 95) -> _CountingSplit:
    images = np.random.default_rng(0).integers(0, 256, (n, 8, 8, 3), dtype="uint8")
    split = _CountingSplit(images, np.arange(n, dtype="int32") % 5, 8)
    object.__setattr__(split, "reads", [])
    return split


def test_batches_are_read_ahead_once_each_and_never_across_epochs() -> None:
    split = _counting_split()
    batches = ImageBatches(split, 10, shuffle=True, seed=4)
    for epoch in range(2):
        batches.set_epoch(epoch)
        order = epoch_order(len(split), 4, epoch)
        for i in range(len(batches)):
            images, labels = batches[i]
            np.testing.assert_array_equal(labels, split.labels[order[i * 10 : (i + 1) * 10]])
            expected_images = Split.read(split, order[i * 10 : (i + 1) * 10])  # unrecorded
            np.testing.assert_array_equal(images, expected_images)
        expected = [tuple(order[i * 10 : (i + 1) * 10].tolist()) for i in range(len(batches))]
        assert sorted(split.reads) == sorted(expected)  # each batch read exactly once
        split.reads.clear()
    batches.set_epoch(0)
    batches[0]  # batches 1..3 of epoch 0 are now being read ahead...
    batches.set_epoch(1)
    _, labels = batches[1]  # ...and none of them is served in epoch 1
    np.testing.assert_array_equal(labels, split.labels[epoch_order(len(split), 4, 1)[10:20]])


def test_a_broken_image_fails_fit_with_its_own_error(
    make_config: Callable[..., Config], image_folder: Callable[..., Path]
) -> None:
    """An image that cannot be decoded fails the fit with the one-line error naming it, not
    the backend's wrapping (TensorFlow reports errors of its input pipeline as UnknownError)."""
    root = image_folder({"cat": 6, "dog": 6}, suffix=".jpg")
    cfg = make_config("data=folder", f"data.path={root}")
    data = load_data(cfg.data, 8)
    broken = Path(data.train.items[0])
    broken.write_bytes(broken.read_bytes()[:200])  # truncated: its header still reads
    model = keras.Sequential(
        [keras.Input((8, 8, 3)), keras.layers.Flatten(), keras.layers.Dense(2)]
    )
    model.compile("sgd", keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    batches = ImageBatches(data.train, 4)
    with pytest.raises(UserError) as info, reading(batches):
        model.fit(batches, epochs=1, verbose=0)
    assert str(broken) in str(info.value)
    assert "\n" not in str(info.value)


def test_reading_passes_other_errors_through() -> None:
    split = Split(np.zeros((4, 8, 8, 3), "uint8"), np.zeros(4, "int32"), 8)
    batches = ImageBatches(split, 2)
    with pytest.raises(KeyError), reading(batches):
        raise KeyError("not a reading failure")
