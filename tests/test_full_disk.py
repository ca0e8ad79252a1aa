"""A disk that fills under a sweep: the artifact store, the study's journal.

Each ends with one line naming the full path (exit 75: try again later), no run left
RUNNING, the study loading, no half-written file left behind; once space is freed, the same
command finishes the study with one run per trial.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import mlflow
import optuna
import pytest
from optuna.trial import TrialState

from tlsweep.cli import main
from tlsweep.sweep import FAIL_REASON_ATTR, RUN_ID_ATTR, open_storage

pytestmark = pytest.mark.slow
FINISHED = (TrialState.COMPLETE, TrialState.PRUNED)
SPACE = {"head.dropout": "interval(0.0, 0.5)"}


def _check_runs(study: optuna.Study, n_trials: int) -> None:
    """n_trials finished, one run per trial (the trial's own), nothing RUNNING."""
    assert len([t for t in study.trials if t.state in FINISHED]) == n_trials
    assert not [t for t in study.trials if t.state in (TrialState.RUNNING, TrialState.WAITING)]
    client = mlflow.MlflowClient(tracking_uri=os.environ["MLFLOW_TRACKING_URI"])
    experiment = client.get_experiment_by_name(study.study_name)
    runs = client.search_runs([experiment.experiment_id])
    assert not [r for r in runs if r.info.status == "RUNNING"]
    children = [r for r in runs if "tlsweep.trial_number" in r.data.tags]
    by_trial = {int(r.data.tags["tlsweep.trial_number"]): r.info.run_id for r in children}
    assert len(by_trial) == len(children) == len(study.trials)
    assert all(by_trial[t.number] == t.user_attrs[RUN_ID_ATTR] for t in study.trials)


def test_a_full_artifact_store_stops_the_sweep_and_loses_nothing(
    tmp_path: Path,
    tmpfs: Callable[[Path, str], Path],
    fill_disk: Callable[[Path], Path],
    write_sweep: Callable[..., Path],
    capsys: pytest.CaptureFixture[str],
) -> None:
    artifacts = tmpfs(tmp_path / "mlruns" / "artifacts", "400m")  # beside mlruns/mlflow.db
    path = write_sweep(tmp_path / "sweep", SPACE, {"study_name": "full", "n_trials": 2})
    filler = fill_disk(artifacts)

    assert main(["sweep", str(path)]) == 75
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.startswith(f"tlsweep: error: no space left on device writing {artifacts}/")
    assert last.endswith("free some space and run the same command again")
    study = optuna.load_study(study_name="full", storage=f"sqlite:///{path.parent / 'optuna.db'}")
    assert [t.state for t in study.trials] == [TrialState.FAIL, TrialState.WAITING]
    assert study.trials[0].user_attrs[FAIL_REASON_ATTR] == "the disk was full"
    client = mlflow.MlflowClient(tracking_uri=os.environ["MLFLOW_TRACKING_URI"])
    run = client.get_run(study.trials[0].user_attrs[RUN_ID_ATTR])
    assert run.info.status == "FAILED" and "No space left" in run.data.tags["error"]
    written = [(p, p.stat().st_size) for p in artifacts.rglob("*") if p.is_file() and p != filler]
    assert written == []  # no half-written artifact, no staging file

    filler.unlink()
    assert main(["sweep", str(path)]) == 0
    _check_runs(optuna.load_study(study_name="full", storage=study._storage), n_trials=2)


def test_a_full_journal_disk_stops_the_sweep_and_the_journal_still_loads(
    tmp_path: Path,
    tmpfs: Callable[[Path, str], Path],
    fill_disk: Callable[[Path], Path],
    write_sweep: Callable[..., Path],
    fault_when: Callable[..., str],
) -> None:
    """The disk fills while trial 0 reports its epochs to the journal: the append that fails
    is cut back to whole lines, and the trial the process could not close is found (its
    process is gone) and run again by the next sweep."""
    disk = tmpfs(tmp_path / "disk", "1m")
    journal = disk / "optuna.journal"
    settings = {"study_name": "full", "n_trials": 2, "storage": f"journal://{journal}"}
    long_trials = {"train.epochs": 200, "train.early_stopping.patience": None}
    path = write_sweep(tmp_path, SPACE, settings, base=long_trials)
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
    sweep = subprocess.Popen(
        [sys.executable, "-m", "tlsweep.cli", "sweep", str(path)],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    filled: list[Path] = []
    stderr = fault_when(sweep, lambda: _reporting(journal), lambda: filled.append(fill_disk(disk)))
    assert sweep.returncode == 75, stderr[-3000:]
    last = stderr.strip().splitlines()[-1]
    assert last.startswith(f"tlsweep: error: no space left on device writing {journal};")
    assert journal.read_bytes().endswith(b"\n")  # whole lines only
    study = optuna.load_study(study_name="full", storage=open_storage(f"journal://{journal}"))
    assert study.trials[0].intermediate_values  # what was written before stays

    filled[0].unlink()
    resumed = subprocess.run(
        [sys.executable, "-m", "tlsweep.cli", "sweep", str(path)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
    )
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    study = optuna.load_study(study_name="full", storage=open_storage(f"journal://{journal}"))
    assert study.trials[0].state == TrialState.FAIL  # its process was gone: failed, run again
    _check_runs(study, n_trials=2)


def _reporting(journal: Path) -> bool:
    if not journal.exists():
        return False
    try:
        study = optuna.load_study(study_name="full", storage=open_storage(f"journal://{journal}"))
    except KeyError:  # not created yet
        return False
    return bool(study.trials and study.trials[0].intermediate_values)
