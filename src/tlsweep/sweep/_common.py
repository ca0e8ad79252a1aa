"""Trial attributes and state groups shared by the sweep's modules."""

from __future__ import annotations

import optuna
from optuna.trial import TrialState

PARENT_RUN_ATTR = "mlflow_parent_run_id"
RUN_ID_ATTR = "mlflow_run_id"
FAIL_REASON_ATTR = "fail_reason"
WORKER_ATTR = "worker"  # host:pid of the process running the trial
N_TRIALS_ATTR = "tlsweep_n_trials"  # the study's n_trials, as last asked for
SUMMARIZED_ATTR = "tlsweep_summarized"  # finished trials when a worker last summarised it
FINISHED_STATES = (TrialState.COMPLETE, TrialState.PRUNED)
ENDED_STATES = (*FINISHED_STATES, TrialState.FAIL)


def count(study: optuna.Study, states: tuple[TrialState, ...]) -> int:
    """How many of the study's trials are in ``states``."""
    return len(study.get_trials(deepcopy=False, states=states))
