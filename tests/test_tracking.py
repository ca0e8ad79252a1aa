"""One tracked run (tlsweep.experiment.run) as recorded in MLflow; failed runs; the store URI.

The finished run is made once (module fixture, its own SQLite store) and inspected with an
MlflowClient bound to that store.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from importlib import metadata
from pathlib import Path

import keras
import mlflow
import numpy as np
import pandas as pd
import pytest
from mlflow import MlflowClient
from mlflow.entities import LoggedModel, LoggedModelStatus
from omegaconf import OmegaConf

from tlsweep import backend, experiment, tracking
from tlsweep.config import Config, TrackingConfig, flatten, to_config
from tlsweep.data import load_data
from tlsweep.experiment import RunResult
from tlsweep.tracking import _store, _system

pytestmark = pytest.mark.backend  # runs on every Keras backend in CI

EPOCHS = 2
EPOCH_METRICS = ("loss", "accuracy", "val_loss", "val_accuracy", "learning_rate")


@dataclass
class Tracked:
    uri: str
    cfg: Config
    result: RunResult
    client: MlflowClient
    root: Path

    @property
    def run_id(self) -> str:
        return self.result.run_id

    def download(self, path: str, dst: Path) -> Path:
        dst.mkdir(parents=True, exist_ok=True)
        return Path(self.client.download_artifacts(self.run_id, path, str(dst)))


@contextmanager
def _tracking_uri(uri: str) -> Iterator[None]:
    """MLflow's process-wide URI (used to resolve runs:/ URIs) pointed at ``uri`` for a while."""
    mlflow.set_tracking_uri(uri)
    try:
        yield
    finally:
        mlflow.set_tracking_uri(None)  # back to $MLFLOW_TRACKING_URI


@pytest.fixture(scope="module")
def tracked(
    tmp_path_factory: pytest.TempPathFactory, make_shared_config: Callable[..., Config]
) -> Tracked:
    root = tmp_path_factory.mktemp("tracked")
    uri = f"sqlite:///{root / 'mlruns' / 'mlflow.db'}"
    cfg = make_shared_config(f"train.epochs={EPOCHS}")
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(root)
        patch.setenv("MLFLOW_TRACKING_URI", uri)
        result = experiment.run(cfg)
    return Tracked(uri, cfg, result, MlflowClient(tracking_uri=uri), root)


def _all_runs(client: MlflowClient) -> list:
    ids = [e.experiment_id for e in client.search_experiments()]
    return client.search_runs(ids)


def _artifacts(client: MlflowClient, run_id: str, path: str | None = None) -> set[str]:
    found = set()
    for item in client.list_artifacts(run_id, path):
        found |= _artifacts(client, run_id, item.path) if item.is_dir else {item.path}
    return found


# --- the finished run ----------------------------------------------------------------------


def test_exactly_one_finished_run(tracked: Tracked) -> None:
    runs = _all_runs(tracked.client)
    assert [r.info.run_id for r in runs] == [tracked.run_id]
    run = runs[0]
    assert run.info.status == "FINISHED"
    assert run.info.end_time is not None
    assert "mobilenet_v2" in run.info.run_name
    assert tracked.client.get_experiment(run.info.experiment_id).name == "tlsweep"


def test_params_hold_the_config_data_model_and_versions(tracked: Tracked) -> None:
    params = tracked.client.get_run(tracked.run_id).data.params
    flat = flatten(tracked.cfg)
    assert set(flat) <= set(params)
    assert params["head.dense_units"] == "16"
    assert params["train.epochs"] == str(EPOCHS)
    assert params["backbone.name"] == "mobilenet_v2"
    assert float(params["backbone.options.alpha"]) == 0.35
    data = load_data(tracked.cfg.data, tracked.cfg.backbone.input_size)
    assert params["data.fingerprint"] == data.fingerprint
    assert params["data.num_classes"] == "10"
    assert params["data.n_train"] == str(len(data.train)) == "1077"
    assert params["data.n_val"] == str(len(data.val)) == "270"
    assert params["data.n_test"] == str(len(data.test)) == "450"
    model = tracked.result.train_result.model
    trainable = sum(int(np.prod(w.shape)) for w in model.trainable_weights)
    assert params["model.trainable_params"] == str(trainable)
    assert params["model.total_params"] == str(model.count_params())
    backend_packages = backend.PACKAGES[keras.backend.backend()]  # e.g. jax and jaxlib
    for package in ("keras", *backend_packages, "optuna", "mlflow", "pillow"):
        assert params[f"version.{package}"] == metadata.version(package)
    others = {p for ps in backend.PACKAGES.values() for p in ps} - set(backend_packages)
    assert not {f"version.{p}" for p in others} & set(params)  # not another backend's
    assert params["keras.backend"] == keras.backend.backend()


