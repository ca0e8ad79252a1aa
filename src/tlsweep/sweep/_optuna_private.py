"""Every use of Optuna's private API, in this one module.

Optuna has no public way to do these few things, so tlsweep reaches inside; each one is named
here with why, and ``tests/test_optuna_private.py`` checks that each still exists and still
does what tlsweep relies on, so that an Optuna release that moves one fails there, loudly,
instead of somewhere in a sweep. Checked against Optuna `CHECKED_VERSIONS`.

- a study's storage and id, and a frozen trial's id: to write another process's trial (a dead
  worker's) and to read trials without copying them;
- ``BaseHeartbeat`` and its ``_get_stale_trial_ids`` hook, which ``fail_stale_trials`` calls:
  the patient storage forgives heartbeats that an outage made old (`_patience`);
- ``GridSampler._get_unvisited_grid_ids`` and the attributes it reads: a failed grid point is
  still to do on resume (`ResumableGridSampler`).
"""

from __future__ import annotations

import optuna
from optuna.storages import BaseStorage
from optuna.storages._heartbeat import BaseHeartbeat
from optuna.trial import FrozenTrial, TrialState

from tlsweep.sweep._common import FINISHED_STATES

CHECKED_VERSIONS = ("4.9", "5.0")  # the oldest and newest Optuna these were checked against
STALE_TRIAL_IDS = "_get_stale_trial_ids"  # BaseHeartbeat's hook behind fail_stale_trials

__all__ = [
    "CHECKED_VERSIONS",
    "STALE_TRIAL_IDS",
    "BaseHeartbeat",
    "ResumableGridSampler",
    "storage_of",
    "study_id_of",
    "trial_id_of",
]


def storage_of(study: optuna.Study) -> BaseStorage:
    """The storage object ``study`` reads and writes."""
    return study._storage


def study_id_of(study: optuna.Study) -> int:
    """``study``'s id in its storage."""
    return study._study_id


def trial_id_of(trial: FrozenTrial) -> int:
    """``trial``'s id in its storage (what the storage's setters take), not its number."""
    return trial._trial_id


class ResumableGridSampler(optuna.samplers.GridSampler):
    """Optuna's grid sampler, except that a grid point whose trial FAILED (an error, Ctrl-C) is
    still to do: resuming the sweep runs it again instead of leaving a hole in the grid (and
    stopping the study one trial short of ``n_trials``)."""

    def _get_unvisited_grid_ids(self, study: optuna.Study) -> list[int]:
        done, running = set(), set()
        for t in storage_of(study).get_all_trials(study_id_of(study), deepcopy=False):
            attrs = t.system_attrs
            if "grid_id" not in attrs or not self._same_search_space(attrs["search_space"]):
                continue
            if t.state in FINISHED_STATES:
                done.add(attrs["grid_id"])
            elif t.state == TrialState.RUNNING:
                running.add(attrs["grid_id"])
        every = set(range(self._n_min_trials))
        return sorted(every - done - running) or sorted(every - done)
