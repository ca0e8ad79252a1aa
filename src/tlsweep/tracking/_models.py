"""Models: the raw-image model as an MLflow logged model, the head's weights, loading, and the
registry (champion and Pareto aliases)."""

from __future__ import annotations

import logging
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
from mlflow.entities import LoggedModel, LoggedModelOutput, LoggedModelStatus, Metric
from mlflow.models import Model, ModelSignature
from mlflow.types import Schema, TensorSpec

from tlsweep import backend
from tlsweep.errors import NO_SPACE, UserError
from tlsweep.tracking._artifacts import artifact_writes, files, local_path
from tlsweep.tracking._logging import package_versions
from tlsweep.tracking._store import connect
from tlsweep.tracking._system import SYSTEM_PREFIX

MODEL_URI_TAG = "tlsweep.model_uri"
HEAD_WEIGHTS = "head/head.weights.h5"
MODEL_TYPE = "keras"  # the logged models' model_type (a filter in the Models tab)
_log = logging.getLogger(__name__)
KerasModel = Any  # a keras.Model: the caller's, saved by MLflow's Keras flavour (no import here)


@artifact_writes
def log_keras_model(
    run_id: str, model: KerasModel, class_names: Sequence[str], name: str = "model"
) -> str:
    """Log the raw-image model as an MLflow logged model of the run (Keras flavour, signature,
    explicit pip requirements), with the run's params and final metrics: the experiment's
    Models tab lists it. Returns its URI ``models:/<model_id>``, also kept as a run tag.

    The class names travel in the model's metadata. ``runs:/<run_id>/<name>`` finds it too.
    """
    # What mlflow.keras.log_model(name=...) does (mlflow.models.Model.log), except the upload:
    # MLflow copies the saved tree with log_model_artifacts, which leaves a half-written file
    # when the disk fills; `_upload_model` stages each file, so a full disk fails cleanly.
    client = mlflow.MlflowClient()
    run = client.get_run(run_id)
    logged = client.create_logged_model(
        run.info.experiment_id,
        name=name,
        source_run_id=run_id,
        params=dict(run.data.params),
        model_type=MODEL_TYPE,
    )
    try:
        client.log_outputs(run_id, [LoggedModelOutput(logged.model_id, step=0)])
        _link_final_metrics(run_id, logged.model_id)
        with tempfile.TemporaryDirectory() as tmp:
            local = Path(tmp) / name
            _save_keras_model(model, local, class_names, run_id, logged)
            _upload_model(logged, local)
    except BaseException:
        _finalize_quietly(logged.model_id, LoggedModelStatus.FAILED)
        raise
    client.finalize_logged_model(logged.model_id, LoggedModelStatus.READY)
    model_uri = f"models:/{logged.model_id}"
    client.set_tag(run_id, MODEL_URI_TAG, model_uri)
    return model_uri


def _save_keras_model(
    model: KerasModel, path: Path, class_names: Sequence[str], run_id: str, logged: LoggedModel
) -> None:
    """The MLflow model folder of a raw-image classifier, its MLmodel naming ``logged``."""
    size = model.input_shape[1]
    classes = model.output_shape[-1]
    signature = ModelSignature(
        inputs=Schema([TensorSpec(np.dtype("float32"), (-1, size, size, 3), "image")]),
        outputs=Schema([TensorSpec(np.dtype("float32"), (-1, classes), "probabilities")]),
    )
    described = Model(
        artifact_path=logged.artifact_location,
        model_uuid=logged.model_id,
        run_id=run_id,
        model_id=logged.model_id,
    )
    mlflow.keras.save_model(
        model,
        str(path),
        mlflow_model=described,
        signature=signature,
        pip_requirements=model_requirements(),
        metadata={"class_names": list(class_names)},
    )


def _upload_model(model: LoggedModel, folder: Path) -> None:
    """`upload` for a logged model's files; a full disk names the model's artifact folder."""
    client = mlflow.MlflowClient()
    try:
        for path, where in files(folder):
            client.log_model_artifact(model.model_id, str(path), where)
    except OSError as exc:
        if exc.errno not in NO_SPACE:
            raise
        raise OSError(exc.errno, exc.strerror, local_path(model.artifact_location)) from exc


def _link_final_metrics(run_id: str, model_id: str) -> None:
    """The run's final metrics (step 0; not the per-epoch curves, not ``system/*``) as the
    model's, ``test_*`` and ``best_val_*`` on the run's test and val dataset inputs: the same
    values and timestamps, so the run's own history gains no entries."""
    client = mlflow.MlflowClient()
    run = client.get_run(run_id)
    splits = {
        tag.value: (i.dataset.name, i.dataset.digest)
        for i in run.inputs.dataset_inputs
        for tag in i.tags
        if tag.key == "mlflow.data.context"
    }
    linked = [
        Metric(m.key, m.value, m.timestamp, m.step, model_id, *_dataset_of(key, splits), run_id)
        for key in run.data.metrics
        if not key.startswith(SYSTEM_PREFIX)
        for m in client.get_metric_history(run_id, key)
        if m.step == 0 and m.model_id is None
    ]
    if linked:
        client.log_batch(run_id, metrics=linked)


def _dataset_of(key: str, splits: Mapping[str, tuple[str, str]]) -> tuple[str | None, str | None]:
    """(name, digest) of the split a final metric was measured on, or (None, None)."""
    split = "test" if key.startswith("test_") else "val" if key.startswith("best_val_") else ""
    return splits.get(split, (None, None))


