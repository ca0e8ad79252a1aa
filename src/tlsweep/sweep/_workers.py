"""Several worker processes on one machine, on one study.

The supervisor opens the study and its parent run once, then starts N workers
(``tlsweep sweep NAME ... --worker``), each pinned to one GPU with ``CUDA_VISIBLE_DEVICES``
when GPUs are given. Workers take trials as soon as they are free (no synchronous batches).
A worker that dies (killed, out of memory) has its running trial failed, its MLflow run
closed as FAILED and a copy queued for retry; a new worker takes its place while the study
still needs trials. When every worker has exited, the supervisor summarises the sweep.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

from tlsweep import backend, tracking
from tlsweep.progress import SweepProgress
from tlsweep.sweep._run import Session, default_progress, finish, finished, open_session
from tlsweep.sweep._storage import fail_lost_trials
from tlsweep.sweep._summary import SweepSummary
from tlsweep.sweepspec import SweepSpec, to_override

INTERRUPTED = 130


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
    session = open_session(spec, workers=max(len(slots), 2))  # refuses bad data, settings...
    session.data.clear()  # ...but the supervisor trains nothing: the workers load their own
    progress = progress or default_progress(spec)
    progress.started(spec.settings.study_name, done=min(finished(session), spec.settings.n_trials))
    command = worker_command(sweep_args, session.url)
    running = {
        w.process.pid: w
        for w in (_start(command, i, gpu, sharing) for i, (gpu, sharing) in enumerate(slots))
    }
    try:
        with tracking.guard_run(session.parent_run_id, end=False):
            _supervise(session, command, running)
    except KeyboardInterrupt:
        _stop_all(running)
        raise
    return finish(session, progress)


def worker_slots(workers: int, gpus: Sequence[str] = ()) -> list[tuple[str | None, int]]:
    """Each worker's GPU and how many workers share that GPU: one worker per listed GPU
    (``0,0,1,1``: two on each), else ``workers`` workers on whatever devices there are."""
    if not gpus:
        return [(None, 1)] * workers
    sharing = Counter(gpus)
    return [(gpu, sharing[gpu]) for gpu in gpus]


def worker_command(sweep_args: Sequence[str], url: str) -> list[str]:
    """The command line of one worker: the same sweep, the storage the supervisor resolved."""
    return [
        sys.executable,
        "-m",
        "tlsweep.cli",
        "sweep",
        *sweep_args,
        to_override("sweep.storage", url),
        "--worker",
    ]


def worker_env(gpu: str | None, slot: int, sharing: int = 1) -> dict[str, str]:
    """A worker's environment: its label, its GPU, and its share of the GPU's memory when
    ``sharing`` workers run on that GPU."""
    env = dict(os.environ, TLSWEEP_WORKER_LABEL=f"[w{slot}] ", PYTHONUNBUFFERED="1")
    env.update(backend.worker_environment(gpu, sharing))
    return env


def _start(command: list[str], slot: int, gpu: str | None, sharing: int = 1) -> Worker:
    env = worker_env(gpu, slot, sharing)
    return Worker(slot, gpu, subprocess.Popen(command, env=env), sharing)


def _supervise(session: Session, command: list[str], running: dict[int, Worker]) -> None:
    """Wait for workers; replace one that died while the study still needs trials."""
    s = session.spec.settings
    while running:
        pid, status = os.wait()
        worker = running.pop(pid, None)
        if worker is None:
            continue
        code = os.waitstatus_to_exitcode(status)
        worker.process.returncode = code
        if code == INTERRUPTED:
            raise KeyboardInterrupt
        if code != 0:
            reason = f"worker {worker.id} died (exit code {code})"
            lost = fail_lost_trials(session.study, worker.id, reason, s.max_retry)
            print(f"{reason}; trials {lost or 'none'} failed and queued for retry", flush=True)
            if finished(session) < s.n_trials:
                replacement = _start(command, worker.slot, worker.gpu, worker.sharing)
                running[replacement.process.pid] = replacement


def _stop_all(running: dict[int, Worker], grace: float = 30.0) -> None:
    """After Ctrl-C: workers in this terminal got the signal too and are closing their runs;
    give them ``grace`` seconds, then interrupt those still going."""
    for worker in running.values():
        try:
            worker.process.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            worker.process.send_signal(signal.SIGINT)
            worker.process.wait()
