"""The feature cache: a frozen backbone's outputs, computed once and reused by every trial.

While the backbone is frozen (and no random augmentation runs), its pooled output for an
image never changes, so the head can train on stored features instead of images. The key
covers everything that changes those outputs: architecture and constructor options, the
backbone's actual weights (a content hash: ImageNet, a seeded random init or a weights file
alike), input size, preprocessing, pooling, how images are decoded, the feature pass's batch
size, the split's data fingerprint, the dtype and the Keras version and backend. Nothing else
is in it, so unrelated changes reuse the entry.

The feature pass streams the split's images through the extractor a batch at a time (the next
batches are read in background threads), and each batch's features are appended to the
entry's file as they come: memory holds a few batches, never the split. Entries are
``KEY.npy`` plus ``KEY.json`` (shape, dtype, checksum, description), written to temporary
files and renamed into place; a per-key file lock makes a second process wait for the first
one's pass and then reuse it. A truncated or corrupt entry fails its checksum and is
recomputed. Reads are memory-mapped; a size budget evicts the least recently used entries.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import io
import json
import math
import os
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import keras
import numpy as np

from tlsweep import backend, interrupts
from tlsweep.backbones import custom_source_identity, preprocess_mode, weights_digest
from tlsweep.config import CacheConfig, Config
from tlsweep.data import RENDERING, ImageData, Split
from tlsweep.errors import UserError
from tlsweep.model import backbone_of, feature_extractor
from tlsweep.pipeline import ImageBatches

SPLITS = ("train", "val", "test")
# The feature pass's batch size when cache.batch_size is null; fixed (not a trial's batch
# size) so that stored values never depend on the trial that computed them.
CPU_FEATURE_BATCH, GPU_FEATURE_BATCH = 64, 256


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
        return cls(cfg.directory.resolve(), int(cfg.max_gb * 1e9), cfg.dtype)

    def get_or_compute(
        self,
        key: str,
        shape: tuple[int, ...],
        compute: Callable[[], Iterable[np.ndarray]],
        description: dict[str, Any],
    ) -> tuple[np.ndarray, bool]:
        """The stored array for ``key`` (True), or the array of ``shape`` whose rows
        ``compute()`` yields in blocks, written as they come and stored (False). Either way
        the array is memory-mapped from the store."""
        self.directory.mkdir(parents=True, exist_ok=True)
        stored = self.load(key)
        if stored is not None:
            return stored, True
        with self._lock(key):
            stored = self.load(key)  # another process may have finished meanwhile
            if stored is not None:
                return stored, True
            self._write(key, shape, compute(), description)
        self.evict(keep=key)
        written = self.load(key)
        if written is None:  # removed meanwhile (a concurrent clear): compute it again
            return self.get_or_compute(key, shape, compute, description)
        return written, False

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

    def _write(
        self,
        key: str,
        shape: tuple[int, ...],
        blocks: Iterable[np.ndarray],
        description: dict[str, Any],
    ) -> None:
        """Append ``blocks`` to a temporary ``.npy`` file, then rename it and its metadata
        into place. Hold the key's lock. A failure (a full disk, an interrupt) removes the
        temporary file and leaves no entry; so does a process killed here, at its next write
        of the key: temporary files of a key belong to whoever holds its lock."""
        meta_path, data_path = self._paths(key)
        for stale in self.directory.glob(f".tmp-{key}-*"):
            stale.unlink(missing_ok=True)
        temporary = self.directory / f".tmp-{key}-{os.getpid()}.npy"
        try:
            writer = _ArrayWriter(temporary, shape, self.dtype)
            with writer:
                for block in blocks:
                    writer.append(block)
            temporary.replace(data_path)
        except OSError as exc:
            temporary.unlink(missing_ok=True)
            if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                size = math.prod(shape) * self.dtype.itemsize / 1e6
                raise UserError(
                    f"no space left in the feature cache {self.directory} for a {size:.0f} MB "
                    "entry; free some, or set cache.dir (or cache.max_gb, cache.dtype=float16)"
                ) from None
            raise
        except BaseException:
            temporary.unlink(missing_ok=True)
            raise
        meta = {
            "key": key,
            "bytes": writer.bytes,
            "sha256": writer.sha256,
            "shape": list(shape),
            "dtype": str(self.dtype),
            "created": time.time(),
            "description": description,
        }
        meta_temporary = self.directory / f".tmp-{key}-{os.getpid()}.json"
        try:
            meta_temporary.write_text(json.dumps(meta))
            meta_temporary.replace(meta_path)
        except BaseException:
            meta_temporary.unlink(missing_ok=True)
            raise
        _remember_verified(data_path, meta)

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
    batch_size = identity["batch_size"]
    arrays, hits = {}, []
    for split in SPLITS:
        part: Split = getattr(data, split)
        fields = {**identity, "split": split, "data": data.split_fingerprints[split]}
        key = hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:32]
        description = {**fields, "n": len(part), "backbone": cfg.backbone.name}
        arrays[split], hit = store.get_or_compute(
            key,
            (len(part), *extractor.output_shape[1:]),
            lambda part=part, split=split: feature_blocks(extractor, part, batch_size, split),
            description,
        )
        hits.append(hit)
    return Features(**arrays, status="hit" if all(hits) else "miss")


def feature_batch_size(cfg: CacheConfig) -> int:
    """``cache.batch_size``, or by default 64 images per batch on a CPU and 256 on a GPU."""
    if cfg.batch_size is not None:
        return cfg.batch_size
    return GPU_FEATURE_BATCH if backend.device_kind() == "gpu" else CPU_FEATURE_BATCH


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
        "rendering": RENDERING,
        "batch_size": feature_batch_size(cfg.cache),
        "dtype": str(dtype),
        "compute_dtype": keras.mixed_precision.global_policy().compute_dtype,
        "keras": keras.__version__,
        "backend": keras.backend.backend(),
    }
    if bb.is_custom:
        identity["custom"] = custom_source_identity(bb, cfg.seed)
    return identity


def compute_features(
    extractor: keras.Model, split: Split, batch_size: int = CPU_FEATURE_BATCH, name: str = ""
) -> np.ndarray:
    """The features of a whole split in memory (a small one: the cache streams instead)."""
    blocks = list(feature_blocks(extractor, split, batch_size, name))
    if not blocks:
        return np.zeros((0, *extractor.output_shape[1:]), dtype="float32")
    return np.concatenate(blocks)


def feature_blocks(
    extractor: keras.Model, split: Split, batch_size: int, name: str = ""
) -> Iterator[np.ndarray]:
    """The extractor's outputs, batch by batch, as the split's images stream from disk.

    Every call has the same batch shape (the last batch is padded, and the padding's outputs
    dropped): a backend that compiles per input shape (JAX, XLA) compiles once, and no image's
    features depend on how many images the split has.
    """
    batches = ImageBatches(split, batch_size)  # the next batches are read meanwhile
    with _progress(f"features {name}", len(batches)) as advance:
        for index in range(len(batches)):
            interrupts.raise_pending()  # a signal swallowed where it landed stops here
            images, _ = batches[index]
            n = len(images)
            if n < batch_size:
                images = np.concatenate(
                    [images, np.zeros((batch_size - n, *images.shape[1:]), images.dtype)]
                )
            outputs = keras.ops.convert_to_numpy(extractor.predict_on_batch(images))
            yield np.asarray(outputs[:n], dtype="float32")
            advance()


@contextlib.contextmanager
def _progress(label: str, total: int) -> Iterator[Callable[[], None]]:
    """A rich progress bar (transient; quiet when not a terminal); yields its step function."""
    from rich.console import Console
    from rich.progress import Progress

    console = Console()
    progress = Progress(transient=True, console=console, disable=not console.is_terminal)
    task = progress.add_task(label, total=total)
    with progress:
        yield lambda: progress.advance(task)


class _ArrayWriter:
    """Writes an ``.npy`` file of known shape block by block, hashing the bytes as they go:
    no block is kept, and the checksum needs no second read. A full disk raises ``OSError``
    (a memory map would crash the process with SIGBUS instead)."""

    def __init__(self, path: Path, shape: tuple[int, ...], dtype: np.dtype) -> None:
        self.path = path
        self.shape = tuple(int(d) for d in shape)
        self.dtype = np.dtype(dtype)
        self.rows = 0
        self.bytes = 0
        self._digest = hashlib.sha256()
        self._handle = path.open("wb", buffering=0)  # each block reaches the file at once
        header = io.BytesIO()
        np.lib.format.write_array_header_2_0(
            header,
            {
                "descr": np.lib.format.dtype_to_descr(self.dtype),
                "fortran_order": False,
                "shape": self.shape,
            },
        )
        self._emit(header.getvalue())

    def append(self, block: np.ndarray) -> None:
        block = np.ascontiguousarray(block, dtype=self.dtype)
        if block.shape[1:] != self.shape[1:] or self.rows + len(block) > self.shape[0]:
            raise ValueError(f"block {block.shape} does not fit an array of shape {self.shape}")
        self._emit(block.tobytes())
        self.rows += len(block)

    @property
    def sha256(self) -> str:
        return self._digest.hexdigest()

    def _emit(self, data: bytes) -> None:
        self._handle.write(data)
        self._digest.update(data)
        self.bytes += len(data)

    def __enter__(self) -> _ArrayWriter:
        return self

    def __exit__(self, kind: object, *rest: object) -> None:
        try:
            if kind is None:
                if self.rows != self.shape[0]:
                    raise ValueError(f"wrote {self.rows} rows of an array of shape {self.shape}")
                self._handle.flush()
                os.fsync(self._handle.fileno())
        finally:
            self._handle.close()


# Files this process has hashed already, by (path, size, mtime, inode): a sweep reads the same
# entries every trial, and hashing a large feature file each time would cost more than the fit.
_VERIFIED: set[tuple[str, int, int, int, str]] = set()


def _identity(path: Path, sha256: str) -> tuple[str, int, int, int, str]:
    stat = path.stat()
    return (str(path), stat.st_size, stat.st_mtime_ns, stat.st_ino, sha256)


def _remember_verified(path: Path, meta: Mapping[str, Any]) -> None:
    """A file this process just wrote, with the checksum it computed while writing."""
    _VERIFIED.add(_identity(path, meta["sha256"]))


def _verified(path: Path, meta: Mapping[str, Any]) -> bool:
    """Whether ``path`` holds exactly the bytes ``meta`` describes (hashed once per process)."""
    if path.stat().st_size != meta["bytes"]:
        return False
    identity = _identity(path, meta["sha256"])
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
