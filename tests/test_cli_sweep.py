"""``tlsweep sweep | runs | reproduce | predict`` as a user runs them: real processes.

Every command here is a fresh interpreter that imports TensorFlow, so independent commands run
side by side (module fixtures) and the tests read their results.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import mlflow
import optuna
import pandas as pd
import pytest
from optuna.trial import TrialState

pytestmark = pytest.mark.slow

TLSWEEP = str(Path(sys.executable).with_name("tlsweep"))
STUDY = "clitiny"
ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]|\x1b\][^\x07]*\x07")


@dataclass
class Done:
    """A finished command."""

    args: list[str]
    returncode: int
    stdout: str
    stderr: str


def environment(folder: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "TLSWEEP_"))}
    env.update(
        MLFLOW_TRACKING_URI=f"sqlite:///{folder / 'mlruns' / 'mlflow.db'}",
        TF_CPP_MIN_LOG_LEVEL="3",
        PYTHONUNBUFFERED="1",
        **extra,
    )
    return env


def start(folder: Path, *args: str, **env: str) -> subprocess.Popen:
    return subprocess.Popen(
        [TLSWEEP, *args],
        cwd=folder,
        env=environment(folder, **env),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def finish(process: subprocess.Popen, timeout: float = 400) -> Done:
    try:
        stdout, stderr = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        stdout, stderr = process.communicate()
    return Done(list(process.args), process.returncode, stdout, stderr)


def run_all(commands: dict[str, tuple[Path, list[str]]]) -> dict[str, Done]:
    """Start every command at once, then collect them."""
    started = {name: start(folder, *args) for name, (folder, args) in commands.items()}
    return {name: finish(process) for name, process in started.items()}


def client_for(folder: Path) -> mlflow.MlflowClient:
    return mlflow.MlflowClient(tracking_uri=f"sqlite:///{folder / 'mlruns' / 'mlflow.db'}")


def all_runs(folder: Path) -> list:
    client = client_for(folder)
    ids = [e.experiment_id for e in client.search_experiments()]
    return client.search_runs(ids) if ids else []


# --- an interrupted sweep, resumed; then the commands that read it -----------------------------


@dataclass
class Session:
    folder: Path
    interrupted: Done
    killed_runs: dict[str, str]  # run id -> status, right after the interruption
    trials_then: list[tuple[int, str]]  # (number, state) right after the interruption
    resumed: Done
    runs: Done
    reproduce: Done
    predict: Done

    def study(self) -> optuna.Study:
        storage = f"sqlite:///{self.folder / 'mlruns' / 'optuna.db'}"  # the default storage
        return optuna.load_study(study_name=STUDY, storage=storage)


def interrupt_during_second_trial(folder: Path, sweep_file: Path) -> Done:
    """Start the sweep, wait for the second trial to be training, then send SIGTERM, as a
    scheduler preempting the job does (handled as Ctrl-C is: tests/test_interrupts.py).

    The console is made to behave as a terminal (TTY_COMPATIBLE) so that the live status line
    shows each epoch: ``trial 2/3`` announces the trial, an ``epoch k/100`` after it proves its
    child run exists and is training.
    """
    process = subprocess.Popen(
        [TLSWEEP, "sweep", str(sweep_file)],
        cwd=folder,
        env=environment(folder, TTY_COMPATIBLE="1", TERM="xterm", COLUMNS="120"),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    seen = b""
    try:
        while True:
            chunk = os.read(process.stdout.fileno(), 65536)
            if not chunk:
                break  # ended without a second trial: the assertions below say so
            seen += chunk
            text = ANSI.sub("", seen.decode(errors="replace"))
            second = text.find("trial 2/3 (#1)")
            epochs = re.findall(r"epoch (\d+)/100", text[second:]) if second >= 0 else []
            if epochs and int(epochs[0]) < 80:  # the live line shows some epoch: 20+ to go
                process.send_signal(signal.SIGTERM)
                break
        rest, stderr = process.communicate(timeout=300)
    finally:
        if process.poll() is None:
            process.kill()
    stdout = ANSI.sub("", (seen + rest).decode(errors="replace"))
    return Done(list(process.args), process.returncode, stdout, stderr.decode(errors="replace"))


@pytest.fixture(scope="module")
def session(tmp_path_factory, write_sweep) -> Session:
    folder = tmp_path_factory.mktemp("cli")
    sweep_file = write_sweep(
        folder,
        {"head.dropout": "choice(0.0, 0.25, 0.5)"},
        # storage null: the default, mlruns/optuna.db in the working directory
        {
            "study_name": STUDY,
            "sampler": "random",
            "pruner": "none",
            "n_trials": 3,
            "storage": None,
        },
        # long enough trials that Ctrl-C lands while the second one trains: an epoch on
        # these cached features takes milliseconds, the live line refreshes ~10 times a second
        base={"train.epochs": 100, "train.early_stopping.patience": None},
    )

    interrupted = interrupt_during_second_trial(folder, sweep_file)
    killed_runs = {r.info.run_id: r.info.status for r in all_runs(folder)}
    storage = f"sqlite:///{folder / 'mlruns' / 'optuna.db'}"
    trials_then = [
        (t.number, t.state.name)
        for t in optuna.load_study(study_name=STUDY, storage=storage).trials
    ]

    resumed = finish(start(folder, "sweep", str(sweep_file)))

    from PIL import Image

    for name, shade in (("bright.png", 230), ("dark.png", 20)):
        Image.new("RGB", (20, 14), (shade, shade, shade)).save(folder / name)
    after = run_all(
        {
            "runs": (folder, ["runs", STUDY, "--csv", "board.csv"]),
            "reproduce": (folder, ["reproduce", "--best", STUDY]),
            "predict": (
                folder,
                ["predict", f"models:/{STUDY}@champion", "bright.png", "dark.png", "--top-k", "2"],
            ),
        }
    )
    return Session(folder, interrupted, killed_runs, trials_then, resumed, **after)


def test_sigterm_exits_143_and_leaves_nothing_running(session: Session) -> None:
    done = session.interrupted
    assert "trial 2/3 (#1)" in done.stdout, done.stdout + done.stderr
    assert done.returncode == 143, done.stderr
    assert done.stderr.rstrip().splitlines()[-1] == "tlsweep: interrupted (SIGTERM)"
    assert "tlsweep: interrupted" not in done.stdout
    # the interrupted trial failed, and a copy with its values waits for the next run
    assert session.trials_then == [(0, "COMPLETE"), (1, "FAIL"), (2, "WAITING")]
    assert sorted(session.killed_runs.values()) == ["FINISHED", "KILLED", "KILLED"]


def test_interrupted_runs_are_the_parent_and_the_current_trial(session: Session) -> None:
    client = client_for(session.folder)
    study = session.study()
    interrupted_trial = study.trials[1]
    child = interrupted_trial.user_attrs["mlflow_run_id"]
    parent = study.user_attrs["mlflow_parent_run_id"]
    killed = {run_id for run_id, status in session.killed_runs.items() if status == "KILLED"}
    assert killed == {parent, child}
    run = client.get_run(child)
    assert run.data.tags["tlsweep.trial_number"] == "1"
    assert run.data.tags["tlsweep.trial_state"] == "FAIL"  # as Optuna recorded the trial
    assert "Interrupted: SIGTERM" in run.data.tags["error"]
    assert interrupted_trial.user_attrs["fail_reason"] == "interrupted (SIGTERM)"


def test_rerun_finishes_the_sweep(session: Session) -> None:
    done = session.resumed
    assert done.returncode == 0, done.stderr[-3000:]
    assert "resuming: 1 finished" in done.stdout
    assert f"champion model: models:/{STUDY}@champion" in done.stdout
    study = session.study()
    states = [t.state for t in study.trials]
    assert states.count(TrialState.COMPLETE) == 3
    assert states == [
        TrialState.COMPLETE,
        TrialState.FAIL,
        TrialState.COMPLETE,
        TrialState.COMPLETE,
    ]
    assert study.trials[2].params == study.trials[1].params  # the interrupted values, again
    runs = all_runs(session.folder)
    parent_id = study.user_attrs["mlflow_parent_run_id"]
    statuses = {r.info.run_id: r.info.status for r in runs}
    assert statuses[parent_id] == "FINISHED"  # the same parent, reopened and finished
    assert "RUNNING" not in statuses.values()
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent_id]
    assert len(children) == 4
    assert {t.user_attrs["mlflow_run_id"] for t in study.trials} == {
        r.info.run_id for r in children
    }


def test_runs_prints_the_leaderboard_and_writes_csv(session: Session) -> None:
    done = session.runs
    assert done.returncode == 0, done.stderr[-3000:]
    study = session.study()
    lines = done.stdout.splitlines()
    header = lines[0].split()
    assert header[:4] == ["trial", "state", "value", "head.dropout"]
    rows = [line.split() for line in lines[1:] if line.split() and line.split()[0].isdigit()]
    assert [row[1] for row in rows] == ["COMPLETE"] * 3 + ["FAIL"]
    assert sorted(int(row[0]) for row in rows) == [t.number for t in study.trials]
    for trial in study.trials:
        assert trial.user_attrs["mlflow_run_id"] in done.stdout
    assert "wrote board.csv" in done.stdout
    board = pd.read_csv(session.folder / "board.csv")
    assert board["trial"].tolist() == [int(row[0]) for row in rows]
    assert board["state"].tolist() == [row[1] for row in rows]
    completed = board[board["state"] == "COMPLETE"]
    assert completed["value"].is_monotonic_decreasing
    assert completed["value"].iloc[0] == pytest.approx(study.best_value)


def test_reproduce_best_prints_the_comparison(session: Session) -> None:
    done = session.reproduce
    assert done.returncode == 0, done.stdout + done.stderr[-3000:]
    best_run = session.study().best_trial.user_attrs["mlflow_run_id"]
    assert re.search(rf"^original {best_run}  reproduced [0-9a-f]{{32}}$", done.stdout, re.M)
    table = done.stdout.splitlines()[1:]
    assert table[0].split() == ["metric", "original", "reproduced", "abs_diff"]
    metrics = {line.split()[0]: line.split()[1:] for line in table[1:] if len(line.split()) == 4}
    assert {"best_val_accuracy", "test_accuracy", "test_loss", "best_epoch"} <= set(metrics)
    assert all(float(values[2]) == 0.0 for values in metrics.values())
    assert "reproduced: every metric within 0" in done.stdout
    reproduced = done.stdout.split("reproduced ")[1].split()[0]
    run = client_for(session.folder).get_run(reproduced)
    assert run.data.tags["tlsweep.reproduces"] == best_run


def test_predict_prints_top_k(session: Session) -> None:
    done = session.predict
    assert done.returncode == 0, done.stderr[-3000:]
    lines = [line for line in done.stdout.splitlines() if line.strip()]
    assert [line.split(":")[0] for line in lines] == ["bright.png", "dark.png"]
    for line in lines:
        shown = line.split(": ", 1)[1].split()
        names, probabilities = shown[0::2], [float(p) for p in shown[1::2]]
        assert len(names) == 2 and set(names) <= {"0", "1", "2"} and len(set(names)) == 2
        assert probabilities == sorted(probabilities, reverse=True)
        assert all(0.0 <= p <= 1.0 for p in probabilities)


# --- bad input: exit 2, one line, nothing created ----------------------------------------------

BAD = {
    "unknown sweep": (["no_such_sweep"], ("unknown sweep 'no_such_sweep'", "quickstart")),
    "sampler": (["{sweep}", "sweep.sampler=annealing"], ("sweep.sampler=annealing",)),
    "expression": (["{sweep}", "head.dropout=choice(0.1"], ("malformed expression",)),
    "metric": (["{sweep}", "sweep.metric=f1"], ("sweep.metric=f1",)),
    "storage": (
        ["{sweep}", "sweep.storage=postgresql://user:s3cret@127.0.0.1:9/optuna"],
        ("cannot open sweep.storage", "user:***@127.0.0.1"),
    ),
}


@pytest.fixture(scope="module")
def refused(tmp_path_factory, write_sweep) -> dict[str, tuple[Path, Done]]:
    commands, folders = {}, {}
    for case, (args, _) in BAD.items():
        folder = tmp_path_factory.mktemp("bad")
        sweep_file = write_sweep(folder, {"head.dropout": "choice(0.0, 0.5)"}, {"n_trials": 2})
        folders[case] = folder
        commands[case] = (folder, ["sweep", *(a.format(sweep=sweep_file) for a in args)])
    done = run_all(commands)
    return {case: (folders[case], done[case]) for case in BAD}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_sweep_input_is_refused(refused, case: str) -> None:
    folder, done = refused[case]
    assert done.returncode == 2, done.stderr[-3000:]
    errors = [line for line in done.stderr.splitlines() if line.startswith("tlsweep: error:")]
    assert len(errors) == 1, done.stderr
    assert done.stderr.rstrip().splitlines()[-1] == errors[0]
    assert "Traceback" not in done.stderr
    for fragment in BAD[case][1]:
        assert fragment in errors[0]
    assert "s3cret" not in done.stderr + done.stdout
    assert not (folder / "mlruns" / "mlflow.db").exists()  # no MLflow run, not even a store
    assert not (folder / "optuna.db").exists()  # the sweep's storage
    assert not (folder / "mlruns" / "optuna.db").exists()  # the default storage
    assert done.stdout == ""
