"""The feature cache: store semantics (hit, corruption, LRU, locking), keys, equivalence."""

from __future__ import annotations

import contextlib
import json
import multiprocessing
import os
import time
from collections.abc import Iterator
from pathlib import Path

import keras
import numpy as np
import pytest

from tlsweep import features
from tlsweep.config import CacheConfig, Config, load_config
from tlsweep.data import ImageData, Split, load_data
from tlsweep.errors import UserError
from tlsweep.features import (
    FeatureStore,
    cached_features,
    compute_features,
    extractor_identity,
    weights_digest,
)
from tlsweep.model import backbone_of, build_classifier, feature_extractor, head_of

pytestmark = pytest.mark.backend  # runs on every Keras backend in CI

# Random ResNet50 at 32x32: cheap to build, and its pooled features vary from image to image.
FEATURES_BASE = (
    "data=digits",
    "data.classes=[0,1,2]",
    "backbone=resnet50",
    "backbone.weights=null",
    "backbone.input_size=32",
    "head.dense_units=16",
)


class Counter:
    """A compute function that counts its calls (and yields its array in two blocks)."""

    def __init__(self, array: np.ndarray) -> None:
        self.array = array
        self.calls = 0

    def __call__(self) -> list[np.ndarray]:
        self.calls += 1
        half = len(self.array) // 2
        return [self.array[:half], self.array[half:]]


def put(store: FeatureStore, key: str, compute: Counter, description: dict | None = None):
    return store.get_or_compute(key, compute.array.shape, compute, description or {})


def features_array(seed: int = 0, rows: int = 50) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(rows, 32)).astype("float32")


@pytest.fixture
def store(tmp_path: Path) -> FeatureStore:
    return FeatureStore(tmp_path / "cache", max_bytes=10**9)


# --- the store -------------------------------------------------------------------------------


def test_computes_once_then_hits(store: FeatureStore) -> None:
    compute = Counter(features_array().astype("float64"))
    first, hit = put(store, "k1", compute, {"what": "test"})
    assert (hit, compute.calls) == (False, 1)
    assert first.dtype == np.float32  # stored in the store's dtype
    again, hit = put(store, "k1", compute, {"what": "test"})
    assert (hit, compute.calls) == (True, 1)
    np.testing.assert_array_equal(again, first)
    assert sorted(p.name for p in store.directory.iterdir() if not p.name.endswith(".lock")) == [
        "k1.json",
        "k1.npy",
    ]
    meta = json.loads((store.directory / "k1.json").read_text())
    assert meta["shape"] == [50, 32] and meta["description"] == {"what": "test"}


def test_a_fresh_store_object_reads_the_entry(store: FeatureStore) -> None:
    compute = Counter(features_array())
    put(store, "k1", compute, {})
    other = FeatureStore(store.directory, max_bytes=10**9)
    array, hit = put(other, "k1", compute, {})
    assert hit and compute.calls == 1
    np.testing.assert_array_equal(array, features_array())


def test_truncated_entry_is_recomputed(store: FeatureStore) -> None:
    compute = Counter(features_array())
    put(store, "k1", compute, {})
    data = store.directory / "k1.npy"
    data.write_bytes(data.read_bytes()[:-100])
    assert store.load("k1") is None
    array, hit = put(store, "k1", compute, {})
    assert (hit, compute.calls) == (False, 2)
    np.testing.assert_array_equal(array, features_array())
    np.testing.assert_array_equal(store.load("k1"), features_array())  # repaired on disk


def test_corrupted_bytes_are_detected(store: FeatureStore) -> None:
    compute = Counter(features_array())
    put(store, "k1", compute, {})
    data = store.directory / "k1.npy"
    raw = bytearray(data.read_bytes())
    raw[-7] ^= 0xFF  # same size, one flipped byte inside the array
    data.write_bytes(bytes(raw))
    assert store.load("k1") is None
    array, hit = put(store, "k1", compute, {})
    assert (hit, compute.calls) == (False, 2)
    np.testing.assert_array_equal(array, features_array())


