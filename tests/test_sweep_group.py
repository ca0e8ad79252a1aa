"""Trials trained in groups (sweep._group, ``sweep.group_size``): asked together, their heads
trained in one step, each trial still its own run, reports and outcome; faults in a group end
every trial of it as they would end a lone one."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import keras
import mlflow
import optuna
import pytest
from optuna.distributions import CategoricalDistribution
from optuna.trial import TrialState, create_trial

from tlsweep import sweep
from tlsweep.errors import UserError
from tlsweep.progress import SweepProgress
from tlsweep.sweep import RUN_ID_ATTR, run_sweep
from tlsweep.sweep._group import GROUP_TAG, ask
from tlsweep.sweep._objective import Objective
from tlsweep.sweep._samplers import make_sampler
from tlsweep.sweepspec import load_sweep

GRID = {"head.dropout": "choice(0.0, 0.2)", "head.dense_units": "choice(16, 32)"}
SETTINGS = {"study_name": "grouped", "sampler": "grid", "pruner": "none", "n_trials": 4}


@pytest.fixture
def tiny_spec(tmp_path: Path, write_sweep):
    """``tiny_spec(*overrides, space=None)``: a parsed tiny sweep (nothing is run)."""

    def make(*overrides: str, space: dict | None = None):
        path = write_sweep(tmp_path / "spec", space or GRID, {**SETTINGS, "sampler": "tpe"})
        return load_sweep(str(path), overrides)

    return make


def client() -> mlflow.MlflowClient:
    return mlflow.MlflowClient(tracking_uri=os.environ["MLFLOW_TRACKING_URI"])


@dataclass
class Trained:
    """A finished sweep: each trial's state, value, run and reported epochs, by its values."""

    study: optuna.Study
    runs: dict[int, Any]  # trial number -> its MLflow run

    def by_values(self) -> dict[tuple, tuple]:
        return {
            tuple(sorted(t.params.items())): (t.state, t.value, dict(t.intermediate_values))
            for t in self.study.trials
        }


def sweep_with(folder: Path, write_sweep, group_size: int, **settings: Any) -> Trained:
    path = write_sweep(folder, GRID, {**SETTINGS, "group_size": group_size, **settings})
    spec = load_sweep(str(path))
    run_sweep(spec)
    study = sweep.load_study("grouped", spec.settings.storage)
    runs = {t.number: client().get_run(t.user_attrs[RUN_ID_ATTR]) for t in study.trials}
    return Trained(study, runs)


@pytest.mark.backend
def test_a_grouped_sweep_trains_its_trials_together_each_in_its_own_run(
    tmp_path: Path, write_sweep
) -> None:
    trained = sweep_with(tmp_path / "grouped", write_sweep, group_size=4)
    study = trained.study
    assert [t.state for t in study.trials] == [TrialState.COMPLETE] * 4
    assert len({tuple(sorted(t.params.items())) for t in study.trials}) == 4  # the whole grid
    for trial in study.trials:
        run = trained.runs[trial.number]
        assert run.info.status == "FINISHED"
        assert run.data.tags[GROUP_TAG] == "0,1,2,3"  # one group: same batch size, optimizer
        assert run.data.tags["tlsweep.trial_state"] == "COMPLETE"
        history = client().get_metric_history(run.info.run_id, "val_accuracy")
        assert [m.step for m in history] == [1, 2]  # its own epochs, logged as they ended
        assert list(trial.intermediate_values) == [1, 2]  # reported to the pruner
        assert trial.value == pytest.approx(max(m.value for m in history))
        assert run.data.metrics["best_val_accuracy"] == pytest.approx(trial.value)
    best = max(study.trials, key=lambda t: (t.value, -t.number))
    assert client().get_registered_model("grouped") is not None
    champion = client().get_model_version_by_alias("grouped", "champion")
    assert champion.run_id == best.user_attrs[RUN_ID_ATTR]


@pytest.mark.slow
def test_each_trial_of_a_group_gets_what_it_would_get_alone(tmp_path: Path, write_sweep) -> None:
    """Same values, same epochs: the grouped sweep equals the one-at-a-time sweep, trial for
    trial (same seed, same features, same batches: bit for bit on TensorFlow)."""
    alone = sweep_with(tmp_path / "alone", write_sweep, group_size=1, study_name="grouped")
    grouped = sweep_with(tmp_path / "grouped", write_sweep, group_size=4)
    assert all(GROUP_TAG not in run.data.tags for run in alone.runs.values())
    assert grouped.by_values().keys() == alone.by_values().keys()
    for values, (state, value, reported) in grouped.by_values().items():
        lone_state, lone_value, lone_reported = alone.by_values()[values]
        assert state == lone_state == TrialState.COMPLETE
        assert value == pytest.approx(lone_value, abs=1e-6), values
        assert reported == pytest.approx(lone_reported, abs=1e-6), values


