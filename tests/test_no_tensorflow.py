"""The JAX path with TensorFlow absent: a folder sweep (data, feature cache, training), its
MLflow model and pyfunc prediction, run as commands in interpreters where ``import
tensorflow`` fails (``tests/no_tensorflow/sitecustomize.py``)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import mlflow
import numpy as np
import pytest

from tlsweep import tracking

NO_TENSORFLOW = Path(__file__).parent / "no_tensorflow"
TLSWEEP = [sys.executable, "-m", "tlsweep.cli"]


def _without_tensorflow(**extra: str) -> dict[str, str]:
    paths = [str(NO_TENSORFLOW), *filter(None, [os.environ.get("PYTHONPATH")])]
    return dict(os.environ, KERAS_BACKEND="jax", PYTHONPATH=os.pathsep.join(paths), **extra)


def _run(args: list[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        args, env=_without_tensorflow(), cwd=cwd, capture_output=True, text=True, timeout=900
    )


def test_tensorflow_is_absent_from_such_interpreters(tmp_path: Path) -> None:
    probe = (
        "import importlib.util, sys\n"
        "assert importlib.util.find_spec('tensorflow') is None\n"
        "import keras, mlflow, optuna, tlsweep.data, tlsweep.backend\n"
        "print(keras.backend.backend())\n"
        "import tensorflow\n"
    )
    result = _run([sys.executable, "-c", probe], tmp_path)
    assert result.stdout.strip() == "jax"
    assert result.returncode == 1
    assert "No module named 'tensorflow'" in result.stderr


@pytest.mark.slow  # a 2-trial sweep and a prediction in fresh interpreters (~1 min)
@pytest.mark.filterwarnings("ignore:The structure of `inputs`:UserWarning")
def test_a_folder_sweep_runs_on_jax_without_tensorflow(
    tmp_path: Path, image_folder: Callable[..., Path], write_sweep: Callable[..., Path]
) -> None:
    root = image_folder({"ant": 12, "bee": 12, "cat": 12})
    sweep = write_sweep(
        tmp_path / "sweeps",
        {"head.dense_units": "choice(16, 32)"},
        {"study_name": "nojax", "n_trials": 2, "sampler": "grid", "pruner": "none"},
        base={"data": "folder", "data.path": str(root), "data.classes": None},
    )
    swept = _run([*TLSWEEP, "sweep", str(sweep)], tmp_path)
    assert swept.returncode == 0, swept.stderr[-3000:]
    assert "champion model: models:/nojax@champion" in swept.stdout

    client = mlflow.MlflowClient(tracking_uri=os.environ["MLFLOW_TRACKING_URI"])
    experiment = client.get_experiment_by_name("nojax")
    runs = client.search_runs([experiment.experiment_id], "tags.mlflow.parentRunId != ''")
    assert len(runs) == 2 and {r.info.status for r in runs} == {"FINISHED"}
    params = [r.data.params for r in runs]
    assert {p["keras.backend"] for p in params} == {"jax"}
    assert sorted(p["feature_cache"] for p in params) == ["hit", "miss"]
    assert "version.tensorflow" not in params[0] and params[0]["version.jax"]
    assert (tmp_path / "sweeps" / "feature_cache" / "manifests").is_dir()

    tracking.connect()  # this process's MLflow client, on the test's store
    model_uri = "models:/nojax@champion"
    requirements = Path(mlflow.artifacts.download_artifacts(f"{model_uri}/requirements.txt"))
    pinned = requirements.read_text()
    assert "jax==" in pinned and "tensorflow" not in pinned

    image = next((root / "bee").glob("*.png"))
    predicted = _run([*TLSWEEP, "predict", model_uri, str(image)], tmp_path)
    assert predicted.returncode == 0, predicted.stderr[-3000:]
    line = predicted.stdout.strip()
    assert line.startswith(f"{image}: ") and len(line.split()) == 7  # path + top 3 pairs

    # The model saved on JAX loads with plain mlflow.pyfunc in this (TensorFlow) process too.
    model = mlflow.pyfunc.load_model(model_uri)
    assert json.loads(json.dumps(model.metadata.metadata))["class_names"] == ["ant", "bee", "cat"]
    probabilities = np.asarray(model.predict(np.zeros((2, 32, 32, 3), "float32")))
    assert probabilities.shape == (2, 3)
    np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, rtol=1e-5)