def test_entry_is_hashed_once_per_process_until_it_changes(
    store: FeatureStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    put(store, "k1", Counter(features_array()), {})
    hashed: list[Path] = []
    real = features._sha256
    monkeypatch.setattr(features, "_sha256", lambda path: hashed.append(path) or real(path))
    assert store.load("k1") is not None
    assert hashed == []  # the writer hashed the bytes as it wrote them
    monkeypatch.setattr(features, "_VERIFIED", set())  # as another process would start
    for _ in range(3):
        assert store.load("k1") is not None
    assert len(hashed) == 1  # later reads of the unchanged file skip the hash
    data = store.directory / "k1.npy"
    raw = bytearray(data.read_bytes())
    raw[-7] ^= 0xFF
    data.write_bytes(bytes(raw))  # rewritten: a new mtime, so verified again
    assert store.load("k1") is None
    assert len(hashed) == 2


def test_missing_or_broken_metadata_is_a_miss(store: FeatureStore) -> None:
    compute = Counter(features_array())
    put(store, "k1", compute, {})
    (store.directory / "k1.json").write_text("{not json")
    assert store.load("k1") is None
    (store.directory / "k1.json").unlink()
    assert store.load("k1") is None
    put(store, "k1", compute, {})
    assert compute.calls == 2


def test_lru_eviction_keeps_the_recently_used(store: FeatureStore) -> None:
    for i, key in enumerate(("a", "b")):
        put(store, key, Counter(features_array(i)), {})
    size = (store.directory / "a.npy").stat().st_size
    store.max_bytes = int(2.5 * size)  # room for two entries
    # a was written long ago, b less long ago; then a is read (used) again.
    now = time.time()
    for age, key in ((200, "a"), (100, "b")):
        os.utime(store.directory / f"{key}.json", (now - age, now - age))
    assert [e.key for e in store.entries()] == ["b", "a"]  # most recently used first
    assert store.load("a") is not None
    assert [e.key for e in store.entries()] == ["a", "b"]
    put(store, "c", Counter(features_array(2)), {})
    assert sorted(e.key for e in store.entries()) == ["a", "c"]  # b: least recently used
    assert not (store.directory / "b.npy").exists()
    assert not (store.directory / "b.json").exists()


def test_an_entry_larger_than_the_budget_is_kept_alone(store: FeatureStore) -> None:
    store.max_bytes = 1
    put(store, "a", Counter(features_array(0)), {})
    put(store, "b", Counter(features_array(1)), {})
    assert [e.key for e in store.entries()] == ["b"]
    np.testing.assert_array_equal(store.load("b"), features_array(1))


def test_clear(store: FeatureStore) -> None:
    for i, key in enumerate(("a", "b", "c")):
        put(store, key, Counter(features_array(i)), {})
    (store.directory / ".tmp-stray.npy").write_bytes(b"half written")
    # A temporary copy of a's metadata (a write interrupted before its rename) is no entry.
    (store.directory / ".tmp-stray.json").write_text((store.directory / "a.json").read_text())
    assert sorted(e.key for e in store.entries()) == ["a", "b", "c"]
    assert store.clear() == 3
    assert store.entries() == []
    assert list(store.directory.iterdir()) == []
    compute = Counter(features_array())
    put(store, "a", compute, {})
    assert compute.calls == 1


def test_blocks_are_written_as_they_come(store: FeatureStore) -> None:
    """The file grows block by block: no block waits for the next one in memory."""
    sizes: list[int] = []

    def blocks() -> Iterator[np.ndarray]:
        for i in range(3):
            temporaries = list(store.directory.glob(".tmp-k1-*.npy"))
            sizes.append(temporaries[0].stat().st_size if temporaries else -1)
            yield features_array(i, rows=10)

    array, hit = store.get_or_compute("k1", (30, 32), blocks, {})
    assert not hit
    block_bytes = 10 * 32 * 4
    assert sizes[1] - sizes[0] == block_bytes  # block 0 was on disk before block 1 was made
    assert sizes[2] - sizes[1] == block_bytes
    assert isinstance(array, np.memmap)  # read back memory-mapped, not kept from the pass
    expected = np.concatenate([features_array(i, rows=10) for i in range(3)])
    np.testing.assert_array_equal(array, expected)


def test_a_failed_pass_leaves_neither_entry_nor_temporary_file(store: FeatureStore) -> None:
    def failing() -> Iterator[np.ndarray]:
        yield features_array(0, rows=10)
        raise OSError(5, "Input/output error")  # a failing disk (a full one: see below)

    with pytest.raises(OSError, match="Input/output error"):
        store.get_or_compute("k1", (30, 32), failing, {})
    assert store.load("k1") is None
    assert sorted(p.name for p in store.directory.iterdir()) == ["k1.lock"]


def test_too_few_rows_are_refused_and_leave_no_entry(store: FeatureStore) -> None:
    with pytest.raises(ValueError, match="wrote 10 rows"):
        store.get_or_compute("k1", (30, 32), lambda: [features_array(0, rows=10)], {})
    assert store.load("k1") is None
    assert not list(store.directory.glob(".tmp-*"))


def test_a_killed_writers_temporary_file_is_removed_by_the_next_writer(
    store: FeatureStore,
) -> None:
    store.directory.mkdir(parents=True)
    stale = store.directory / ".tmp-k1-99999.npy"  # a writer of k1 killed mid-pass
    stale.write_bytes(b"\x93NUMPY half an array")
    other = store.directory / ".tmp-k2-99999.npy"  # another key's: not k1's writer's to touch
    other.write_bytes(b"\x93NUMPY")
    assert store.entries() == []  # never counted as an entry
    put(store, "k1", Counter(features_array()), {})
    assert not stale.exists()
    assert other.exists()
    assert [e.key for e in store.entries()] == ["k1"]


def test_a_full_disk_is_a_one_line_error_and_leaves_nothing(small_filesystem: Path) -> None:
    store = FeatureStore(small_filesystem / "cache", max_bytes=10**9)
    rows = np.ones((64, 1024), "float32")  # 256 KB a block: the disk fills in the second

    with pytest.raises(UserError) as exc:
        store.get_or_compute("k1", (640, 1024), lambda: [rows] * 10, {})

    message = str(exc.value)
    assert message.startswith(f"no space left in the feature cache {store.directory}")
    assert "\n" not in message
    assert store.load("k1") is None
    assert sorted(p.name for p in store.directory.iterdir()) == ["k1.lock"]  # no temporary


def test_from_config(tmp_path: Path) -> None:
    store = FeatureStore.from_config(CacheConfig(dir=str(tmp_path / "x"), max_gb=0.5))
    assert store.directory == (tmp_path / "x").resolve()
    assert store.max_bytes == 500_000_000
    default = FeatureStore.from_config(CacheConfig(dtype="float16"))
    assert default.directory == (tmp_path / "mlruns" / "feature_cache").resolve()
    assert default.dtype == np.float16


# --- two processes, one key --------------------------------------------------------------------


class _SignallingStore(FeatureStore):
    """Sets ``at_lock`` when it has missed the entry and goes for the per-key lock."""

    def __init__(self, directory: Path, at_lock) -> None:
        super().__init__(directory, max_bytes=10**9)
        self.at_lock = at_lock

    @contextlib.contextmanager
    def _lock(self, key: str) -> Iterator[None]:
        self.at_lock.set()
        with super()._lock(key):
            yield


def _compete(directory, log, role, first_computing, release, at_lock, results) -> None:
    """One process: A computes (and holds the lock until released); B comes second."""

    def compute() -> list[np.ndarray]:
        with Path(log).open("a") as handle:
            handle.write(f"{role}\n")
        if role == "A":
            first_computing.set()
            if not release.wait(120):
                raise TimeoutError("never released")
        return [features_array(7)]

    if role == "B" and not first_computing.wait(120):
        raise TimeoutError("A never started computing")
    store = _SignallingStore(Path(directory), at_lock)
    array, hit = store.get_or_compute("shared", (50, 32), compute, {"role": role})
    results.put((role, hit, float(np.asarray(array).sum())))


@pytest.mark.slow  # two fresh interpreters import Keras (about 10 s on 2 cores)
def test_two_processes_compute_once(tmp_path: Path) -> None:
    ctx = multiprocessing.get_context("spawn")
    first_computing, release = ctx.Event(), ctx.Event()
    a_at_lock, b_at_lock = ctx.Event(), ctx.Event()
    results = ctx.Queue()
    log = tmp_path / "computed.txt"
    directory = tmp_path / "cache"
    args = (str(directory), str(log))
    a = ctx.Process(
        target=_compete, args=(*args, "A", first_computing, release, a_at_lock, results)
    )
    b = ctx.Process(
        target=_compete, args=(*args, "B", first_computing, release, b_at_lock, results)
    )
    a.start()
    b.start()
    try:
        assert first_computing.wait(120), "A never computed"
        # B has looked, found nothing and is at the lock A holds: only then may A finish.
        assert b_at_lock.wait(120), "B never reached the lock"
        release.set()
        got = {}
        for _ in range(2):
            role, hit, total = results.get(timeout=120)
            got[role] = (hit, total)
        a.join(60)
        b.join(60)
    finally:
        release.set()
        for process in (a, b):
            if process.is_alive():
                process.kill()
    assert (a.exitcode, b.exitcode) == (0, 0)
    assert log.read_text().splitlines() == ["A"]  # computed once, by A
    expected = float(features_array(7).sum())
    assert got["A"] == (False, pytest.approx(expected))
    assert got["B"] == (True, pytest.approx(expected))


# --- keys --------------------------------------------------------------------------------------

# Keys need no meaningful features, only a real keras.applications backbone: VGG16 builds fastest.
KEYS_BASE = (
    "data=digits",
    "backbone=vgg16",
    "backbone.weights=null",
    "backbone.input_size=32",
    "head.dense_units=16",
)


class SpyStore(FeatureStore):
    """Records the key of each split; never computes."""

    def __init__(self, dtype: str = "float32") -> None:
        super().__init__(Path("never-written"), max_bytes=10**9, dtype=dtype)
        self.keys: dict[str, str] = {}

    def get_or_compute(self, key, shape, compute, description):
        self.keys[description["split"]] = key
        return np.zeros((1, 1), "float32"), True


def fake_data(size: int = 32) -> ImageData:
    rng = np.random.default_rng(0)

    def split(n: int) -> Split:
        images = rng.integers(0, 256, (n, size, size, 3), dtype="uint8")
        return Split(images, np.arange(n, dtype="int32") % 3, size)

    fingerprints = {s: f"{s}-fingerprint" for s in ("train", "val", "test")}
    return ImageData(split(6), split(3), split(3), ("a", "b", "c"), "all", fingerprints)


def build(cfg: Config, seed: int = 0) -> keras.Model:
    keras.utils.set_random_seed(seed)
    return build_classifier(cfg.backbone, cfg.head, 3)


def keys_of(cfg: Config, model=None, *, data=None, dtype: str = "float32") -> dict[str, str]:
    store = SpyStore(dtype)
    cached_features(cfg, build(cfg) if model is None else model, data or fake_data(), store)
    assert set(store.keys) == {"train", "val", "test"}
    assert len(set(store.keys.values())) == 3  # one key per split
    return store.keys


def differs_everywhere(keys: dict[str, str], other: dict[str, str]) -> bool:
    return all(keys[split] != other[split] for split in other)


@pytest.fixture(scope="module")
def base(make_shared_config) -> tuple[Config, keras.Model, dict[str, str]]:
    cfg = make_shared_config(base=KEYS_BASE)
    model = build(cfg)
    return cfg, model, keys_of(cfg, model)


def test_key_is_deterministic(base) -> None:
    cfg, _, keys = base
    assert keys_of(cfg) == keys  # rebuilt with the same seed: the same weights


@pytest.mark.parametrize(
    "overrides",
    [
        ("head.dense_units=32", "head.dropout=0.5"),
        ("optimizer=sgd", "optimizer.learning_rate=0.1", "train.batch_size=7", "train.epochs=3"),
    ],
)
def test_key_ignores_the_head_and_training(make_config, base, overrides) -> None:
    assert keys_of(make_config(*overrides, base=KEYS_BASE)) == base[2]


@pytest.mark.parametrize("overrides", [("head.pooling=max",), ("backbone.preprocess=none",)])
def test_key_follows_the_frozen_part(make_config, base, overrides) -> None:
    assert differs_everywhere(keys_of(make_config(*overrides, base=KEYS_BASE)), base[2])


def test_key_follows_input_size(make_config, base) -> None:
    cfg = make_config("backbone.input_size=48", base=KEYS_BASE)
    assert differs_everywhere(keys_of(cfg, data=fake_data(size=48)), base[2])


def test_key_follows_random_weights(base) -> None:
    cfg, _, keys = base
    assert differs_everywhere(keys_of(cfg, build(cfg, seed=1)), keys)


def test_key_follows_the_store_dtype(base) -> None:
    cfg, model, keys = base
    assert differs_everywhere(keys_of(cfg, model, dtype="float16"), keys)


def test_key_follows_the_feature_pass_batch_size(make_config, base) -> None:
    cfg, model, keys = base
    assert features.feature_batch_size(cfg.cache) == features.CPU_FEATURE_BATCH  # no GPU here
    bigger = make_config("cache.batch_size=256", base=KEYS_BASE)
    assert features.feature_batch_size(bigger.cache) == 256
    assert differs_everywhere(keys_of(bigger, model), keys)


def test_key_follows_each_split_data(base) -> None:
    cfg, model, keys = base
    data = fake_data()
    data.split_fingerprints["val"] = "other images"
    changed = keys_of(cfg, model, data=data)
    assert changed["val"] != keys["val"]
    assert (changed["train"], changed["test"]) == (keys["train"], keys["test"])


def test_key_follows_a_weights_file_changed_in_place(make_config, tmp_path: Path) -> None:
    weights = tmp_path / "backbone.weights.h5"
    random_cfg = make_config(base=KEYS_BASE)
    backbone_of(build(random_cfg, seed=1)).save_weights(weights)
    cfg = make_config(f"backbone.weights={weights}", base=KEYS_BASE)
    before = build(cfg, seed=5)
    assert keys_of(cfg, build(cfg, seed=6)) == keys_of(cfg, before)  # the file decides
    backbone_of(build(random_cfg, seed=2)).save_weights(weights)  # same path, new content
    after = build(cfg, seed=5)
    assert differs_everywhere(keys_of(cfg, after), keys_of(cfg, before))
    old = extractor_identity(cfg, before, np.dtype("float32"))
    new = extractor_identity(cfg, after, np.dtype("float32"))
    assert new["weights_sha256"] != old["weights_sha256"]
    del new["weights_sha256"], old["weights_sha256"]
    assert new == old  # nothing else about the extractor changed


def test_weights_digest_reflects_values() -> None:
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])
    digest = weights_digest(model)
    kernel, bias = model.get_weights()
    model.set_weights([kernel, bias + 1e-6])
    assert weights_digest(model) != digest
    model.set_weights([kernel, bias])
    assert weights_digest(model) == digest