def test_heads_that_cannot_share_a_step_train_in_separate_groups(
    tmp_path: Path, write_sweep
) -> None:
    path = write_sweep(
        tmp_path,
        {"head.dropout": "choice(0.0, 0.2)", "train.batch_size": "choice(16, 32)"},
        {**SETTINGS, "group_size": 4},
    )
    spec = load_sweep(str(path))
    run_sweep(spec)
    study = sweep.load_study("grouped", spec.settings.storage)
    groups = {}
    for trial in study.trials:
        tags = client().get_run(trial.user_attrs[RUN_ID_ATTR]).data.tags
        groups.setdefault(trial.params["train.batch_size"], set()).add(tags[GROUP_TAG])
    assert all(len(tags) == 1 for tags in groups.values())  # one group per batch size
    assert groups[16] != groups[32]
    assert [t.state for t in study.trials] == [TrialState.COMPLETE] * 4


@pytest.mark.backend
def test_a_head_that_diverges_fails_its_trial_alone(tmp_path: Path, write_sweep) -> None:
    path = write_sweep(
        tmp_path,
        {"optimizer.learning_rate": "choice(0.0003, 1e30)"},
        {**SETTINGS, "group_size": 2, "n_trials": 2},
        base={"optimizer": "sgd"},
    )
    spec = load_sweep(str(path))
    summary = run_sweep(spec)
    study = sweep.load_study("grouped", spec.settings.storage)
    by_rate = {t.params["optimizer.learning_rate"]: t for t in study.trials[:2]}
    diverged, trained = by_rate[1e30], by_rate[0.0003]
    assert diverged.state == TrialState.FAIL
    assert "loss became nan" in diverged.user_attrs["fail_reason"]
    assert trained.state == TrialState.COMPLETE
    runs = {n: client().get_run(t.user_attrs[RUN_ID_ATTR]) for n, t in by_rate.items()}
    assert runs[1e30].info.status == "FAILED"
    assert runs[0.0003].info.status == "FINISHED"
    assert summary.best_run_id == trained.user_attrs[RUN_ID_ATTR]


class InterruptOnce(keras.callbacks.Callback):
    """Ctrl-C (or a scheduler's SIGTERM, as tlsweep raises it) after the first epoch of one
    head, mid-group."""

    fired = False

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        if not type(self).fired:
            type(self).fired = True
            raise KeyboardInterrupt