def test_splits_are_logged_as_datasets(tracked: Tracked) -> None:
    """The UI's Datasets column: one input per split, with its context and fingerprint."""
    inputs = tracked.client.get_run(tracked.run_id).inputs.dataset_inputs
    contexts = {i.tags[0].value: i.dataset for i in inputs if i.tags}
    assert set(contexts) == {"train", "val", "test"}
    fingerprints = json.loads(tracked.download("data.json", tracked.root / "ds").read_text())
    for split, dataset in contexts.items():
        assert dataset.name == "digits"
        assert dataset.digest == fingerprints["split_fingerprints"][split][:36]
        assert json.loads(dataset.profile)["num_rows"] > 0


def test_source_tags_name_the_commit_and_a_dirty_tree(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import subprocess

    def git(*args: str) -> str:
        done = subprocess.run(["git", *args], cwd=tmp_path, capture_output=True, text=True)
        assert done.returncode == 0, done.stderr
        return done.stdout.strip()

    git("init", "-q")
    (tmp_path / "train.py").write_text("print('v1')\n")
    git("add", "train.py")
    git("-c", "user.name=t", "-c", "user.email=t@example.com", "commit", "-qm", "v1")
    git("remote", "add", "origin", "https://user:s3cret@example.com/repo.git")
    monkeypatch.chdir(tmp_path)
    tracking.source_tags.cache_clear()
    tags = tracking.source_tags()
    assert tags["mlflow.source.git.commit"] == git("rev-parse", "HEAD")
    assert tags["tlsweep.git.dirty"] == "False"
    assert "s3cret" not in tags["mlflow.source.git.repoURL"]
    (tmp_path / "train.py").write_text("print('v2')\n")
    tracking.source_tags.cache_clear()
    assert tracking.source_tags()["tlsweep.git.dirty"] == "True"
    tracking.source_tags.cache_clear()  # the next tests run elsewhere


def test_per_epoch_metrics(tracked: Tracked) -> None:
    history = tracked.result.train_result.history
    assert len(history) == EPOCHS
    for key in EPOCH_METRICS:
        logged = sorted(
            tracked.client.get_metric_history(tracked.run_id, key), key=lambda m: m.step
        )
        assert [m.step for m in logged] == list(range(1, EPOCHS + 1)), key
        assert [m.value for m in logged] == pytest.approx(history[key].tolist(), rel=1e-6), key


def test_final_metrics(tracked: Tracked) -> None:
    metrics = tracked.client.get_run(tracked.run_id).data.metrics
    final = tracked.result.metrics
    for key in ("accuracy", "loss", "f1_macro", "precision_macro", "recall_macro"):
        assert metrics[f"best_val_{key}"] == pytest.approx(final[f"val_{key}"])
        assert metrics[f"test_{key}"] == pytest.approx(final[f"test_{key}"])
    assert 0.0 <= metrics["test_accuracy"] <= 1.0
    assert metrics["best_epoch"] == tracked.result.train_result.best_epoch


def test_artifacts(tracked: Tracked) -> None:
    found = _artifacts(tracked.client, tracked.run_id)
    for path in (
        "config.yaml",
        "history.csv",
        "evaluation/test_confusion_matrix.png",
        "evaluation/test_confusion_matrix.csv",
        "evaluation/test_classification_report.txt",
        "evaluation/val_confusion_matrix.csv",
    ):
        assert path in found, path
    assert not any(p.startswith("model/") for p in found)  # the logged model's, not the run's


def test_config_artifact_rebuilds_the_config(tracked: Tracked, tmp_path: Path) -> None:
    text = tracked.download("config.yaml", tmp_path).read_text()
    assert to_config(OmegaConf.create(text)) == tracked.cfg


def test_history_artifact(tracked: Tracked, tmp_path: Path) -> None:
    history = pd.read_csv(tracked.download("history.csv", tmp_path))
    expected = tracked.result.train_result.history
    assert history["epoch"].tolist() == list(range(1, EPOCHS + 1))
    assert set(EPOCH_METRICS) <= set(history.columns)
    for key in EPOCH_METRICS:
        assert history[key].tolist() == pytest.approx(expected[key].tolist(), rel=1e-6)


def test_confusion_matrix_and_report_artifacts(tracked: Tracked, tmp_path: Path) -> None:
    names = [str(i) for i in range(10)]
    table = pd.read_csv(
        tracked.download("evaluation/test_confusion_matrix.csv", tmp_path), index_col=0
    )
    assert [str(c) for c in table.columns] == names
    assert [str(i) for i in table.index] == names
    expected = tracked.result.train_result.evaluations["test"].confusion
    np.testing.assert_array_equal(table.to_numpy(), expected)
    assert table.to_numpy().sum() == 450
    png = tracked.download("evaluation/test_confusion_matrix.png", tmp_path).read_bytes()
    assert png.startswith(b"\x89PNG")
    report = tracked.download("evaluation/test_classification_report.txt", tmp_path).read_text()
    for word in ("precision", "recall", "f1-score", *names):
        assert word in report
    found = _artifacts(tracked.client, tracked.run_id)
    if "evaluation/test_classification_report.json" in found:
        path = tracked.download("evaluation/test_classification_report.json", tmp_path)
        assert set(names) <= set(json.loads(path.read_text()))


def test_system_metrics_are_logged(tracked: Tracked) -> None:
    """MLflow's monitor sampled the machine while the run trained: CPU and memory always."""
    metrics = tracked.client.get_run(tracked.run_id).data.metrics
    system = {k: v for k, v in metrics.items() if k.startswith("system/")}
    assert {"system/cpu_utilization_percentage", "system/system_memory_usage_megabytes"} <= set(
        system
    )
    assert 0.0 <= system["system/cpu_utilization_percentage"] <= 100.0
    assert system["system/system_memory_usage_megabytes"] > 0
    history = tracked.client.get_metric_history(tracked.run_id, "system/cpu_utilization_percentage")
    assert sorted(m.step for m in history) == list(range(len(history)))  # one step per sample


def _logged_model(tracked: Tracked) -> LoggedModel:
    experiment = tracked.client.get_run(tracked.run_id).info.experiment_id
    models = tracked.client.search_logged_models([experiment])
    assert len(models) == 1
    return models[0]


def test_the_model_is_a_logged_model_of_the_run(tracked: Tracked) -> None:
    """The experiment's Models tab: the model, READY, from this run, with its params and
    final metrics; the run points at it (output and tag)."""
    model = _logged_model(tracked)
    run = tracked.client.get_run(tracked.run_id)
    assert (model.name, model.status, model.source_run_id) == (
        "model",
        LoggedModelStatus.READY,
        tracked.run_id,
    )
    assert model.model_type == tracking.MODEL_TYPE
    assert tracked.client.get_logged_model(model.model_id).model_id == model.model_id
    assert run.data.tags[tracking.MODEL_URI_TAG] == f"models:/{model.model_id}"
    assert [o.model_id for o in run.outputs.model_outputs] == [model.model_id]
    assert model.params["head.dense_units"] == "16"
    assert model.params["data.fingerprint"] == run.data.params["data.fingerprint"]
    linked = {m.key: m.value for m in model.metrics}
    for key in ("test_accuracy", "test_loss", "best_val_accuracy", "best_epoch"):
        assert linked[key] == pytest.approx(run.data.metrics[key]), key
    assert not [k for k in linked if k.startswith("system/") or k in EPOCH_METRICS]
    splits = {i.tags[0].value: i.dataset.digest for i in run.inputs.dataset_inputs}
    on = {m.key: (m.dataset_name, m.dataset_digest) for m in model.metrics}
    assert on["test_accuracy"] == ("digits", splits["test"])  # measured on the test split
    assert on["best_val_accuracy"] == ("digits", splits["val"])
    assert len(tracked.client.get_metric_history(tracked.run_id, "test_accuracy")) == 1
    with _tracking_uri(tracked.uri):
        files = {f.path for f in mlflow.artifacts.list_artifacts(f"models:/{model.model_id}")}
    assert {"MLmodel", "requirements.txt"} <= files


@pytest.mark.filterwarnings("ignore:The structure of `inputs`:UserWarning")
def test_logged_model_predicts_probabilities(tracked: Tracked) -> None:
    images = np.random.default_rng(0).uniform(0, 255, (5, 32, 32, 3)).astype("float32")
    uri = tracked.client.get_run(tracked.run_id).data.tags[tracking.MODEL_URI_TAG]
    with _tracking_uri(tracked.uri):
        model = mlflow.pyfunc.load_model(uri)
        by_run = mlflow.pyfunc.load_model(f"runs:/{tracked.run_id}/model")  # MLflow finds it
    assert model.metadata.metadata["class_names"] == [str(i) for i in range(10)]
    probabilities = np.asarray(model.predict(images))
    assert probabilities.shape == (5, 10)
    assert np.allclose(probabilities.sum(axis=1), 1.0, atol=1e-5)
    assert (probabilities >= 0).all()
    direct = np.asarray(tracked.result.train_result.model.predict(images, verbose=0))
    np.testing.assert_allclose(probabilities, direct, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.asarray(by_run.predict(images)), direct, rtol=1e-5, atol=1e-6)


# --- system metrics: MLflow's monitor around a block ----------------------------------------

MONITOR_THREADS = ("SystemMetricsMonitor", "tlsweep-system-metrics")
CPU = "system/cpu_utilization_percentage"


def _monitor_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name in MONITOR_THREADS and t.is_alive()]


