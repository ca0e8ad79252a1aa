"""Several workers on one study: local processes, lost trials, the study lock, and several
machines against a real PostgreSQL server and a real MLflow tracking server."""

from __future__ import annotations

import fcntl
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import mlflow
import optuna
import pytest
from bench.servers import PASSWORD, MlflowServer, Postgres
from optuna.trial import TrialState

from tlsweep import tracking
from tlsweep.cli import main
from tlsweep.errors import UserError
from tlsweep.sweep import FAIL_REASON_ATTR, RUN_ID_ATTR, open_storage
from tlsweep.sweep._common import WORKER_ATTR
from tlsweep.sweep._storage import (
    DEFAULT_JOURNAL,
    DEFAULT_STORAGE,
    RetryLostTrial,
    StudyLock,
    fail_dead_trials,
    fail_lost_trials,
    reconcile_runs,
    retry_of,
    storage_url,
)
from tlsweep.sweep._workers import worker_command, worker_env, worker_slots
from tlsweep.sweepspec import WORKER_STORAGE_ENV, SweepSettings, load_sweep, worker_overrides

TLSWEEP = [sys.executable, "-m", "tlsweep.cli"]
ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]|\r")
FINISHED = (TrialState.COMPLETE, TrialState.PRUNED)
CAPTURE = {"capture_output": True, "text": True, "check": True}

# --- fast: commands, storages, lost trials, the lock -------------------------------------------


