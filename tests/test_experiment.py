"""One tracked run (tlsweep.experiment.run) with a custom backbone, augmented or not."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import keras
import mlflow
import numpy as np
import pytest

from tlsweep.config import load_config
from tlsweep.experiment import TRAIN_PATH_PARAM, run
from tlsweep.features import FeatureStore

pytestmark = pytest.mark.backend  # runs on every Keras backend in CI

CUSTOM_RUN = (
    "data=digits",
    "data.classes=[0,1,2]",
    "data.train_limit=90",
    "data.test_limit=30",
    "backbone=custom",
    "backbone.preprocess=tf",
    "backbone.input_size=32",
    "head.dense_units=8",
    "train.epochs=1",
    "train.batch_size=32",
)


@pytest.mark.slow  # two tracked runs, one with a logged model (~20 s on 2 cores)
@pytest.mark.filterwarnings("ignore:The structure of `inputs`:UserWarning")
def test_custom_backbone_runs_cached_and_augmented(
    tmp_path: Path, store_runs: Callable[..., list]
) -> None:
    from custom_backbones import save_tiny_convnet

    path = save_tiny_convnet(tmp_path / "convnet.keras")
    common = (*CUSTOM_RUN, f"backbone.path={path}", f"cache.dir={tmp_path / 'features'}")
    cached = run(load_config([*common, "tracking.log_model=false"]))
    augmented = run(load_config([*common, "augment=light"]))
    client = mlflow.MlflowClient()
    params = {r.run_id: client.get_run(r.run_id).data.params for r in (cached, augmented)}
    assert params[cached.run_id]["feature_cache"] == "miss"
    assert params[cached.run_id][TRAIN_PATH_PARAM] == "cached_features"
    assert params[augmented.run_id]["feature_cache"] == "off"
    assert params[augmented.run_id][TRAIN_PATH_PARAM] == "end_to_end"
    assert params[augmented.run_id]["augment.name"] == "light"
    assert params[augmented.run_id]["backbone.path"] == str(path)
    assert {r.info.status for r in store_runs()} == {"FINISHED"}
    entries = FeatureStore(tmp_path / "features", 10**9).entries()
    assert len(entries) == 3  # the cached run's splits; the augmented run wrote none
    assert {e.description["custom"]["cut_layer"] for e in entries} == {None}

    # the logged model: plain Keras, no augmentation layers, the same predictions
    local = client.download_artifacts(augmented.run_id, "model", str(tmp_path / "download"))
    saved = next(Path(local).rglob("*.keras"))
    loaded = keras.saving.load_model(saved)
    assert "augment" not in [layer.name for layer in loaded.layers]
    images = np.random.default_rng(0).uniform(0, 255, (4, 32, 32, 3)).astype("float32")
    expected = augmented.train_result.model.predict(images, verbose=0)
    np.testing.assert_allclose(loaded.predict(images, verbose=0), expected, rtol=1e-5)
    model = mlflow.pyfunc.load_model(f"runs:/{augmented.run_id}/model")
    np.testing.assert_allclose(np.asarray(model.predict(images)), expected, rtol=1e-5)


@pytest.mark.slow  # a tracked run, then the full model rebuilt from its head (~20 s)
@pytest.mark.filterwarnings("ignore:The structure of `inputs`:UserWarning")
def test_head_only_run_of_a_target_backbone_materializes(tmp_path: Path) -> None:
    from tlsweep import tracking
    from tlsweep.experiment import execute, materialize_model, prepare

    cfg = load_config(
        [
            *CUSTOM_RUN,
            "backbone._target_=custom_backbones:tiny_convnet",
            f"cache.dir={tmp_path / 'features'}",
        ]
    )
    prepared = prepare(cfg)
    tracking.connect(cfg.tracking)
    with tracking.start_run(cfg.tracking.experiment, "head-only") as run_id:
        result = execute(run_id, cfg, prepared, log_model=lambda _: True)  # a sweep's best
    client = mlflow.MlflowClient()
    assert client.get_run(run_id).data.params[TRAIN_PATH_PARAM] == "cached_features"
    assert tracking.MODEL_URI_TAG not in client.get_run(run_id).data.tags
    uri = materialize_model(run_id)  # the backbone rebuilt from the callable and the seed
    run = client.get_run(run_id)
    (model,) = client.search_logged_models([run.info.experiment_id])  # a logged model now
    assert model.source_run_id == run_id
    assert uri == f"models:/{model.model_id}" == run.data.tags[tracking.MODEL_URI_TAG]
    images = np.random.default_rng(1).uniform(0, 255, (4, 32, 32, 3)).astype("float32")
    expected = result.model.predict(images, verbose=0)
    got = np.asarray(mlflow.pyfunc.load_model(uri).predict(images))
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)
