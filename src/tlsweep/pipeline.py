"""Batches that Keras fits and predicts on: the same batches on every Keras backend.

`ImageBatches` reads a `Split`'s images only when a batch is asked for (decoded and resized in
threads), and reads the next few batches in the background while the model computes, so a
folder of any size streams through in bounded memory. `FeatureBatches` serves cached
features (a memory-mapped array) the same way. Both shuffle by `epoch_order`, a permutation
seeded by (seed, epoch): a head trained on cached features and the full model trained on
images see the same examples in the same order, on TensorFlow, JAX and PyTorch alike.

The epoch comes from ``fit`` itself, through the `Reshuffle` callback (as PyTorch's samplers
take ``set_epoch``): Keras also calls a dataset's ``on_epoch_end`` when ``fit`` starts, so
counting those calls would not tell the epoch. Reading ahead is done here, keyed by (epoch,
batch), rather than by Keras' ``PyDataset`` workers: their queue carries batches read but not
yet used over into the next epoch (``OrderedEnqueuer.stop`` keeps them for "the next run"),
which made an epoch start with stale batches, a different number of them from run to run.

A failure while reading (an unreadable image) is kept on the batches object: `reading`
re-raises it as it was, instead of the backend's wrapping of it (TensorFlow turns an error
inside its input pipeline into an ``UnknownError`` with a traceback in its text).
"""

from __future__ import annotations

import contextlib
import functools
import math
import threading
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor

import keras
import numpy as np

from tlsweep.data import Split

READ_AHEAD = 3  # image batches read ahead of the one being computed


def epoch_order(n: int, seed: int, epoch: int) -> np.ndarray:
    """The order of ``n`` examples in epoch ``epoch`` of a shuffled fit seeded ``seed``."""
    return np.random.default_rng([seed, epoch]).permutation(n)


class _Batches(keras.utils.PyDataset):
    """Batches of inputs and labels in a fixed order, reshuffled per epoch if asked, the
    next ``read_ahead`` batches of the epoch read in the background."""

    def __init__(
        self,
        labels: np.ndarray,
        batch_size: int,
        *,
        shuffle: bool,
        seed: int,
        read_ahead: int = 0,
    ) -> None:
        super().__init__(workers=1, use_multiprocessing=False)  # no Keras enqueuer: see above
        self.labels = np.asarray(labels)
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.seed = seed
        self.read_ahead = read_ahead
        self.epoch = 0
        self.failure: BaseException | None = None
        self._order = self._epoch_order()
        self._ahead: dict[tuple[int, int], Future] = {}
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return math.ceil(len(self.labels) / self.batch_size)

    def indices(self, index: int) -> np.ndarray:
        """The example indices of batch ``index`` in the current epoch."""
        return self._order[index * self.batch_size : (index + 1) * self.batch_size]

    def __getitem__(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        if not 0 <= index < len(self):
            raise IndexError(index)
        with self._lock:
            pending = self._ahead.pop((self.epoch, index), None)
            self._schedule_after(index)
        try:
            return pending.result() if pending is not None else self._load(self.indices(index))
        except Exception as exc:  # kept for `reading` (a batch read ahead but never used is not)
            self.failure = self.failure or exc
            raise

    def inputs(self, indices: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def set_epoch(self, epoch: int) -> None:
        """Serve epoch ``epoch``'s order from now on (see `Reshuffle`)."""
        with self._lock:
            if epoch != self.epoch:
                self.epoch = epoch
                self._order = self._epoch_order()

    def _load(self, indices: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return self.inputs(indices), self.labels[indices]

    def _schedule_after(self, index: int) -> None:
        """Start reading the batches after ``index``; forget any not of this epoch's future."""
        for key in [k for k in self._ahead if k[0] != self.epoch or k[1] <= index]:
            self._ahead.pop(key).cancel()
        for ahead in range(index + 1, min(index + 1 + self.read_ahead, len(self))):
            key = (self.epoch, ahead)
            if key not in self._ahead:
                self._ahead[key] = _reader().submit(self._load, self.indices(ahead))

    def _epoch_order(self) -> np.ndarray:
        n = len(self.labels)
        return epoch_order(n, self.seed, self.epoch) if self.shuffle else np.arange(n)


class ImageBatches(_Batches):
    """(images, labels) batches of a split, read from disk (or memory) as they are needed.

    Images come as float32 pixels in [0, 255]; the model's own layers preprocess them.
    """

    def __init__(
        self, split: Split, batch_size: int, *, shuffle: bool = False, seed: int = 0
    ) -> None:
        super().__init__(
            split.labels, batch_size, shuffle=shuffle, seed=seed, read_ahead=READ_AHEAD
        )
        self.split = split

    def inputs(self, indices: np.ndarray) -> np.ndarray:
        return self.split.read(indices).astype("float32")


class FeatureBatches(_Batches):
    """(features, labels) batches of cached features (a memory-mapped array is read as
    needed), in the order `ImageBatches` would give the images they came from."""

    def __init__(
        self,
        features: np.ndarray,
        labels: np.ndarray,
        batch_size: int,
        *,
        shuffle: bool = False,
        seed: int = 0,
    ) -> None:
        super().__init__(labels, batch_size, shuffle=shuffle, seed=seed)
        self.features = features

    def inputs(self, indices: np.ndarray) -> np.ndarray:
        return np.asarray(self.features[indices], "float32")


class Reshuffle(keras.callbacks.Callback):
    """Gives shuffled batches the number of each epoch as ``fit`` begins it.

    Keras reads a ``PyDataset``'s batches lazily, when the epoch's first step asks for them,
    which is after the callbacks' ``on_epoch_begin``: epoch ``e`` is served in the order
    ``epoch_order(n, seed, e)`` on every backend (``initial_epoch`` included).
    """

    def __init__(self, *batches: _Batches) -> None:
        super().__init__()
        self.batches = batches

    def on_epoch_begin(self, epoch: int, logs: dict | None = None) -> None:
        for batches in self.batches:
            batches.set_epoch(epoch)


@functools.cache
def _reader() -> ThreadPoolExecutor:
    """Threads that read batches ahead (each read then decodes in the data module's pool,
    which must be another one: a batch waits for its images)."""
    return ThreadPoolExecutor(max_workers=2, thread_name_prefix="tlsweep-batches")


@contextlib.contextmanager
def reading(*sources: _Batches) -> Iterator[None]:
    """Re-raise a failure of reading ``sources`` as itself, however the backend wrapped it."""
    try:
        yield
    except Exception:
        failure = next((s.failure for s in sources if s.failure is not None), None)
        if failure is not None:
            raise failure from None
        raise
