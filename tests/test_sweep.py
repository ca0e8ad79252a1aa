"""Optuna sweeps: study <-> MLflow runs, resume, failures, pruning, samplers, storage."""

from __future__ import annotations

import copy
import importlib.util
import sys
from dataclasses import dataclass
from pathlib import Path

import mlflow
import numpy as np
import optuna
import pandas as pd
import pytest
from optuna.trial import TrialState

from tlsweep import sweep, tracking
from tlsweep.errors import UserError
from tlsweep.sweep import (
    FAIL_REASON_ATTR,
    RUN_ID_ATTR,
    SweepSummary,
    _objective,
    _run,
    _samplers,
    open_storage,
    run_sweep,
)
from tlsweep.sweep._objective import EpochReporter
from tlsweep.sweep._samplers import make_pruner, make_sampler, suggest
from tlsweep.sweep._storage import open_study, storage_url
from tlsweep.sweep._summary import pareto_ranks
from tlsweep.sweepspec import Dimension, SweepSettings, load_sweep, parse_dimension, with_settings

# --- the epoch reporter --------------------------------------------------------------------------


class FakeTrial:
    def __init__(self, prune_at: int | None = None) -> None:
        self.reports: list[tuple[float, int]] = []
        self.prune_at = prune_at

    def report(self, value: float, step: int) -> None:
        self.reports.append((value, step))

    def should_prune(self) -> bool:
        return self.prune_at is not None and self.reports[-1][1] >= self.prune_at


class FakeModel:
    stop_training = False


def reporter_after(values, metric="val_accuracy", direction="maximize", prune_at=None):
    trial = FakeTrial(prune_at)
    reporter = EpochReporter(trial, metric, direction)  # type: ignore[arg-type]
    reporter.set_model(FakeModel())
    for epoch, value in enumerate(values):
        reporter.on_epoch_end(epoch, {metric: value, "loss": 9.0})
        if reporter.model.stop_training:
            break
    return reporter, trial


def test_trial_value_is_the_best_epoch_not_the_last() -> None:
    reporter, trial = reporter_after([0.5, 0.9, 0.7])
    assert reporter.best == 0.9
    assert trial.reports == [(0.5, 1), (0.9, 2), (0.7, 3)]
    assert (reporter.last_step, reporter.stop_run) == (3, False)
    assert reporter.model.stop_training is False


def test_minimized_metric_keeps_the_lowest() -> None:
    reporter, trial = reporter_after([0.9, 0.4, 0.6], metric="val_loss", direction="minimize")
    assert reporter.best == 0.4
    assert [v for v, _ in trial.reports] == [0.9, 0.4, 0.6]


def test_pruning_stops_training() -> None:
    reporter, trial = reporter_after([0.5, 0.6, 0.7, 0.8], prune_at=2)
    assert trial.reports == [(0.5, 1), (0.6, 2)]
    assert reporter.stop_run and reporter.model.stop_training
    assert (reporter.last_step, reporter.best) == (2, 0.6)


# --- samplers, pruners, suggestions ------------------------------------------------------------

SPACE = (
    parse_dimension("head.dropout", "choice(0.1, 0.3)"),
    parse_dimension("train.batch_size", "range(8, 24, step=8)"),
)


@pytest.mark.parametrize(
    ("name", "cls"),
    [
        ("tpe", optuna.samplers.TPESampler),
        ("random", optuna.samplers.RandomSampler),
        ("grid", optuna.samplers.GridSampler),
        ("cmaes", optuna.samplers.CmaEsSampler),
        ("qmc", optuna.samplers.QMCSampler),
        ("nsga2", optuna.samplers.NSGAIISampler),
        ("nsga3", optuna.samplers.NSGAIIISampler),
    ],
)
@pytest.mark.filterwarnings("ignore::optuna.exceptions.ExperimentalWarning")
def test_make_sampler(name: str, cls: type) -> None:
    assert isinstance(make_sampler(SweepSettings(sampler=name), SPACE), cls)


def test_nsga_population_follows_n_trials_and_options() -> None:
    sampler = make_sampler(SweepSettings(sampler="nsga2", n_trials=40), SPACE)
    assert sampler._population_size == 10  # a few generations in a short sweep
    assert make_sampler(SweepSettings(sampler="nsga2", n_trials=12), SPACE)._population_size == 6
    assert make_sampler(SweepSettings(sampler="nsga2", n_trials=400), SPACE)._population_size == 50
    tuned = SweepSettings(sampler="nsga2", sampler_options={"population_size": 6})
    assert make_sampler(tuned, SPACE)._population_size == 6


@pytest.mark.parametrize(
    ("options", "fragment"),
    [
        ({"populations": 6}, "do not fit nsga2"),
        ({"population_size": 1}, "do not fit nsga2"),  # refused by the constructor
        ({"seed": 3}, "set sweep.seed"),
    ],
)
def test_bad_sampler_options_are_user_errors(options: dict, fragment: str) -> None:
    with pytest.raises(UserError, match=fragment) as exc:
        make_sampler(SweepSettings(sampler="nsga2", sampler_options=options), SPACE)
    assert "\n" not in str(exc.value)


def test_unknown_sampler_options_are_refused_before_anything_opens(tiny_spec, store_runs) -> None:
    spec = tiny_spec(settings={"sampler": "random", "sampler_options": {"nope": 1}})
    with pytest.raises(UserError, match="do not fit random"):
        run_sweep(spec)
    assert store_runs() == []
    assert not Path(spec.settings.storage.removeprefix("sqlite:///")).exists()


def test_grid_sampler_walks_the_whole_grid() -> None:
    sampler = make_sampler(SweepSettings(sampler="grid"), SPACE)
    study = optuna.create_study(sampler=sampler)
    study.optimize(lambda t: float(sum(suggest(t, d) for d in SPACE)), n_trials=10)
    seen = sorted(tuple(t.params.values()) for t in study.trials)
    assert seen == [(0.1, 8), (0.1, 16), (0.3, 8), (0.3, 16)]  # then the study stopped