# --- equivalence -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def digits_model(make_shared_config):
    cfg = make_shared_config("data.train_limit=60", "data.test_limit=30", base=FEATURES_BASE)
    data = load_data(cfg.data, cfg.backbone.input_size)
    return cfg, build(cfg), data


def test_head_on_features_equals_the_full_model(digits_model) -> None:
    _, model, data = digits_model
    features = compute_features(feature_extractor(model), data.test, name="test")
    # Random ResNet50 features are large: an untrained head's softmax saturates (one class at
    # ~1.0 for every image), which would make the comparison blind. Scaled-down final weights
    # keep the probabilities image-dependent.
    last = head_of(model).layers[-1]
    original = keras.ops.convert_to_numpy(last.kernel)
    last.kernel.assign(original * 2e-2)
    try:
        via_head = head_of(model).predict(features, verbose=0)
        full = model.predict(data.test.read().astype("float32"), verbose=0)
    finally:
        last.kernel.assign(original)
    assert features.shape == (len(data.test), 2048)
    assert features.std(axis=0).mean() > 1e-3  # real, image-dependent features
    assert full.std(axis=0).max() > 1e-3  # predictions differ from image to image
    np.testing.assert_allclose(via_head, full, atol=1e-5)


def test_the_feature_pass_streams_one_batch_at_a_time(digits_model) -> None:
    """Images are read a batch at a time and each batch's features handed on at once: the
    pass never holds the split; every call of the extractor sees the same batch shape."""
    _, model, data = digits_model
    reads: list[int] = []

    class Watched(Split):
        def read(self, indices=None) -> np.ndarray:
            reads.append(len(self.items) if indices is None else len(indices))
            return super().read(indices)

    split = Watched(data.train.items, data.train.labels, data.train.size)
    extractor = feature_extractor(model)
    shapes: list[tuple] = []
    real = extractor.predict_on_batch
    extractor.predict_on_batch = lambda x: shapes.append(x.shape) or real(x)
    batch = next(b for b in (16, 15, 14) if len(split) % b)  # a last, partial batch
    blocks = list(features.feature_blocks(extractor, split, batch_size=batch))
    assert [len(b) for b in blocks] == [
        min(batch, len(split) - i) for i in range(0, len(split), batch)
    ]
    assert max(reads) == batch and sum(reads) == len(split)  # each image read once
    assert set(shapes) == {(batch, 32, 32, 3)}  # the last batch padded to the same shape
    np.testing.assert_allclose(
        np.concatenate(blocks), compute_features(extractor, data.train), rtol=1e-5, atol=1e-5
    )