def test_each_worker_runs_the_same_sweep_on_the_resolved_storage(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    secret = "postgresql://tl:s3cret@db.example/optuna"
    command = worker_command(["quickstart", "head.dropout=0.1", f"sweep.storage={secret}"])
    assert command[:4] == [sys.executable, "-m", "tlsweep.cli", "sweep"]
    assert command[4:] == ["quickstart", "head.dropout=0.1", "--worker"]
    assert "s3cret" not in " ".join(command)  # never on a command line: ps shows those
    env = worker_env(None, slot=0, storage=secret)
    assert env[WORKER_STORAGE_ENV] == secret  # in the environment instead
    monkeypatch.setenv(WORKER_STORAGE_ENV, secret)
    assert worker_overrides() == [f"sweep.storage='{secret}'"]
    spec = load_sweep("quickstart", worker_overrides())  # how the worker reads it back
    assert spec.settings.storage == secret


def test_each_gpu_worker_sees_only_its_gpu() -> None:
    env = worker_env("3", slot=1)
    assert env["CUDA_VISIBLE_DEVICES"] == "3"
    assert env["TLSWEEP_WORKER_LABEL"] == "[w1] "
    assert worker_env(None, slot=0).get("CUDA_VISIBLE_DEVICES") == os.environ.get(
        "CUDA_VISIBLE_DEVICES"
    )
    assert "XLA_PYTHON_CLIENT_MEM_FRACTION" not in env  # alone on its GPU
    shared = worker_env("0", slot=2, sharing=2)  # --gpus 0,0,...: two workers on GPU 0
    assert shared["CUDA_VISIBLE_DEVICES"] == "0"
    assert float(shared["XLA_PYTHON_CLIENT_MEM_FRACTION"]) == pytest.approx(0.45)


def test_workers_listed_twice_share_their_gpu() -> None:
    """``--gpus 0,0,1``: three workers, two of them told to share GPU 0's memory."""
    assert worker_slots(3) == [(None, 1)] * 3
    assert worker_slots(1, ["0", "0", "1"]) == [("0", 2), ("0", 2), ("1", 1)]


@pytest.mark.parametrize("gpus", ["0,x", "1,,2", "-1"])
def test_bad_gpu_lists_are_refused(gpus: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["sweep", "quickstart", "--gpus", gpus]) == 2
    assert capsys.readouterr().err.strip().startswith(f"tlsweep: error: --gpus={gpus}")


def test_workers_default_to_a_journal_file_and_refuse_sqlite() -> None:
    settings = SweepSettings(study_name="s")
    assert storage_url(settings, workers=1).startswith("sqlite:///")
    assert storage_url(settings, workers=2) == f"journal://{DEFAULT_JOURNAL.resolve()}"
    with pytest.raises(UserError, match="not safe for 3 concurrent workers"):
        storage_url(SweepSettings(storage="sqlite:///x.db"), workers=3)


def test_a_study_in_the_sqlite_file_moves_to_the_journal_for_workers() -> None:
    sqlite = open_storage(f"sqlite:///{DEFAULT_STORAGE.resolve()}")
    study = optuna.create_study(study_name="moving", storage=sqlite, direction="maximize")
    study.add_trial(optuna.trial.create_trial(value=0.5))
    study.set_user_attr("mlflow_parent_run_id", "abc")

    url = storage_url(SweepSettings(study_name="moving"), workers=2)

    moved = optuna.load_study(study_name="moving", storage=open_storage(url))
    assert [t.value for t in moved.trials] == [0.5]
    assert moved.user_attrs["mlflow_parent_run_id"] == "abc"
    assert "moving" not in optuna.get_all_study_names(sqlite)
    assert storage_url(SweepSettings(study_name="moving"), workers=1) == url  # found there again


def _running_trial_with_run(storage: optuna.storages.BaseStorage, worker: str) -> tuple:
    study = optuna.create_study(study_name="lost", storage=storage, direction="maximize")
    trial = study.ask()
    dropout = trial.suggest_float("head.dropout", 0.0, 0.5)
    trial.set_user_attr(WORKER_ATTR, worker)
    tracking.connect()
    client = mlflow.MlflowClient()
    run = client.create_run(tracking.experiment_id("lost"))
    trial.set_user_attr(RUN_ID_ATTR, run.info.run_id)
    return study, trial, dropout, run.info.run_id


def test_a_dead_workers_trial_is_failed_closed_and_retried(tmp_path: Path) -> None:
    storage = open_storage(f"journal://{tmp_path / 'j.journal'}")
    study, trial, dropout, run_id = _running_trial_with_run(storage, "host:123")
    other = study.ask()
    other.set_user_attr(WORKER_ATTR, "host:456")

    lost = fail_lost_trials(study, "host:123", "worker host:123 died (exit code -9)", max_retry=1)

    assert lost == [trial.number]
    frozen = study.trials[trial.number]
    assert frozen.state == TrialState.FAIL
    assert "died" in frozen.user_attrs[FAIL_REASON_ATTR]
    assert study.trials[other.number].state == TrialState.RUNNING  # another worker's: untouched
    run = mlflow.MlflowClient().get_run(run_id)
    assert run.info.status == "FAILED"
    assert "died" in run.data.tags["error"] and run.data.tags["tlsweep.trial_state"] == "FAIL"
    retry = study.get_trials(states=(TrialState.WAITING,))
    assert len(retry) == 1
    assert retry_of(retry[0]) == trial.number
    assert not {RUN_ID_ATTR, WORKER_ATTR, FAIL_REASON_ATTR} & set(retry[0].user_attrs)
    retried = study.ask()  # the next trial any worker takes is the retry, with the same values
    assert retried.suggest_float("head.dropout", 0.0, 0.5) == dropout
    retried.set_user_attr(WORKER_ATTR, "host:789")
    fail_lost_trials(study, "host:789", "died again", max_retry=1)
    assert study.get_trials(states=(TrialState.WAITING,)) == []  # max_retry reached


def test_trials_of_gone_processes_are_found_without_heartbeats(tmp_path: Path) -> None:
    """A resumed or joined sweep on a journal file finds what a killed process left RUNNING:
    its trials on this machine by their worker's pid, and a trial that recorded no worker."""
    storage = open_storage(f"journal://{tmp_path / 'j.journal'}")
    host = socket.gethostname()
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], **CAPTURE)
    dead_pid = int(gone.stdout)  # that process has exited
    study, dead, _, run_id = _running_trial_with_run(storage, f"{host}:{dead_pid}")
    unrecorded = study.ask()  # killed between taking the trial and recording itself
    alive = study.ask()
    alive.set_user_attr(WORKER_ATTR, f"{host}:{os.getpid()}")
    elsewhere = study.ask()  # another machine's: left to that machine (or to heartbeats)
    elsewhere.set_user_attr(WORKER_ATTR, f"another-{host}:{dead_pid}")

    lost = fail_dead_trials(study, max_retry=2)

    assert sorted(lost) == sorted([dead.number, unrecorded.number])
    states = {t.number: t.state for t in study.trials}
    assert states[dead.number] == states[unrecorded.number] == TrialState.FAIL
    assert states[alive.number] == states[elsewhere.number] == TrialState.RUNNING
    assert "is gone" in study.trials[dead.number].user_attrs[FAIL_REASON_ATTR]
    assert mlflow.MlflowClient().get_run(run_id).info.status == "FAILED"
    retries = study.get_trials(states=(TrialState.WAITING,))
    assert sorted(retry_of(t) for t in retries) == sorted(lost)  # both queued again
    assert fail_dead_trials(study, max_retry=2) == []


