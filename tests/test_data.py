"""Data sources: digits, image folders (both layouts, every format), keras offline; reading
images on demand; the folder manifest."""

from __future__ import annotations

import json
import os
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from sklearn.datasets import load_digits

from tlsweep import data as data_module
from tlsweep.config import Config
from tlsweep.data import ImageData, load_data
from tlsweep.errors import UserError

N_DIGITS = 1797


@pytest.fixture(scope="module")
def digits32(make_shared_config: Callable[..., Config]) -> ImageData:
    cfg = make_shared_config()
    return load_data(cfg.data, 32)


def _load(make_config: Callable[..., Config], *overrides: str, size: int = 8) -> ImageData:
    return load_data(make_config(*overrides).data, size)


def _folder(make_config: Callable[..., Config], root: Path, *overrides: str) -> Config:
    return make_config("data=folder", f"data.path={root}", *overrides)


def _all_labels(data: ImageData) -> np.ndarray:
    return np.concatenate([data.train.labels, data.val.labels, data.test.labels])


# --- digits --------------------------------------------------------------------------------


def test_digits_shapes_and_classes(digits32: ImageData) -> None:
    data = digits32
    assert data.class_names == tuple(str(i) for i in range(10))
    assert data.num_classes == 10
    for split in (data.train, data.val, data.test):
        images = split.read()
        assert images.dtype == np.uint8
        assert images.shape[1:] == (32, 32, 3)
        assert images.shape[0] == len(split.labels)
        assert images.max() > 200  # rendered at full contrast, not left in 0..16
        assert set(np.unique(split.labels)) == set(range(10))


def test_digits_split_sizes(digits32: ImageData) -> None:
    # test_fraction 0.25 of 1797, then val_fraction 0.2 of the rest (sklearn rounds up)
    assert digits32.counts == {"train": 1077, "val": 270, "test": 450}
    assert sum(digits32.counts.values()) == N_DIGITS


def test_digits_splits_are_stratified(digits32: ImageData) -> None:
    overall = Counter(load_digits().target.tolist())
    for split in (digits32.train, digits32.val, digits32.test):
        counts = Counter(split.labels.tolist())
        for label, n in overall.items():
            assert abs(counts[label] - n * len(split) / N_DIGITS) <= 1.0


def test_digits_split_is_seeded(make_config: Callable[..., Config]) -> None:
    first = _load(make_config)
    again = _load(make_config)
    other = _load(make_config, "data.split_seed=1")
    assert first.fingerprint == again.fingerprint
    assert first.split_fingerprints == again.split_fingerprints
    np.testing.assert_array_equal(first.train.read(), again.train.read())
    np.testing.assert_array_equal(first.test.labels, again.test.labels)
    assert other.fingerprint != first.fingerprint
    assert other.counts == first.counts
    assert not np.array_equal(other.test.labels, first.test.labels)


def test_digits_images_are_the_dataset_images(make_config: Callable[..., Config]) -> None:
    """At 8x8 nothing is resized: every image is a dataset image, with its own label."""
    digits = load_digits()
    originals = np.round(digits.images * (255.0 / 16.0)).astype("uint8")
    label_of = {image.tobytes(): set() for image in originals}
    for image, target in zip(originals, digits.target, strict=True):
        label_of[image.tobytes()].add(int(target))
    data = _load(make_config)
    for split in (data.train, data.val, data.test):
        images = split.read()
        assert np.array_equal(images[..., 0], images[..., 2])  # gray as RGB
        for image, label in zip(images, split.labels, strict=True):
            assert int(data.class_names[label]) in label_of[image[..., 0].tobytes()]


def test_digits_class_subset_remaps_labels(make_config: Callable[..., Config]) -> None:
    digits = load_digits()
    originals = np.round(digits.images * (255.0 / 16.0)).astype("uint8")
    by_image = {img.tobytes(): int(t) for img, t in zip(originals, digits.target, strict=True)}
    data = _load(make_config, "data.classes=[7,3]")
    assert data.class_names == ("7", "3")
    n_kept = int(np.isin(digits.target, [3, 7]).sum())
    assert sum(data.counts.values()) == n_kept
    for split in (data.train, data.val, data.test):
        assert set(np.unique(split.labels)) == {0, 1}
        for image, label in zip(split.read(), split.labels, strict=True):
            assert by_image[image[..., 0].tobytes()] == (7, 3)[label]


def test_digits_unknown_class_is_a_user_error(make_config: Callable[..., Config]) -> None:
    with pytest.raises(UserError, match=r"data\.classes"):
        _load(make_config, "data.classes=[3,42]")


