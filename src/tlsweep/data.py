"""Data sources -> train/val/test splits read on demand, class names, fingerprint.

A split holds labels and a way to read any of its images, decoded and resized to the
backbone's input size only when asked (`Split.read`): image folders stay on disk and are
streamed in batches, so memory does not grow with the number of images. The in-memory sources
(digits, ``keras.datasets``) keep their source-resolution arrays and resize per batch.

Decoding and resizing use Pillow in a thread pool (its decoders release the GIL), with no
TensorFlow: the same pixels on every Keras backend. Folder scans remember each file's content
hash in a manifest keyed on path, size and modification time, so an unchanged folder is not
read again to fingerprint it.
"""

from __future__ import annotations

import functools
import hashlib
import io
import json
import os
import tempfile
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import PIL
from PIL import Image, UnidentifiedImageError

from tlsweep.config import Config, DataConfig
from tlsweep.errors import UserError

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif")
SPLIT_DIRS = {"train": ("train",), "val": ("val", "valid", "validation"), "test": ("test",)}
# How files become pixels (decoder, resampling): part of the feature cache's key.
RENDERING = f"pillow-{PIL.__version__}-bilinear"
MANIFEST_VERSION = 1
KERAS_CLASS_NAMES = {
    "cifar10": (
        "airplane",
        "automobile",
        "bird",
        "cat",
        "deer",
        "dog",
        "frog",
        "horse",
        "ship",
        "truck",
    ),
    "fashion_mnist": (
        "t-shirt",
        "trouser",
        "pullover",
        "dress",
        "coat",
        "sandal",
        "shirt",
        "sneaker",
        "bag",
        "ankle boot",
    ),
}


@dataclass(frozen=True, eq=False)
class Split:
    """Integer labels (N,) and the images behind them, read at ``size`` x ``size`` on demand.

    ``items`` holds either source images in memory, uint8 (N, h, w[, c]), or image file
    paths (a string array): `read` decodes and resizes only the images asked for.
    """

    items: np.ndarray
    labels: np.ndarray
    size: int

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def from_files(self) -> bool:
        return self.items.dtype.kind in "UO"

    def read(self, indices: Sequence[int] | np.ndarray | None = None) -> np.ndarray:
        """uint8 (n, size, size, 3) RGB pixels of the images at ``indices`` (None: all)."""
        chosen = self.items if indices is None else self.items[np.asarray(indices, "int64")]
        out = np.empty((len(chosen), self.size, self.size, 3), dtype="uint8")
        if len(chosen) == 0:
            return out
        if not self.from_files and chosen.shape[1:] == (self.size, self.size, 3):
            out[:] = chosen
            return out
        render = _render_file if self.from_files else _render_array

        def fill(i: int) -> None:
            out[i] = render(chosen[i], self.size)

        list(_pool().map(fill, range(len(chosen))))
        return out


@dataclass(frozen=True, eq=False)
class ImageData:
    """The three splits, the class names and a fingerprint of exactly what was used."""

    train: Split
    val: Split
    test: Split
    class_names: tuple[str, ...]
    fingerprint: str
    split_fingerprints: dict[str, str]

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def counts(self) -> dict[str, int]:
        return {"train": len(self.train), "val": len(self.val), "test": len(self.test)}


@dataclass(frozen=True)
class _Source:
    """Undecoded splits: arrays of images at source resolution, or image file paths."""

    items: dict[str, np.ndarray]  # split -> images (N, h, w[, 3]) uint8, or file paths
    labels: dict[str, np.ndarray]
    class_names: tuple[str, ...]
    root: Path | None = None  # set for file sources
    digests: dict[str, bytes] | None = None  # file path -> SHA-256 of its bytes (file sources)


def load_data(cfg: DataConfig, input_size: int, manifest_dir: Path | None = None) -> ImageData:
    """The configured source's splits, read at ``input_size`` on demand.

    ``manifest_dir``: where folder scans keep their manifests (None: hash every file again).
    Files that are not images are refused here, naming the file.
    """
    loaders = {"digits": _digits_source, "keras": _keras_source, "folder": _folder_source}
    if cfg.source == "folder":
        source = _folder_source(cfg, manifest_dir)
    else:
        source = loaders[cfg.source](cfg)
    source = _select_classes(source, cfg.classes)
    splits = {
        name: Split(source.items[name], source.labels[name].astype("int32"), input_size)
        for name in ("train", "val", "test")
    }
    fingerprints = {name: _fingerprint(source, name) for name in splits}
    overall = hashlib.sha256(
        "|".join([*source.class_names, *(fingerprints[n] for n in sorted(fingerprints))]).encode()
    ).hexdigest()[:16]
    return ImageData(
        **splits,
        class_names=source.class_names,
        fingerprint=overall,
        split_fingerprints=fingerprints,
    )


