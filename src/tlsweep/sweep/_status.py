"""``tlsweep status``: a study's progress in one line, from any machine that reaches it."""

from __future__ import annotations

import time

import optuna
from optuna.trial import TrialState

from tlsweep.sweep._common import (
    FINISHED_STATES,
    N_TRIALS_ATTR,
    SUMMARIZED_ATTR,
    count,
)


def status_line(study: optuna.Study) -> str:
    """E.g. ``sweep s: 3/8 finished, 2 running, 1 queued, 1 failed; best val_accuracy 0.9125
    (trial 2)``, and ``; summarised`` once a worker has summarised it."""
    n_trials = study.user_attrs.get(N_TRIALS_ATTR, "?")
    done = count(study, FINISHED_STATES)
    parts = [f"{done}/{n_trials} finished"]
    for state, word in (
        (TrialState.RUNNING, "running"),
        (TrialState.WAITING, "queued"),
        (TrialState.FAIL, "failed"),
    ):
        if number := count(study, (state,)):
            parts.append(f"{number} {word}")
    line = f"sweep {study.study_name}: {', '.join(parts)}"
    if len(study.directions) == 1 and count(study, (TrialState.COMPLETE,)):
        metric = (study.metric_names or ["value"])[0]
        best = study.best_trial
        line += f"; best {metric} {best.value:.4f} (trial {best.number})"
    if study.user_attrs.get(SUMMARIZED_ATTR) == done:
        line += "; summarised"
    return line


def ended(study: optuna.Study) -> bool:
    """Complete (``n_trials`` finished, nothing running or queued) and summarised."""
    n_trials = study.user_attrs.get(N_TRIALS_ATTR)
    done = count(study, FINISHED_STATES)
    busy = count(study, (TrialState.RUNNING, TrialState.WAITING))
    return (
        n_trials is not None
        and done >= n_trials
        and not busy
        and (study.user_attrs.get(SUMMARIZED_ATTR) == done)
    )


def show_status(study: optuna.Study, follow: bool = False, every: float = 10.0) -> int:
    """Print the status line; with ``follow``, a new line at each change (with the time)
    until the sweep has ended. Returns the exit code (0)."""
    line = status_line(study)
    print(line if not follow else f"{time.strftime('%H:%M:%S')} {line}", flush=True)
    while follow and not ended(study):
        time.sleep(every)  # polling the study (each read is fresh): a status display
        if (current := status_line(study)) != line:
            line = current
            print(f"{time.strftime('%H:%M:%S')} {line}", flush=True)
    return 0