def test_train_limit_caps_training_pool(make_config: Callable[..., Config]) -> None:
    data = _load(make_config, "data.train_limit=100", "data.test_limit=40")
    assert data.counts == {"train": 80, "val": 20, "test": 40}
    full = _load(make_config)
    assert data.fingerprint != full.fingerprint


# --- folders -------------------------------------------------------------------------------


def test_every_image_format_loads_as_rgb(
    make_config: Callable[..., Config], write_image: Callable[..., Path], tmp_path: Path
) -> None:
    root = tmp_path / "formats"
    red, gray, blue = (255, 0, 0), 128, (0, 0, 255)
    files = {
        "red": [(f, "RGB", red) for f in ("a.jpg", "b.png", "c.bmp", "d.gif", "e.JPEG")],
        "gray": [(f, "L", gray) for f in ("a.png", "b.jpg", "c.bmp", "d.gif", "e.png")],
        "blue": [
            ("a.png", "RGBA", (0, 0, 255, 90)),
            ("b.png", "RGBA", (0, 0, 255, 255)),
            ("c.png", "RGBA", (0, 0, 255, 0)),
            ("d.gif", "RGB", blue),
            ("e.bmp", "RGB", blue),
        ],
    }
    for name, images in files.items():
        for filename, mode, color in images:
            write_image(root / name / filename, color, mode)
    data = load_data(_folder(make_config, root, "data.test_fraction=0.2").data, 24)
    assert data.class_names == ("blue", "gray", "red")
    assert sum(data.counts.values()) == 15
    expected = {"red": (255, 0, 0), "gray": (128, 128, 128), "blue": (0, 0, 255)}
    for split in (data.train, data.val, data.test):
        images = split.read()
        assert images.dtype == np.uint8
        assert images.shape[1:] == (24, 24, 3)
        for image, label in zip(images, split.labels, strict=True):
            pixels = image.reshape(-1, 3).astype(int)
            want = np.array(expected[data.class_names[label]])
            assert np.abs(pixels - want).max() <= 3, data.class_names[label]


def test_flat_layout_is_split_by_fractions(
    make_config: Callable[..., Config], image_folder: Callable[..., Path]
) -> None:
    root = image_folder({"ant": 10, "bee": 10, "cat": 10})
    cfg = _folder(make_config, root, "data.test_fraction=0.2", "data.val_fraction=0.25")
    data = load_data(cfg.data, 16)
    assert data.class_names == ("ant", "bee", "cat")
    assert data.counts == {"train": 18, "val": 6, "test": 6}
    for split, per_class in ((data.train, 6), (data.val, 2), (data.test, 2)):
        assert Counter(split.labels.tolist()) == dict.fromkeys(range(3), per_class)
    again = load_data(cfg.data, 16)
    other = load_data(_folder(make_config, root, "data.split_seed=5").data, 16)
    assert again.fingerprint == data.fingerprint
    assert other.fingerprint != data.fingerprint


def test_split_folders_are_used_as_given(
    make_config: Callable[..., Config], image_folder: Callable[..., Path]
) -> None:
    image_folder({"cat": 5, "dog": 4}, split="train")
    image_folder({"cat": 2, "dog": 3}, split="val")
    root = image_folder({"cat": 3, "dog": 1}, split="test")
    data = load_data(_folder(make_config, root).data, 16)
    assert data.class_names == ("cat", "dog")
    assert data.counts == {"train": 9, "val": 5, "test": 4}
    assert Counter(data.train.labels.tolist()) == {0: 5, 1: 4}
    assert Counter(data.val.labels.tolist()) == {0: 2, 1: 3}
    assert Counter(data.test.labels.tolist()) == {0: 3, 1: 1}
    # test images are the blue-tinted ones written under test/
    assert (data.test.read()[..., 2] == 200).all()
    assert (data.train.read()[..., 2] == 100).all()


def test_train_and_test_folders_carve_val_from_train(
    make_config: Callable[..., Config], image_folder: Callable[..., Path]
) -> None:
    image_folder({"cat": 10, "dog": 10}, split="train")
    root = image_folder({"cat": 3, "dog": 3}, split="test")
    data = load_data(_folder(make_config, root, "data.val_fraction=0.2").data, 16)
    assert data.counts == {"train": 16, "val": 4, "test": 6}
    assert Counter(data.val.labels.tolist()) == {0: 2, 1: 2}
    assert (data.test.read()[..., 2] == 200).all()
    assert (data.val.read()[..., 2] == 100).all()
    train_and_val = np.concatenate([data.train.read(), data.val.read()])
    assert len({image.tobytes() for image in train_and_val}) == 20  # no image in both