def test_an_interrupted_group_fails_every_trial_and_the_sweep_resumes(
    tmp_path: Path, write_sweep, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = write_sweep(tmp_path, GRID, {**SETTINGS, "group_size": 4})
    spec = load_sweep(str(path))
    real = SweepProgress.epoch_callback
    monkeypatch.setattr(InterruptOnce, "fired", False)

    def interrupting(self: SweepProgress, number: int, cfg: Any) -> keras.callbacks.Callback:
        return keras.callbacks.CallbackList([real(self, number, cfg), InterruptOnce()])

    with monkeypatch.context() as patch:
        patch.setattr(SweepProgress, "epoch_callback", interrupting)
        with pytest.raises(KeyboardInterrupt):
            run_sweep(spec)
    study = sweep.load_study("grouped", spec.settings.storage)
    states = [t.state for t in study.trials]
    assert states[:4] == [TrialState.FAIL] * 4  # the whole group, each queued again
    assert states[4:] == [TrialState.WAITING] * 4
    for trial in study.trials[:4]:
        assert trial.user_attrs["fail_reason"].startswith("interrupted")
        assert client().get_run(trial.user_attrs[RUN_ID_ATTR]).info.status == "KILLED"

    run_sweep(spec)  # the same command: the queued copies run, as a group
    study = sweep.load_study("grouped", spec.settings.storage)
    done = [t for t in study.trials if t.state == TrialState.COMPLETE]
    assert len(done) == 4 and len(study.trials) == 8
    assert len({tuple(sorted(t.params.items())) for t in done}) == 4
    runs = client().search_runs([client().get_experiment_by_name("grouped").experiment_id])
    assert not [r for r in runs if r.info.status == "RUNNING"]


def test_a_full_disk_in_a_group_fails_and_queues_every_trial_without_training_them(
    tmp_path: Path, write_sweep, monkeypatch: pytest.MonkeyPatch
) -> None:
    """One trial of the group meets a full disk as its run opens: the others are neither
    opened nor trained (each would meet it too); all four are queued again, no run is left
    RUNNING, and the same command finishes the sweep once there is space."""
    import errno

    from tlsweep.errors import OutageError
    from tlsweep.sweep import _group

    path = write_sweep(tmp_path, GRID, {**SETTINGS, "group_size": 4})
    spec = load_sweep(str(path))
    real_open, trained = Objective.open, []

    def open_on_a_full_disk(self: Objective, run: Any) -> None:
        if run.trial.number == 1:
            raise OSError(errno.ENOSPC, "No space left on device", "mlruns/artifacts/x")
        real_open(self, run)

    with monkeypatch.context() as patch:
        patch.setattr(Objective, "open", open_on_a_full_disk)
        patch.setattr(_group, "execute_group", lambda *a, **k: trained.append(a) or [])
        with pytest.raises(OutageError, match="no space left on device"):
            run_sweep(spec)
    assert trained == []
    study = sweep.load_study("grouped", spec.settings.storage)
    assert [t.state for t in study.trials] == [TrialState.FAIL] * 4 + [TrialState.WAITING] * 4
    assert {t.user_attrs["fail_reason"] for t in study.trials[:4]} == {"the disk was full"}
    opened = client().get_run(study.trials[0].user_attrs[RUN_ID_ATTR])
    assert opened.info.status == "FAILED"  # the one run opened before the disk filled
    assert [RUN_ID_ATTR in t.user_attrs for t in study.trials[:4]] == [True, False, False, False]

    run_sweep(spec)
    study = sweep.load_study("grouped", spec.settings.storage)
    assert [t.state for t in study.trials[4:]] == [TrialState.COMPLETE] * 4


def test_trials_asked_together_differ_under_tpe(tiny_spec) -> None:
    """TPE's constant liar (on with a group size): a trial asked while its group's others run
    is not drawn on the same values. Without it, TPE asked three times in a row with the same
    history picks the same, clearly best, choice."""
    spec = tiny_spec(
        "sweep.sampler=tpe",
        "sweep.group_size=3",
        "sweep.sampler_options={n_startup_trials: 0}",
        space={"head.dense_units": "choice(8, 16, 32, 64)"},
    )
    picks = {}
    for liar in (True, False):
        sampler = make_sampler(spec.settings, spec.space)
        sampler._constant_liar = liar  # the comparison only: the setting is what the sweep uses
        study = optuna.create_study(direction="maximize", sampler=sampler)
        units = CategoricalDistribution([8, 16, 32, 64])
        for value, score in [(8, 1.0), (8, 0.99), (16, 0.1), (32, 0.1), (64, 0.1)]:
            study.add_trial(
                create_trial(
                    params={"head.dense_units": value},
                    distributions={"head.dense_units": units},
                    value=score,
                )
            )
        objective = Objective(spec, "parent", SweepProgress(3, "val_accuracy"))
        picks[liar] = [params["head.dense_units"] for _, params in ask(study, objective, 3)]
    assert make_sampler(spec.settings, spec.space)._constant_liar
    assert len(set(picks[False])) == 1
    assert len(set(picks[True])) > 1


def test_grid_asks_in_a_group_take_distinct_points(tiny_spec) -> None:
    spec = tiny_spec("sweep.sampler=grid", "sweep.group_size=4", space=GRID)
    study = optuna.create_study(
        direction="maximize", sampler=make_sampler(spec.settings, spec.space)
    )
    objective = Objective(spec, "parent", SweepProgress(4, "val_accuracy"))
    asked = ask(study, objective, 4)
    assert len({tuple(sorted(params.items())) for _, params in asked}) == 4
    assert all(t.state == TrialState.RUNNING for t in study.trials)


@pytest.mark.parametrize("size", [0, -2])
def test_a_group_size_below_one_is_refused(tiny_spec, size: int) -> None:
    with pytest.raises(UserError) as exc:
        tiny_spec(f"sweep.group_size={size}")
    assert f"sweep.group_size={size} is not allowed" in str(exc.value)
    assert "\n" not in str(exc.value)


def test_a_base_that_cannot_group_trains_one_trial_at_a_time(tiny_spec) -> None:
    """Augmenting trials train end to end: no features to share, so no group is asked."""
    from tlsweep.sweep._group import group_size

    grouped = tiny_spec("sweep.group_size=4")
    augmenting = tiny_spec("sweep.group_size=4", "augment=light")
    progress = SweepProgress(2, "val_accuracy")
    for spec, expected in ((grouped, 4), (augmenting, 1)):
        objective = Objective(spec, "parent", progress)
        assert group_size(objective, objective.configs.load()) == expected
