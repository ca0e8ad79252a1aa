"""Worker jobs on Slurm: the launcher settings, ``tlsweep status``, and a real one-node cluster
(slurmctld + slurmd, started by the test) running two worker jobs, one of them cancelled."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import mlflow
import optuna
import pytest
from optuna.trial import TrialState

from tlsweep.cli import main
from tlsweep.errors import UserError
from tlsweep.sweep import FAIL_REASON_ATTR, RUN_ID_ATTR, open_storage
from tlsweep.sweep._common import N_TRIALS_ATTR, SUMMARIZED_ATTR, WORKER_ATTR
from tlsweep.sweep._slurm import launcher_settings
from tlsweep.sweep._status import ended, status_line

TLSWEEP = [sys.executable, "-m", "tlsweep.cli"]
FINISHED = (TrialState.COMPLETE, TrialState.PRUNED)

# --- fast: settings, refusals, status -----------------------------------------------------------


def test_launcher_settings_become_submitit_parameters() -> None:
    settings = launcher_settings(
        [
            "launcher.partition=gpu",
            "launcher.gpus_per_node=2",
            "launcher.time_min=30",
            "launcher.additional={constraint: a100}",
        ]
    )
    parameters = settings.executor_parameters("s", jobs=4)
    assert parameters["slurm_partition"] == "gpu"
    assert parameters["gpus_per_node"] == 2
    assert parameters["timeout_min"] == 30
    assert parameters["slurm_array_parallelism"] == 4
    assert parameters["slurm_additional_parameters"] == {"constraint": "a100", "requeue": True}
    assert "slurm_account" not in parameters  # unset: the cluster's default
    defaults = launcher_settings([])
    assert defaults.cluster == "slurm" and defaults.cpus_per_task == 4


@pytest.mark.parametrize(
    ("override", "fragment"),
    [
        ("launcher.partitions=gpu", "launcher.partition"),
        ("launcher.cpus_per_task=many", "cpus_per_task"),
        ("launcher.time_min=0", "launcher.time_min=0 is not allowed"),
        ("launcher.cluster=kubernetes", "launcher.cluster=kubernetes is not allowed"),
    ],
)
def test_bad_launcher_settings_are_one_line_errors(override: str, fragment: str) -> None:
    with pytest.raises(UserError) as refused:
        launcher_settings([override])
    assert fragment in str(refused.value) and "\n" not in str(refused.value)


def test_launcher_settings_need_the_slurm_launcher(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["sweep", "quickstart", "launcher.partition=gpu"]) == 2
    error = capsys.readouterr().err.strip()
    assert error == "tlsweep: error: launcher.partition=gpu is not allowed without --launcher slurm"


def test_status_counts_trials_and_says_when_summarised(tmp_path: Path) -> None:
    storage = open_storage(f"journal://{tmp_path / 'j.journal'}")
    study = optuna.create_study(study_name="s", storage=storage, direction="maximize")
    study.set_metric_names(["val_accuracy"])
    study.set_user_attr(N_TRIALS_ATTR, 3)
    study.add_trial(optuna.trial.create_trial(value=0.5))
    study.add_trial(optuna.trial.create_trial(value=0.75))
    study.add_trial(optuna.trial.create_trial(state=TrialState.FAIL))
    study.ask()  # running
    assert status_line(study) == (
        "sweep s: 2/3 finished, 1 running, 1 failed; best val_accuracy 0.7500 (trial 1)"
    )
    assert not ended(study)
    study.tell(3, 0.25)
    study.set_user_attr(SUMMARIZED_ATTR, 3)
    assert status_line(study).endswith("(trial 1); summarised")
    assert ended(study)


# --- slow: a real Slurm cluster -----------------------------------------------------------------


@pytest.fixture(scope="module")
def slurm() -> None:
    from bench.servers import SlurmCluster

    try:
        SlurmCluster()
    except RuntimeError as exc:  # .ci/run installs Slurm and runs as root
        if os.environ.get("CI"):
            pytest.fail(str(exc))
        pytest.skip(str(exc))


def _job_of(pid: int) -> str | None:
    """The Slurm job (array element, ``12_0``) a process of this node runs in, from the
    environment Slurm gave it."""
    try:
        environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    except OSError:
        return None
    env = dict(item.decode(errors="replace").partition("=")[::2] for item in environ if item)
    if "SLURM_ARRAY_JOB_ID" in env:
        return f"{env['SLURM_ARRAY_JOB_ID']}_{env.get('SLURM_ARRAY_TASK_ID', '0')}"
    return env.get("SLURM_JOB_ID")


def _submit(tmp_path: Path, write_sweep: Callable[..., Path], n_trials: int, jobs: int):
    """A sweep of ``n_trials`` long trials on a journal, submitted as ``jobs`` worker jobs:
    returns the job ids and a function that loads the study."""
    journal = tmp_path / "study.journal"
    path = write_sweep(
        tmp_path,
        {"head.dropout": "interval(0.0, 0.5)"},
        {"study_name": "cluster", "n_trials": n_trials, "storage": f"journal://{journal}"},
        base={"train.epochs": 150, "train.early_stopping.patience": None},
    )
    launcher = ["launcher.cpus_per_task=1", "launcher.time_min=20"]
    launcher.append(f"launcher.logs={tmp_path / 'slurm'}")
    submitted = subprocess.run(
        [*TLSWEEP, "sweep", str(path), "--launcher", "slurm", "--workers", str(jobs), *launcher],
        cwd=tmp_path,
        env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3"),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert submitted.returncode == 0, submitted.stderr[-3000:]
    found = re.search(r"worker job\(s\) for sweep cluster: (.+)", submitted.stdout)
    assert found, submitted.stdout
    assert "tlsweep status cluster --follow" in submitted.stdout
    store = open_storage(f"journal://{journal}")
    return found.group(1).split(), lambda: optuna.load_study(study_name="cluster", storage=store)


def _job_training(study: Callable[[], optuna.Study], job_ids: list[str], folder: Path) -> str:
    """Wait for one of the jobs to be training a trial (an epoch reported); returns its id."""
    deadline = time.monotonic() + 300
    while True:
        assert time.monotonic() < deadline and not ended(study()), _logs(folder)
        training = [
            _job_of(int(t.user_attrs[WORKER_ATTR].rpartition(":")[2]))
            for t in study().get_trials(states=(TrialState.RUNNING,))
            if t.user_attrs.get(WORKER_ATTR) and t.intermediate_values
        ]
        if job := next((j for j in training if j in job_ids), None):
            return job
        time.sleep(0.5)  # polling the study for a trial under way


def _wait_until_ended(study: Callable[[], optuna.Study], folder: Path, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not ended(study()):
        assert time.monotonic() < deadline, _logs(folder)
        time.sleep(1)  # polling the study until a job has summarised it


def _assert_exact(study: optuna.Study, n_trials: int) -> list[optuna.trial.FrozenTrial]:
    """n_trials finished, nothing running or queued, one run per trial (its own), no run
    RUNNING, the parent FINISHED with its leaderboard; returns the failed trials."""
    trials = study.trials
    assert len([t for t in trials if t.state in FINISHED]) == n_trials
    assert not [t for t in trials if t.state in (TrialState.RUNNING, TrialState.WAITING)]
    client = mlflow.MlflowClient(tracking_uri=os.environ["MLFLOW_TRACKING_URI"])
    parent_id = study.user_attrs["mlflow_parent_run_id"]
    parent = client.get_run(parent_id)
    assert parent.info.status == "FINISHED"
    children = client.search_runs(
        [parent.info.experiment_id], f"tags.mlflow.parentRunId = '{parent_id}'"
    )
    by_trial = {int(r.data.tags["tlsweep.trial_number"]): r.info.run_id for r in children}
    assert len(by_trial) == len(children) == len(trials)  # one run per trial
    assert all(by_trial[t.number] == t.user_attrs[RUN_ID_ATTR] for t in trials)
    every = client.search_runs([parent.info.experiment_id])
    assert not [r for r in every if r.info.status == "RUNNING"]
    assert "leaderboard.csv" in {a.path for a in client.list_artifacts(parent_id)}
    failed = [t for t in trials if t.state == TrialState.FAIL]
    for trial in failed:
        assert trial.user_attrs[FAIL_REASON_ATTR] == "interrupted (SIGTERM)"
        assert client.get_run(trial.user_attrs[RUN_ID_ATTR]).info.status == "KILLED"
    return failed


@pytest.mark.slow
def test_two_slurm_jobs_finish_a_study_exactly_though_one_is_cancelled(
    slurm: None, tmp_path: Path, write_sweep: Callable[..., Path]
) -> None:
    """``tlsweep sweep --launcher slurm --workers 2`` submits a job array and returns; one job
    is ``scancel``led while it trains (SIGTERM: its trial is failed and queued again, its run
    KILLED); the other job runs the retry, finds the study complete and summarises it. The
    study ends with exactly n_trials finished, one run per trial, nothing RUNNING."""
    job_ids, study = _submit(tmp_path, write_sweep, n_trials=4, jobs=2)
    try:
        assert len(job_ids) == 2
        subprocess.run(["scancel", _job_training(study, job_ids, tmp_path)], check=True)
        _wait_until_ended(study, tmp_path, timeout=600)
    finally:
        subprocess.run(["scancel", *job_ids], check=False)
    assert len(_assert_exact(study(), n_trials=4)) == 1

    shown = subprocess.run(
        [*TLSWEEP, "status", "cluster"], cwd=tmp_path, capture_output=True, text=True
    )  # found from its parent run: no storage given
    assert shown.returncode == 0, shown.stderr
    assert shown.stdout.startswith("sweep cluster: 4/4 finished, 1 failed; best val_accuracy")
    assert shown.stdout.strip().endswith("summarised")


@pytest.mark.slow
def test_a_requeued_job_rejoins_the_study_and_finishes_it(
    slurm: None, tmp_path: Path, write_sweep: Callable[..., Path]
) -> None:
    """``scontrol requeue`` (what preemption with requeue does): Slurm stops the only job
    with SIGTERM mid-trial and starts it again; the restarted worker runs the queued retry
    and the rest, and summarises the study."""
    job_ids, study = _submit(tmp_path, write_sweep, n_trials=3, jobs=1)
    try:
        job = _job_training(study, job_ids, tmp_path)
        subprocess.run(["scontrol", "requeue", job], check=True, capture_output=True)
        _wait_until_ended(study, tmp_path, timeout=600)
    finally:
        subprocess.run(["scancel", *job_ids], check=False)
    failed = _assert_exact(study(), n_trials=3)
    assert len(failed) == 1
    workers = {t.user_attrs[WORKER_ATTR] for t in study().trials}
    assert len(workers) == 2  # the job before its requeue, and after


def _logs(folder: Path) -> str:
    texts = [p.read_text()[-1500:] for p in sorted((folder / "slurm").rglob("*.err"))]
    return "\n".join(texts)