def test_missing_data_path_is_a_user_error(
    make_config: Callable[..., Config], tmp_path: Path
) -> None:
    missing = tmp_path / "nowhere"
    with pytest.raises(UserError, match="no such directory") as info:
        load_data(_folder(make_config, missing).data, 16)
    assert str(missing) in str(info.value)


def test_fewer_than_two_classes_is_a_user_error(
    make_config: Callable[..., Config], image_folder: Callable[..., Path]
) -> None:
    root = image_folder({"only": 6})
    with pytest.raises(UserError, match="at least 2"):
        load_data(_folder(make_config, root).data, 16)


def test_empty_class_folder_is_a_user_error(
    make_config: Callable[..., Config], image_folder: Callable[..., Path]
) -> None:
    root = image_folder({"cat": 6, "dog": 6})
    (root / "emu").mkdir()
    (root / "emu" / "notes.txt").write_text("not an image")
    with pytest.raises(UserError, match="no images") as info:
        load_data(_folder(make_config, root).data, 16)
    assert str(root / "emu") in str(info.value)


def test_unreadable_image_is_named(
    make_config: Callable[..., Config], image_folder: Callable[..., Path]
) -> None:
    root = image_folder({"cat": 6, "dog": 6})
    broken = root / "dog" / "broken.jpg"
    broken.write_bytes(b"\xff\xd8 these bytes are not a JPEG image at all " * 4)
    with pytest.raises(UserError) as info:
        load_data(_folder(make_config, root).data, 16)
    message = str(info.value)
    assert str(broken) in message
    assert "\n" not in message


def test_folder_fingerprint_follows_file_contents(
    make_config: Callable[..., Config],
    image_folder: Callable[..., Path],
    write_image: Callable[..., Path],
) -> None:
    root = image_folder({"cat": 4, "dog": 4})
    cfg = _folder(make_config, root, "data.test_fraction=0.25", "data.val_fraction=0.34")
    before = load_data(cfg.data, 16)
    target = root / "cat" / "cat_1.png"
    stat = target.stat()
    os.utime(target, ns=(stat.st_atime_ns + 10**9, stat.st_mtime_ns + 10**9))
    touched = load_data(cfg.data, 16)
    assert touched.fingerprint == before.fingerprint  # same bytes, newer mtime
    write_image(target, (1, 2, 3))
    changed = load_data(cfg.data, 16)
    assert changed.fingerprint != before.fingerprint
    changed_splits = [
        split
        for split in ("train", "val", "test")
        if changed.split_fingerprints[split] != before.split_fingerprints[split]
    ]
    assert len(changed_splits) == 1  # only the split holding that file


# --- keras datasets, offline ---------------------------------------------------------------


def test_keras_dataset_offline_is_a_user_error(
    make_config: Callable[..., Config], offline: Path
) -> None:
    cfg = make_config("data=cifar10")
    with pytest.raises(UserError, match="download") as info:
        load_data(cfg.data, 32)
    message = str(info.value)
    assert "cifar10" in message
    assert "data=digits" in message  # what to use instead
    assert "\n" not in message
    assert not [p for p in offline.rglob("*cifar*") if p.is_file() and p.stat().st_size]


def test_unknown_keras_dataset_is_a_user_error(make_config: Callable[..., Config]) -> None:
    with pytest.raises(UserError, match="no_such_set"):
        _load(make_config, "data=cifar10", "data.name=no_such_set")


# --- reading on demand --------------------------------------------------------------------------


def test_a_folder_split_holds_paths_and_reads_only_what_is_asked(
    make_config: Callable[..., Config],
    image_folder: Callable[..., Path],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    root = image_folder({"cat": 6, "dog": 6})
    data = load_data(_folder(make_config, root).data, 16)
    split = data.train
    assert split.from_files and split.items.dtype.kind == "U"  # paths, no pixels in memory
    everything = split.read()
    decoded: list[str] = []
    real = data_module._render_file
    monkeypatch.setattr(
        data_module, "_render_file", lambda path, size: decoded.append(path) or real(path, size)
    )
    picked = split.read([3, 0])
    assert sorted(decoded) == sorted([split.items[3], split.items[0]])
    np.testing.assert_array_equal(picked, everything[[3, 0]])


def test_in_memory_sources_keep_their_source_resolution(digits32: ImageData) -> None:
    assert digits32.train.items.shape[1:] == (8, 8)  # the bundled 8x8 digits, not 32x32 copies
    assert digits32.train.read([0]).shape == (1, 32, 32, 3)


def _truncated_jpeg(path: Path) -> Path:
    from PIL import Image

    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), "uint8")).save(path)
    path.write_bytes(path.read_bytes()[:-600])  # its header reads; its pixels do not
    return path