def test_runs_left_running_by_ended_trials_are_closed(tmp_path: Path) -> None:
    """Reconciliation (as a sweep opens and as it ends): a run still RUNNING whose trial has
    ended is closed, FINISHED if it is a finished trial's run, FAILED otherwise."""
    storage = open_storage(f"journal://{tmp_path / 'j.journal'}")
    study = optuna.create_study(study_name="lost", storage=storage, direction="maximize")
    tracking.connect()
    client = mlflow.MlflowClient()
    experiment = tracking.experiment_id("lost")
    parent = client.create_run(experiment).info.run_id

    def trial_with_run(state: TrialState | None) -> tuple[int, str]:
        trial = study.ask()
        tags = {"mlflow.parentRunId": parent, "tlsweep.trial_number": str(trial.number)}
        run_id = client.create_run(experiment, tags=tags).info.run_id
        trial.set_user_attr(RUN_ID_ATTR, run_id)
        if state is not None:
            study.tell(trial, 1.0 if state == TrialState.COMPLETE else None, state=state)
        return trial.number, run_id

    _, completed = trial_with_run(TrialState.COMPLETE)  # the tracking server was away at its end
    _, failed = trial_with_run(TrialState.FAIL)  # its process stopped before closing the run
    _, running = trial_with_run(None)  # still training elsewhere
    other = client.create_run(experiment).info.run_id  # not a child of this sweep

    ended = reconcile_runs(study, parent)

    assert sorted(ended) == sorted([completed, failed])
    status = {r: client.get_run(r).info.status for r in (completed, failed, running, other)}
    assert status == {completed: "FINISHED", failed: "FAILED", running: "RUNNING", other: "RUNNING"}
    assert "ended (FAIL)" in client.get_run(failed).data.tags["error"]
    assert reconcile_runs(study, parent) == []


def test_a_torn_journal_line_is_cut_and_the_study_loads(tmp_path: Path) -> None:
    """A write cut short (a full disk) leaves half a line at the end of the journal; Optuna
    would join the next line to it and then fail to read the file at all."""
    path = tmp_path / "j.journal"
    study = optuna.create_study(study_name="torn", storage=open_storage(f"journal://{path}"))
    study.add_trial(optuna.trial.create_trial(value=0.5))
    complete = path.read_bytes()
    path.write_bytes(complete + b'{"op_code": 5, "worker_id": "x", "trial_id": 0, "par')

    again = optuna.load_study(study_name="torn", storage=open_storage(f"journal://{path}"))
    again.add_trial(optuna.trial.create_trial(value=0.7))  # appended after the cut

    assert path.read_bytes().startswith(complete)
    reread = optuna.load_study(study_name="torn", storage=open_storage(f"journal://{path}"))
    assert [t.value for t in reread.trials] == [0.5, 0.7]


def test_a_killed_writer_leaves_no_journal_lock_behind(tmp_path: Path) -> None:
    """Optuna's own lock file outlives a process killed while appending, and stalls every
    other process for 30 s; the kernel drops an flock with its holder."""
    journal = tmp_path / "j.journal"
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time, pathlib\n"
            "from tlsweep.sweep._storage import JournalFlock\n"
            f"lock = JournalFlock(pathlib.Path({str(journal)!r}))\n"
            "lock.acquire()\n"
            "print('locked', flush=True)\n"
            "sys.stdin.read()\n",
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert holder.stdout.readline().strip() == "locked"
    with Path(f"{journal}.flock").open("a") as handle:
        with pytest.raises(BlockingIOError):  # held...
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        holder.kill()
        holder.wait()
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)  # ...and free the moment it died


def test_a_signal_while_waiting_for_the_journal_lock_leaves_it_usable(tmp_path: Path) -> None:
    """SIGTERM lands while a worker waits for another's journal append (every epoch's report
    is one): the interrupted wait must not keep the thread lock, or the worker's own clean-up
    (failing its trial in the journal) waits forever; the supervisor killed such workers."""
    from tlsweep.sweep._storage import JournalFlock

    journal = tmp_path / "j.journal"
    lock = JournalFlock(journal)

    def interrupt(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    with Path(f"{journal}.flock").open("a") as other:
        fcntl.flock(other, fcntl.LOCK_EX)  # another process is appending
        previous = signal.signal(signal.SIGALRM, interrupt)
        try:
            signal.setitimer(signal.ITIMER_REAL, 0.2)  # the signal comes during the wait
            with pytest.raises(KeyboardInterrupt):
                lock.acquire()
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, previous)
    again = threading.Thread(target=lambda: (lock.acquire(), lock.release()), daemon=True)
    again.start()
    again.join(timeout=10)
    assert not again.is_alive()  # at once: nothing of the interrupted wait is held


def test_rdb_storages_beat_and_retry_lost_trials(tmp_path: Path) -> None:
    settings = SweepSettings(heartbeat_interval=7, grace_period=30, max_retry=2)
    storage = open_storage(f"sqlite:///{tmp_path / 'o.db'}", settings)
    assert storage.get_heartbeat_interval() == 7
    callback = storage.get_heartbeat_stale_trial_callback()
    assert isinstance(callback, RetryLostTrial)

    study, trial, _, run_id = _running_trial_with_run(storage, "host:1")
    study.tell(trial, state=TrialState.FAIL)  # as fail_stale_trials does before the callback
    callback(study, study.trials[trial.number])

    assert len(study.get_trials(states=(TrialState.WAITING,))) == 1
    run = mlflow.MlflowClient().get_run(run_id)
    assert run.info.status == "FAILED" and "heartbeats" in run.data.tags["error"]