def test_gp_sampler_without_torch_is_a_user_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "torch", None)  # as if not installed: import fails
    with pytest.raises(UserError, match=r"sweep\.sampler=gp needs PyTorch"):
        make_sampler(SweepSettings(sampler="gp"), SPACE)


@pytest.mark.skipif(importlib.util.find_spec("torch") is None, reason="torch is not installed")
def test_gp_sampler_with_torch() -> None:
    assert isinstance(make_sampler(SweepSettings(sampler="gp"), SPACE), optuna.samplers.GPSampler)


def test_make_pruner() -> None:
    median = make_pruner(SweepSettings(pruner="median"))
    assert isinstance(median, optuna.pruners.MedianPruner)
    assert median._n_startup_trials == 3
    tuned = make_pruner(SweepSettings(pruner="median", pruner_options={"n_startup_trials": 0}))
    assert tuned._n_startup_trials == 0
    assert isinstance(make_pruner(SweepSettings(pruner="none")), optuna.pruners.NopPruner)
    assert isinstance(
        make_pruner(SweepSettings(pruner="hyperband")), optuna.pruners.HyperbandPruner
    )
    assert isinstance(
        make_pruner(SweepSettings(pruner="successive_halving")),
        optuna.pruners.SuccessiveHalvingPruner,
    )
    with pytest.raises(UserError, match="pruner_options"):
        make_pruner(SweepSettings(pruner="median", pruner_options={"patience": 3}))


def test_suggest_follows_the_dimension() -> None:
    dims = [
        Dimension("c", "categorical", choices=("adam", "sgd")),
        Dimension("i", "int", low=8, high=64, step=8),
        Dimension("l", "int", low=1, high=100, log=True),
        Dimension("f", "float", low=0.1, high=0.4, step=0.1),
        Dimension("g", "float", low=1e-5, high=1e-2, log=True),
    ]
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    for _ in range(20):
        trial = study.ask()
        values = {d.key: suggest(trial, d) for d in dims}
        assert values["c"] in ("adam", "sgd")
        assert values["i"] in range(8, 65, 8)
        assert isinstance(values["l"], int) and 1 <= values["l"] <= 100
        assert min(abs(values["f"] - v) for v in (0.1, 0.2, 0.3, 0.4)) < 1e-9
        assert 1e-5 <= values["g"] <= 1e-2
        study.tell(trial, 0.0)
    distributions = study.trials[0].distributions
    assert distributions["g"].log and distributions["l"].log
    assert distributions["i"].step == 8


# --- storage and study ---------------------------------------------------------------------------


@pytest.fixture
def tiny_spec(tmp_path: Path, write_sweep):
    def make(*overrides: str, settings: dict | None = None, space: dict | None = None):
        path = write_sweep(
            tmp_path / "spec",
            space or {"head.dropout": "choice(0.0, 0.2)"},
            {"study_name": "tiny", "pruner": "none", "n_trials": 2, **(settings or {})},
        )
        return load_sweep(str(path), overrides)

    return make


@pytest.mark.parametrize(
    "url",
    [
        "postgresql://user:s3cret@127.0.0.1:9/optuna",
        "sqlite:////dev/null/inside/optuna.db",
        "nosuchdb://host/optuna",
    ],
)
def test_unusable_storage_is_a_user_error_and_creates_nothing(
    tiny_spec, store_runs, tmp_path: Path, url: str
) -> None:
    spec = tiny_spec(f"sweep.storage={url}")
    with pytest.raises(UserError) as exc:
        run_sweep(spec)
    message = str(exc.value)
    assert message.startswith("cannot open sweep.storage")
    assert "s3cret" not in message and "\n" not in message
    assert store_runs() == []
    assert not (tmp_path / "mlruns" / "mlflow.db").exists()
    assert not (tmp_path / "mlruns" / "optuna.db").exists()


def test_unreadable_data_is_refused_before_any_study_or_run(
    tiny_spec, store_runs, tmp_path: Path
) -> None:
    spec = tiny_spec("data=folder", f"data.path={tmp_path / 'no_photos'}")
    with pytest.raises(UserError, match="no_photos: no such directory"):
        run_sweep(spec)
    assert store_runs() == []
    assert not (tmp_path / "mlruns" / "optuna.db").exists()


def test_a_file_that_is_not_weights_is_refused_before_any_study_or_run(
    tiny_spec, store_runs, tmp_path: Path
) -> None:
    """Before: the sweep started, and every trial failed loading it."""
    notes = tmp_path / "resnet50_notop.weights.h5"
    notes.write_text("these are notes, not weights")
    with pytest.raises(UserError) as exc:
        run_sweep(tiny_spec(f"backbone.weights={notes}"))
    assert f"backbone.weights={notes}" in str(exc.value) and "\n" not in str(exc.value)
    assert store_runs() == []
    assert not (tmp_path / "spec" / "optuna.db").exists()


def test_trials_share_the_preloaded_data_unless_they_search_it(
    tiny_spec, monkeypatch: pytest.MonkeyPatch
) -> None:
    loads: list[tuple[str, int]] = []

    def load_run_data(cfg) -> object:
        loads.append((cfg.data.name, cfg.backbone.input_size))
        return object()

    monkeypatch.setattr(_objective, "load_run_data", load_run_data)
    spec = tiny_spec()
    base = _objective.trial_configs(spec).load()
    memo = _run.preload_data(spec, base)
    memo.load(copy.deepcopy(base))  # an equal config: no load
    memo.load(_objective.trial_configs(spec).load(["head.dense_units=7"]))  # nor a new head
    assert loads == [("digits", base.backbone.input_size)]
    memo.load(_objective.trial_configs(spec).load(["backbone.input_size=64"]))
    assert len(loads) == 2
    searching = tiny_spec(space={"backbone.input_size": "choice(32, 48)"})
    _run.preload_data(searching, base)
    assert len(loads) == 2, "a searched input size: each trial loads its own"


def test_default_storage_is_mlruns_optuna_db(tmp_path: Path) -> None:
    assert storage_url(SweepSettings()) == f"sqlite:///{tmp_path / 'mlruns' / 'optuna.db'}"


