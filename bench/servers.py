"""Real servers for the tests and benchmarks that need them: PostgreSQL and an MLflow
tracking server, on free loopback ports, started and stopped (and restarted) from Python.

PostgreSQL's own binaries (``initdb``, ``pg_ctl``, from Debian's ``postgresql`` package, which
``.ci/run`` installs) run as the ``postgres`` user when this runs as root (``initdb`` refuses
root). The MLflow server drains its output in a thread: a full pipe would block its request
logging, and with it the server.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

PG_BINS = sorted(Path("/usr/lib/postgresql").glob("*/bin"), key=lambda p: int(p.parent.name))
PASSWORD = "s3cret-Pw"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Postgres:
    """A PostgreSQL server with the databases ``optuna`` and ``mlflow``; ``url`` is its base
    URL (user ``tlsweep``, password `PASSWORD`): append ``/optuna`` or ``/mlflow``."""

    def __init__(self) -> None:
        found = [b for b in PG_BINS if (b / "initdb").exists()]
        bin_dir = found[-1] if found else Path(shutil.which("initdb") or "/nonexistent").parent
        if not (bin_dir / "initdb").exists():
            raise RuntimeError(
                "PostgreSQL's server binaries (initdb, pg_ctl) are missing: "
                "apt-get install postgresql"
            )
        # Not under a private temporary folder: the postgres user must reach it.
        self.root = Path(tempfile.mkdtemp(prefix="tlsweep-pg-"))
        self.root.chmod(0o755)
        data, pwfile = self.root / "data", self.root / "pw"
        pwfile.write_text(PASSWORD)
        if os.geteuid() == 0:
            shutil.chown(self.root, "postgres")
            shutil.chown(pwfile, "postgres")
        initdb = [str(bin_dir / "initdb"), "-D", str(data), "-U", "tlsweep"]
        initdb += ["--auth=scram-sha-256", f"--pwfile={pwfile}"]
        subprocess.run(_as_postgres(initdb), check=True, capture_output=True)
        port = free_port()
        options = f"-p {port} -k {self.root} -c listen_addresses=127.0.0.1"
        self._pg_ctl = [str(bin_dir / "pg_ctl"), "-D", str(data), "-o", options]
        self._pg_ctl += ["-l", str(self.root / "log")]
        self.url = f"postgresql://tlsweep:{PASSWORD}@127.0.0.1:{port}"
        self.control("start")
        self._create_databases("optuna", "mlflow")

    def control(self, action: str) -> None:
        """``pg_ctl start``, ``stop`` or ``restart`` (fast: connections dropped)."""
        mode = [] if action == "start" else ["-m", "fast"]
        command = _as_postgres([*self._pg_ctl, *mode, "-w", action])
        subprocess.run(command, check=True, capture_output=True)

    def close(self) -> None:
        subprocess.run(_as_postgres([*self._pg_ctl, "-m", "fast", "stop"]), capture_output=True)
        shutil.rmtree(self.root, ignore_errors=True)

    def _create_databases(self, *names: str) -> None:
        import sqlalchemy

        engine = sqlalchemy.create_engine(f"{self.url}/postgres", isolation_level="AUTOCOMMIT")
        with engine.connect() as connection:
            for name in names:  # CREATE DATABASE cannot share a transaction
                connection.execute(sqlalchemy.text(f"CREATE DATABASE {name}"))
        engine.dispose()


class MlflowServer:
    """``mlflow server`` on loopback with a PostgreSQL backend store and an artifact root."""

    def __init__(self, backend_store: str, artifacts: Path, env: dict[str, str]) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self._command = [
            sys.executable,
            "-m",
            "mlflow",
            "server",
            "--backend-store-uri",
            backend_store,
            "--artifacts-destination",
            str(artifacts),
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--workers",
            "1",
        ]
        self._env = env
        self.output: list[str] = []
        self.process: subprocess.Popen[str] | None = None
        self.start()

    def start(self, timeout: float = 180) -> None:
        self.process = subprocess.Popen(
            self._command,
            env=self._env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,  # its own group: stopping it stops its workers
        )
        listening = threading.Event()
        process = self.process

        def drain() -> None:
            assert process.stdout is not None
            for line in process.stdout:
                self.output.append(line)
                if "Application startup complete" in line or "Listening at" in line:
                    listening.set()

        threading.Thread(target=drain, daemon=True).start()
        if not listening.wait(timeout=timeout):
            self.stop()
            raise RuntimeError("mlflow server did not start:\n" + "".join(self.output[-30:]))

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGINT)
            try:
                self.process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()

    def restart(self) -> None:
        self.stop()
        self.start()


def _as_postgres(command: list[str]) -> list[str]:
    return ["runuser", "-u", "postgres", "--", *command] if os.geteuid() == 0 else command


class SlurmCluster:
    """A one-node Slurm cluster on this machine, for the tests (root only): ``munged`` as the
    munge user, then ``slurmctld`` and ``slurmd`` as root with a generated ``slurm.conf`` (one
    node with every CPU, one partition). A cluster already answering is used as it is; a
    ``slurm.conf`` that this class did not write is never replaced."""

    MARKER = "# written by tlsweep's bench.servers.SlurmCluster"
    CONF = Path("/etc/slurm/slurm.conf")

    def __init__(self, timeout: float = 90) -> None:
        missing = [b for b in ("sbatch", "slurmctld", "slurmd", "munged") if not _which(b)]
        if missing:
            raise RuntimeError(
                f"Slurm is not installed ({', '.join(missing)}): apt-get install slurm-wlm munge"
            )
        if self.answering():
            return
        if os.geteuid() != 0:
            raise RuntimeError("starting a Slurm cluster needs root")
        if self.CONF.exists() and self.MARKER not in self.CONF.read_text():
            raise RuntimeError(f"{self.CONF} belongs to another cluster and does not answer")
        self._start_munge()
        self._write_conf()
        for daemon in ("slurmctld", "slurmd"):
            if subprocess.run(["pgrep", "-x", daemon], capture_output=True).returncode != 0:
                subprocess.run([daemon], check=True, capture_output=True)
        deadline = time.monotonic() + timeout
        while not self.answering():
            if time.monotonic() > deadline:
                raise RuntimeError("the Slurm node did not come up:\n" + self._log_tail())
            time.sleep(0.5)

    @staticmethod
    def answering() -> bool:
        """Whether the controller answers and the node takes jobs."""
        try:
            done = subprocess.run(
                ["sinfo", "-h", "-o", "%T"], capture_output=True, text=True, timeout=10
            )
        except (OSError, subprocess.TimeoutExpired):
            return False
        states = done.stdout.split()
        return done.returncode == 0 and any(s in ("idle", "mixed", "allocated") for s in states)

    def _start_munge(self) -> None:
        for folder in ("/run/munge", "/var/log/munge", "/var/lib/munge", "/etc/munge"):
            Path(folder).mkdir(parents=True, exist_ok=True)
            shutil.chown(folder, "munge", "munge")
        key = Path("/etc/munge/munge.key")
        if not key.exists():
            key.write_bytes(os.urandom(1024))
        shutil.chown(key, "munge", "munge")
        key.chmod(0o400)
        if subprocess.run(["pgrep", "-x", "munged"], capture_output=True).returncode != 0:
            subprocess.run(["runuser", "-u", "munge", "--", "munged"], check=True)

    def _write_conf(self) -> None:
        for folder in ("/var/spool/slurmctld", "/var/spool/slurmd", "/var/log/slurm"):
            Path(folder).mkdir(parents=True, exist_ok=True)
        host = socket.gethostname()
        self.CONF.parent.mkdir(parents=True, exist_ok=True)
        self.CONF.write_text(
            "\n".join(
                [
                    self.MARKER,
                    "ClusterName=tlsweep",
                    f"SlurmctldHost={host}",
                    "SlurmUser=root",
                    "AuthType=auth/munge",
                    "ProctrackType=proctrack/linuxproc",
                    "TaskPlugin=task/none",
                    "SelectType=select/cons_tres",
                    "SelectTypeParameters=CR_Core",
                    "SchedulerType=sched/backfill",
                    "MpiDefault=none",
                    "ReturnToService=2",
                    "StateSaveLocation=/var/spool/slurmctld",
                    "SlurmdSpoolDir=/var/spool/slurmd",
                    "SlurmctldPidFile=/run/slurmctld.pid",
                    "SlurmdPidFile=/run/slurmd.pid",
                    "SlurmctldLogFile=/var/log/slurm/slurmctld.log",
                    "SlurmdLogFile=/var/log/slurm/slurmd.log",
                    "AccountingStorageType=accounting_storage/none",
                    "JobCompType=jobcomp/none",
                    "KillWait=30",
                    f"NodeName={host} CPUs={os.cpu_count()} State=UNKNOWN",
                    "PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP",
                    "",
                ]
            )
        )

    @staticmethod
    def _log_tail() -> str:
        logs = [Path("/var/log/slurm/slurmctld.log"), Path("/var/log/slurm/slurmd.log")]
        return "\n".join(p.read_text()[-2000:] for p in logs if p.exists())


def _which(binary: str) -> bool:
    return shutil.which(binary) is not None or Path("/usr/sbin", binary).exists()
