"""Shared fixtures: offline, tiny configs composed with Hydra, a fresh MLflow store per test."""

from __future__ import annotations

import os

os.environ.setdefault("KERAS_BACKEND", "tensorflow")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ["MLFLOW_DISABLE_TELEMETRY"] = "true"

from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import pytest

from tlsweep.config import Config, load_config

# Small and offline: random weights, 32x32 digits, a narrow MobileNetV2, one epoch.
TINY = (
    "data=digits",
    "backbone=mobilenet_v2",
    "backbone.weights=null",
    "backbone.input_size=32",
    "+backbone.options.alpha=0.35",
    "head.dense_units=16",
    "train.epochs=1",
    "train.batch_size=64",
)


@pytest.fixture(autouse=True)
def _isolated_store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Every test gets its own working directory and SQLite tracking store."""
    monkeypatch.chdir(tmp_path)
    uri = f"sqlite:///{tmp_path / 'mlruns' / 'mlflow.db'}"
    (tmp_path / "mlruns").mkdir()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    return tmp_path


@pytest.fixture
def make_config() -> Callable[..., Config]:
    """``make_config("head.dropout=0.1")``: the tiny config plus overrides, validated."""

    def make(*overrides: str, base: Sequence[str] = TINY) -> Config:
        return load_config([*base, *overrides])

    return make


# --- shared helpers for the test suite (appended) ----------------------------------------------

PROXY_VARS = ("HTTPS_PROXY", "HTTP_PROXY", "https_proxy", "http_proxy")
CLOSED_PORT_PROXY = "http://127.0.0.1:9"


@pytest.fixture(scope="session")
def make_shared_config() -> Callable[..., Config]:
    """``make_config`` for module-scoped fixtures (one expensive training shared by tests)."""

    def make(*overrides: str, base: Sequence[str] = TINY) -> Config:
        return load_config([*base, *overrides])

    return make


@pytest.fixture
def offline(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """No downloads: every proxy points at a closed local port and Keras' cache is empty.

    Deterministic with or without a network. Returns the (empty) Keras home directory.
    """
    home = tmp_path / "keras_home"
    home.mkdir()
    for var in PROXY_VARS:
        monkeypatch.setenv(var, CLOSED_PORT_PROXY)
    for var in ("NO_PROXY", "no_proxy"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("KERAS_HOME", str(home))
    # Keras reads KERAS_HOME once, at import; point the running process at the empty cache too.
    from keras.src.backend import config as keras_config

    monkeypatch.setattr(keras_config, "_KERAS_DIR", str(home))
    return home


def _write_image(path: Path, color: int | tuple[int, ...], mode: str = "RGB") -> Path:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, (17, 11), color).save(path)
    return path


@pytest.fixture
def write_image() -> Callable[..., Path]:
    """``write_image(path, color, mode="RGB")``: a solid 17x11 image, format from the suffix."""
    return _write_image


@pytest.fixture
def image_folder(tmp_path: Path) -> Callable[..., Path]:
    """``image_folder({"cat": 6, "dog": 6})``: class folders of small distinct PNG images.

    ``image_folder({...}, split="train")`` writes under ``<root>/train/``; call it again with
    ``split="test"`` (same root) for the other layout. Returns the root (``data.path``).
    """

    def make(
        classes: dict[str, int], *, split: str | None = None, root: str = "images", suffix=".png"
    ) -> Path:
        base = tmp_path / root
        where = base / split if split else base
        for c, (name, count) in enumerate(sorted(classes.items())):
            for i in range(count):
                color = ((40 + 60 * c) % 256, (13 * i) % 256, 200 if split == "test" else 100)
                _write_image(where / name / f"{name}_{i}{suffix}", color)
        return base

    return make


def _runs_in_store(experiment: str | None = None) -> list:
    uri = os.environ["MLFLOW_TRACKING_URI"]
    if uri.startswith("sqlite:///") and not Path(uri.removeprefix("sqlite:///")).exists():
        return []
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=uri)
    experiments = [e.experiment_id for e in client.search_experiments()]
    if experiment is not None:
        found = client.get_experiment_by_name(experiment)
        experiments = [found.experiment_id] if found else []
    return client.search_runs(experiments) if experiments else []


@pytest.fixture
def store_runs(_isolated_store: Path) -> Callable[..., list]:
    """``store_runs()``: the MLflow runs in this test's store ($MLFLOW_TRACKING_URI).

    Queried with a client bound to that URI (never mlflow's process-wide current URI). A store
    that was never opened holds no run, and is not created just to be asked.
    """
    return _runs_in_store


@pytest.fixture(scope="session")
def tiny_overrides() -> tuple[str, ...]:
    """The overrides behind ``make_config`` (for the command line)."""
    return TINY


# --- sweeps: tiny sweep files (appended) --------------------------------------------------------

# Small, offline and quick, yet learning: random ResNet50 features separate digits (random
# MobileNet features vanish), three classes, 120 images at 32x32, a 64-unit head, two epochs.
TINY_SWEEP_BASE = {
    "data": "digits",
    "data.classes": [0, 1, 2],
    "data.train_limit": 120,
    "data.test_limit": 60,
    "backbone": "resnet50",
    "backbone.weights": None,
    "backbone.input_size": 32,
    "head.dense_units": 64,
    "optimizer.learning_rate": 0.0003,
    "train.epochs": 2,
    "train.batch_size": 32,
}


def _write_sweep(
    folder: Path,
    space: dict[str, str],
    settings: dict | None = None,
    base: dict | None = None,
    name: str = "tiny",
) -> Path:
    import yaml

    folder.mkdir(parents=True, exist_ok=True)
    document = {
        "base": {**TINY_SWEEP_BASE, "cache.dir": str(folder / "feature_cache"), **(base or {})},
        "search_space": dict(space),
        "sweep": {"storage": f"sqlite:///{folder / 'optuna.db'}", **(settings or {})},
    }
    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump(document, sort_keys=False))
    return path


@pytest.fixture(scope="session")
def write_sweep() -> Callable[..., Path]:
    """``write_sweep(folder, space, settings=None, base=None, name="tiny")``: a tiny sweep file.

    Its base is `TINY_SWEEP_BASE` with the feature cache in ``folder/feature_cache``; its study
    lives in ``folder/optuna.db`` unless ``settings`` says otherwise (``storage: None``: the
    default ``mlruns/optuna.db`` of the working directory). Returns ``folder/NAME.yaml``.
    """
    return _write_sweep


# --- a small, real file system (appended) -------------------------------------------------------


@pytest.fixture
def tmpfs() -> Iterator[Callable[[Path, str], Path]]:
    """``tmpfs(where, "1m")``: a tmpfs of that size mounted at ``where`` (created), a disk
    that really fills; unmounted after the test. Skips where mounting is not allowed (root
    only; .ci/run runs as root)."""
    import subprocess

    mounted: list[Path] = []

    def mount(where: Path, size: str) -> Path:
        where.mkdir(parents=True, exist_ok=True)
        if os.geteuid() != 0:
            pytest.skip("mounting a small tmpfs needs root")
        command = ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)]
        done = subprocess.run(command, capture_output=True)
        if done.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode().strip()}")
        mounted.append(where)
        return where

    yield mount
    for where in mounted:
        subprocess.run(["umount", "-l", str(where)], check=False)


@pytest.fixture
def small_filesystem(tmp_path: Path, tmpfs: Callable[[Path, str], Path]) -> Path:
    """A 256 KB tmpfs mounted at ``tmp_path/small``."""
    return tmpfs(tmp_path / "small", "256k")


@pytest.fixture(scope="session")
def fill_disk() -> Callable[[Path], Path]:
    """``fill_disk(where)``: write a file in ``where`` until its file system has no byte
    left; returns the file (delete it to free the space)."""
    return _fill_disk


def _fill_disk(where: Path) -> Path:
    import errno

    filler = where / "filler"
    with filler.open("wb", buffering=0) as handle:
        try:
            while True:
                handle.write(b"\0" * 65536)
        except OSError as exc:
            if exc.errno != errno.ENOSPC:
                raise
    return filler


# --- a fault injected into a running command (appended) ------------------------------------------


@pytest.fixture(scope="session")
def fault_when() -> Callable[..., str]:
    """``fault_when(process, ready, fault, timeout=300)``: poll ``ready()`` while ``process``
    (a ``Popen`` with ``stderr=PIPE``, text) runs, then call ``fault()`` and wait for the
    process to end; returns its stderr. The process is killed if anything fails first."""
    return _fault_when


def _fault_when(process, ready: Callable[[], bool], fault: Callable[[], None], timeout=300) -> str:
    import time

    try:
        deadline = time.monotonic() + timeout
        while not ready():
            assert process.poll() is None, process.communicate()[1][-3000:]
            assert time.monotonic() < deadline, f"not ready within {timeout} s"
            time.sleep(0.2)  # polling for the moment to inject the fault
        fault()
        return process.communicate(timeout=timeout)[1]
    finally:
        if process.poll() is None:
            process.kill()
