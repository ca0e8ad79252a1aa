"""The feature cache: a frozen backbone's outputs, computed once and reused by every trial.

While the backbone is frozen (and no random augmentation runs), its pooled output for an
image never changes, so the head can train on stored features instead of images. The key
covers everything that changes those outputs: architecture and constructor options, the
backbone's actual weights (a content hash: ImageNet, a seeded random init or a weights file
alike), input size, preprocessing, pooling, the split's data fingerprint, the dtype and the
Keras version and backend. Nothing else is in it, so unrelated changes reuse the entry.

Entries are ``KEY.npy`` plus ``KEY.json`` (shape, dtype, checksum, description), written to
temporary files and renamed into place; a per-key file lock makes a second process wait for
the first one's pass and then reuse it. A truncated or corrupt entry fails its checksum and is
recomputed. Reads are memory-mapped; a size budget evicts the least recently used entries.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import keras
import numpy as np

from tlsweep.backbones import custom_source_identity, preprocess_mode, weights_digest
from tlsweep.config import CacheConfig, Config
from tlsweep.data import ImageData, Split, batches
from tlsweep.model import backbone_of, feature_extractor

SPLITS = ("train", "val", "test")
FEATURE_BATCH = 64  # fixed, so the stored values never depend on a trial's batch size
DEFAULT_DIR = Path("mlruns") / "feature_cache"


@dataclass(frozen=True)
class Features:
    """Pooled backbone features of each split, and whether they came from the cache."""

    train: np.ndarray
    val: np.ndarray
    test: np.ndarray
    status: str  # "hit": every split was stored already; "miss": at least one was computed


@dataclass(frozen=True)
class Entry:
    key: str
    bytes: int
    last_used: float
    description: dict[str, Any]


class FeatureStore:
    """A directory of feature arrays keyed by content, with an LRU size budget."""

    def __init__(self, directory: Path, max_bytes: int, dtype: str = "float32") -> None:
        self.directory = directory
        self.max_bytes = max_bytes
        self.dtype = np.dtype(dtype)

    @classmethod
    def from_config(cls, cfg: CacheConfig) -> FeatureStore:
        directory = Path(cfg.dir).expanduser() if cfg.dir else DEFAULT_DIR
        return cls(directory.resolve(), int(cfg.max_gb * 1e9), cfg.dtype)

    def get_or_compute(
        self, key: str, compute: Callable[[], np.ndarray], description: dict[str, Any]
    ) -> tuple[np.ndarray, bool]:
        """The stored array for ``key`` (True), or ``compute()``'s result, stored (False)."""
        self.directory.mkdir(parents=True, exist_ok=True)
        stored = self.load(key)
        if stored is not None:
            return stored, True
        with self._lock(key):
            stored = self.load(key)  # another process may have finished meanwhile
            if stored is not None:
                return stored, True
            array = np.ascontiguousarray(compute(), dtype=self.dtype)
            self._write(key, array, description)
        self.evict(keep=key)
        return array, False

    def load(self, key: str) -> np.ndarray | None:
        """The memory-mapped array, or None when absent, truncated or corrupt."""
        meta_path, data_path = self._paths(key)
        try:
            meta = json.loads(meta_path.read_text())
            if not _verified(data_path, meta):
                return None
            array = np.load(data_path, mmap_mode="r")
        except (OSError, ValueError, KeyError):
            return None
        os.utime(meta_path)  # least-recently-used bookkeeping
        return array

    def entries(self) -> list[Entry]:
        """Every complete entry, most recently used first."""
        found = []
        for meta_path in self._stored("json"):
            with contextlib.suppress(OSError, ValueError, KeyError):
                meta = json.loads(meta_path.read_text())
                found.append(
                    Entry(
                        meta["key"],
                        meta["bytes"],
                        meta_path.stat().st_mtime,
                        meta.get("description", {}),
                    )
                )
        return sorted(found, key=lambda e: e.last_used, reverse=True)

    def evict(self, keep: str | None = None) -> list[str]:
        """Remove least recently used entries until the store fits its budget."""
        entries = self.entries()
        total = sum(e.bytes for e in entries)
        removed = []
        for entry in reversed(entries):
            if total <= self.max_bytes:
                break
            if entry.key == keep:
                continue
            self.remove(entry.key)
            total -= entry.bytes
            removed.append(entry.key)
        return removed

    def remove(self, key: str) -> None:
        for path in (*self._paths(key), self.directory / f"{key}.lock"):
            path.unlink(missing_ok=True)

    def clear(self) -> int:
        """Remove every entry; returns how many there were."""
        keys = {p.stem for p in self._stored("npy")} | {p.stem for p in self._stored("json")}
        for key in keys:
            self.remove(key)
        for stray in self.directory.glob(".tmp-*"):
            stray.unlink(missing_ok=True)
        return len(keys)

    def _write(self, key: str, array: np.ndarray, description: dict[str, Any]) -> None:
        meta_path, data_path = self._paths(key)
        with tempfile.NamedTemporaryFile(
            dir=self.directory, prefix=".tmp-", suffix=".npy", delete=False
        ) as tmp:
            np.save(tmp, array)
        Path(tmp.name).replace(data_path)
        meta = {
            "key": key,
            "bytes": data_path.stat().st_size,
            "sha256": _sha256(data_path),
            "shape": list(array.shape),
            "dtype": str(array.dtype),
            "created": time.time(),
            "description": description,
        }
        with tempfile.NamedTemporaryFile(
            "w", dir=self.directory, prefix=".tmp-", suffix=".json", delete=False
        ) as tmp:
            json.dump(meta, tmp)
        Path(tmp.name).replace(meta_path)

    def _stored(self, suffix: str) -> list[Path]:
        """Entry files with ``suffix``; half-written ``.tmp-*`` files are no entries."""
        return [p for p in self.directory.glob(f"*.{suffix}") if not p.name.startswith(".tmp-")]

    def _paths(self, key: str) -> tuple[Path, Path]:
        return self.directory / f"{key}.json", self.directory / f"{key}.npy"

    @contextlib.contextmanager
    def _lock(self, key: str) -> Iterator[None]:
        with (self.directory / f"{key}.lock").open("a") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)