def test_direction_mismatch_is_refused(tiny_spec, store_runs) -> None:
    spec = tiny_spec()
    storage = open_storage(storage_url(spec.settings))
    study = open_study(spec, storage)
    assert study.direction == optuna.study.StudyDirection.MAXIMIZE
    other = with_settings(spec, direction="minimize")
    with pytest.raises(UserError, match="direction") as exc:
        open_study(other, storage)
    assert "maximize" in str(exc.value)
    with pytest.raises(UserError, match="direction"):
        run_sweep(other)
    with pytest.raises(UserError, match="direction"):  # val_loss: minimize by default
        run_sweep(tiny_spec("sweep.metric=val_loss"))
    assert store_runs() == []
    assert open_study(spec, storage).direction == optuna.study.StudyDirection.MAXIMIZE


def test_load_study_lists_known_names(tiny_spec) -> None:
    spec = tiny_spec()
    open_study(spec, open_storage(storage_url(spec.settings)))
    with pytest.raises(UserError) as exc:
        sweep.load_study("nope", spec.settings.storage)
    assert "known: tiny" in str(exc.value)
    assert sweep.study_names(spec.settings.storage) == ["tiny"]


# --- the sweep loop, without training (a stand-in objective) -------------------------------------


class StandInObjective:
    """Replaces `_Objective`: samples like it, returns the dropout, raises on cue."""

    calls: list[dict] = []
    interrupt_at: int | None = None
    fail_at: int | None = None

    def __init__(self, spec, *session_parts) -> None:
        self.spec = spec
        self.outage = None  # as the real one's: never met here

    def __call__(self, trial: optuna.Trial) -> float:
        params = {d.key: suggest(trial, d) for d in self.spec.space}
        type(self).calls.append(params)
        if len(self.calls) == self.interrupt_at:
            raise KeyboardInterrupt
        if len(self.calls) == self.fail_at:
            raise ValueError("stand-in failure")
        return float(params["head.dropout"])


@pytest.fixture
def stand_in(monkeypatch: pytest.MonkeyPatch) -> type[StandInObjective]:
    monkeypatch.setattr(StandInObjective, "calls", [])
    monkeypatch.setattr(_run, "Objective", StandInObjective)
    monkeypatch.setattr(_run, "prepare", lambda *args, **kwargs: None)  # no model to check
    return StandInObjective


def mlflow_client() -> mlflow.MlflowClient:
    import os

    return mlflow.MlflowClient(tracking_uri=os.environ["MLFLOW_TRACKING_URI"])


def test_interrupted_sweep_resumes_to_n_trials(tiny_spec, stand_in, monkeypatch) -> None:
    spec = tiny_spec(
        settings={"sampler": "random", "n_trials": 3},
        space={"head.dropout": "choice(0.0, 0.1, 0.2, 0.3)"},
    )
    monkeypatch.setattr(stand_in, "interrupt_at", 2)
    with pytest.raises(KeyboardInterrupt):
        run_sweep(spec)
    study = sweep.load_study("tiny", spec.settings.storage)
    assert [t.state for t in study.trials] == [TrialState.COMPLETE, TrialState.FAIL]
    parent = sweep.parent_run_id(study)
    assert mlflow_client().get_run(parent).info.status == "KILLED"

    summary = run_sweep(spec)
    study = sweep.load_study("tiny", spec.settings.storage)
    states = [t.state for t in study.trials]
    assert states == [
        TrialState.COMPLETE,
        TrialState.FAIL,
        TrialState.COMPLETE,
        TrialState.COMPLETE,
    ]
    assert summary.parent_run_id == parent
    assert mlflow_client().get_run(parent).info.status == "FINISHED"
    assert len(stand_in.calls) == 4
    again = run_sweep(spec)  # nothing left to do
    assert len(stand_in.calls) == 4 and again.parent_run_id == parent


def test_interrupted_grid_sweep_completes_the_grid(tiny_spec, stand_in, monkeypatch) -> None:
    spec = tiny_spec(
        settings={"sampler": "grid", "n_trials": 3},
        space={"head.dropout": "choice(0.1, 0.2, 0.3)"},
    )
    monkeypatch.setattr(stand_in, "interrupt_at", 2)
    with pytest.raises(KeyboardInterrupt):
        run_sweep(spec)
    run_sweep(spec)
    study = sweep.load_study("tiny", spec.settings.storage)
    finished = [t for t in study.trials if t.state == TrialState.COMPLETE]
    assert len(finished) == 3  # the interrupted grid point ran again
    assert sorted(t.params["head.dropout"] for t in finished) == [0.1, 0.2, 0.3]


def test_summaries_close_their_figures(tiny_spec, stand_in) -> None:
    import matplotlib.pyplot as plt

    open_before = set(plt.get_fignums())
    spec = tiny_spec(settings={"sampler": "random", "n_trials": 3})
    run_sweep(spec)
    run_sweep(spec)
    assert set(plt.get_fignums()) == open_before
    parent = sweep.parent_run_id(sweep.load_study("tiny", spec.settings.storage))
    plots = {a.path for a in mlflow_client().list_artifacts(parent, "plots")}
    assert {"plots/optimization_history.png", "plots/slice.png"} <= plots


def test_a_study_is_one_experiment(tiny_spec, stand_in) -> None:
    """Resuming with more trials, or another cache or tracking place, continues the study;
    another search space or base is refused before anything runs, pointing at a new study."""
    run_sweep(tiny_spec(settings={"sampler": "random"}))
    run_sweep(
        tiny_spec("sweep.n_trials=3", "cache.dir=/tmp/elsewhere", settings={"sampler": "random"})
    )
    study = sweep.load_study("tiny", tiny_spec().settings.storage)
    assert len(study.trials) == 3
    parent = mlflow_client().get_run(sweep.parent_run_id(study))
    refused = {
        "head.dropout=choice(0.0, 0.2, 0.4)": "search space head.dropout=choice(0.0, 0.2), "
        "this sweep has choice(0.0, 0.2, 0.4)",
        "head.dense_units=8": "base head.dense_units=64, this sweep has 8",
    }
    for override, difference in refused.items():
        with pytest.raises(UserError) as exc:
            run_sweep(tiny_spec(override, "sweep.n_trials=5", settings={"sampler": "random"}))
        message = str(exc.value)
        assert f"study tiny was started with {difference}" in message, message
        assert "sweep.study_name=tiny-2" in message and "\n" not in message
    study = sweep.load_study("tiny", tiny_spec().settings.storage)
    assert len(study.trials) == 3  # untouched
    after = mlflow_client().get_run(parent.info.run_id)
    assert after.info.status == "FINISHED" and after.info.end_time == parent.info.end_time