def _finalize_quietly(model_id: str, status: LoggedModelStatus) -> None:
    """Mark a logged model, when the store lets us: the error that got here matters more."""
    try:
        mlflow.MlflowClient().finalize_logged_model(model_id, status)
    except Exception as exc:
        _log.warning("logged model %s not marked %s: %s", model_id, status, exc)


@artifact_writes
def log_head_weights(run_id: str, head: KerasModel) -> None:
    """The head's trained weights (small: the backbone is rebuilt from its config and seed) as
    `HEAD_WEIGHTS`; `download_head_weights` gets them back."""
    folder, name = HEAD_WEIGHTS.split("/")
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / name
        head.save_weights(path)
        mlflow.MlflowClient().log_artifact(run_id, str(path), folder)


def download_head_weights(run_id: str, folder: str | None = None) -> str | None:
    """Local path of the run's head weights, downloaded into ``folder`` (None: a new
    temporary folder), or None if the run has none."""
    client = mlflow.MlflowClient()
    if not any(f.path == HEAD_WEIGHTS for f in client.list_artifacts(run_id, "head")):
        return None
    return client.download_artifacts(
        run_id, HEAD_WEIGHTS, folder or tempfile.mkdtemp(prefix="tlsweep-")
    )


def class_names(run_id: str) -> list[str]:
    """The class names a run was trained on (its ``data.json``)."""
    return list(mlflow.artifacts.load_dict(f"runs:/{run_id}/data.json")["class_names"])


def load_model(model_uri: str) -> Any:
    """Load a logged model with ``mlflow.pyfunc``."""
    connect()
    try:
        return mlflow.pyfunc.load_model(model_uri)
    except mlflow.exceptions.MlflowException as exc:
        raise UserError(f"cannot load model {model_uri}: {str(exc).splitlines()[0]}") from None


def model_requirements() -> list[str]:
    """Pinned pip requirements of a logged Keras model (skips MLflow's slow inference)."""
    return backend.model_requirements(package_versions())


def register_champion(
    run_id: str,
    name: str,
    alias: str = "champion",
    description: str | None = None,
    tags: Mapping[str, Any] | None = None,
) -> str | None:
    """Register the run's full model under ``name`` and point ``alias`` at it; the version
    gets ``description`` and ``tags`` (plus the run's data fingerprint) for the registry's UI.

    Returns ``models:/NAME@ALIAS``, or None when the run holds no model.
    """
    client = mlflow.MlflowClient()
    try:
        current = client.get_model_version_by_alias(name, alias)
    except mlflow.exceptions.MlflowException:
        current = None
    if current is not None and current.run_id == run_id:
        version: str | None = current.version
    else:  # the run's existing version, if a process registered it and stopped before the alias
        version = _model_version_of_run(client, name, run_id)
        if version is None:
            return None
        client.set_registered_model_alias(name, alias, version)
    fingerprint = client.get_run(run_id).data.params.get("data.fingerprint")
    labels = {**(tags or {}), **({"data_fingerprint": fingerprint} if fingerprint else {})}
    for key, value in labels.items():
        client.set_model_version_tag(name, version, key, str(value))
    if description:
        client.update_model_version(name, version, description=description)
    return f"models:/{name}@{alias}"


def register_aliases(
    name: str, aliases: Mapping[str, str], stale_prefix: str | None = None
) -> dict[str, str]:
    """Point each alias (``pareto-1``, ``champion``...) at its run's full model under ``name``.

    ``aliases`` maps alias -> run id. A run is registered once (its existing version is
    reused, so a resumed sweep adds no duplicate versions); runs without a model get no alias.
    Aliases starting with ``stale_prefix`` that are not in ``aliases`` are removed (a front
    that shrank). Returns alias -> ``models:/NAME@ALIAS`` for the aliases set.
    """
    client = mlflow.MlflowClient()
    versions: dict[str, str | None] = {}
    uris = {}
    for alias, run_id in aliases.items():
        if run_id not in versions:
            versions[run_id] = _model_version_of_run(client, name, run_id)
        if versions[run_id] is not None:
            client.set_registered_model_alias(name, alias, versions[run_id])
            uris[alias] = f"models:/{name}@{alias}"
    if stale_prefix:
        try:
            current = client.get_registered_model(name).aliases
        except mlflow.exceptions.MlflowException:
            current = {}
        for alias in current:
            if alias.startswith(stale_prefix) and alias not in uris:
                client.delete_registered_model_alias(name, alias)
    return uris


def _model_version_of_run(client: mlflow.MlflowClient, name: str, run_id: str) -> str | None:
    model_uri = client.get_run(run_id).data.tags.get(MODEL_URI_TAG)
    if not model_uri:
        return None
    try:
        existing = client.search_model_versions(f"name = '{name}' and run_id = '{run_id}'")
    except mlflow.exceptions.MlflowException:
        existing = []
    if existing:
        return str(max(int(v.version) for v in existing))
    with _quiet_unless_verbose():  # MLflow prints "Successfully registered model ..." itself
        return str(mlflow.register_model(model_uri, name).version)


@contextmanager
def _quiet_unless_verbose() -> Iterator[None]:
    """Hide what MLflow prints (not logs) on stderr, except with ``-v``."""
    import contextlib
    import io

    from tlsweep.logs import verbosity

    if verbosity() > 0:
        yield
        return
    with contextlib.redirect_stderr(io.StringIO()):
        yield