def load_run_data(cfg: Config) -> ImageData:
    """The data a run of ``cfg`` trains on: its source at the backbone's input size, with the
    folder manifests kept beside the feature cache."""
    return load_data(cfg.data, cfg.backbone.input_size, cfg.cache.manifest_dir)


def read_images(paths: Sequence[str], size: int) -> np.ndarray:
    """Image files as uint8 (N, size, size, 3), decoded and resized as in training."""
    missing = [p for p in paths if not Path(p).expanduser().is_file()]
    if missing:
        raise UserError(f"no such image file: {missing[0]}")
    files = np.array([str(Path(p).expanduser()) for p in paths])
    return Split(files, np.zeros(len(files), "int32"), size).read()


# --- sources -------------------------------------------------------------------------------


def _digits_source(cfg: DataConfig) -> _Source:
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = np.round(digits.images * (255.0 / 16.0)).astype("uint8")
    names = tuple(str(i) for i in range(10))
    images, labels, names = _keep_classes(images, digits.target, names, cfg.classes)
    train, val, test = _stratified_split(labels, cfg)
    return _Source(
        items={"train": images[train], "val": images[val], "test": images[test]},
        labels={"train": labels[train], "val": labels[val], "test": labels[test]},
        class_names=names,
    )


def _keras_source(cfg: DataConfig) -> _Source:
    import keras

    module = getattr(keras.datasets, cfg.name, None)
    if module is None or not hasattr(module, "load_data"):
        raise UserError(f"data.name={cfg.name} is not a keras.datasets image set")
    try:
        (x_train, y_train), (x_test, y_test) = module.load_data()
    except Exception as exc:  # network errors come in many types
        raise UserError(
            f"could not download keras.datasets.{cfg.name} ({' '.join(str(exc).split())[:160]}); "
            "without internet use data=digits or data=folder data.path=..."
        ) from None
    y_train, y_test = np.ravel(y_train), np.ravel(y_test)
    x_train, y_train = x_train[: cfg.train_limit], y_train[: cfg.train_limit]
    x_test, y_test = x_test[: cfg.test_limit], y_test[: cfg.test_limit]
    n_val = round(len(x_train) * cfg.val_fraction)  # the last fraction, as validation_split
    names = KERAS_CLASS_NAMES.get(cfg.name, tuple(str(i) for i in range(int(y_train.max()) + 1)))
    return _Source(
        items={"train": x_train[:-n_val], "val": x_train[-n_val:], "test": x_test},
        labels={"train": y_train[:-n_val], "val": y_train[-n_val:], "test": y_test},
        class_names=names,
    )


def _folder_source(cfg: DataConfig, manifest_dir: Path | None = None) -> _Source:
    root = Path(str(cfg.path)).expanduser()
    if not root.is_dir():
        raise UserError(f"data.path={cfg.path}: no such directory")
    split_roots = {split: _find_split_dir(root, split) for split in SPLIT_DIRS}
    if split_roots["train"] is None:
        files, labels, names = _scan_classes(root)
        idx = dict(zip(("train", "val", "test"), _stratified_split(labels, cfg), strict=True))
        items = {split: files[i] for split, i in idx.items()}
        labelled = {s: labels[i] for s, i in idx.items()}
    else:
        files, labels, names = _scan_classes(split_roots["train"])
        items, labelled = {"train": files}, {"train": labels}
        for split in ("val", "test"):
            if split_roots[split] is not None:
                items[split], labelled[split] = _scan_classes(split_roots[split], names)[:2]
        _carve_missing_splits(items, labelled, cfg)
    used = np.concatenate(list(items.values()))
    digests = FolderManifest(root, manifest_dir).digests(used)
    return _Source(items, labelled, names, root, digests)


def _find_split_dir(root: Path, split: str) -> Path | None:
    return next((root / d for d in SPLIT_DIRS[split] if (root / d).is_dir()), None)