def test_failed_trial_does_not_stop_the_sweep(tiny_spec, stand_in, monkeypatch) -> None:
    spec = tiny_spec(settings={"sampler": "random", "n_trials": 3})
    monkeypatch.setattr(stand_in, "fail_at", 1)
    summary = run_sweep(spec)
    study = sweep.load_study("tiny", spec.settings.storage)
    assert [t.state for t in study.trials][:2] == [TrialState.FAIL, TrialState.COMPLETE]
    assert summary.leaderboard["state"].tolist()[-1] == "FAIL"
    assert mlflow_client().get_run(summary.parent_run_id).info.status == "FINISHED"


# --- real sweeps (train tiny models) -------------------------------------------------------------


@dataclass
class Swept:
    uri: str
    storage: str
    first: SweepSummary
    second: SweepSummary
    before: list[tuple]  # (number, params, run id, start) of each trial after the first run

    @property
    def client(self) -> mlflow.MlflowClient:
        return mlflow.MlflowClient(tracking_uri=self.uri)

    def study(self, name: str = "tiny") -> optuna.Study:
        return sweep.load_study(name, self.storage)


def _trial_facts(study: optuna.Study) -> list[tuple]:
    return [
        (t.number, t.params, t.user_attrs.get(RUN_ID_ATTR), t.datetime_start) for t in study.trials
    ]


@pytest.fixture(scope="module")
def swept(tmp_path_factory, write_sweep) -> Swept:
    """A grid of three dropouts: two trials, then resumed to three."""
    folder = tmp_path_factory.mktemp("swept")
    path = write_sweep(
        folder,
        {"head.dropout": "choice(0.0, 0.25, 0.5)"},
        {"study_name": "tiny", "sampler": "grid", "pruner": "none", "n_trials": 2},
    )
    uri = f"sqlite:///{folder / 'mlruns' / 'mlflow.db'}"
    storage = f"sqlite:///{folder / 'optuna.db'}"
    real_record = tracking.run_record

    def tampered_record(run_id: str) -> dict:
        """What a tampered store would hand back: a config that is not even YAML. The
        champion is built from the config the sweep composed, so nothing reads it."""
        return {**real_record(run_id), "config_yaml": "backbone: {_target_: [tampered"}

    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(folder)
        mp.setenv("MLFLOW_TRACKING_URI", uri)
        mp.setattr(tracking, "run_record", tampered_record)
        first = run_sweep(load_sweep(str(path)))
        before = _trial_facts(sweep.load_study("tiny", storage))
        second = run_sweep(load_sweep(str(path), ["sweep.n_trials=3"]))
    return Swept(uri, storage, first, second, before)


@pytest.mark.slow
def test_resume_continues_the_same_study(swept: Swept) -> None:
    assert [number for number, *_ in swept.before] == [0, 1]
    study = swept.study()
    assert len(study.trials) == 3  # exactly n_trials, none repeated
    assert _trial_facts(study)[:2] == swept.before
    assert sorted(t.params["head.dropout"] for t in study.trials) == [0.0, 0.25, 0.5]
    assert swept.second.parent_run_id == swept.first.parent_run_id
    assert len(swept.first.leaderboard) == 2 and len(swept.second.leaderboard) == 3


@pytest.mark.slow
def test_study_and_runs_agree_one_to_one(swept: Swept) -> None:
    study, client = swept.study(), swept.client
    parent_id = swept.second.parent_run_id
    parent = client.get_run(parent_id)
    assert parent.info.status == "FINISHED"
    assert parent.data.tags["tlsweep.role"] == "sweep"
    assert parent.data.metrics["trials_complete"] == 3
    runs = client.search_runs([parent.info.experiment_id])
    children = {r.info.run_id: r for r in runs if r.info.run_id != parent_id}
    assert all(r.data.tags.get("mlflow.parentRunId") == parent_id for r in children.values())
    assert not [r for r in runs if r.info.status == "RUNNING"]
    trial_runs = {t.user_attrs[RUN_ID_ATTR]: t for t in study.trials}
    assert set(trial_runs) == set(children)  # one child per trial, no strays
    for run_id, trial in trial_runs.items():
        run = children[run_id]
        assert trial.state == TrialState.COMPLETE
        assert run.info.status == "FINISHED"
        assert run.data.tags["tlsweep.trial_number"] == str(trial.number)
        assert run.data.tags["tlsweep.trial_state"] == "COMPLETE"
        assert float(run.data.params["head.dropout"]) == trial.params["head.dropout"]
        history = client.get_metric_history(run_id, "val_accuracy")
        assert [m.step for m in history] == [1, 2]
        assert trial.value == pytest.approx(max(m.value for m in history))
        assert run.data.metrics["best_val_accuracy"] == pytest.approx(trial.value)


@pytest.mark.slow
def test_parent_holds_leaderboard_and_plots(swept: Swept) -> None:
    client, parent_id = swept.client, swept.second.parent_run_id
    top = {a.path for a in client.list_artifacts(parent_id)}
    assert {"leaderboard.csv", "leaderboard.html", "leaderboard.md", "plots"} <= top
    plots = {a.path for a in client.list_artifacts(parent_id, "plots")}
    assert "plots/optimization_history.png" in plots
    local = Path(client.download_artifacts(parent_id, "leaderboard.csv", str(Path.cwd())))
    board = pd.read_csv(local)
    assert sorted(board["trial"]) == [0, 1, 2]
    assert set(board["run_id"]) == {t.user_attrs[RUN_ID_ATTR] for t in swept.study().trials}
    assert board["value"].is_monotonic_decreasing
    markdown = Path(client.download_artifacts(parent_id, "leaderboard.md", str(Path.cwd())))
    assert all(run_id in markdown.read_text() for run_id in board["run_id"])
    assert swept.second.leaderboard["trial"].tolist() == board["trial"].tolist()


