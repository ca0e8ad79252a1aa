"""Optuna drives the sweep: this package is the only code that imports optuna.

One study per sweep (resumable: the same command continues it to ``n_trials`` finished
trials), one MLflow parent run per study, one child run per trial. Each trial reports the
monitored metric every epoch so the pruner can stop it, and returns its best epoch's value.
A sweep with several objectives (``sweep.objectives``: accuracy against latency or size)
returns a tuple per trial, is not pruned, and ends with its Pareto front registered.

Public face (what the CLI, the report and the benchmarks call): `run_sweep` (one process),
`run_workers` (several on this machine, supervised) and `run_worker` (one of them),
`submit_workers` (Slurm jobs), `show_status`, the study helpers (`open_storage`,
`load_study`, `study_names`), the read side of ``tlsweep runs``, ``report`` and
``reproduce`` (`leaderboard`, `best_run_id`, `parent_run_id`, `optuna_figures`), and
``tlsweep dashboard`` (`open_dashboard`, `serve_dashboard`).

The private modules, each with its tests: ``_storage`` (where studies live), ``_samplers``,
``_objective`` (one trial), ``_artifacts`` (each trial's confusion matrix in Optuna's artifact
store), ``_run`` (the trial loop), ``_workers`` (local worker processes), ``_slurm`` (worker
jobs through submitit), ``_status``, ``_summary`` (the end of a sweep), ``_dashboard``,
``_patience`` (a database that restarts), ``_optuna_private`` (every use of Optuna's private
API, checked by ``tests/test_optuna_private.py``).
"""

from __future__ import annotations

import warnings

import optuna

from tlsweep.sweep._common import FAIL_REASON_ATTR, RUN_ID_ATTR
from tlsweep.sweep._dashboard import open_dashboard, serve_dashboard
from tlsweep.sweep._run import run_sweep, run_worker
from tlsweep.sweep._slurm import submit_workers
from tlsweep.sweep._status import show_status
from tlsweep.sweep._storage import load_study, open_storage, study_names
from tlsweep.sweep._summary import (
    SweepSummary,
    best_run_id,
    leaderboard,
    optuna_figures,
    parent_run_id,
)
from tlsweep.sweep._workers import run_workers

optuna.logging.set_verbosity(optuna.logging.ERROR)  # trial outcomes are printed by progress
# Heartbeats and their retry callback are "experimental" in Optuna 5; we use them deliberately.
warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)

__all__ = [
    "FAIL_REASON_ATTR",
    "RUN_ID_ATTR",
    "SweepSummary",
    "best_run_id",
    "leaderboard",
    "load_study",
    "open_dashboard",
    "open_storage",
    "optuna_figures",
    "parent_run_id",
    "run_sweep",
    "run_worker",
    "run_workers",
    "serve_dashboard",
    "show_status",
    "study_names",
    "submit_workers",
]