def test_the_study_lock_excludes_other_holders(tmp_path: Path) -> None:
    url = f"journal://{tmp_path / 'j.journal'}"
    lock = StudyLock(open_storage(url), url, "locked")
    path = lock._path
    assert path is not None and path.parent == tmp_path

    def free() -> bool:
        with path.open("a") as handle:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return False
            fcntl.flock(handle, fcntl.LOCK_UN)
            return True

    with lock.held():
        assert not free()
    assert free()


# --- slow: real processes ------------------------------------------------------------------------


def _env(**extra: str) -> dict[str, str]:
    # PYTHONFAULTHANDLER: SIGABRT makes a hung process print every thread's stack (`_stacks`)
    return dict(
        os.environ, TF_CPP_MIN_LOG_LEVEL="3", PYTHONUNBUFFERED="1", PYTHONFAULTHANDLER="1", **extra
    )


def _communicate_or_show_stacks(process: subprocess.Popen[bytes], timeout: float) -> bytes:
    """``process``'s stderr once it exits; if it is still running after ``timeout`` seconds,
    fail with the Python stacks of every process in its group (where each one hangs)."""
    try:
        return process.communicate(timeout=timeout)[1]
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGABRT)  # faulthandler prints the stacks, then dies
        _, stderr = process.communicate(timeout=60)
        pytest.fail(f"still running after {timeout} s:\n{stderr.decode(errors='replace')[-20000:]}")


def _client() -> mlflow.MlflowClient:
    """This test's store (earlier tests may have set MLflow's global tracking URI)."""
    return mlflow.MlflowClient(tracking_uri=os.environ["MLFLOW_TRACKING_URI"])


def _journal_study(folder: Path, name: str = "tiny") -> optuna.Study:
    storage = open_storage(f"journal://{folder / 'mlruns' / 'optuna.journal'}")
    return optuna.load_study(study_name=name, storage=storage)


def _assert_one_to_one(study: optuna.Study, client: mlflow.MlflowClient, n_trials: int) -> None:
    """n_trials finished; every trial has exactly one child run under the one parent; nothing
    is left RUNNING."""
    trials = study.trials
    assert len([t for t in trials if t.state in FINISHED]) == n_trials
    assert not [t for t in trials if t.state in (TrialState.RUNNING, TrialState.WAITING)]
    parent_id = study.user_attrs["mlflow_parent_run_id"]
    parent = client.get_run(parent_id)
    children = client.search_runs(
        [parent.info.experiment_id], f"tags.mlflow.parentRunId = '{parent_id}'"
    )
    by_trial = {int(r.data.tags["tlsweep.trial_number"]): r for r in children}
    assert len(by_trial) == len(children) == len(trials)  # one run per trial, no duplicates
    for trial in trials:
        assert by_trial[trial.number].info.run_id == trial.user_attrs[RUN_ID_ATTR]
    every = client.search_runs([parent.info.experiment_id])
    assert not [r for r in every if r.info.status == "RUNNING"]
    assert parent.info.status == "FINISHED"


def _sweep_with_two_workers(path: Path, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*TLSWEEP, "sweep", str(path), "--workers", "2"],
        cwd=cwd,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=900,
    )


@pytest.mark.slow
def test_local_workers_share_one_study_exactly(
    tmp_path: Path, write_sweep: Callable[..., Path]
) -> None:
    path = write_sweep(
        tmp_path,
        {"head.dropout": "interval(0.0, 0.5)"},
        {"study_name": "tiny", "storage": None, "n_trials": 4},
    )
    done = _sweep_with_two_workers(path, tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]

    study = _journal_study(tmp_path)
    assert len(study.trials) == 4  # exactly: no surplus trial from a race
    assert len({t.user_attrs[WORKER_ATTR] for t in study.trials}) == 2  # both took trials
    _assert_one_to_one(study, _client(), n_trials=4)
    assert "[w0] " in done.stdout and "[w1] " in done.stdout


