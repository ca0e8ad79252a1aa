"""Optuna drives the sweep: this package is the only code that imports optuna.

One study per sweep (resumable: the same command continues it to ``n_trials`` finished
trials), one MLflow parent run per study, one child run per trial. Each trial reports the
monitored metric every epoch so the pruner can stop it, and returns its best epoch's value.
A sweep with several objectives (``sweep.objectives``: accuracy against latency or size)
returns a tuple per trial, is not pruned, and ends with its Pareto front registered.

Public face: `run_sweep` (one process), `run_workers` (several on this machine, supervised)
and `run_worker` (one of them), `submit_workers` (Slurm jobs), `show_status`, the study
helpers (`open_storage`, `open_study`, `load_study`, `study_names`, `storage_url`), the
sampler/pruner factories, and the read side
used by ``tlsweep runs`` and ``tlsweep reproduce`` (`leaderboard`, `best_run_id`,
`parent_run_id`, `pareto_front`).
The private modules: ``_storage`` (where studies live), ``_samplers``, ``_objective`` (one
trial), ``_run`` (the trial loop), ``_workers`` (local worker processes), ``_slurm`` (worker
jobs through submitit), ``_status`` and ``_summary`` (the end of a sweep).
"""

from __future__ import annotations

import warnings

import optuna

from tlsweep.sweep._common import (
    ENDED_STATES,
    FAIL_REASON_ATTR,
    FINISHED_STATES,
    PARENT_RUN_ATTR,
    RUN_ID_ATTR,
)
from tlsweep.sweep._run import run_sweep, run_worker
from tlsweep.sweep._samplers import make_pruner, make_sampler, sampler_factory, suggest
from tlsweep.sweep._slurm import submit_workers
from tlsweep.sweep._status import show_status, status_line
from tlsweep.sweep._storage import (
    DEFAULT_STORAGE,
    load_study,
    open_storage,
    open_study,
    storage_url,
    study_names,
)
from tlsweep.sweep._summary import (
    SweepSummary,
    best_run_id,
    leaderboard,
    optuna_figures,
    parent_run_id,
    pareto_front,
    pareto_ranks,
    summarize,
)
from tlsweep.sweep._workers import run_workers

optuna.logging.set_verbosity(optuna.logging.ERROR)  # trial outcomes are printed by progress
# Heartbeats and their retry callback are "experimental" in Optuna 5; we use them deliberately.
warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)

__all__ = [
    "DEFAULT_STORAGE",
    "ENDED_STATES",
    "FAIL_REASON_ATTR",
    "FINISHED_STATES",
    "PARENT_RUN_ATTR",
    "RUN_ID_ATTR",
    "SweepSummary",
    "best_run_id",
    "leaderboard",
    "load_study",
    "make_pruner",
    "make_sampler",
    "open_storage",
    "open_study",
    "optuna_figures",
    "parent_run_id",
    "pareto_front",
    "pareto_ranks",
    "run_sweep",
    "run_worker",
    "run_workers",
    "sampler_factory",
    "show_status",
    "status_line",
    "storage_url",
    "study_names",
    "submit_workers",
    "suggest",
    "summarize",
]
