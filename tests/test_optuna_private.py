"""Optuna's private API that tlsweep relies on (`tlsweep.sweep._optuna_private`): each piece
still exists and still does what tlsweep expects. A failure here means an Optuna release
changed one of them: re-check that module before anything else."""

from __future__ import annotations

import inspect

import optuna
import pytest
from optuna.trial import TrialState

from tlsweep.sweep import _optuna_private as private


@pytest.fixture
def study() -> optuna.Study:
    storage = optuna.storages.RDBStorage("sqlite:///:memory:", heartbeat_interval=60)
    return optuna.create_study(storage=storage, study_name="s")


def test_checked_versions_name_the_installed_major_version_or_say_to_recheck() -> None:
    installed = tuple(int(p) for p in optuna.__version__.split(".")[:2])
    oldest, newest = (tuple(int(p) for p in v.split(".")) for v in private.CHECKED_VERSIONS)
    assert oldest <= installed, f"Optuna {optuna.__version__} is older than tlsweep supports"
    assert installed[0] <= newest[0], (
        f"Optuna {optuna.__version__} is a new major version: re-check "
        f"tlsweep/sweep/_optuna_private.py and extend CHECKED_VERSIONS"
    )


def test_a_study_exposes_its_storage_and_id(study: optuna.Study) -> None:
    storage = private.storage_of(study)
    assert isinstance(storage, optuna.storages.BaseStorage)
    assert private.study_id_of(study) == storage.get_study_id_from_name("s")


def test_a_frozen_trial_carries_its_storage_id(study: optuna.Study) -> None:
    study.ask()
    second = study.ask()
    frozen = study.trials[second.number]
    storage = private.storage_of(study)
    trial_id = private.trial_id_of(frozen)
    assert trial_id == storage.get_trial_id_from_study_id_trial_number(
        private.study_id_of(study), second.number
    )
    storage.set_trial_user_attr(trial_id, "k", "v")  # how a dead worker's trial is written
    assert study.trials[second.number].user_attrs == {"k": "v"}


def test_fail_stale_trials_asks_the_heartbeat_hook(study: optuna.Study) -> None:
    storage = private.storage_of(study)
    assert isinstance(storage, private.BaseHeartbeat)
    hook = getattr(type(storage), private.STALE_TRIAL_IDS)
    assert list(inspect.signature(hook).parameters) == ["self", "study_id"]
    trial = study.ask()
    asked: list[int] = []

    def stale(study_id: int) -> list[int]:
        asked.append(study_id)
        return [trial._trial_id]

    setattr(storage, private.STALE_TRIAL_IDS, stale)
    optuna.storages.fail_stale_trials(study)
    assert asked == [private.study_id_of(study)]
    assert study.trials[trial.number].state == TrialState.FAIL


def test_the_grid_sampler_hook_decides_which_points_are_left() -> None:
    grid = {"x": [0, 1, 2]}
    study = optuna.create_study(sampler=private.ResumableGridSampler(grid, seed=0))
    assert hasattr(optuna.samplers.GridSampler, "_get_unvisited_grid_ids")
    seen: list[int] = []

    def objective(trial: optuna.Trial) -> float:
        seen.append(trial.suggest_categorical("x", grid["x"]))
        if len(seen) == 1:
            raise ValueError("the first point fails")  # ...and is still to do
        return 1.0

    study.optimize(objective, n_trials=4, catch=(ValueError,))
    complete = [t.params["x"] for t in study.trials if t.state == TrialState.COMPLETE]
    assert sorted(complete) == [0, 1, 2]  # the failed point ran again: the grid is whole
    assert seen.count(seen[0]) == 2


def test_telling_the_last_grid_point_outside_optimize_does_not_stop_the_study() -> None:
    """Optuna's grid calls ``study.stop()`` when its last point is told: outside ``optimize``
    (a group's trials, a dead worker's trial failed by another process) that raised, and an
    enqueued trial without a grid point raised too."""
    grid = {"x": [0, 1]}
    study = optuna.create_study(sampler=private.ResumableGridSampler(grid, seed=0))
    asked = [study.ask() for _ in range(2)]
    for trial in asked:
        trial.suggest_categorical("x", grid["x"])
    study.tell(asked[0], 1.0)
    study.tell(asked[1], state=TrialState.FAIL)  # the last point: Optuna's grid would stop
    study.enqueue_trial({"x": 0})
    extra = study.ask()
    extra.suggest_categorical("x", grid["x"])
    study.tell(extra, 0.5)
    states = [t.state for t in study.trials]
    assert states == [TrialState.COMPLETE, TrialState.FAIL, TrialState.COMPLETE]
    with pytest.raises(RuntimeError, match="supposed to be invoked inside"):
        plain = optuna.create_study(sampler=optuna.samplers.GridSampler(grid, seed=0))
        plain_trials = [plain.ask() for _ in range(2)]
        for trial in plain_trials:
            trial.suggest_categorical("x", grid["x"])
        plain.tell(plain_trials[0], 1.0)
        plain.tell(plain_trials[1], 1.0)