@pytest.mark.slow
def test_runs_carry_descriptions_the_ui_shows(swept: Swept) -> None:
    """``mlflow.note.content``: the sweep (objective, space, best so far) on the parent, the
    sampled values on each trial."""
    client, study = swept.client, swept.study()
    parent = client.get_run(swept.second.parent_run_id).data.tags["mlflow.note.content"]
    assert parent.startswith("Sweep `") and "val_accuracy (maximize)" in parent
    assert "- `head.dropout`:" in parent
    best = study.best_trial
    assert f"Best so far: trial {best.number}, val_accuracy {best.value:.4f}" in parent
    for trial in study.trials:
        note = client.get_run(trial.user_attrs[RUN_ID_ATTR]).data.tags["mlflow.note.content"]
        assert note.startswith(f"Trial {trial.number} of sweep")
        assert f"`head.dropout={trial.params['head.dropout']}`" in note


@pytest.mark.slow
def test_best_so_far_trials_keep_their_head_and_the_champion_its_model(swept: Swept) -> None:
    """A trial that beat every earlier one stores its head's weights; only the best trial
    gets the full model, assembled at the end of the sweep."""
    client = swept.client
    study = swept.study()
    best_run = study.best_trial.user_attrs[RUN_ID_ATTR]
    best_so_far = None
    for trial in sorted(study.trials, key=lambda t: t.number):
        run_id = trial.user_attrs[RUN_ID_ATTR]
        improved = best_so_far is None or trial.value > best_so_far
        heads = [f.path for f in client.list_artifacts(run_id, "head")]
        assert (heads == ["head/head.weights.h5"]) == improved, trial.number
        tags = client.get_run(run_id).data.tags
        assert ("tlsweep.model_uri" in tags) == (run_id == best_run), trial.number
        best_so_far = trial.value if improved else best_so_far


@pytest.mark.slow
def test_champion_is_the_best_trial_and_predicts(swept: Swept) -> None:
    study = swept.study()
    best_run = study.best_trial.user_attrs[RUN_ID_ATTR]
    assert swept.second.best_run_id == best_run
    assert swept.second.best_value == study.best_value
    assert swept.second.champion_uri == "models:/tiny@champion"
    version = swept.client.get_model_version_by_alias("tiny", "champion")
    assert version.run_id == best_run
    best = study.best_trial  # the registry's own description and tags say what it is
    assert version.description.startswith(f"Best trial ({best.number}) of sweep tiny:")
    assert version.tags["study"] == "tiny" and version.tags["trial"] == str(best.number)
    assert float(version.tags["val_accuracy"]) == pytest.approx(best.value)
    best_params = swept.client.get_run(best_run).data.params
    assert version.tags["data_fingerprint"] == best_params["data.fingerprint"]
    parent_tags = swept.client.get_run(swept.second.parent_run_id).data.tags
    assert parent_tags["best.run_id"] == best_run
    mlflow.set_tracking_uri(swept.uri)
    model = mlflow.pyfunc.load_model("models:/tiny@champion")
    images = np.random.default_rng(0).uniform(0, 255, (4, 32, 32, 3)).astype("float32")
    probabilities = np.asarray(model.predict(images))
    assert probabilities.shape == (4, 3)
    np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, atol=1e-5)
    assert model.metadata.metadata["class_names"] == ["0", "1", "2"]


class AlwaysPrune(optuna.pruners.BasePruner):
    def prune(self, study: optuna.Study, trial: optuna.trial.FrozenTrial) -> bool:
        return True


@pytest.fixture(scope="module")
def faulty(tmp_path_factory, write_sweep) -> Swept:
    """Trial 0 has an invalid dropout (fails inside the trial); the sweep replaces it with
    trial 1, pruned at epoch 1, which completes the single trial asked for."""
    folder = tmp_path_factory.mktemp("faulty")
    path = write_sweep(
        folder,
        {"head.dropout": "choice(0.2, 1.5)"},
        {"study_name": "faulty", "sampler": "random", "n_trials": 1},
    )
    uri = f"sqlite:///{folder / 'mlruns' / 'mlflow.db'}"
    storage = f"sqlite:///{folder / 'optuna.db'}"
    queued = optuna.create_study(study_name="faulty", storage=storage, direction="maximize")
    queued.enqueue_trial({"head.dropout": 1.5})
    queued.enqueue_trial({"head.dropout": 0.2})
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(folder)
        mp.setenv("MLFLOW_TRACKING_URI", uri)
        mp.setattr(_samplers, "make_pruner", lambda settings: AlwaysPrune())
        summary = run_sweep(load_sweep(str(path)))
    return Swept(uri, storage, summary, summary, [])


@pytest.mark.slow
def test_failing_trial_is_recorded_and_the_sweep_goes_on(faulty: Swept) -> None:
    failed, pruned = faulty.study("faulty").trials
    assert failed.state == TrialState.FAIL
    assert failed.params == {"head.dropout": 1.5}
    assert "head.dropout=1.5" in failed.user_attrs[FAIL_REASON_ATTR]
    run = faulty.client.get_run(failed.user_attrs[RUN_ID_ATTR])
    assert run.info.status == "FAILED"
    assert run.data.tags["tlsweep.trial_state"] == "FAIL"
    assert "head.dropout=1.5" in run.data.tags["error"]
    assert pruned.state == TrialState.PRUNED  # the next trial ran
    board = faulty.first.leaderboard
    assert board["state"].tolist() == ["PRUNED", "FAIL"]
    assert "head.dropout=1.5" in board["reason"].iloc[1]