def test_a_truncated_image_is_refused_by_name_at_load(
    make_config: Callable[..., Config], image_folder: Callable[..., Path]
) -> None:
    root = image_folder({"cat": 4, "dog": 4})
    photo = _truncated_jpeg(root / "cat" / "big.jpg")
    with pytest.raises(UserError) as info:
        load_data(_folder(make_config, root, "data.test_fraction=0.25").data, 16)
    message = str(info.value)
    assert message.startswith(f"cannot read image {photo}: image file is truncated")
    assert "\n" not in message


def test_an_image_broken_after_loading_is_named_when_read(
    make_config: Callable[..., Config], image_folder: Callable[..., Path]
) -> None:
    root = image_folder({"cat": 4, "dog": 4})
    photo = root / "cat" / "big.jpg"
    from PIL import Image

    Image.new("RGB", (64, 64), (10, 20, 30)).save(photo)
    data = load_data(_folder(make_config, root, "data.test_fraction=0.25").data, 16)
    _truncated_jpeg(photo)  # replaced on disk by a truncated one meanwhile
    split = next(s for s in (data.train, data.val, data.test) if str(photo) in s.items)
    with pytest.raises(UserError) as info:
        split.read()
    assert str(photo) in str(info.value)
    assert "\n" not in str(info.value)


# --- the folder manifest ------------------------------------------------------------------------


def test_manifest_spares_reading_unchanged_files(
    make_config: Callable[..., Config],
    image_folder: Callable[..., Path],
    write_image: Callable[..., Path],
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
) -> None:
    root = image_folder({"cat": 5, "dog": 5})
    cfg = _folder(make_config, root, "data.test_fraction=0.2").data
    manifests = tmp_path / "manifests"
    hashed: list[str] = []
    real = data_module._checked_digest
    monkeypatch.setattr(data_module, "_checked_digest", lambda p: hashed.append(p) or real(p))
    first = load_data(cfg, 16, manifests)
    assert len(hashed) == 10 and len(list(manifests.glob("*.json"))) == 1
    hashed.clear()
    again = load_data(cfg, 16, manifests)
    assert hashed == []  # nothing read again
    assert again.fingerprint == first.fingerprint == load_data(cfg, 16).fingerprint
    hashed.clear()  # (the load without a manifest hashed everything)
    target = root / "cat" / "cat_1.png"
    stat = target.stat()
    os.utime(target, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    touched = load_data(cfg, 16, manifests)
    assert hashed == [str(target)]  # a newer mtime: read again, same content
    assert touched.fingerprint == first.fingerprint
    hashed.clear()
    write_image(target, (1, 2, 3))
    changed = load_data(cfg, 16, manifests)
    assert hashed == [str(target)]
    assert changed.fingerprint != first.fingerprint
    assert changed.fingerprint == load_data(cfg, 16).fingerprint  # as if hashed from scratch


def test_a_damaged_manifest_is_rebuilt(
    make_config: Callable[..., Config], image_folder: Callable[..., Path], tmp_path: Path
) -> None:
    root = image_folder({"cat": 4, "dog": 4})
    cfg = _folder(make_config, root, "data.test_fraction=0.25").data
    manifests = tmp_path / "manifests"
    first = load_data(cfg, 16, manifests)
    (manifest,) = manifests.glob("*.json")
    manifest.write_text("{truncated")
    assert load_data(cfg, 16, manifests).fingerprint == first.fingerprint
    assert json.loads(manifest.read_text())["files"]  # written whole again
    assert not list(manifests.glob(".tmp-*"))


def test_a_text_file_named_like_an_image_is_refused_at_load(
    make_config: Callable[..., Config], image_folder: Callable[..., Path], tmp_path: Path
) -> None:
    root = image_folder({"cat": 4, "dog": 4})
    fake = root / "dog" / "notes.png"
    fake.write_text("not an image")
    with pytest.raises(UserError) as info:
        load_data(_folder(make_config, root).data, 16, tmp_path / "manifests")
    assert str(fake) in str(info.value) and "\n" not in str(info.value)