def _scan_classes(
    root: Path, expected: Sequence[str] | None = None
) -> tuple[np.ndarray, np.ndarray, tuple[str, ...]]:
    class_dirs = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    names = tuple(p.name for p in class_dirs)
    if expected is None and len(names) < 2:
        raise UserError(f"{root} has {len(names)} class folder(s); need at least 2, one per class")
    if expected is not None and set(names) - set(expected):
        raise UserError(f"{root} has classes not in train/: {sorted(set(names) - set(expected))}")
    order = list(expected or names)
    files, labels = [], []
    for class_dir in class_dirs:
        images = sorted(
            p for p in class_dir.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()
        )
        if not images:
            raise UserError(f"class folder {class_dir} has no images ({', '.join(IMAGE_SUFFIXES)})")
        files += [str(p) for p in images]
        labels += [order.index(class_dir.name)] * len(images)
    return np.array(files), np.array(labels, dtype="int64"), tuple(order)


def _carve_missing_splits(
    items: dict[str, np.ndarray], labels: dict[str, np.ndarray], cfg: DataConfig
) -> None:
    """With train/ present but no val/ (or test/), take them from train/ by stratified fractions."""
    fractions = {"val": cfg.val_fraction, "test": cfg.test_fraction}
    for split in ("test", "val"):
        if split in items:
            continue
        keep, carved = _split_once(labels["train"], fractions[split] or 0.2, cfg.split_seed)
        items[split], labels[split] = items["train"][carved], labels["train"][carved]
        items["train"], labels["train"] = items["train"][keep], labels["train"][keep]
    if cfg.train_limit:
        items["train"], labels["train"] = (
            items["train"][: cfg.train_limit],
            labels["train"][: cfg.train_limit],
        )


# --- the folder manifest -------------------------------------------------------------------


class FolderManifest:
    """Content hashes of a folder's image files, remembered by (path, size, mtime).

    Stored as JSON in ``directory`` (one file per folder, written atomically; concurrent
    writers each write a complete, correct manifest). A file whose size or modification time
    changed is read and hashed again; a new file is also decoded once, so that a stray text
    file or a truncated image is refused, by name, before anything trains.
    """

    def __init__(self, root: Path, directory: Path | None) -> None:
        self.root = root.absolute()
        self.path = None
        if directory is not None:
            name = hashlib.sha256(str(self.root).encode()).hexdigest()[:16]
            self.path = directory / f"{name}.json"

    def digests(self, files: np.ndarray) -> dict[str, bytes]:
        """SHA-256 digest of each file's bytes, from the manifest when unchanged."""
        known = self._load()
        stats = {str(f): Path(f).stat() for f in files}
        entries: dict[str, list] = {}
        fresh = []
        for name, st in stats.items():
            entry = known.get(self._relative(name))
            if entry and entry[0] == st.st_size and entry[1] == st.st_mtime_ns:
                entries[name] = entry
            else:
                fresh.append(name)
        for name, digest in zip(fresh, _pool().map(_checked_digest, fresh), strict=True):
            st = stats[name]
            entries[name] = [st.st_size, st.st_mtime_ns, digest]
        if fresh:
            self._save(known | {self._relative(n): e for n, e in entries.items()})
        return {name: bytes.fromhex(entry[2]) for name, entry in entries.items()}

    def _relative(self, path: str) -> str:
        return os.path.relpath(path, self.root)

    def _load(self) -> dict[str, list]:
        if self.path is None:
            return {}
        try:
            document = json.loads(self.path.read_text())
        except (OSError, ValueError):
            return {}
        if document.get("version") != MANIFEST_VERSION or document.get("root") != str(self.root):
            return {}
        return dict(document.get("files", {}))

    def _save(self, files: dict[str, list]) -> None:
        if self.path is None:
            return
        document = {"version": MANIFEST_VERSION, "root": str(self.root), "files": files}
        temporary = None
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with tempfile.NamedTemporaryFile(
                "w", dir=self.path.parent, prefix=".tmp-", suffix=".json", delete=False
            ) as handle:
                temporary = Path(handle.name)
                json.dump(document, handle)
            temporary.replace(self.path)
        except OSError:  # a read-only or full disk: the manifest is only a shortcut
            if temporary is not None:
                temporary.unlink(missing_ok=True)


def _checked_digest(path: str) -> str:
    """SHA-256 of the file's bytes, once Pillow has decoded them as an image (a JPEG at a
    reduced scale: under a millisecond, and a truncated file still fails)."""
    data = Path(path).read_bytes()
    try:
        with Image.open(io.BytesIO(data)) as image:
            image.draft("RGB", (64, 64))
            image.load()
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise UserError(f"cannot read image {path}: {_reason(exc)}") from None
    return hashlib.sha256(data).hexdigest()