@pytest.mark.slow
def test_pruned_trial_keeps_its_run_and_metrics(faulty: Swept) -> None:
    pruned = faulty.study("faulty").trials[1]
    assert pruned.state == TrialState.PRUNED
    assert list(pruned.intermediate_values) == [1]  # stopped after epoch 1 of 2
    run = faulty.client.get_run(pruned.user_attrs[RUN_ID_ATTR])
    assert run.info.status == "FINISHED"
    assert run.data.tags["tlsweep.trial_state"] == "PRUNED"
    assert run.data.tags["tlsweep.trial_number"] == "1"
    assert "tlsweep.model_uri" not in run.data.tags  # no full model for a pruned trial
    history = faulty.client.get_metric_history(run.info.run_id, "val_accuracy")
    assert [m.step for m in history] == [1]
    assert history[0].value == pytest.approx(pruned.intermediate_values[1])
    assert run.data.metrics["epochs_run"] == 1
    assert "test_accuracy" in run.data.metrics
    # No COMPLETE trial: nothing to crown.
    assert faulty.first.best_value is None and faulty.first.champion_uri is None
    parent = faulty.client.get_run(faulty.first.parent_run_id)
    assert parent.info.status == "FINISHED"
    assert parent.data.metrics["trials_pruned"] == 1
    assert parent.data.metrics["trials_fail"] == 1


def test_a_resumed_random_sweep_does_not_redraw_its_first_values(tiny_spec, stand_in) -> None:
    """Each session seeds its sampler with seed + session number: the same seed twice would
    make a resumed sweep (or a second worker) repeat the first session's draws."""
    run_sweep(
        tiny_spec(
            settings={"sampler": "random", "n_trials": 2},
            space={"head.dropout": "interval(0.0, 0.5)"},
        )
    )
    spec = tiny_spec(
        settings={"sampler": "random", "n_trials": 4}, space={"head.dropout": "interval(0.0, 0.5)"}
    )
    run_sweep(spec)
    values = [
        t.params["head.dropout"] for t in sweep.load_study("tiny", spec.settings.storage).trials
    ]
    assert len(values) == 4
    assert values[2:] != values[:2]
    assert len(set(values)) == 4


@pytest.mark.parametrize(("sampler", "seeds"), [("random", [0, 1, 2]), ("grid", [0, 0, 0])])
def test_each_session_builds_one_sampler_seeded_by_its_number(
    tiny_spec, stand_in, monkeypatch: pytest.MonkeyPatch, sampler: str, seeds: list[int]
) -> None:
    built: list[int | None] = []
    real = {"random": optuna.samplers.RandomSampler, "grid": _samplers.ResumableGridSampler}

    class Recording(real[sampler]):  # type: ignore[misc,valid-type]
        def __init__(self, *args, seed=None) -> None:
            built.append(seed)
            super().__init__(*args, seed=seed)

    if sampler == "random":
        monkeypatch.setattr(optuna.samplers, "RandomSampler", Recording)
    else:
        monkeypatch.setattr(_samplers, "ResumableGridSampler", Recording)
    space = {"head.dropout": "choice(0.0, 0.1, 0.2, 0.3)"}
    for n_trials in (1, 2, 3):  # three sessions: a sweep resumed twice
        run_sweep(tiny_spec(settings={"sampler": sampler, "n_trials": n_trials}, space=space))
    assert built == seeds  # one sampler per session, seed + session number (grid: seed)
    assert len(stand_in.calls) == 3


def test_pareto_ranks() -> None:
    points = [(1.0, 5.0), (2.0, 2.0), (5.0, 1.0), (3.0, 3.0), (2.0, 2.0), (6.0, 6.0), (4.0, 4.0)]
    assert pareto_ranks(points) == [1, 1, 1, 2, 1, 4, 3]
    assert pareto_ranks([]) == []


class MultiStandIn(StandInObjective):
    """Two objectives from the params: val_accuracy = dropout, params = dense units."""

    def __call__(self, trial: optuna.Trial) -> tuple[float, float]:
        params = {d.key: suggest(trial, d) for d in self.spec.space}
        type(self).calls.append(params)
        return float(params["head.dropout"]), float(params["head.dense_units"])


MULTI = {
    "objectives": {"val_accuracy": "maximize", "params": "minimize"},
    "sampler": "nsga2",
    "n_trials": 8,
}
MULTI_SPACE = {"head.dropout": "interval(0.0, 0.5)", "head.dense_units": "choice(8, 16, 32, 64)"}


def dominated(a: tuple[float, ...], b: tuple[float, ...], signs: tuple[int, ...]) -> bool:
    """Whether ``a`` is dominated by ``b`` (signs: +1 maximize, -1 minimize)."""
    better_or_equal = all(s * y >= s * x for x, y, s in zip(a, b, signs, strict=True))
    return better_or_equal and a != b


