"""SIGKILL at each window of a sweep, then the same command again: nothing lost, duplicated
or left RUNNING, no stale temporary file counted or trusted, and no lock stall.

The kill comes from ``tests/killpoints/sitecustomize.py`` (``TLSWEEP_KILL_AT=<window>``): the
process dies on the spot, as with ``kill -9``, an out-of-memory kill or a lost machine.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import mlflow
import optuna
import pytest
from optuna.trial import TrialState

from tlsweep.sweep import RUN_ID_ATTR
from tlsweep.sweep._storage import journal_storage

pytestmark = pytest.mark.slow
KILLPOINTS = Path(__file__).parent / "killpoints"
TLSWEEP = [sys.executable, "-m", "tlsweep.cli"]
N_TRIALS = 2
WINDOWS = ["worker", "run", "features", "entry", "model", "journal", "champion"]


def _sweep(path: Path, cwd: Path, **env: str) -> subprocess.CompletedProcess[str]:
    paths = [str(KILLPOINTS), *filter(None, [os.environ.get("PYTHONPATH")])] if env else []
    environment = {**os.environ, **env}
    if paths:
        environment["PYTHONPATH"] = os.pathsep.join(paths)
    return subprocess.run(
        [*TLSWEEP, "sweep", str(path)],
        cwd=cwd,
        env=environment,
        capture_output=True,
        text=True,
        timeout=900,
    )


def _study(folder: Path, journal: bool) -> optuna.Study:
    storage = (
        journal_storage(folder / "optuna.journal")
        if journal
        else f"sqlite:///{folder / 'optuna.db'}"
    )
    return optuna.load_study(study_name="killed", storage=storage)


@pytest.mark.parametrize("window", WINDOWS)
def test_a_sweep_killed_in_any_window_resumes_exactly(
    tmp_path: Path, write_sweep: Callable[..., Path], window: str
) -> None:
    journal = window == "journal"
    settings = {"study_name": "killed", "sampler": "grid", "pruner": "none", "n_trials": N_TRIALS}
    if journal:
        settings["storage"] = f"journal://{tmp_path / 'optuna.journal'}"
    path = write_sweep(tmp_path, {"head.dropout": "choice(0.0, 0.3)"}, settings)
    # The journal window: the 8th append is mid-trial (after the study, its attributes and
    # the first trial's start); the others: the first time there.
    call = "8" if journal else "1"

    killed = _sweep(path, tmp_path, TLSWEEP_KILL_AT=window, TLSWEEP_KILL_AT_CALL=call)
    assert killed.returncode == -signal.SIGKILL, (killed.returncode, killed.stderr[-2000:])

    started = time.monotonic()
    resumed = _sweep(path, tmp_path)
    took = time.monotonic() - started
    assert resumed.returncode == 0, resumed.stdout[-2000:] + resumed.stderr[-3000:]
    assert "champion model: models:/killed@champion" in resumed.stdout
    assert took < 120, f"the resumed sweep took {took:.0f} s: a lock stall?"

    study = _study(tmp_path, journal)
    trials = study.trials
    assert len([t for t in trials if t.state == TrialState.COMPLETE]) == N_TRIALS
    assert not [t for t in trials if t.state in (TrialState.RUNNING, TrialState.WAITING)]
    assert sorted(t.params["head.dropout"] for t in trials if t.state == TrialState.COMPLETE) == [
        0.0,
        0.3,
    ]

    client = mlflow.MlflowClient(tracking_uri=os.environ["MLFLOW_TRACKING_URI"])
    parent_id = study.user_attrs["mlflow_parent_run_id"]
    parent = client.get_run(parent_id)
    assert parent.info.status == "FINISHED"
    runs = client.search_runs([parent.info.experiment_id])
    assert not [r for r in runs if r.info.status == "RUNNING"]
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent_id]
    by_trial: dict[int, list] = {}
    for run in children:
        by_trial.setdefault(int(run.data.tags["tlsweep.trial_number"]), []).append(run)
    assert all(len(runs_of) == 1 for runs_of in by_trial.values()), "a trial with two runs"
    for trial in trials:
        if trial.state == TrialState.COMPLETE:
            assert by_trial[trial.number][0].info.run_id == trial.user_attrs[RUN_ID_ATTR]
            assert by_trial[trial.number][0].info.status == "FINISHED"

    cache = tmp_path / "feature_cache"
    assert not list(cache.glob(".tmp-*")), "a half-written cache file was left behind"
    entries = sorted(p.stem for p in cache.glob("*.npy"))
    assert entries == sorted(p.stem for p in cache.glob("*.json"))  # each with its metadata
    versions = mlflow.MlflowClient(
        tracking_uri=os.environ["MLFLOW_TRACKING_URI"]
    ).search_model_versions("name = 'killed'")
    assert len({v.run_id for v in versions}) == len(versions)  # no run registered twice


@pytest.mark.parametrize("stage", ["grouped", "promoted"])
def test_a_grouped_or_promoting_sweep_killed_mid_stage_resumes_exactly(
    tmp_path: Path, write_sweep: Callable[..., Path], stage: str
) -> None:
    """SIGKILL inside a group (its second trial's run just created, the first one's open), or
    as the promoted stage starts (its trial's run just created): the same command finishes
    the sweep, every trial of the killed group or stage queued again and run once."""
    settings: dict = {
        "study_name": "killed",
        "sampler": "grid",
        "pruner": "none",
        "n_trials": N_TRIALS,
        "group_size": 2,
    }
    if stage == "promoted":
        settings["promote"] = {"top_k": 1, "overrides": ["train.epochs=1"]}
    path = write_sweep(tmp_path, {"head.dropout": "choice(0.0, 0.3)"}, settings)
    call = "2" if stage == "grouped" else str(N_TRIALS + 1)
    killed = _sweep(path, tmp_path, TLSWEEP_KILL_AT="run", TLSWEEP_KILL_AT_CALL=call)
    assert killed.returncode == -signal.SIGKILL, (killed.returncode, killed.stderr[-2000:])

    resumed = _sweep(path, tmp_path)
    assert resumed.returncode == 0, resumed.stdout[-2000:] + resumed.stderr[-3000:]
    assert "champion model: models:/killed@champion" in resumed.stdout

    study = _study(tmp_path, journal=False)
    trials = study.trials
    assert not [t for t in trials if t.state in (TrialState.RUNNING, TrialState.WAITING)]
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    search = [t for t in complete if "tlsweep.continues" not in t.user_attrs]
    final = [t for t in complete if "tlsweep.continues" in t.user_attrs]
    assert sorted(t.params["head.dropout"] for t in search) == [0.0, 0.3]
    if stage == "promoted":
        best = max(search, key=lambda t: (t.value, -t.number))
        assert [t.user_attrs["tlsweep.continues"] for t in final] == [best.number]
        assert study.user_attrs["tlsweep.promoted"] == [best.number]
    else:
        assert final == []
    client = mlflow.MlflowClient(tracking_uri=os.environ["MLFLOW_TRACKING_URI"])
    parent_id = study.user_attrs["mlflow_parent_run_id"]
    runs = client.search_runs([client.get_run(parent_id).info.experiment_id])
    assert not [r for r in runs if r.info.status == "RUNNING"]
    for trial in complete:
        run = client.get_run(trial.user_attrs[RUN_ID_ATTR])
        assert run.info.status == "FINISHED"
        assert run.data.tags["tlsweep.trial_number"] == str(trial.number)