def _wait_until(condition: Callable[[], bool], timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def _samples(run_id: str) -> int:
    return len(MlflowClient().get_metric_history(run_id, CPU))


@pytest.fixture
def fast_sampling(monkeypatch: pytest.MonkeyPatch) -> None:
    """MLflow's own setting, which the monitor follows: a sample every 0.1 s."""
    monkeypatch.setenv("MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL", "0.1")


def _new_run() -> str:
    return MlflowClient().create_run(tracking.experiment_id("monitored")).info.run_id


@pytest.mark.usefixtures("fast_sampling")
def test_the_monitor_logs_while_the_block_runs_and_stops_with_it() -> None:
    run_id = _new_run()
    with tracking.monitor_system(run_id):
        _wait_until(lambda: _samples(run_id) >= 2)  # written while the run goes on
    assert not _monitor_threads()
    metrics = MlflowClient().get_run(run_id).data.metrics
    assert {CPU, "system/system_memory_usage_megabytes"} <= set(metrics)
    steps = [m.step for m in MlflowClient().get_metric_history(run_id, CPU)]
    assert sorted(steps) == list(range(len(steps)))


@pytest.mark.usefixtures("fast_sampling")
def test_a_switched_off_monitor_logs_nothing() -> None:
    run_id = _new_run()
    with tracking.monitor_system(run_id, enabled=False):
        assert not _monitor_threads()
    assert not [k for k in MlflowClient().get_run(run_id).data.metrics if k.startswith("system/")]


@pytest.mark.usefixtures("fast_sampling")
@pytest.mark.parametrize("exception", [RuntimeError("boom"), KeyboardInterrupt()])
def test_the_monitor_stops_when_the_block_raises(exception: BaseException) -> None:
    run_id = _new_run()
    with pytest.raises(type(exception)) as raised, tracking.monitor_system(run_id):
        _wait_until(lambda: _samples(run_id) >= 1)
        raise exception
    assert raised.value is exception  # not replaced by anything from the monitor
    assert not _monitor_threads()


def _outage(*args: object, **kwargs: object) -> None:
    import requests

    error = mlflow.exceptions.MlflowException("API request to http://x failed")
    error.__cause__ = requests.exceptions.ConnectionError("refused")
    raise error


@pytest.mark.usefixtures("fast_sampling")
def test_a_tracking_outage_costs_the_metrics_not_the_run(monkeypatch: pytest.MonkeyPatch) -> None:
    run_id = _new_run()
    monitor_client = "mlflow.tracking.client.MlflowClient"
    with tracking.monitor_system(run_id):
        _wait_until(lambda: _samples(run_id) >= 1)
        monkeypatch.setattr(f"{monitor_client}.get_run", _outage)
        monkeypatch.setattr(f"{monitor_client}.log_batch", _outage)
        _wait_until(lambda: not [t for t in _monitor_threads() if t.name == MONITOR_THREADS[0]])
    assert not _monitor_threads()


@pytest.mark.usefixtures("fast_sampling")
def test_a_store_that_hangs_does_not_hold_the_run_open(monkeypatch: pytest.MonkeyPatch) -> None:
    """The monitor's last write waits on a store that does not answer: the block ends after
    ``SYSTEM_STOP_S`` all the same, and the write finishes in the background."""
    run_id = _new_run()
    released = threading.Event()
    write = MlflowClient.log_batch

    def hanging(self: MlflowClient, *args: object, **kwargs: object) -> None:
        released.wait(60)
        write(self, *args, **kwargs)

    monkeypatch.setattr(_system, "SYSTEM_STOP_S", 0.5)
    with tracking.monitor_system(run_id):
        _wait_until(lambda: _samples(run_id) >= 1)
        monkeypatch.setattr(MlflowClient, "log_batch", hanging)
        started = time.monotonic()
    assert time.monotonic() - started < 10
    assert _monitor_threads()  # still writing
    released.set()
    for thread in _monitor_threads():
        thread.join(60)
    assert not _monitor_threads()


def test_the_config_switch_turns_the_monitor_off(
    make_config: Callable[..., Config], monkeypatch: pytest.MonkeyPatch
) -> None:
    """``tracking.system_metrics=false``: nothing samples while the run trains (the tracked run
    above shows the default)."""
    seen: list[list[str]] = []

    def training(*args: object, **kwargs: object) -> None:
        seen.append([t.name for t in _monitor_threads()])
        raise RuntimeError("stop here")

    monkeypatch.setattr(experiment, "train", training)
    cfg = make_config("tracking.system_metrics=false", "data.train_limit=60")
    with pytest.raises(RuntimeError, match="stop here"):
        experiment.run(cfg)
    assert seen == [[]]


# --- runs that do not finish ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("exception", "status"),
    [
        (RuntimeError("boom in training"), "FAILED"),
        pytest.param(KeyboardInterrupt(), "KILLED", marks=pytest.mark.slow),
    ],
)
def test_a_run_that_raises_is_never_left_running(
    make_config: Callable[..., Config],
    monkeypatch: pytest.MonkeyPatch,
    store_runs: Callable[..., list],
    exception: BaseException,
    status: str,
) -> None:
    def explode(*args: object, **kwargs: object) -> None:
        raise exception

    monkeypatch.setattr(experiment, "train", explode)
    with pytest.raises(type(exception)):
        experiment.run(make_config("data.train_limit=60", "data.test_limit=30"))
    runs = store_runs()
    assert len(runs) == 1
    run = runs[0]
    assert run.info.status == status
    assert run.info.end_time is not None
    assert type(exception).__name__ in run.data.tags["error"]
    assert str(exception) in run.data.tags["error"]


