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
  still to do on resume (`ResumableGridSampler`), and a group asks no more trials than the
  grid has points left (`grid_points_to_do`);
- ``get_heartbeat_thread``: trials asked together (a group of heads) keep the heartbeats that
  ``study.optimize`` keeps for its one trial.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence

import optuna
from optuna.storages import BaseStorage
from optuna.storages._heartbeat import BaseHeartbeat, get_heartbeat_thread
from optuna.trial import FrozenTrial, TrialState

from tlsweep.sweep._common import FINISHED_STATES

CHECKED_VERSIONS = ("4.9", "5.0")  # the oldest and newest Optuna these were checked against
STALE_TRIAL_IDS = "_get_stale_trial_ids"  # BaseHeartbeat's hook behind fail_stale_trials

__all__ = [
    "CHECKED_VERSIONS",
    "STALE_TRIAL_IDS",
    "BaseHeartbeat",
    "ResumableGridSampler",
    "grid_points_to_do",
    "heartbeat",
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
    stopping the study one trial short of ``n_trials``); and telling a trial never stops the
    study (`after_trial`)."""

    def after_trial(
        self,
        study: optuna.Study,
        trial: FrozenTrial,
        state: TrialState,
        values: Sequence[float] | None,
    ) -> None:
        """Optuna's: ``study.stop()`` once the last point is told, inside ``study.optimize``.
        Outside it (a dead worker's trial failed by another process, a group's trials told
        with ``study.tell``) that stop raises, and a trial with no grid point (an enqueued,
        promoted one) has no id to read: both are left alone, as tlsweep's loop stops at an
        exhausted grid itself."""
        if "grid_id" not in trial.system_attrs:
            return
        with contextlib.suppress(RuntimeError):  # "supposed to be invoked inside ..."
            super().after_trial(study, trial, state, values)

    def _get_unvisited_grid_ids(self, study: optuna.Study) -> list[int]:
        done, running = _grid_points(self, study)
        every = set(range(self._n_min_trials))
        return sorted(every - done - running) or sorted(every - done)


def _grid_points(sampler: optuna.samplers.GridSampler, study: optuna.Study) -> tuple[set, set]:
    """The grid ids of the study's finished trials and of its running ones."""
    done, running = set(), set()
    for t in storage_of(study).get_all_trials(study_id_of(study), deepcopy=False):
        attrs = t.system_attrs
        if "grid_id" not in attrs or not sampler._same_search_space(attrs["search_space"]):
            continue
        if t.state in FINISHED_STATES:
            done.add(attrs["grid_id"])
        elif t.state == TrialState.RUNNING:
            running.add(attrs["grid_id"])
    return done, running


def heartbeat(study: optuna.Study, trial: optuna.Trial) -> contextlib.AbstractContextManager:
    """The heartbeat ``study.optimize`` keeps for a running trial (a thread recording it every
    ``heartbeat_interval`` on storages with heartbeats, nothing on the others), for trials
    asked with ``study.ask``: a group of trials trained together (`_group`)."""
    return get_heartbeat_thread(trial._trial_id, storage_of(study))


def grid_points_to_do(sampler: optuna.samplers.GridSampler, study: optuna.Study) -> int:
    """How many grid points no trial has finished or is running."""
    done, running = _grid_points(sampler, study)
    return len(set(range(sampler._n_min_trials)) - done - running)
