"""The backend module: process environment, GPU sharing, seeding, devices, requirements."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import keras
import mlflow
import numpy as np
import pytest

from tlsweep import backend

pytestmark = pytest.mark.backend  # runs on every Keras backend in CI
TLSWEEP = [sys.executable, "-m", "tlsweep.cli"]


def test_prepare_process_adds_deterministic_gpu_flags_and_keeps_the_users() -> None:
    env: dict[str, str] = {}
    backend.prepare_process(env)
    assert "--xla_gpu_deterministic_ops=true" in env["XLA_FLAGS"]
    assert env["TF_CPP_MIN_LOG_LEVEL"] == "3"
    assert env["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8"
    mine = {"XLA_FLAGS": "--xla_dump_to=/tmp/x", "TF_CPP_MIN_LOG_LEVEL": "0"}
    backend.prepare_process(mine)
    assert mine["XLA_FLAGS"] == "--xla_dump_to=/tmp/x --xla_gpu_deterministic_ops=true"
    assert mine["TF_CPP_MIN_LOG_LEVEL"] == "0"  # the user's value wins
    chosen = {"XLA_FLAGS": "--xla_gpu_deterministic_ops=false"}
    backend.prepare_process(chosen)
    assert chosen["XLA_FLAGS"] == "--xla_gpu_deterministic_ops=false"


def test_workers_sharing_a_gpu_split_its_memory() -> None:
    assert backend.worker_environment(None) == {}
    alone = backend.worker_environment("1")
    assert alone == {"CUDA_VISIBLE_DEVICES": "1"}  # alone on its GPU: the backend's defaults
    shared = backend.worker_environment("0", processes_on_gpu=4)
    assert shared["CUDA_VISIBLE_DEVICES"] == "0"
    assert float(shared["XLA_PYTHON_CLIENT_MEM_FRACTION"]) == pytest.approx(0.9 / 4, abs=1e-3)
    assert shared["TF_FORCE_GPU_ALLOW_GROWTH"] == "true"


def test_seeding_repeats_the_backends_random_numbers() -> None:
    def draw() -> np.ndarray:
        backend.seed_everything(7, deterministic=True)
        layer = keras.layers.Dense(4)
        layer.build((None, 3))
        noise = keras.random.normal((5,), seed=keras.random.SeedGenerator(1))
        return np.concatenate(
            [keras.ops.convert_to_numpy(layer.kernel).ravel(), keras.ops.convert_to_numpy(noise)]
        )

    first, second = draw(), draw()
    np.testing.assert_array_equal(first, second)
    backend.seed_everything(8, deterministic=True)
    layer = keras.layers.Dense(4)
    layer.build((None, 3))
    assert not np.array_equal(keras.ops.convert_to_numpy(layer.kernel).ravel(), first[:12])


def test_on_a_cpu_mixed_precision_stays_off() -> None:
    try:
        assert backend.configure_devices(mixed_precision=True) == "cpu"
        assert keras.mixed_precision.global_policy().name == "float32"
    finally:
        keras.mixed_precision.set_global_policy("float32")
    assert backend.device_kind() == "cpu"
    assert backend.peak_device_memory() is None


def test_model_requirements_name_keras_and_this_backend() -> None:
    versions = {"keras": "3.1", "numpy": "2.0", "tensorflow": "2.1", "jax": "0.5", "jaxlib": "0.5"}
    versions["torch"] = "2.9"
    pinned = backend.model_requirements(versions)
    expected = {"tensorflow": ["tensorflow==2.1"], "jax": ["jax==0.5", "jaxlib==0.5"]}
    expected["torch"] = ["torch==2.9"]
    assert pinned == ["keras==3.1", *expected[keras.backend.backend()], "numpy==2.0"]
    assert backend.name() == keras.backend.backend()


def _python(code: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", code], env={**os.environ, **env}, capture_output=True, text=True
    )


def test_seeding_another_backend_leaves_tensorflow_unloaded() -> None:
    """Keras' own set_random_seed imports TensorFlow whenever it is installed; JAX and
    PyTorch processes have no use for it (this fails loudly if Keras moves the names that
    `backend._seed_without_tensorflow` relies on)."""
    code = (
        "import sys\n"
        "from tlsweep import backend\n"
        "backend.seed_everything(3, deterministic=True)\n"
        "print(backend.name(), 'tensorflow' in sys.modules)\n"
    )
    result = _python(code, KERAS_BACKEND="jax")
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["jax", "False"]


@pytest.mark.slow  # a 2-trial sweep in a fresh PyTorch interpreter (~40 s)
@pytest.mark.skipif(importlib.util.find_spec("torch") is None, reason="torch is not installed")
def test_a_sweep_runs_on_torch(tmp_path: Path, write_sweep: Callable[..., Path]) -> None:
    sweep = write_sweep(
        tmp_path,
        {"head.dense_units": "choice(64, 128)"},
        {"study_name": "ontorch", "n_trials": 2, "sampler": "grid", "pruner": "none"},
        base={"train.epochs": 4},
    )
    storage = tmp_path / "optuna.db"  # where write_sweep puts the study
    result = subprocess.run(
        [*TLSWEEP, "sweep", str(sweep)],
        env={**os.environ, "KERAS_BACKEND": "torch"},
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    client = mlflow.MlflowClient(tracking_uri=os.environ["MLFLOW_TRACKING_URI"])
    experiment = client.get_experiment_by_name("ontorch")
    runs = client.search_runs([experiment.experiment_id], "tags.mlflow.parentRunId != ''")
    assert {r.info.status for r in runs} == {"FINISHED"} and len(runs) == 2
    assert {r.data.params["keras.backend"] for r in runs} == {"torch"}
    assert sorted(r.data.params["feature_cache"] for r in runs) == ["hit", "miss"]
    best = max(r.data.metrics["best_val_accuracy"] for r in runs)
    assert best > 0.6  # three classes: chance is 1/3, the heads learned
    again = subprocess.run(  # determinism on this backend: the best trial, retrained
        [*TLSWEEP, "reproduce", "--best", "ontorch", "--storage", f"sqlite:///{storage}"],
        env={**os.environ, "KERAS_BACKEND": "torch"},
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert again.returncode == 0, again.stdout[-2000:] + again.stderr[-2000:]
    assert "reproduced: every metric within 0" in again.stdout


@pytest.mark.skipif(keras.backend.backend() != "tensorflow", reason="a TensorFlow leak")
def test_clear_state_lets_earlier_runs_training_graphs_go() -> None:
    """Without it, every model ever trained stays in memory through TensorFlow's gradient
    registry (a sweep grew by 17 MB a trial: bench/RESULTS.md)."""
    import gc

    def traced_steps() -> int:
        gc.collect()
        return sum(type(o).__name__ == "FuncGraph" and "step" in o.name for o in gc.get_objects())

    def train_a_model() -> None:
        model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])
        model.compile("adam", "mse")
        model.fit(np.zeros((8, 3)), np.zeros((8, 2)), epochs=1, verbose=0)

    backend.clear_state()
    before = traced_steps()
    for _ in range(3):
        train_a_model()
    assert traced_steps() > before  # the models are gone, their training graphs are not...
    backend.clear_state()
    assert traced_steps() == before  # ...until the next run starts