# --- where runs are stored -----------------------------------------------------------------


def test_default_tracking_uri_is_sqlite_under_mlruns(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    expected = f"sqlite:///{(tmp_path / 'mlruns' / 'mlflow.db').resolve()}"
    assert tracking.tracking_uri() == expected
    assert tracking.tracking_uri(TrackingConfig()) == expected


def test_environment_then_config_tracking_uri(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    from_env = f"sqlite:///{tmp_path / 'env.db'}"
    from_cfg = f"sqlite:///{tmp_path / 'cfg.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", from_env)
    assert tracking.tracking_uri() == from_env
    assert tracking.tracking_uri(TrackingConfig()) == from_env
    assert tracking.tracking_uri(replace(TrackingConfig(), uri=from_cfg)) == from_cfg


# --- a tracking server that is gone ----------------------------------------------------------


def test_a_server_gone_past_its_retries_is_told_from_other_errors(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from bench.servers import free_port

    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "2")
    gone = MlflowClient(tracking_uri=f"http://127.0.0.1:{free_port()}")  # nothing listens
    with pytest.raises(mlflow.exceptions.MlflowException) as refused:
        gone.get_run("0" * 32)
    assert tracking.is_unreachable(refused.value)

    with pytest.raises(mlflow.exceptions.MlflowException) as missing:
        MlflowClient().get_run("0" * 32)  # the store answers: no such run
    assert not tracking.is_unreachable(missing.value)
    assert not tracking.is_unreachable(RuntimeError("boom"))


def test_a_run_is_left_for_reconciliation_when_the_server_is_gone(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """``guard_run`` cannot close a run on a server that is away: the outage itself goes on
    (not an error about recording the error), and the run waits for `reconcile_runs`."""
    import requests

    run_id = MlflowClient().create_run(tracking.experiment_id("gone")).info.run_id
    outage = mlflow.exceptions.MlflowException("API request to http://x failed")
    outage.__cause__ = requests.exceptions.ConnectionError("refused")

    def unreachable(*args: object, **kwargs: object) -> None:
        raise outage

    monkeypatch.setattr(_store, "record_failure", unreachable)  # where guard_run finds it
    failed = pytest.raises(RuntimeError, match="the trial failed")  # not the failed recording
    with failed, tracking.guard_run(run_id):
        raise RuntimeError("the trial failed")
    assert MlflowClient().get_run(run_id).info.status == "RUNNING"
