"""Worker jobs on a Slurm cluster, submitted through ``submitit`` as one job array.

The submitting process (a login node) opens the study and its parent run once, exactly as a
local supervisor does, so that bad input is refused before anything is queued; then it submits
N jobs and returns. Each job runs ``tlsweep sweep NAME ... --worker --summarize``: it takes
trials until the study has ``n_trials``, and whichever job finds the study complete with no
trial running summarises it (leaderboard, plots, champion) under the study lock, once. Nothing
has to stay alive on the login node.

The storage the jobs join travels in their environment (``sbatch`` exports the submitter's),
never on a command line or in submitit's pickled job file. A job that Slurm stops (``scancel``,
preemption, the end of its time) gets SIGTERM: its trial is failed and queued again, its run
ends KILLED; a requeued job (``launcher.requeue``) joins the study again when it restarts.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tlsweep.config import config_dir
from tlsweep.errors import UserError
from tlsweep.sweep._run import open_session
from tlsweep.sweep._workers import worker_command
from tlsweep.sweepspec import WORKER_STORAGE_ENV, SweepSpec

CLUSTERS = ("slurm", "local")


@dataclass
class LauncherSettings:
    """``conf/launcher/slurm.yaml``, with ``launcher.KEY=VALUE`` overrides."""

    partition: str | None = None
    gpus_per_node: int = 0
    cpus_per_task: int = 4
    mem_gb: float | None = None
    time_min: int = 240
    account: str | None = None
    qos: str | None = None
    array_parallelism: int | None = None
    requeue: bool = True
    setup: list[str] = field(default_factory=list)
    additional: dict[str, Any] = field(default_factory=dict)
    logs: str = "mlruns/slurm"
    cluster: str = "slurm"

    def executor_parameters(self, study_name: str, jobs: int) -> dict[str, Any]:
        """``submitit.AutoExecutor.update_parameters`` keywords (``slurm_*`` ones are ignored
        by the local executor)."""
        additional = dict(self.additional)
        if self.requeue:
            additional.setdefault("requeue", True)
        parameters: dict[str, Any] = {
            "name": f"tlsweep-{study_name}",
            "timeout_min": self.time_min,
            "cpus_per_task": self.cpus_per_task,
            "tasks_per_node": 1,
            "nodes": 1,
            "slurm_array_parallelism": self.array_parallelism or jobs,
            "slurm_setup": list(self.setup),
            "slurm_additional_parameters": additional,
        }
        if self.gpus_per_node:
            parameters["gpus_per_node"] = self.gpus_per_node
        if self.mem_gb is not None:
            parameters["mem_gb"] = self.mem_gb
        for key in ("partition", "account", "qos"):
            if getattr(self, key) is not None:
                parameters[f"slurm_{key}"] = getattr(self, key)
        return parameters


def launcher_settings(overrides: Sequence[str]) -> LauncherSettings:
    """The launcher config with ``launcher.KEY=VALUE`` overrides; bad keys or values are a
    one-line error naming them and what is allowed."""
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    schema = OmegaConf.structured(LauncherSettings)
    try:
        defaults = OmegaConf.load(config_dir() / "launcher" / "slurm.yaml")
        dotlist = [o.lstrip("+").removeprefix("launcher.") for o in overrides]
        merged = OmegaConf.merge(schema, defaults, OmegaConf.from_dotlist(dotlist))
    except OmegaConfBaseException as exc:
        allowed = ", ".join(f"launcher.{name}" for name in LauncherSettings.__dataclass_fields__)
        reason = str(exc).splitlines()[0]
        raise UserError(f"bad launcher setting ({reason}); allowed: {allowed}") from None
    settings: LauncherSettings = OmegaConf.to_object(merged)  # type: ignore[assignment]
    if settings.cluster not in CLUSTERS:
        raise UserError(
            f"launcher.cluster={settings.cluster} is not allowed: one of {', '.join(CLUSTERS)}"
        )
    for name in ("cpus_per_task", "time_min"):
        if getattr(settings, name) < 1:
            raise UserError(f"launcher.{name}={getattr(settings, name)} is not allowed: >= 1")
    return settings


@dataclass
class Submitted:
    job_ids: list[str]
    logs: Path


def submit_workers(
    spec: SweepSpec, sweep_args: Sequence[str], workers: int, launcher: LauncherSettings
) -> Submitted:
    """Open the study and its parent run, then submit ``workers`` worker jobs as one array."""
    import submitit

    if launcher.cluster == "slurm" and not _has_sbatch():
        raise UserError("--launcher slurm needs Slurm's sbatch on PATH (this is not a login node)")
    session = open_session(spec, workers=max(workers, 2), trains=False)  # refuses bad input
    session.data.clear()
    folder = Path(launcher.logs).expanduser().resolve() / spec.settings.study_name
    executor = submitit.AutoExecutor(folder=folder / "%j", cluster=launcher.cluster)
    executor.update_parameters(**launcher.executor_parameters(spec.settings.study_name, workers))
    command = [*worker_command(sweep_args), "--summarize"]
    os.environ[WORKER_STORAGE_ENV] = session.url  # sbatch exports it; no file or argv holds it
    with executor.batch():
        jobs = [
            executor.submit(submitit.helpers.CommandFunction(command, cwd=str(Path.cwd())))
            for _ in range(workers)
        ]
    return Submitted([job.job_id for job in jobs], folder)


def _has_sbatch() -> bool:
    import shutil

    return shutil.which("sbatch") is not None