@pytest.mark.slow
def test_a_killed_worker_loses_no_trial(tmp_path: Path, write_sweep: Callable[..., Path]) -> None:
    path = write_sweep(
        tmp_path,
        {"head.dropout": "interval(0.0, 0.5)"},
        {"study_name": "tiny", "storage": None, "n_trials": 4},
    )
    # A terminal-like console prints each epoch on the live line: "[w1] trial ... epoch 1/2"
    # proves that worker's trial has its MLflow run and is training.
    env = _env(TTY_COMPATIBLE="1", TERM="xterm", COLUMNS="160")
    supervisor = subprocess.Popen(
        [*TLSWEEP, "sweep", str(path), "--workers", "2"],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
    )
    assert supervisor.stdout is not None
    seen, victim = "", None
    while victim is None and (chunk := os.read(supervisor.stdout.fileno(), 65536)):
        seen += ANSI.sub("", chunk.decode(errors="replace"))
        if re.search(r"\[w1\] trial \d/4  epoch \d/2", seen):
            running = _journal_study(tmp_path).get_trials(states=(TrialState.RUNNING,))
            victim = next(t for t in running if RUN_ID_ATTR in t.user_attrs)
            os.kill(int(victim.user_attrs[WORKER_ATTR].split(":")[1]), signal.SIGKILL)
    rest = ANSI.sub("", supervisor.communicate(timeout=600)[0].decode(errors="replace"))
    assert supervisor.returncode == 0
    assert victim is not None and "died (exit code -9)" in rest

    study = _journal_study(tmp_path)
    lost = study.trials[victim.number]
    assert lost.state == TrialState.FAIL and "died" in lost.user_attrs[FAIL_REASON_ATTR]
    client = _client()
    assert client.get_run(lost.user_attrs[RUN_ID_ATTR]).info.status == "FAILED"
    retries = [t for t in study.trials if retry_of(t) == victim.number]
    assert len(retries) == 1 and retries[0].state in FINISHED
    assert retries[0].params == lost.params
    finished = [t for t in study.trials if t.state in FINISHED]
    assert len(finished) == 4
    parent_id = study.user_attrs["mlflow_parent_run_id"]
    runs = client.search_runs([client.get_run(parent_id).info.experiment_id])
    assert not [r for r in runs if r.info.status == "RUNNING"]


def _worker_processes(sweep_file: Path) -> list[int]:
    """Pids of live worker processes of ``sweep_file`` (from /proc: any parent)."""
    found = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            args = cmdline.read_bytes().split(b"\0")
        except OSError:
            continue
        if str(sweep_file).encode() in args and b"--worker" in args:
            found.append(int(cmdline.parent.name))
    return found


