"""Data sources -> train/val/test images at the backbone's input size, class names, fingerprint.

Every source ends as uint8 arrays of shape (N, S, S, 3) decoded and resized by a parallel
``tf.data`` pipeline; training batches are served by ``batches`` (shuffle, batch, prefetch).
TensorFlow is used here only, for the input pipeline; the model code is plain Keras.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from tlsweep.config import DataConfig
from tlsweep.errors import UserError

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif")
SPLIT_DIRS = {"train": ("train",), "val": ("val", "valid", "validation"), "test": ("test",)}
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


@dataclass(frozen=True)
class Split:
    """Images as uint8 (N, S, S, 3) raw RGB pixels and integer labels (N,)."""

    images: np.ndarray
    labels: np.ndarray

    def __len__(self) -> int:
        return len(self.labels)


@dataclass(frozen=True)
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


def load_data(cfg: DataConfig, input_size: int) -> ImageData:
    """Load the configured source and render every split at ``input_size``."""
    loaders = {"digits": _digits_source, "keras": _keras_source, "folder": _folder_source}
    source = _select_classes(loaders[cfg.source](cfg), cfg.classes)
    splits = {
        name: Split(_render(source, name, input_size), source.labels[name].astype("int32"))
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


def batches(split: Split, batch_size: int, *, shuffle: bool = False, seed: int = 0):
    """A ``tf.data.Dataset`` of (float32 images, labels) batches, prefetched."""
    import tensorflow as tf

    ds = tf.data.Dataset.from_tensor_slices((split.images, split.labels))
    if shuffle:
        ds = ds.shuffle(len(split), seed=seed, reshuffle_each_iteration=True)
    ds = ds.batch(batch_size).map(
        lambda x, y: (tf.cast(x, tf.float32), y), num_parallel_calls=tf.data.AUTOTUNE
    )
    return ds.prefetch(tf.data.AUTOTUNE)


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


def _folder_source(cfg: DataConfig) -> _Source:
    root = Path(str(cfg.path)).expanduser()
    if not root.is_dir():
        raise UserError(f"data.path={cfg.path}: no such directory")
    split_roots = {split: _find_split_dir(root, split) for split in SPLIT_DIRS}
    if split_roots["train"] is None:
        files, labels, names = _scan_classes(root)
        idx = dict(zip(("train", "val", "test"), _stratified_split(labels, cfg), strict=True))
        items = {split: files[i] for split, i in idx.items()}
        return _Source(items, {s: labels[i] for s, i in idx.items()}, names, root)
    files, labels, names = _scan_classes(split_roots["train"])
    items, labelled = {"train": files}, {"train": labels}
    for split in ("val", "test"):
        if split_roots[split] is not None:
            items[split], labelled[split] = _scan_classes(split_roots[split], names)[:2]
    _carve_missing_splits(items, labelled, cfg)
    return _Source(items, labelled, names, root)


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
            p for p in class_dir.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES
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
    return _Source(items, labels, new_names, source.root)


# --- decoding and resizing --------------------------------------------------------------------


def _render(source: _Source, split: str, size: int) -> np.ndarray:
    """Decode (files) and resize to (N, size, size, 3) uint8, in parallel with tf.data."""
    import tensorflow as tf

    items = source.items[split]
    if len(items) == 0:
        return np.zeros((0, size, size, 3), dtype="uint8")
    if source.root is None:
        ds = tf.data.Dataset.from_tensor_slices(items).map(
            lambda img: _to_rgb_uint8(img, size), num_parallel_calls=tf.data.AUTOTUNE
        )
    else:
        ds = tf.data.Dataset.from_tensor_slices(items).map(
            lambda path: _to_rgb_uint8(_decode(tf.io.read_file(path)), size),
            num_parallel_calls=tf.data.AUTOTUNE,
        )
    try:
        return np.concatenate(list(ds.batch(256).prefetch(2).as_numpy_iterator()))
    except tf.errors.InvalidArgumentError:
        raise UserError(_name_unreadable(items)) from None


def _decode(data):
    import tensorflow as tf

    image = tf.io.decode_image(data, channels=3, expand_animations=False)
    image.set_shape([None, None, 3])
    return image


def _to_rgb_uint8(image, size: int):
    import tensorflow as tf

    if image.shape.rank == 2:
        image = image[..., tf.newaxis]
    if image.shape[-1] == 1:
        image = tf.image.grayscale_to_rgb(image)
    if tuple(image.shape[:2]) == (size, size):
        return tf.cast(image, tf.uint8)
    resized = tf.image.resize(image, (size, size), method="bilinear")
    return tf.cast(tf.clip_by_value(tf.round(resized), 0, 255), tf.uint8)


def _name_unreadable(paths: np.ndarray) -> str:
    """Find the first file TensorFlow cannot decode (only called once decoding has failed)."""
    import tensorflow as tf

    for path in paths:
        try:
            _decode(tf.io.read_file(str(path)))
        except tf.errors.InvalidArgumentError as exc:
            reason = str(exc).splitlines()[0][:120]
            return f"cannot read image {path}: {reason}"
    return "cannot decode one of the images"


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
        for path in items:
            digest.update(str(Path(path).relative_to(source.root)).encode())
            digest.update(hashlib.sha256(Path(path).read_bytes()).digest())
    return digest.hexdigest()[:16]


def read_images(paths: Sequence[str], size: int) -> np.ndarray:
    """Image files as uint8 (N, size, size, 3), decoded and resized as in training."""
    missing = [p for p in paths if not Path(p).expanduser().is_file()]
    if missing:
        raise UserError(f"no such image file: {missing[0]}")
    files = np.array([str(Path(p).expanduser()) for p in paths])
    source = _Source({"input": files}, {"input": np.zeros(len(files))}, (), root=Path("/"))
    return _render(source, "input", size)