def cached_features(
    cfg: Config,
    model: keras.Model,
    data: ImageData,
    store: FeatureStore | None = None,
    weights_sha256: str | None = None,
) -> Features:
    """Pooled features of every split, from the store or computed once and stored.

    ``weights_sha256``: the backbone's weight hash, when the caller knows it already.
    """
    store = store or FeatureStore.from_config(cfg.cache)
    extractor = feature_extractor(model)
    identity = extractor_identity(cfg, model, store.dtype, weights_sha256)
    arrays, hits = {}, []
    for split in SPLITS:
        part: Split = getattr(data, split)
        fields = {**identity, "split": split, "data": data.split_fingerprints[split]}
        key = hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:32]
        description = {**fields, "n": len(part), "backbone": cfg.backbone.name}
        arrays[split], hit = store.get_or_compute(
            key,
            lambda part=part, split=split: compute_features(extractor, part, split),
            description,
        )
        hits.append(hit)
    return Features(**arrays, status="hit" if all(hits) else "miss")


def extractor_identity(
    cfg: Config, model: keras.Model, dtype: np.dtype, weights_sha256: str | None = None
) -> dict[str, Any]:
    """Everything about the frozen part that changes its output (the data comes separately).

    A custom backbone adds its source: the ``.keras`` file's SHA-256 and the cut layer, or the
    callable's name (and seed); keys of the other backbones are unchanged by it.
    """
    bb = cfg.backbone
    identity = {
        "architecture": bb.architecture,
        "options": bb.options,
        "weights_sha256": weights_sha256 or weights_digest(backbone_of(model)),
        "input_size": bb.input_size,
        "preprocess": preprocess_mode(bb),
        "pooling": cfg.head.pooling,
        "dtype": str(dtype),
        "compute_dtype": keras.mixed_precision.global_policy().compute_dtype,
        "keras": keras.__version__,
        "backend": keras.backend.backend(),
    }
    if bb.is_custom:
        identity["custom"] = custom_source_identity(bb, cfg.seed)
    return identity


def compute_features(extractor: keras.Model, split: Split, name: str = "") -> np.ndarray:
    """One fast pass (``predict`` on batched, prefetched data) with a progress bar."""
    if len(split) == 0:
        return np.zeros((0, *extractor.output_shape[1:]), dtype="float32")
    bar = _ProgressBar(f"features {name}", -(-len(split) // FEATURE_BATCH))
    with bar:
        return np.asarray(
            extractor.predict(batches(split, FEATURE_BATCH), verbose=0, callbacks=[bar.callback])
        )


def feature_batches(
    features: np.ndarray,
    labels: np.ndarray,
    batch_size: int,
    *,
    shuffle: bool = False,
    seed: int = 0,
):
    """A ``tf.data.Dataset`` of (float32 features, labels) batches, like `data.batches`."""
    import tensorflow as tf

    ds = tf.data.Dataset.from_tensor_slices((np.asarray(features, "float32"), labels))
    if shuffle:
        ds = ds.shuffle(len(labels), seed=seed, reshuffle_each_iteration=True)
    return ds.batch(batch_size).prefetch(tf.data.AUTOTUNE)


class _ProgressBar:
    """A rich progress bar driven by ``predict``'s batch callbacks (quiet when not a TTY)."""

    def __init__(self, label: str, total: int) -> None:
        from rich.progress import Progress

        self.progress = Progress(transient=True)
        self.task = self.progress.add_task(label, total=total)
        progress, task = self.progress, self.task

        class _Callback(keras.callbacks.Callback):
            def on_predict_batch_end(self, batch: int, logs: dict | None = None) -> None:
                progress.update(task, completed=batch + 1)

        self.callback = _Callback()

    def __enter__(self) -> _ProgressBar:
        self.progress.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.progress.stop()


# Files this process has hashed already, by (path, size, mtime, inode): a sweep reads the same
# entries every trial, and hashing a large feature file each time would cost more than the fit.
_VERIFIED: set[tuple[str, int, int, int, str]] = set()


def _verified(path: Path, meta: Mapping[str, Any]) -> bool:
    """Whether ``path`` holds exactly the bytes ``meta`` describes (hashed once per process)."""
    stat = path.stat()
    if stat.st_size != meta["bytes"]:
        return False
    identity = (str(path), stat.st_size, stat.st_mtime_ns, stat.st_ino, meta["sha256"])
    if identity in _VERIFIED:
        return True
    if _sha256(path) != meta["sha256"]:
        return False
    _VERIFIED.add(identity)
    return True


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()