@pytest.mark.slow
@pytest.mark.parametrize("target", ["process group", "supervisor"])
def test_sigterm_stops_every_worker_cleanly_and_the_sweep_resumes(
    tmp_path: Path, write_sweep: Callable[..., Path], target: str
) -> None:
    """What ``docker stop``, systemd or ``scancel`` send, to the whole process group or to the
    supervisor alone (which passes it on): every running trial fails and is queued again, its
    run ends KILLED, no worker outlives the supervisor, and the next run finishes exactly."""
    path = write_sweep(
        tmp_path,
        {"head.dropout": "interval(0.0, 0.5)"},
        {"study_name": "tiny", "storage": None, "n_trials": 4},
        base={"train.epochs": 300, "train.early_stopping.patience": None},
    )
    env = _env(TTY_COMPATIBLE="1", TERM="xterm", COLUMNS="160")
    supervisor = subprocess.Popen(
        [*TLSWEEP, "sweep", str(path), "--workers", "2"],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        start_new_session=True,  # its own process group, as a job's
    )
    assert supervisor.stdout is not None
    seen, training = "", []
    while len(training) < 2 and (chunk := os.read(supervisor.stdout.fileno(), 65536)):
        seen += ANSI.sub("", chunk.decode(errors="replace"))
        latest = [re.findall(rf"\[w{w}\] trial \d/4  epoch (\d+)/300", seen) for w in (0, 1)]
        if all(epochs and int(epochs[-1]) < 150 for epochs in latest):  # both well in a trial
            running = _journal_study(tmp_path).get_trials(states=(TrialState.RUNNING,))
            training = [t for t in running if RUN_ID_ATTR in t.user_attrs]
    assert len(training) == 2, seen[-2000:]
    if target == "process group":
        os.killpg(supervisor.pid, signal.SIGTERM)
    else:
        supervisor.send_signal(signal.SIGTERM)
    stderr = _communicate_or_show_stacks(supervisor, timeout=120)
    assert supervisor.returncode == 143, stderr.decode()[-2000:]
    assert stderr.decode().rstrip().splitlines()[-1] == "tlsweep: interrupted (SIGTERM)"
    assert _worker_processes(path) == []  # no orphan

    study = _journal_study(tmp_path)
    assert not study.get_trials(states=(TrialState.RUNNING,))
    client = _client()
    for trial in training:
        stopped = study.trials[trial.number]
        assert stopped.state == TrialState.FAIL
        reason = stopped.user_attrs[FAIL_REASON_ATTR]
        assert reason == "interrupted (SIGTERM)", stderr.decode(errors="replace")[-4000:]
        assert client.get_run(stopped.user_attrs[RUN_ID_ATTR]).info.status == "KILLED"
    waiting = study.get_trials(states=(TrialState.WAITING,))
    assert sorted(retry_of(t) for t in waiting) == sorted(t.number for t in training)
    parent = client.get_run(study.user_attrs["mlflow_parent_run_id"])
    assert parent.info.status == "KILLED"

    resumed = _sweep_with_two_workers(path, tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    study = _journal_study(tmp_path)
    _assert_one_to_one(study, client, n_trials=4)
    retried = [t for t in study.trials if retry_of(t) is not None]
    assert {retry_of(t) for t in retried} == {t.number for t in training}
    assert all(t.params == study.trials[retry_of(t)].params for t in retried)


# --- slow: several machines: PostgreSQL + an MLflow tracking server ----------------------------


@pytest.fixture(scope="module")
def postgres_server() -> Iterator[Postgres]:
    """A PostgreSQL server on a free loopback port with databases optuna and mlflow."""
    try:
        server = Postgres()
    except RuntimeError as exc:  # no server binaries: .ci/run installs them
        pytest.fail(str(exc))
    try:
        yield server
    finally:
        server.close()


@pytest.fixture(scope="module")
def postgres(postgres_server: Postgres) -> str:
    """The server's base URL: append /optuna or /mlflow."""
    return postgres_server.url


@pytest.fixture(scope="module")
def mlflow_server(
    postgres_server: Postgres, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[str]:
    """``mlflow server`` on loopback: PostgreSQL backend store, a shared artifact root."""
    root = tmp_path_factory.mktemp("mlflow-server")
    try:
        server = MlflowServer(f"{postgres_server.url}/mlflow", root / "artifacts", _env())
    except RuntimeError as exc:
        pytest.fail(str(exc))
    try:
        yield server.url
    finally:
        server.stop()


def _postgres_sweep(
    write_sweep: Callable[..., Path],
    folder: Path,
    storage: str,
    name: str,
    n_trials: int,
    heartbeat: tuple[int, int],
    base: dict | None = None,
) -> Path:
    """A tiny sweep on the PostgreSQL storage, with (interval, grace period) heartbeats."""
    interval, grace = heartbeat
    settings = {
        "study_name": name,
        "storage": storage,
        "n_trials": n_trials,
        "heartbeat_interval": interval,
        "grace_period": grace,
    }
    return write_sweep(folder, {"head.dropout": "interval(0.0, 0.5)"}, settings, base=base)


@pytest.mark.slow
def test_two_machines_join_one_study_through_postgres_and_an_mlflow_server(
    postgres: str,
    mlflow_server: str,
    tmp_path: Path,
    write_sweep: Callable[..., Path],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server)
    storage = f"{postgres}/optuna"
    path = _postgres_sweep(write_sweep, tmp_path, storage, "shared", 4, heartbeat=(2, 6))
    env = _env(MLFLOW_TRACKING_URI=mlflow_server)
    machines = []
    for name in ("m1", "m2"):  # two working directories: nothing shared but the two servers
        (tmp_path / name).mkdir()
        machines.append(
            subprocess.Popen(
                [*TLSWEEP, "sweep", str(path)],
                cwd=tmp_path / name,
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
            )
        )
    outputs = [m.communicate(timeout=900)[0] for m in machines]
    assert [m.returncode for m in machines] == [0, 0], outputs[0][-2000:] + outputs[1][-2000:]

    study = optuna.load_study(study_name="shared", storage=open_storage(storage))
    assert len(study.trials) == 4  # the advisory lock: no surplus trial across machines
    assert len({t.user_attrs[WORKER_ATTR] for t in study.trials}) == 2
    mlflow.set_tracking_uri(mlflow_server)  # artifacts are served by the tracking server
    client = mlflow.MlflowClient(tracking_uri=mlflow_server)
    _assert_one_to_one(study, client, n_trials=4)
    for output in outputs:
        assert PASSWORD not in output
    experiment = client.get_experiment_by_name("shared")
    for run in client.search_runs([experiment.experiment_id]):
        assert PASSWORD not in str(run.data.params) + str(run.data.tags)
        if "tlsweep.trial_number" in run.data.tags:
            config = mlflow.artifacts.load_text(f"{run.info.artifact_uri}/config.yaml")
            assert PASSWORD not in config


def _read_until(process: subprocess.Popen, pattern: str, timeout: float) -> str:
    """``process``'s output (ANSI stripped) up to a match of ``pattern``; fails at timeout."""
    import select
    import time

    assert process.stdout is not None
    seen, deadline = "", time.monotonic() + timeout
    while not re.search(pattern, seen):
        left = deadline - time.monotonic()
        ready, _, _ = select.select([process.stdout], [], [], max(left, 0))
        chunk = os.read(process.stdout.fileno(), 65536) if ready else b""
        if not chunk:
            pytest.fail(f"no {pattern!r} in the output within {timeout} s:\n{seen[-2000:]}")
        seen += ANSI.sub("", chunk.decode(errors="replace"))
    return seen


def _as_another_machine(name: str) -> list[str]:
    """A command prefix that runs a process as if on machine ``name``: its own UTS namespace
    with that host name (root only), so its trials name another host and only heartbeats can
    tell that it is lost. Empty where that is not possible."""
    if os.geteuid() != 0 or shutil.which("unshare") is None:
        return []
    return ["unshare", "--uts", "sh", "-c", f'hostname "tlsweep-{name}" && exec "$@"', "sh"]


@pytest.mark.slow
def test_a_machine_lost_mid_trial_is_detected_by_heartbeat_and_its_trial_retried(
    postgres: str,
    mlflow_server: str,
    tmp_path: Path,
    write_sweep: Callable[..., Path],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Two machines on PostgreSQL + an MLflow server; one is killed (-9) while training. The
    survivor notices the missing heartbeats, fails the trial, closes its run as FAILED, runs
    the retry, and the study still ends with n_trials finished, one run per trial."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server)
    storage = f"{postgres}/optuna"
    path = _postgres_sweep(
        write_sweep,
        tmp_path,
        storage,
        "lossy",
        3,
        heartbeat=(1, 4),
        base={"train.epochs": 15, "train.early_stopping.patience": None},
    )
    env = _env(MLFLOW_TRACKING_URI=mlflow_server, TTY_COMPATIBLE="1", TERM="xterm", COLUMNS="160")
    machines = {}
    for name in ("m1", "m2"):
        (tmp_path / name).mkdir()
        machines[name] = subprocess.Popen(
            [*_as_another_machine(name), *TLSWEEP, "sweep", str(path)],
            cwd=tmp_path / name,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
    victim_process = machines["m2"]
    try:
        _read_until(victim_process, r"trial \d/3  epoch [1-9]/15", timeout=300)
        victim_process.kill()  # the machine is gone: no clean-up of any kind
        victim_process.wait(timeout=60)
        output = machines["m1"].communicate(timeout=600)[0].decode(errors="replace")
    finally:
        for process in machines.values():
            if process.poll() is None:
                process.kill()
    assert machines["m1"].returncode == 0, output[-3000:]

    study = optuna.load_study(study_name="lossy", storage=open_storage(storage))
    lost = [
        t
        for t in study.trials
        if t.user_attrs.get(WORKER_ATTR, "").endswith(f":{victim_process.pid}")
        and t.state == TrialState.FAIL
    ]
    assert len(lost) == 1, [(t.number, t.state, t.user_attrs) for t in study.trials]
    client = mlflow.MlflowClient(tracking_uri=mlflow_server)
    lost_run = client.get_run(lost[0].user_attrs[RUN_ID_ATTR])
    # On one host (no namespaces to pretend otherwise) its pid gives it away sooner.
    found_by = "heartbeats" if _as_another_machine("m2") else "is gone"
    assert lost_run.info.status == "FAILED" and found_by in lost_run.data.tags["error"]
    retries = [t for t in study.trials if retry_of(t) == lost[0].number]
    assert len(retries) == 1 and retries[0].state in FINISHED
    assert retries[0].params == lost[0].params
    _assert_one_to_one(study, client, n_trials=3)


@pytest.mark.slow
def test_a_tracking_server_gone_past_its_retries_loses_nothing(
    tmp_path: Path, write_sweep: Callable[..., Path], fault_when: Callable[..., str]
) -> None:
    """The MLflow server goes away mid-trial for longer than the client's retries: the sweep
    fails that trial, queues it again and stops with a one-line error (exit 75, no
    traceback). Once the server is back, the same command reconciles the open run with its
    trial and finishes the study: n_trials finished, one run per trial, nothing RUNNING."""
    server = MlflowServer(f"sqlite:///{tmp_path / 'mlflow.db'}", tmp_path / "artifacts", _env())
    path = write_sweep(
        tmp_path,
        {"head.dropout": "interval(0.0, 0.5)"},
        {"study_name": "away", "n_trials": 2},
        base={"train.epochs": 200, "train.early_stopping.patience": None},
    )
    env = _env(
        MLFLOW_TRACKING_URI=server.url,
        MLFLOW_HTTP_REQUEST_MAX_RETRIES="1",  # a budget of seconds, not minutes
        MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR="1",
        MLFLOW_HTTP_REQUEST_TIMEOUT="5",
    )
    client = mlflow.MlflowClient(tracking_uri=server.url)
    sweep = subprocess.Popen(
        [*TLSWEEP, "sweep", str(path)], cwd=tmp_path, env=env, stderr=subprocess.PIPE, text=True
    )
    stderr = fault_when(sweep, lambda: _epochs_logged(client, "away"), server.stop)
    assert sweep.returncode == 75, stderr[-3000:]
    last = stderr.strip().splitlines()[-1]
    assert last.startswith(f"tlsweep: error: the tracking server {server.url} is unreachable")
    assert "Traceback" not in stderr

    storage = open_storage(f"sqlite:///{tmp_path / 'optuna.db'}")
    study = optuna.load_study(study_name="away", storage=storage)
    states = [t.state for t in study.trials]
    assert states == [TrialState.FAIL, TrialState.WAITING], states  # failed, queued again
    assert study.trials[0].user_attrs[FAIL_REASON_ATTR] == "the tracking server was unreachable"
    assert study.trials[1].params == study.trials[0].params

    server.start()  # back, on the same address
    try:
        resumed = subprocess.run(
            [*TLSWEEP, "sweep", str(path)], cwd=tmp_path, env=env, capture_output=True, text=True
        )
        assert resumed.returncode == 0, resumed.stderr[-3000:]
        study = optuna.load_study(study_name="away", storage=storage)
        _assert_one_to_one(study, client, n_trials=2)
        lost_run = client.get_run(study.trials[0].user_attrs[RUN_ID_ATTR])
        assert lost_run.info.status == "FAILED"  # closed by the reconciliation at resume
        assert "ended (FAIL) with this run open" in lost_run.data.tags["error"]
    finally:
        server.stop()


def _epochs_logged(client: mlflow.MlflowClient, experiment: str) -> bool:
    found = client.get_experiment_by_name(experiment)
    if found is None:
        return False
    runs = client.search_runs([found.experiment_id], "attributes.status = 'RUNNING'")
    return any("loss" in r.data.metrics for r in runs if "tlsweep.trial_number" in r.data.tags)


# Last in the module: it restarts the PostgreSQL server the tests above share.
@pytest.mark.slow
def test_postgres_restarted_and_stopped_mid_sweep_loses_nothing(
    postgres_server: Postgres, tmp_path: Path, write_sweep: Callable[..., Path]
) -> None:
    """Two workers on PostgreSQL: the server restarts under them, later stops for 45 s. They
    wait it out (each says so once), none dies with a traceback, and the study ends with
    exactly n_trials, none failed by stale heartbeats, one run per trial."""
    storage = f"{postgres_server.url}/optuna"
    path = _postgres_sweep(
        write_sweep,
        tmp_path,
        storage,
        "outage",
        8,
        heartbeat=(2, 8),
        base={"train.epochs": 150, "train.early_stopping.patience": None},
    )
    supervisor = subprocess.Popen(
        [*TLSWEEP, "sweep", str(path), "--workers", "2"],
        cwd=tmp_path,
        env=_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    output: list[str] = []
    reader = threading.Thread(target=lambda: output.extend(supervisor.stdout or []), daemon=True)
    reader.start()

    store = open_storage(storage)  # a patient storage: it outlives the restart below

    def completed() -> int:
        try:
            study = optuna.load_study(study_name="outage", storage=store)
        except KeyError:  # not created yet
            return 0
        return len(study.get_trials(states=(TrialState.COMPLETE,)))

    def wait_for(trials: int) -> None:
        deadline = time.monotonic() + 300
        while completed() < trials:
            assert supervisor.poll() is None, "".join(output)[-3000:]
            assert time.monotonic() < deadline, "no progress"
            time.sleep(0.5)  # polling the study for progress, not waiting for time to pass

    try:
        wait_for(1)
        postgres_server.control("restart")  # every connection dropped mid-trial
        wait_for(completed() + 1)
        postgres_server.control("stop")
        time.sleep(45)  # the outage itself
        postgres_server.control("start")
        supervisor.wait(timeout=600)
    finally:
        if supervisor.poll() is None:
            supervisor.kill()
        reader.join(timeout=10)
    text = "".join(output)
    assert supervisor.returncode == 0, text[-3000:]
    assert "Traceback" not in text and "died" not in text, text[-3000:]
    assert "the study's database is unreachable" in text
    assert "the study's database is reachable again" in text

    study = optuna.load_study(study_name="outage", storage=storage)
    assert len(study.trials) == 8  # none lost, failed or doubled
    assert all(t.state in FINISHED for t in study.trials), [t.state for t in study.trials]
    client = mlflow.MlflowClient(tracking_uri=os.environ["MLFLOW_TRACKING_URI"])
    _assert_one_to_one(study, client, n_trials=8)