def test_a_multi_objective_sweep_summarises_its_front(
    tiny_spec, stand_in, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(_run, "Objective", MultiStandIn)
    spec = tiny_spec(settings=MULTI, space=MULTI_SPACE)
    summary = run_sweep(spec)
    study = sweep.load_study("tiny", spec.settings.storage)
    assert study.metric_names == ["val_accuracy", "params"]
    assert [t.state for t in study.trials] == [TrialState.COMPLETE] * 8
    front = summary.pareto_front
    assert front is not None
    assert sorted(front["trial"]) == sorted(t.number for t in study.best_trials)
    assert front["val_accuracy"].is_monotonic_decreasing  # best first on the first objective
    assert front["rank"].tolist() == list(range(1, len(front) + 1))
    assert summary.best_value == max(t.values[0] for t in study.trials)
    assert summary.champion_uri is None  # stand-in trials have no run, so no model

    board = summary.leaderboard
    assert {"val_accuracy", "params", "pareto_rank"} <= set(board.columns)
    assert "value" not in board.columns
    on_front = board[board["pareto_rank"] == 1]
    assert sorted(on_front["trial"]) == sorted(front["trial"])
    assert board["pareto_rank"].is_monotonic_increasing
    assert board.head(len(front))["trial"].tolist() == front["trial"].tolist()
    for _, row in board.iterrows():  # a rank-k trial is dominated by some rank-(k-1) trial
        if row["pareto_rank"] > 1:
            better = board[board["pareto_rank"] == row["pareto_rank"] - 1]
            point = (row["val_accuracy"], row["params"])
            assert any(
                dominated(point, (b["val_accuracy"], b["params"]), (1, -1))
                for _, b in better.iterrows()
            )

    client = mlflow_client()
    parent = summary.parent_run_id
    top = {a.path for a in client.list_artifacts(parent)}
    assert {"pareto.csv", "pareto.md", "leaderboard.csv"} <= top
    plots = {a.path for a in client.list_artifacts(parent, "plots")}
    assert {"plots/pareto_front.png", "plots/optimization_history.png"} <= plots
    run = client.get_run(parent)
    assert run.data.tags["sweep.objectives"] == str(MULTI["objectives"])
    assert run.data.metrics["pareto_front_size"] == len(front)
    assert run.data.metrics["best_value"] == summary.best_value


def test_a_multi_objective_study_keeps_its_objectives(tiny_spec) -> None:
    spec = tiny_spec(settings=MULTI, space=MULTI_SPACE)
    storage = open_storage(storage_url(spec.settings))
    study = open_study(spec, storage)
    assert [d.name for d in study.directions] == ["MAXIMIZE", "MINIMIZE"]
    other = with_settings(spec, objectives={"val_accuracy": "maximize", "latency_ms": "minimize"})
    with pytest.raises(UserError, match="exists with objectives") as exc:
        open_study(other, storage)
    assert "params" in str(exc.value) and "\n" not in str(exc.value)
    with pytest.raises(UserError, match="exists with objectives"):
        open_study(with_settings(spec, objectives=None), storage)  # one objective now
    assert open_study(spec, storage).metric_names == ["val_accuracy", "params"]


def test_registered_aliases_follow_the_front() -> None:
    """A run is registered once; aliases move; aliases of members that left the front go."""
    import keras

    from tlsweep import tracking

    tracking.connect()
    inputs = keras.Input((8, 8, 3), name="image")
    flat = keras.layers.Flatten()(inputs)
    model = keras.Model(inputs, keras.layers.Dense(3, activation="softmax")(flat))
    runs = []
    for i in range(4):
        with tracking.start_run("aliases", f"r{i}") as run_id:
            if i < 3:
                tracking.log_keras_model(run_id, model, ["a", "b", "c"])
            runs.append(run_id)
    client = mlflow_client()
    first = {"pareto-1": runs[0], "pareto-2": runs[1], "pareto-3": runs[2], "champion": runs[0]}
    uris = tracking.register_aliases("front", first, stale_prefix="pareto-")
    assert uris == {alias: f"models:/front@{alias}" for alias in first}
    assert len(client.search_model_versions("name = 'front'")) == 3
    second = {"pareto-1": runs[1], "pareto-2": runs[3], "champion": runs[1]}  # r3: no model
    uris = tracking.register_aliases("front", second, stale_prefix="pareto-")
    assert set(uris) == {"pareto-1", "champion"}
    aliases = client.get_registered_model("front").aliases
    assert set(aliases) == {"pareto-1", "champion"}
    assert client.get_model_version_by_alias("front", "pareto-1").run_id == runs[1]
    assert client.get_model_version_by_alias("front", "champion").run_id == runs[1]
    assert len(client.search_model_versions("name = 'front'")) == 3  # no new version


def test_measure_costs_reports_the_requested_costs(tiny_spec) -> None:
    import keras

    from tlsweep.sweep._objective import measure_costs

    inputs = keras.Input((4, 4, 3))
    model = keras.Model(inputs, keras.layers.Dense(2)(keras.layers.Flatten()(inputs)))
    both = tiny_spec(
        settings={**MULTI, "objectives": ["val_accuracy", "latency_ms", "params"]},
        space=MULTI_SPACE,
    )
    both = with_settings(both, latency_warmup=1, latency_repeats=2)
    costs = measure_costs(model, both)
    assert costs["params"] == 4 * 4 * 3 * 2 + 2 and costs["latency_ms"] > 0
    assert measure_costs(model, tiny_spec()) == {}


# --- a real multi-objective sweep (trains tiny models) ----------------------------------------


@dataclass
class ParetoSwept:
    uri: str
    storage: str
    first: SweepSummary
    second: SweepSummary
    runs_output: str

    @property
    def client(self) -> mlflow.MlflowClient:
        return mlflow.MlflowClient(tracking_uri=self.uri)

    def study(self) -> optuna.Study:
        return sweep.load_study("tiny_pareto", self.storage)


@pytest.fixture(scope="module")
def pareto_swept(tmp_path_factory, write_sweep) -> ParetoSwept:
    """Accuracy against latency: three trials, then resumed to four."""
    import contextlib
    import io

    from tlsweep.cli import main

    folder = tmp_path_factory.mktemp("pareto")
    path = write_sweep(
        folder,
        {"head.dense_units": "choice(8, 64)", "head.dropout": "choice(0.0, 0.5)"},
        {
            "study_name": "tiny_pareto",
            "objectives": {"val_accuracy": "maximize", "latency_ms": "minimize"},
            "sampler": "nsga2",
            "n_trials": 3,
            "latency_warmup": 2,
            "latency_repeats": 5,
        },
    )
    uri = f"sqlite:///{folder / 'mlruns' / 'mlflow.db'}"
    storage = f"sqlite:///{folder / 'optuna.db'}"
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(folder)
        mp.setenv("MLFLOW_TRACKING_URI", uri)
        first = run_sweep(load_sweep(str(path)))
        second = run_sweep(load_sweep(str(path), ["sweep.n_trials=4"]))
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            assert main(["runs", "tiny_pareto", "--storage", storage]) == 0
    return ParetoSwept(uri, storage, first, second, out.getvalue())


@pytest.mark.slow
def test_every_trial_logs_its_latency_and_keeps_its_head(pareto_swept: ParetoSwept) -> None:
    study, client = pareto_swept.study(), pareto_swept.client
    assert [t.state for t in study.trials] == [TrialState.COMPLETE] * 4
    for trial in study.trials:
        run_id = trial.user_attrs[RUN_ID_ATTR]
        run = client.get_run(run_id)
        assert len(trial.values) == 2
        assert run.data.metrics["latency_ms"] == pytest.approx(trial.values[1])
        assert trial.values[1] > 0
        assert run.data.metrics["best_val_accuracy"] == pytest.approx(trial.values[0])
        assert [m.step for m in client.get_metric_history(run_id, "val_accuracy")] == [1, 2]
        assert "head" in {a.path for a in client.list_artifacts(run_id)}  # any may be on the front


@pytest.mark.slow
def test_the_front_is_non_dominated_and_registered(pareto_swept: ParetoSwept) -> None:
    study, client = pareto_swept.study(), pareto_swept.client
    front = pareto_swept.second.pareto_front
    assert front is not None and len(front) >= 1
    members = {t.number: t for t in study.best_trials}
    assert sorted(front["trial"]) == sorted(members)
    for a in members.values():  # no member dominated by another, nor by any trial
        for b in study.trials:
            assert not dominated(tuple(a.values), tuple(b.values), (1, -1)), (a.number, b.number)
    for other in set(t.number for t in study.trials) - set(members):  # the rest is dominated
        point = tuple(study.trials[other].values)
        assert any(dominated(point, tuple(m.values), (1, -1)) for m in members.values())

    aliases = client.get_registered_model("tiny_pareto").aliases
    expected = {f"pareto-{k}" for k in front["rank"]} | {"champion"}
    assert set(aliases) == expected
    for _, row in front.iterrows():
        version = client.get_model_version_by_alias("tiny_pareto", f"pareto-{row['rank']}")
        assert version.run_id == row["run_id"]
        assert row["model"] == f"models:/tiny_pareto@pareto-{row['rank']}"
    champion = client.get_model_version_by_alias("tiny_pareto", "champion")
    best_accuracy = max(m.values[0] for m in members.values())
    champion_trial = next(
        m for m in members.values() if m.user_attrs[RUN_ID_ATTR] == champion.run_id
    )
    assert champion_trial.values[0] == best_accuracy
    assert pareto_swept.second.champion_uri == "models:/tiny_pareto@champion"
    assert pareto_swept.second.best_run_id == champion.run_id
    assert sweep.best_run_id("tiny_pareto", pareto_swept.storage) == champion.run_id
    runs = {v.run_id for v in client.search_model_versions("name = 'tiny_pareto'")}
    versions = client.search_model_versions("name = 'tiny_pareto'")
    assert len(versions) == len(runs)  # the resumed sweep registered no run twice

    mlflow.set_tracking_uri(pareto_swept.uri)
    images = np.random.default_rng(0).uniform(0, 255, (2, 32, 32, 3)).astype("float32")
    for alias in sorted(expected):
        model = mlflow.pyfunc.load_model(f"models:/tiny_pareto@{alias}")
        probabilities = np.asarray(model.predict(images))
        assert probabilities.shape == (2, 3)


@pytest.mark.slow
def test_the_parent_shows_the_front_and_runs_lists_every_objective(
    pareto_swept: ParetoSwept,
) -> None:
    client, parent = pareto_swept.client, pareto_swept.second.parent_run_id
    assert pareto_swept.first.parent_run_id == parent
    local = Path(client.download_artifacts(parent, "pareto.csv", str(Path.cwd())))
    table = pd.read_csv(local)
    assert table["trial"].tolist() == pareto_swept.second.pareto_front["trial"].tolist()
    assert {"val_accuracy", "latency_ms", "model", "champion"} <= set(table.columns)
    plots = {a.path for a in client.list_artifacts(parent, "plots")}
    assert "plots/pareto_front.png" in plots
    header = pareto_swept.runs_output.splitlines()[0].split()
    assert {"pareto_rank", "val_accuracy", "latency_ms"} <= set(header)
    assert len(pareto_swept.runs_output.strip().splitlines()) == 1 + 4


# --- enqueued configurations and the artifact folder ---------------------------------------------


def test_enqueued_configurations_run_first_and_are_queued_once(tiny_spec, stand_in) -> None:
    """The sweep file's known configurations are the first trials; opening the study again
    (a resumed sweep, another worker) queues none of them twice."""
    from dataclasses import replace

    known = ({"head.dropout": 0.3}, {"head.dropout": 0.2})

    def spec(n_trials: int):
        settings = {"sampler": "random", "n_trials": n_trials}
        space = {"head.dropout": "choice(0.0, 0.1, 0.2, 0.3)"}
        return replace(tiny_spec(settings=settings, space=space), enqueue=known)

    first = _run.open_session(spec(2), trains=False)
    _run.open_session(spec(2), trains=False)  # a second process opening the study
    waiting = first.study.get_trials(states=(TrialState.WAITING,))
    assert [t.system_attrs["fixed_params"] for t in waiting] == list(known)

    run_sweep(spec(2))
    assert stand_in.calls == list(known)
    run_sweep(spec(3))  # resumed: one sampled trial more, the known ones not queued again
    study = sweep.load_study("tiny", spec(3).settings.storage)
    assert [t.params["head.dropout"] for t in study.trials][:2] == [0.3, 0.2]
    assert len(study.trials) == 3 == len(stand_in.calls)
    assert not study.get_trials(states=(TrialState.WAITING,))


def test_the_study_records_its_artifact_folder(tiny_spec, tmp_path: Path) -> None:
    """Beside the study's file unless ``sweep.artifacts`` says otherwise; `tlsweep dashboard`
    reads it from the study."""
    session = _run.open_session(tiny_spec(), trains=False)
    folder = tmp_path / "spec" / "optuna-artifacts"  # beside spec/optuna.db
    assert session.study.user_attrs["tlsweep_artifacts"] == str(folder) and folder.is_dir()
    assert session.artifacts is not None and session.artifacts.path == folder
    chosen = tmp_path / "shared" / "artifacts"
    session = _run.open_session(tiny_spec(f"sweep.artifacts={chosen}"), trains=False)
    assert session.study.user_attrs["tlsweep_artifacts"] == str(chosen) and chosen.is_dir()
