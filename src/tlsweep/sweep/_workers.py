"""Several worker processes on one machine, on one study.

The supervisor opens the study and its parent run once, then starts N workers
(``tlsweep sweep NAME ... --worker``), each pinned to one GPU with ``CUDA_VISIBLE_DEVICES``
when GPUs are given. Workers take trials as soon as they are free (no synchronous batches).
A worker that dies (killed, out of memory) has its running trial failed, its MLflow run
closed as FAILED and a copy queued for retry; a new worker takes its place while the study
still needs trials. When every worker has exited, the supervisor summarises the sweep.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from tlsweep import backend, interrupts, tracking
from tlsweep.errors import OutageError, UserError
from tlsweep.progress import SweepProgress
from tlsweep.sweep._run import (
    Session,
    default_progress,
    finish,
    finished,
    open_session,
    work_left,
)
from tlsweep.sweep._storage import fail_lost_trials
from tlsweep.sweep._summary import SweepSummary
from tlsweep.sweepspec import WORKER_STORAGE_ENV, SweepSpec

INTERRUPTING = {int(signum) for signum in interrupts.SIGNALS}  # exit code - 128 of a worker
# Seconds a worker has to close its trial and run once asked to stop: its clean-up makes a
# few writes to the tracking store, and on MLflow's SQLite store each may wait up to MLflow's
# busy timeout (20 s) behind another process's write; 30 s cut short some clean exits.
STOP_GRACE = 60.0
MAX_BACKOFF = 30.0  # seconds before a dead worker's slot is started again, at most


@dataclass
class Worker:
    slot: int
    gpu: str | None
    process: subprocess.Popen[bytes]
    sharing: int = 1  # workers on the same GPU

    @property
    def id(self) -> str:
        import socket

        return f"{socket.gethostname()}:{self.process.pid}"


def run_workers(
    spec: SweepSpec,
    sweep_args: Sequence[str],
    workers: int,
    gpus: Sequence[str] = (),
    progress: SweepProgress | None = None,
) -> SweepSummary:
    """Run the sweep with ``workers`` local processes (one per GPU when ``gpus`` is given)."""
    slots = worker_slots(workers, gpus)
    session = open_session(spec, workers=max(len(slots), 2), trains=False)  # refuses bad data...
    session.data.clear()  # ...but the supervisor trains nothing: the workers load their own
    progress = progress or default_progress(spec)
    progress.started(spec.settings.study_name, done=min(finished(session), spec.settings.n_trials))
    command = worker_command(sweep_args)

    def start(slot: int, gpu: str | None, sharing: int) -> Worker:
        env = worker_env(gpu, slot, sharing, storage=session.url)
        return Worker(slot, gpu, _spawn(command, env), sharing)

    running = {w.process.pid: w for w in (start(i, *slot) for i, slot in enumerate(slots))}
    with tracking.guard_run(session.parent_run_id, end=False):  # closes it after the workers
        try:
            _supervise(session, start, running)
        except BaseException as exc:  # Ctrl-C, SIGTERM or SIGHUP, here or in a worker...
            interrupts.handled(exc)
            _stop_all(session, running)  # at once, and before the parent run is written:
            raise  # the workers' own clean-up writes to the same store
    return finish(session, progress)


def worker_slots(workers: int, gpus: Sequence[str] = ()) -> list[tuple[str | None, int]]:
    """Each worker's GPU and how many workers share that GPU: one worker per listed GPU
    (``0,0,1,1``: two on each), else ``workers`` workers on whatever devices there are."""
    if not gpus:
        return [(None, 1)] * workers
    sharing = Counter(gpus)
    return [(gpu, sharing[gpu]) for gpu in gpus]


def worker_command(sweep_args: Sequence[str]) -> list[str]:
    """The command line of one worker: the same sweep. The storage it joins comes in its
    environment (`WORKER_STORAGE_ENV`), never on a command line that ``ps`` shows with its password:
    a ``sweep.storage=`` the user typed is dropped here."""
    kept = [arg for arg in sweep_args if not arg.lstrip("+").startswith("sweep.storage=")]
    return [sys.executable, "-m", "tlsweep.cli", "sweep", *kept, "--worker"]


def worker_env(
    gpu: str | None, slot: int, sharing: int = 1, storage: str | None = None
) -> dict[str, str]:
    """A worker's environment: its label, its GPU, its share of the GPU's memory when
    ``sharing`` workers run on that GPU, and the storage the supervisor resolved."""
    env = dict(os.environ, TLSWEEP_WORKER_LABEL=f"[w{slot}] ", PYTHONUNBUFFERED="1")
    env.update(backend.worker_environment(gpu, sharing))
    if storage is not None:
        env[WORKER_STORAGE_ENV] = storage
    return env


def _spawn(command: list[str], env: dict[str, str]) -> subprocess.Popen[bytes]:
    return subprocess.Popen(command, env=env, preexec_fn=_terminate_with_parent)


def _terminate_with_parent() -> None:
    """In a new worker, before it runs: have Linux send it SIGTERM if the supervisor dies
    (even by SIGKILL), so that it closes its trial instead of running on as an orphan."""
    if sys.platform.startswith("linux"):
        import ctypes

        pr_set_pdeathsig = 1
        ctypes.CDLL(None).prctl(pr_set_pdeathsig, signal.SIGTERM)


def _supervise(
    session: Session, start: Callable[[int, str | None, int], Worker], running: dict[int, Worker]
) -> None:
    """Wait for workers; replace one that died while the study still needs trials, after
    1, 2, 4... seconds (at most `MAX_BACKOFF`), and at most ``max(3, n_trials)`` times in all
    (a worker that dies at every start must not spin). A worker that refused the sweep (bad
    input, exit code 2) or met an outage (exit code 75) stops them all."""
    s = session.spec.settings
    restarts: dict[int, int] = {}
    max_restarts = max(3, s.n_trials)
    while running:
        pid, status = os.wait()
        worker = running.pop(pid, None)
        if worker is None:
            continue
        code = os.waitstatus_to_exitcode(status)
        worker.process.returncode = code
        if code - 128 in INTERRUPTING:  # it was interrupted (and closed its trial): stop all
            raise interrupts.Interrupted(code - 128)
        if code == UserError.exit_code:  # it refused the sweep (its one-line error is above)
            raise UserError(f"worker {worker.id} refused the sweep (exit code {code})")
        if code == OutageError.exit_code:  # a server gone, a full disk: the others' too
            raise OutageError(
                f"worker {worker.id} stopped on an outage (its error is above); nothing is "
                "lost: run the same command again once it is over"
            )
        if code != 0:
            reason = f"worker {worker.id} died (exit code {code})"
            lost = fail_lost_trials(session.study, worker.id, reason, s.max_retry)
            print(f"{reason}; trials {lost or 'none'} failed and queued for retry", flush=True)
            if work_left(session.study, s):  # search trials, or promoted ones, still to finish
                restarts[worker.slot] = restarts.get(worker.slot, 0) + 1
                if sum(restarts.values()) > max_restarts:
                    raise RuntimeError(f"workers died {sum(restarts.values())} times; stopping")
                time.sleep(min(MAX_BACKOFF, 2 ** (restarts[worker.slot] - 1)))
                replacement = start(worker.slot, worker.gpu, worker.sharing)
                running[replacement.process.pid] = replacement


def _stop_all(session: Session, running: dict[int, Worker], grace: float = STOP_GRACE) -> None:
    """Interrupt every worker still running and wait for them: each fails its trial (queued
    again), ends its run KILLED and exits. SIGTERM is what they are sent: those that had the
    signal already (a terminal's Ctrl-C, a scheduler signalling the process group) ignore a
    second one and finish their clean-up. A worker still running after ``grace`` seconds is
    killed, and its trial failed, closed and queued here. No worker outlives the supervisor."""
    for worker in running.values():
        with contextlib.suppress(ProcessLookupError):
            worker.process.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + grace
    for worker in running.values():
        try:
            worker.process.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            worker.process.kill()
            worker.process.wait()
        if worker.process.returncode - 128 not in INTERRUPTING:  # it could not clean up
            reason = f"worker {worker.id} stopped (exit code {worker.process.returncode})"
            fail_lost_trials(session.study, worker.id, reason, session.spec.settings.max_retry)