def test_cached_features_miss_then_hit(digits_model, tmp_path: Path) -> None:
    cfg, model, data = digits_model
    store = FeatureStore(tmp_path / "cache", max_bytes=10**9)
    first = cached_features(cfg, model, data, store)
    assert first.status == "miss"
    second = cached_features(cfg, model, data, store)
    assert second.status == "hit"
    for split in ("train", "val", "test"):
        stored = getattr(second, split)
        assert stored.shape == (len(getattr(data, split)), 2048)
        np.testing.assert_array_equal(stored, getattr(first, split))
    assert first.train.std(axis=0).mean() > 1e-3
    descriptions = {e.description["split"]: e.description for e in store.entries()}
    assert set(descriptions) == {"train", "val", "test"}
    assert descriptions["train"]["n"] == len(data.train)
    assert descriptions["train"]["backbone"] == "resnet50"


# --- the training path, as logged --------------------------------------------------------------


@pytest.mark.slow
def test_runs_log_the_cache_path(tmp_path: Path) -> None:
    import mlflow

    from tlsweep.experiment import run

    common = (
        *KEYS_BASE,  # VGG16: the quickest to trace through whole-image training
        "data.classes=[0,1,2]",
        "data.train_limit=60",
        "data.test_limit=30",
        "train.epochs=1",
        "tracking.log_model=false",
        f"cache.dir={tmp_path / 'features'}",
    )
    off = run(load_config([*common, "cache.enabled=false"]))
    first = run(load_config(common))
    second = run(load_config([*common, "head.dense_units=8"]))  # a head change reuses it
    client = mlflow.MlflowClient()
    logged = [client.get_run(r.run_id).data.params["feature_cache"] for r in (off, first, second)]
    assert logged == ["off", "miss", "hit"]
    assert len(FeatureStore(tmp_path / "features", 10**9).entries()) == 3
    # Same config with and without the cache: the same model, so the same metrics.
    assert off.metrics["val_loss"] == pytest.approx(first.metrics["val_loss"], abs=1e-5)