# --- splitting and selection ----------------------------------------------------------------


def _stratified_split(labels: np.ndarray, cfg: DataConfig) -> tuple[np.ndarray, ...]:
    """Seeded, stratified train/val/test indices; ``train_limit`` caps the train+val pool."""
    all_idx = np.arange(len(labels))
    pool, test = _split_once(labels, cfg.test_fraction, cfg.split_seed)
    test = test[: cfg.test_limit]
    pool = pool[: cfg.train_limit]
    train, val = _split_once(labels[pool], cfg.val_fraction, cfg.split_seed)
    return all_idx[pool][train], all_idx[pool][val], test


def _split_once(labels: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    from sklearn.model_selection import train_test_split

    idx = np.arange(len(labels))
    if fraction <= 0:
        return idx, idx[:0]
    try:
        keep, carved = train_test_split(
            idx, test_size=fraction, stratify=labels, random_state=seed, shuffle=True
        )
    except ValueError as exc:
        raise UserError(f"cannot split {len(labels)} images by class: {exc}") from None
    return keep, carved


def _keep_classes(
    images: np.ndarray, labels: np.ndarray, names: tuple[str, ...], keep: Sequence[str] | None
) -> tuple[np.ndarray, np.ndarray, tuple[str, ...]]:
    if not keep:
        return images, labels, names
    keep = [str(k) for k in keep]
    unknown = [k for k in keep if k not in names]
    if unknown:
        raise UserError(f"data.classes has unknown classes {unknown}; choose from {list(names)}")
    if len(keep) < 2:
        raise UserError(f"data.classes={keep} is not allowed: need at least 2 classes")
    old = [names.index(k) for k in keep]
    mask = np.isin(labels, old)
    remap = {o: i for i, o in enumerate(old)}
    return images[mask], np.array([remap[v] for v in labels[mask]]), tuple(keep)


def _select_classes(source: _Source, keep: Sequence[str] | None) -> _Source:
    """Apply ``data.classes`` to sources that did not filter while loading (keras, folder)."""
    if not keep or tuple(str(k) for k in keep) == source.class_names:
        return source
    items, labels = {}, {}
    names = source.class_names
    for split in source.items:
        items[split], labels[split], new_names = _keep_classes(
            source.items[split], source.labels[split], names, keep
        )
    return _Source(items, labels, new_names, source.root, source.digests)


# --- decoding and resizing --------------------------------------------------------------------


def _render_file(path: str, size: int) -> np.ndarray:
    """A file decoded to RGB and resized to (size, size, 3) uint8; a bad file is named."""
    try:
        with Image.open(path) as image:
            image.draft("RGB", (size, size))  # JPEG: decode at a reduced scale when large
            return _resized(image, size)
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise UserError(f"cannot read image {path}: {_reason(exc)}") from None


def _render_array(image: np.ndarray, size: int) -> np.ndarray:
    """An in-memory uint8 image (h, w), (h, w, 1) or (h, w, 3) as (size, size, 3)."""
    if image.ndim == 3 and image.shape[-1] == 1:
        image = image[..., 0]
    return _resized(Image.fromarray(np.ascontiguousarray(image)), size)


def _resized(image: Image.Image, size: int) -> np.ndarray:
    rgb = image if image.mode == "RGB" else image.convert("RGB")
    if rgb.size != (size, size):
        rgb = rgb.resize((size, size), Image.Resampling.BILINEAR)
    return np.asarray(rgb, dtype="uint8")


@functools.cache
def _pool() -> ThreadPoolExecutor:
    """Threads that decode, resize and hash images (Pillow and hashlib release the GIL)."""
    return ThreadPoolExecutor(max_workers=max(2, _cpu_count()), thread_name_prefix="tlsweep-io")


def _cpu_count() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def _reason(exc: BaseException) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text[:160]


# --- fingerprint --------------------------------------------------------------------------------


def _fingerprint(source: _Source, split: str) -> str:
    """Content hash of one split: the images (or file bytes and relative paths) and labels."""
    digest = hashlib.sha256()
    digest.update(np.ascontiguousarray(source.labels[split]).astype("int64").tobytes())
    items = source.items[split]
    if source.root is None:
        digest.update(str(items.shape).encode())
        digest.update(np.ascontiguousarray(items).tobytes())
    else:
        assert source.digests is not None
        for path in items:
            digest.update(str(Path(path).relative_to(source.root)).encode())
            digest.update(source.digests[str(path)])
    return digest.hexdigest()[:16]
