"""Promotion (sweep._promote, ``sweep.promote``): the search's best trials continued, from
their trained heads, into a costlier stage of the same study and parent run; the champion is
the best of that final stage; promoting is recorded once and survives a kill."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import mlflow
import optuna
import pytest
from optuna.distributions import FloatDistribution
from optuna.trial import TrialState, create_trial

from tlsweep import sweep
from tlsweep.errors import UserError
from tlsweep.reproduce import reproduce
from tlsweep.sweep import RUN_ID_ATTR, run_sweep
from tlsweep.sweep._promote import (
    CONTINUES_ATTR,
    PROMOTED_ATTR,
    continues,
    final_best,
    promote_if_due,
    promoted,
)
from tlsweep.sweep._run import _needs_trial
from tlsweep.sweepspec import PromoteSettings, SweepSettings, load_sweep

GRID = {"head.dropout": "choice(0.0, 0.2)", "head.dense_units": "choice(16, 32)"}
SETTINGS = {"study_name": "promo", "sampler": "grid", "pruner": "none", "n_trials": 4}


def client() -> mlflow.MlflowClient:
    return mlflow.MlflowClient(tracking_uri=os.environ["MLFLOW_TRACKING_URI"])


# --- when and what is promoted (in-memory studies) --------------------------------------------

X = FloatDistribution(0.0, 1.0)


def study_with(*values: float | None, direction: str = "maximize") -> optuna.Study:
    """A study whose trials have these values (None: still running)."""
    study = optuna.create_study(direction=direction)
    for index, value in enumerate(values):
        params, dists = {"x": index / 10}, {"x": X}
        if value is None:
            study.enqueue_trial(params)
            study.ask()
        else:
            study.add_trial(create_trial(params=params, distributions=dists, value=value))
    return study


def settings(top_k: int = 2, n_trials: int = 4) -> SweepSettings:
    return SweepSettings(n_trials=n_trials, promote=PromoteSettings(top_k=top_k))


def test_nothing_is_promoted_before_the_search_is_complete() -> None:
    assert promote_if_due(study_with(0.5, 0.7, 0.6), settings()) == []  # 3 of 4
    running = study_with(0.5, 0.7, 0.6, None)
    assert promote_if_due(running, settings()) == []
    assert promoted(running) is None


@pytest.mark.parametrize(("direction", "best"), [("maximize", [1, 3]), ("minimize", [0, 2])])
def test_the_best_search_trials_are_queued_once_to_continue(direction: str, best: list) -> None:
    study = study_with(0.2, 0.9, 0.4, 0.8, direction=direction)
    assert promote_if_due(study, settings()) == best
    assert promoted(study) == best
    queued = [t for t in study.trials if t.state == TrialState.WAITING]
    assert [continues(t) for t in queued] == best
    assert [t.system_attrs["fixed_params"] for t in queued] == [
        study.trials[n].params for n in best
    ]
    assert promote_if_due(study, settings()) == []  # again (another worker, a resume): nothing
    assert len(study.trials) == 6


def test_a_promotion_recorded_but_not_queued_is_queued_on_the_next_call() -> None:
    """Killed between recording the promotion and queueing its trials: the next process
    queues exactly the missing ones."""
    study = study_with(0.2, 0.9, 0.4, 0.8)
    study.set_user_attr(PROMOTED_ATTR, [1, 3])
    study.enqueue_trial({"x": 0.1}, user_attrs={CONTINUES_ATTR: 1})  # one was queued
    assert promote_if_due(study, settings()) == [3]
    assert sorted(continues(t) for t in study.trials[4:]) == [1, 3]


def test_after_the_promotion_only_the_promoted_trials_are_left_to_run() -> None:
    study = study_with(0.2, 0.9, 0.4, 0.8)
    promote_if_due(study, settings(top_k=1))
    assert _needs_trial(study, 4)  # the promoted one is queued
    trial = study.ask()
    assert continues(trial) == 1
    study.tell(trial, 0.95)
    assert not _needs_trial(study, 4)
    assert final_best(study).number == trial.number


def test_the_champion_of_a_promoting_sweep_is_the_best_of_its_final_stage() -> None:
    from tlsweep.sweep._summary import _best_trial

    study = study_with(0.2, 0.9, 0.4, 0.8)
    promote_if_due(study, settings())
    for value in (0.85, 0.7):  # both below the search's best 0.9
        study.tell(study.ask(), value)
    assert _best_trial(study).number == 4
    assert study.best_trial.number == 1  # what Optuna alone would crown


def test_work_is_left_until_the_promoted_trials_have_finished() -> None:
    """What keeps workers waiting for (and a supervisor replacing) a lost trial: the search,
    then the promotion, then its trials."""
    from tlsweep.sweep._run import work_left

    study = study_with(0.2, 0.9, 0.4)
    assert work_left(study, settings())  # the search
    study.add_trial(create_trial(params={"x": 0.9}, distributions={"x": X}, value=0.5))
    assert work_left(study, settings())  # searched, not promoted yet
    assert not work_left(study, SweepSettings(n_trials=4))  # without promotion: done
    promote_if_due(study, settings(top_k=1))
    assert work_left(study, settings())  # promoted, its trial queued
    study.tell(study.ask(), 0.95)
    assert not work_left(study, settings())
    assert not work_left(study, settings(n_trials=10))  # more trials asked: not searched


def test_a_finished_promotion_is_complete_whatever_n_trials_says_since() -> None:
    from types import SimpleNamespace

    from tlsweep.sweep._run import shortfall

    study = study_with(0.2, 0.9, 0.4, 0.8)
    promote_if_due(study, settings(top_k=1))
    spec = SimpleNamespace(settings=settings(top_k=1, n_trials=10))
    session = SimpleNamespace(spec=spec, study=study)
    assert "before its promoted trials finished" in shortfall(session, "done")
    study.tell(study.ask(), 0.95)
    assert shortfall(session, "done") is None  # complete: raising n_trials searches no more


def test_a_queued_search_trial_beyond_n_trials_does_not_hold_the_promotion_back() -> None:
    study = study_with(0.2, 0.9, 0.4, 0.8)
    study.enqueue_trial({"x": 0.5})  # n_trials lowered since it was queued
    assert promote_if_due(study, settings(top_k=1)) == [1]


def test_the_leaderboard_of_a_promotion_without_promoted_trials() -> None:
    """Every search trial pruned: the promotion is recorded with nothing to promote."""
    from tlsweep.sweep._summary import leaderboard

    study = optuna.create_study(direction="maximize")
    for index in range(2):
        study.add_trial(
            create_trial(
                params={"x": index / 10},
                distributions={"x": X},
                state=TrialState.PRUNED,
                intermediate_values={1: 0.5},
            )
        )
    assert promote_if_due(study, settings(top_k=1, n_trials=2)) == []
    assert promoted(study) == []
    board = leaderboard(study)
    assert board["stage"].tolist() == ["search", "search"]
    assert "continues" not in board


# --- refused settings ------------------------------------------------------------------------


@pytest.fixture
def spec_with(tmp_path: Path, write_sweep):
    def make(promote: dict, space: dict | None = None, base: dict | None = None, **extra: Any):
        path = write_sweep(
            tmp_path, space or GRID, {**SETTINGS, "promote": promote, **extra}, base=base
        )
        return load_sweep(str(path))

    return make


@pytest.mark.parametrize(
    ("promote", "extra", "expected"),
    [
        ({"top_k": 0}, {}, "sweep.promote.top_k=0 is not allowed: between 1 and"),
        ({"top_k": 5}, {}, "sweep.promote.top_k=5 is not allowed: between 1 and sweep.n_trials=4"),
        (
            {"top_k": 1},
            {"objectives": {"val_accuracy": None, "params": None}, "sampler": "nsga2"},
            "cannot be used with several sweep.objectives",
        ),
        ({"overrides": ["train.fine_tune.epochs=choice(1,2)"]}, {}, "is a search; give fixed"),
        ({"overrides": ["train.fine_tune.epochs=-1"]}, {}, "train.fine_tune.epochs"),
        ({"overrides": ["no.such.key=1"]}, {}, "no.such.key"),
        ({"top_k": "two"}, {}, "sweep.promote.top_k"),
        ({"overrides": ["head.dense_units=64"]}, {}, "would change what the promoted trial"),
        ({"overrides": ["backbone.input_size=64"]}, {}, "'backbone.input_size=64' would change"),
        ({"overrides": ["head.dropout=0.1"]}, {}, "a searched value"),  # GRID searches it
    ],
)
def test_bad_promotion_settings_are_one_line_errors(
    spec_with, promote: dict, extra: dict, expected: str
) -> None:
    with pytest.raises(UserError) as exc:
        spec_with(promote, **extra)
    assert expected in str(exc.value)
    assert "\n" not in str(exc.value)


def test_a_search_that_fine_tunes_cannot_be_promoted(spec_with) -> None:
    with pytest.raises(UserError, match=r"continues head-only trials: set train\.fine_tune"):
        spec_with({"top_k": 1}, base={"train.fine_tune.epochs": 1})
    searched = {**GRID, "train.fine_tune.epochs": "choice(0, 1)"}
    with pytest.raises(UserError, match=r"train\.fine_tune cannot be searched"):
        spec_with({"top_k": 1}, space=searched)


# --- real promoting sweeps -------------------------------------------------------------------


@pytest.mark.backend
def test_a_promoted_trial_starts_from_the_head_it_continues(tmp_path: Path, write_sweep) -> None:
    """Promoted with a learning rate too small to move a weight, each promoted trial scores
    exactly what the trial it continues scored: it starts from that trial's trained head
    (a fresh head would score near chance)."""
    path = write_sweep(
        tmp_path,
        GRID,
        {**SETTINGS, "promote": {"top_k": 2, "overrides": ["optimizer.learning_rate=1e-20"]}},
        base={"optimizer": "sgd", "optimizer.learning_rate": 0.05, "train.epochs": 3},
    )
    spec = load_sweep(str(path))
    summary = run_sweep(spec)
    study = sweep.load_study("promo", spec.settings.storage)
    search, final = study.trials[:4], study.trials[4:]
    best_two = sorted(search, key=lambda t: (-t.value, t.number))[:2]
    assert [continues(t) for t in final] == [t.number for t in best_two]
    for trial, origin in zip(final, best_two, strict=True):
        assert trial.state == TrialState.COMPLETE
        assert trial.params == origin.params
        assert trial.value == pytest.approx(origin.value, abs=1e-9)
        assert not trial.intermediate_values  # not reported: a promoted trial is not pruned
        tags = client().get_run(trial.user_attrs[RUN_ID_ATTR]).data.tags
        assert tags["tlsweep.stage"] == "promoted"
        assert tags["tlsweep.continues_trial"] == str(origin.number)
        assert tags["tlsweep.continues_run"] == origin.user_attrs[RUN_ID_ATTR]
        run = client().get_run(trial.user_attrs[RUN_ID_ATTR])
        assert run.data.tags["mlflow.parentRunId"] == summary.parent_run_id
        assert run.data.params["optimizer.learning_rate"] == "1e-20"
        history = client().get_metric_history(run.info.run_id, "val_accuracy")
        assert [m.step for m in history] == [4, 5, 6]  # numbered on from its 3 head epochs
    board = summary.leaderboard
    assert board["stage"].tolist() == ["promoted"] * 2 + ["search"] * 4
    assert board["continues"].tolist()[:2] == [t.number for t in best_two]
    champion = min(final, key=lambda t: (-t.value, t.number))
    assert summary.best_run_id == champion.user_attrs[RUN_ID_ATTR]


@pytest.mark.backend
def test_a_promoted_trial_fine_tunes_its_head_and_is_the_champion(
    tmp_path: Path, write_sweep
) -> None:
    path = write_sweep(
        tmp_path,
        GRID,
        {
            **SETTINGS,
            "promote": {
                "top_k": 1,
                "overrides": [
                    "train.fine_tune.epochs=1",
                    "train.fine_tune.unfreeze_layers=5",
                    "train.fine_tune.learning_rate=1e-5",
                ],
            },
        },
    )
    spec = load_sweep(str(path))
    summary = run_sweep(spec)
    study = sweep.load_study("promo", spec.settings.storage)
    assert len(study.trials) == 5
    final = study.trials[4]
    assert final.state == TrialState.COMPLETE and continues(final) is not None
    run = client().get_run(final.user_attrs[RUN_ID_ATTR])
    assert run.data.metrics["epochs_run"] == 1  # the fine-tuning stage alone: the head was
    assert run.data.params["train.fine_tune.epochs"] == "1"  # trained by the trial it continues
    history = client().get_metric_history(run.info.run_id, "val_accuracy")
    assert [m.step for m in history] == [3]  # after the 2 epochs of the head it continues
    assert run.data.tags[mlflow_tag_model()].startswith("models:/")
    champion = client().get_model_version_by_alias("promo", "champion")
    assert champion.run_id == final.user_attrs[RUN_ID_ATTR] == summary.best_run_id
    assert summary.best_value == pytest.approx(final.value)

    # Reproducible exactly: the trial it continued is retrained first, then its fine-tuning.
    again = reproduce(summary.best_run_id)
    assert again.matches, again.table
    assert again.table["metric"].tolist()[:2] == ["best_val_accuracy", "best_val_loss"]


def mlflow_tag_model() -> str:
    from tlsweep import tracking

    return tracking.MODEL_URI_TAG
