"""Benchmark: a sweep under chaos, then its record checked.

Four workers (separate ``tlsweep sweep`` processes, as four machines would run them) share one
study on a real PostgreSQL server and log to a real MLflow tracking server (PostgreSQL-backed)
for about ``--minutes``. Every 20-40 s a random worker is killed, half the time with SIGKILL (a
lost machine, the OOM killer) and half with SIGTERM (a scheduler's preemption), and started
again, as a scheduler requeues a job. A third of the way in PostgreSQL restarts; two thirds
of the way in the MLflow server restarts. When the study is done, the record is checked:

  finished    trials COMPLETE or PRUNED (must be n_trials)
  lost        n_trials minus finished, and trials left RUNNING or WAITING (must be 0)
  duplicated  trials with more than one MLflow run (must be 0)
  running     MLflow runs left RUNNING (must be 0)
  ignored     workers still running STOP_WITHIN s after SIGTERM (must be 0; then killed)

and it prints the kills, the restarts and the wall time, with the machine and versions.

    python -m bench.chaos                  # about 10 minutes, 120 trials
    python -m bench.chaos --minutes 3 --trials 40
"""

from __future__ import annotations

import argparse
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

import yaml

WORKERS = 4
STOP_WITHIN = 90  # seconds a worker has to exit after SIGTERM before it counts as stuck
TLSWEEP = [sys.executable, "-m", "tlsweep.cli"]


def sweep_file(folder: Path, storage: str, trials: int) -> Path:
    document = {
        "base": {
            "data": "digits",
            "data.classes": [0, 1, 2],
            "data.train_limit": 240,
            "backbone": "resnet50",
            "backbone.weights": None,
            "backbone.input_size": 32,
            "train.epochs": 40,
            "train.early_stopping.patience": None,
            "cache.dir": str(folder / "features"),
        },
        "search_space": {
            "head.dropout": "interval(0.0, 0.5)",
            "head.dense_units": "choice(32, 64)",
        },
        "sweep": {
            "study_name": "chaos",
            "sampler": "random",
            "pruner": "none",
            "n_trials": trials,
            "storage": storage,
            "heartbeat_interval": 2,
            "grace_period": 10,
            "max_retry": 5,
        },
    }
    path = folder / "chaos.yaml"
    path.write_text(yaml.safe_dump(document, sort_keys=False))
    return path


class Workers:
    """The worker processes, each in its own folder (a machine's working directory)."""

    def __init__(self, folder: Path, path: Path, env: dict[str, str]) -> None:
        self.folder, self.path, self.env = folder, path, env
        self.running: dict[int, subprocess.Popen[bytes]] = {}
        self.started = 0
        for slot in range(WORKERS):
            self.start(slot)

    def start(self, slot: int) -> None:
        where = self.folder / f"machine{slot}"
        where.mkdir(exist_ok=True)
        log = (where / "log.txt").open("ab")
        self.running[slot] = subprocess.Popen(
            [*TLSWEEP, "sweep", str(self.path)], cwd=where, env=self.env, stdout=log, stderr=log
        )
        self.started += 1

    def reap(self) -> list[tuple[int, int]]:
        """Slots whose worker exited on its own, with the exit code; they are not restarted."""
        done = [(slot, p.returncode) for slot, p in self.running.items() if p.poll() is not None]
        for slot, _ in done:
            del self.running[slot]
        return done


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=10)
    parser.add_argument("--trials", type=int, default=120)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    from bench.run import machine_report
    from bench.servers import MlflowServer, Postgres

    print(machine_report())
    rng = random.Random(args.seed)
    kills: Counter[str] = Counter()
    exits: Counter[int] = Counter()
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        postgres = Postgres()
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        server = MlflowServer(f"{postgres.url}/mlflow", folder / "artifacts", env)
        try:
            env["MLFLOW_TRACKING_URI"] = server.url
            storage = f"{postgres.url}/optuna"
            workers = Workers(folder, sweep_file(folder, storage, args.trials), env)
            started = time.monotonic()
            budget = args.minutes * 60
            events = {"postgres restart": budget / 3, "mlflow server restart": 2 * budget / 3}
            next_kill = started + rng.uniform(20, 40)
            while workers.running:
                time.sleep(1)
                now = time.monotonic()
                for _slot, code in workers.reap():
                    exits[code] += 1
                for event, at in list(events.items()):
                    if now - started >= at:
                        print(f"{now - started:5.0f} s  {event}", flush=True)
                        if event == "postgres restart":
                            postgres.control("restart")
                        else:
                            server.restart()
                        del events[event]
                if now >= next_kill and now - started < budget and workers.running:
                    slot = rng.choice(sorted(workers.running))
                    how = rng.choice([signal.SIGKILL, signal.SIGTERM])
                    victim = workers.running[slot]
                    victim.send_signal(how)
                    try:
                        victim.wait(timeout=STOP_WITHIN)
                    except subprocess.TimeoutExpired:  # it ignored the signal: a bug to report
                        kills["ignored SIGTERM"] += 1
                        victim.kill()
                        victim.wait()
                    kills[how.name] += 1
                    print(f"{now - started:5.0f} s  {how.name} worker {slot}", flush=True)
                    workers.start(slot)  # the scheduler requeues it
                    next_kill = now + rng.uniform(20, 40)
            wall = time.monotonic() - started
            report(storage, server.url, args.trials, kills, exits, workers.started, wall)
        finally:
            server.stop()
            postgres.close()


def report(
    storage: str,
    tracking: str,
    n_trials: int,
    kills: Counter[str],
    exits: Counter[int],
    started: int,
    wall: float,
) -> None:
    import mlflow
    import optuna
    from optuna.trial import TrialState

    study = optuna.load_study(study_name="chaos", storage=storage)
    states = Counter(t.state.name for t in study.trials)
    finished = states["COMPLETE"] + states["PRUNED"]
    left = states["RUNNING"] + states["WAITING"]
    client = mlflow.MlflowClient(tracking_uri=tracking)
    parent_id = study.user_attrs["mlflow_parent_run_id"]
    experiment = client.get_run(parent_id).info.experiment_id
    runs = client.search_runs([experiment], max_results=50_000)
    per_trial = Counter(
        r.data.tags.get("tlsweep.trial_number")
        for r in runs
        if r.data.tags.get("mlflow.parentRunId") == parent_id
    )
    duplicated = sum(1 for n in per_trial.values() if n > 1)
    running = sum(1 for r in runs if r.info.status == "RUNNING")
    failed = [t for t in study.trials if t.state == TrialState.FAIL]
    print(f"wall {wall:.0f} s; worker starts {started} ({started - WORKERS} after kills)")
    print(f"kills: {dict(kills)}; worker exits on their own: {dict(exits)}")
    print(f"trials: {dict(states)} (failed and retried: {len(failed)})")
    print(
        f"finished {finished} of {n_trials}; lost {max(0, n_trials - finished) + left}; "
        f"duplicated {duplicated}; extra finished {max(0, finished - n_trials)}; "
        f"runs left RUNNING {running}"
    )
    ok = finished == n_trials and not left and not duplicated and not running
    ok = ok and not kills["ignored SIGTERM"]
    print("record: consistent" if ok else "record: INCONSISTENT")


if __name__ == "__main__":
    main()
