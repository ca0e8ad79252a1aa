"""Optuna drives the sweep: the only module that imports optuna.

One study per sweep (resumable: the same command continues it to ``n_trials`` finished
trials), one MLflow parent run per study, one child run per trial. Each trial reports the
monitored metric every epoch so the pruner can stop it, and returns its best epoch's value.
"""

from __future__ import annotations

import json
import time
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import keras
import optuna
import pandas as pd
from optuna.trial import TrialState

from tlsweep import report, tracking
from tlsweep.backbones import BackboneCache
from tlsweep.config import Config, DataConfig, load_config, to_yaml
from tlsweep.data import ImageData, load_data
from tlsweep.errors import UserError
from tlsweep.experiment import execute, prepare
from tlsweep.progress import SweepProgress
from tlsweep.sweepspec import Dimension, Scalar, SweepSettings, SweepSpec

PARENT_RUN_ATTR = "mlflow_parent_run_id"
RUN_ID_ATTR = "mlflow_run_id"
FAIL_REASON_ATTR = "fail_reason"
FINISHED_STATES = (TrialState.COMPLETE, TrialState.PRUNED)
ENDED_STATES = (*FINISHED_STATES, TrialState.FAIL)
DEFAULT_STORAGE = Path("mlruns") / "optuna.db"

optuna.logging.set_verbosity(optuna.logging.ERROR)  # trial outcomes are printed by progress


@dataclass(frozen=True)
class SweepSummary:
    """What a sweep invocation leaves behind."""

    study_name: str
    parent_run_id: str
    leaderboard: pd.DataFrame
    best_run_id: str | None
    best_value: float | None
    champion_uri: str | None


# --- storage, study, sampler, pruner ---------------------------------------------------------


def storage_url(settings: SweepSettings) -> str:
    """``sweep.storage``, or the SQLite file ``mlruns/optuna.db``."""
    return settings.storage or f"sqlite:///{DEFAULT_STORAGE.resolve()}"


def open_storage(url: str) -> optuna.storages.BaseStorage:
    """An Optuna storage for ``url``; unreachable or malformed URLs raise `UserError`."""
    try:
        if url.startswith("sqlite:///"):
            Path(url.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
        return optuna.storages.RDBStorage(url, heartbeat_interval=None)
    except Exception as exc:
        reason = " ".join(str(exc).split())[:200]
        raise UserError(f"cannot open sweep.storage {tracking.redact(url)}: {reason}") from None


def open_study(spec: SweepSpec, storage: optuna.storages.BaseStorage) -> optuna.Study:
    """Create the study, or load it to resume; the sampler and pruner are this session's."""
    s = spec.settings
    study = optuna.create_study(
        study_name=s.study_name,
        storage=storage,
        sampler=make_sampler(s, spec.space),
        pruner=make_pruner(s),
        direction=s.resolved_direction,
        load_if_exists=True,
    )
    existing = study.direction.name.lower()
    if existing != s.resolved_direction:
        raise UserError(
            f"study {s.study_name} exists with direction {existing}; sweep.direction="
            f"{s.resolved_direction} would corrupt it; use another sweep.study_name"
        )
    return study


def load_study(study_name: str, storage: str | None = None) -> optuna.Study:
    """An existing study, for the leaderboard and reproduce; unknown names list the known ones."""
    url = storage or storage_url(SweepSettings())
    store = open_storage(url)
    names = [s.study_name for s in optuna.get_all_study_summaries(store)]
    if study_name not in names:
        known = ", ".join(names) or "none yet"
        raise UserError(f"no sweep named '{study_name}' in {tracking.redact(url)}; known: {known}")
    return optuna.load_study(study_name=study_name, storage=store)


def study_names(storage: str | None = None) -> list[str]:
    store = open_storage(storage or storage_url(SweepSettings()))
    return [s.study_name for s in optuna.get_all_study_summaries(store)]


def make_sampler(
    settings: SweepSettings, space: tuple[Dimension, ...]
) -> optuna.samplers.BaseSampler:
    """The sampler named by ``sweep.sampler``, seeded by ``sweep.seed``."""
    seed = settings.seed
    name = settings.sampler
    if name == "tpe":
        return optuna.samplers.TPESampler(seed=seed, n_startup_trials=min(5, settings.n_trials))
    if name == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    if name == "grid":
        return _ResumableGridSampler({d.key: d.grid_values() for d in space}, seed=seed)
    if name == "cmaes":
        return optuna.samplers.CmaEsSampler(seed=seed, warn_independent_sampling=False)
    if name == "qmc":
        return optuna.samplers.QMCSampler(seed=seed, warn_independent_sampling=False)
    if name == "gp":
        try:
            import torch  # noqa: F401  (GPSampler's requirement)
        except ImportError:
            raise UserError("sweep.sampler=gp needs PyTorch: pip install torch") from None
        return optuna.samplers.GPSampler(seed=seed)
    raise UserError(f"sweep.sampler={name} is not allowed")


class _ResumableGridSampler(optuna.samplers.GridSampler):
    """Optuna's grid sampler, except that a grid point whose trial FAILED (an error, Ctrl-C) is
    still to do: resuming the sweep runs it again instead of leaving a hole in the grid (and
    stopping the study one trial short of ``n_trials``)."""

    def _get_unvisited_grid_ids(self, study: optuna.Study) -> list[int]:
        done, running = set(), set()
        for t in study._storage.get_all_trials(study._study_id, deepcopy=False):
            attrs = t.system_attrs
            if "grid_id" not in attrs or not self._same_search_space(attrs["search_space"]):
                continue
            if t.state in FINISHED_STATES:
                done.add(attrs["grid_id"])
            elif t.state == TrialState.RUNNING:
                running.add(attrs["grid_id"])
        every = set(range(self._n_min_trials))
        return sorted(every - done - running) or sorted(every - done)


def make_pruner(settings: SweepSettings) -> optuna.pruners.BasePruner:
    """The pruner named by ``sweep.pruner``; ``sweep.pruner_options`` go to its constructor."""
    options = dict(settings.pruner_options)
    factories: dict[str, Callable[..., optuna.pruners.BasePruner]] = {
        "median": lambda **kw: optuna.pruners.MedianPruner(
            **{"n_startup_trials": 3, "n_warmup_steps": 1, **kw}
        ),
        "hyperband": lambda **kw: optuna.pruners.HyperbandPruner(**{"min_resource": 1, **kw}),
        "successive_halving": lambda **kw: optuna.pruners.SuccessiveHalvingPruner(
            **{"min_resource": 1, **kw}
        ),
        "none": lambda **kw: optuna.pruners.NopPruner(),
    }
    try:
        return factories[settings.pruner](**options)
    except TypeError as exc:
        raise UserError(
            f"sweep.pruner_options={options} do not fit {settings.pruner}: {exc}"
        ) from None


def suggest(trial: optuna.Trial, dim: Dimension) -> Scalar:
    """Sample one dimension."""
    if dim.kind == "categorical":
        return trial.suggest_categorical(dim.key, list(dim.choices))
    if dim.kind == "int":
        step = int(dim.step or 1)
        return trial.suggest_int(dim.key, int(dim.low), int(dim.high), step=step, log=dim.log)
    return trial.suggest_float(dim.key, dim.low, dim.high, step=dim.step, log=dim.log)


# --- running ---------------------------------------------------------------------------------


def run_sweep(spec: SweepSpec, progress: SweepProgress | None = None) -> SweepSummary:
    """Run (or resume) the study to ``n_trials`` finished trials, then summarise it."""
    s = spec.settings
    base_cfg = load_config([*spec.base, f"train.early_stopping.monitor={s.metric}"])
    make_sampler(s, spec.space), make_pruner(s)  # refuse bad settings before touching storage
    storage = open_storage(storage_url(s))
    study = open_study(spec, storage)
    tracking.connect(base_cfg.tracking)
    parent = tracking.open_parent_run(
        s.study_name,
        run_id=study.user_attrs.get(PARENT_RUN_ATTR),
        tags=_parent_tags(spec),
    )
    study.set_user_attr(PARENT_RUN_ATTR, parent)
    progress = progress or SweepProgress(
        s.n_trials, s.metric, maximize=s.resolved_direction == "maximize"
    )
    with tracking.guard_run(parent, end=False):
        done = _count(study, FINISHED_STATES)
        progress.started(s.study_name, done=min(done, s.n_trials))
        _optimize_until_done(study, _Objective(spec, parent, progress), s)
        summary = summarize(study, spec, parent)
    tracking.finish_run(parent)
    progress.finished(summary.leaderboard, summary.best_value, summary.champion_uri)
    return summary


def _optimize_until_done(study: optuna.Study, objective: _Objective, s: SweepSettings) -> None:
    """Run trials until ``n_trials`` have finished (complete or pruned).

    Failed trials do not count, so they are replaced, up to ``max(3, n_trials)`` failures in
    one invocation; the loop also ends at the timeout, or when a round runs no trial at all
    (a grid sampler with every point done stops the study at once).
    """
    deadline = None if s.timeout is None else time.monotonic() + s.timeout
    max_failures = max(3, s.n_trials)
    failures = 0
    while (remaining := s.n_trials - _count(study, FINISHED_STATES)) > 0:
        left = None if deadline is None else deadline - time.monotonic()
        if failures >= max_failures or (left is not None and left <= 0):
            return
        ended_before = _count(study, ENDED_STATES)
        failed_before = _count(study, (TrialState.FAIL,))
        study.optimize(
            objective,
            n_trials=remaining,
            timeout=left,
            catch=(Exception,),
            callbacks=[optuna.study.MaxTrialsCallback(s.n_trials, states=FINISHED_STATES)],
            gc_after_trial=True,
        )
        if _count(study, ENDED_STATES) == ended_before:
            return
        failures += _count(study, (TrialState.FAIL,)) - failed_before


class _Objective:
    """Samples a trial's values, trains it as a child run, reports every epoch."""

    def __init__(self, spec: SweepSpec, parent_run_id: str, progress: SweepProgress) -> None:
        self.spec = spec
        self.parent_run_id = parent_run_id
        self.progress = progress
        self.data = _DataMemo()
        self.backbones = BackboneCache()

    def __call__(self, trial: optuna.Trial) -> float:
        params = {dim.key: suggest(trial, dim) for dim in self.spec.space}
        s = self.spec.settings
        reporter = _EpochReporter(trial, s.metric, s.resolved_direction)
        tags = {
            "tlsweep.study": s.study_name,
            "tlsweep.trial_number": str(trial.number),
            "tlsweep.trial_state": "RUNNING",
            "tlsweep.sampled_params": json.dumps(params),
        }
        self.progress.trial_started(trial.number, params)
        started = time.monotonic()
        run_id = None
        try:
            with tracking.start_run(
                s.study_name, f"trial-{trial.number}", parent_run_id=self.parent_run_id, tags=tags
            ) as run_id:
                trial.set_user_attr(RUN_ID_ATTR, run_id)
                cfg = load_config(
                    [*self.spec.trial_overrides(params), f"train.early_stopping.monitor={s.metric}"]
                )
                prepared = prepare(cfg, load=self.data.load, backbones=self.backbones)
                callbacks = [reporter, self.progress.epoch_callback(trial.number, cfg)]
                execute(
                    run_id,
                    cfg,
                    prepared,
                    callbacks,
                    log_model=lambda _: (
                        not reporter.stop_run and self._is_new_best(trial, reporter.best)
                    ),
                )
                state = "PRUNED" if reporter.stop_run else "COMPLETE"
                tracking.set_tags(run_id, {"tlsweep.trial_state": state})
        except BaseException as exc:  # Ctrl-C too: Optuna records it as FAIL, so must we
            interrupted = isinstance(exc, KeyboardInterrupt)
            reason = "interrupted (Ctrl-C)" if interrupted else f"{type(exc).__name__}: {exc}"
            trial.set_user_attr(FAIL_REASON_ATTR, reason[:2000])
            if run_id:
                tracking.set_tags(run_id, {"tlsweep.trial_state": "FAIL"})
            self.progress.trial_finished(
                trial.number, "FAIL", None, time.monotonic() - started, reason
            )
            raise
        self.progress.trial_finished(trial.number, state, reporter.best, time.monotonic() - started)
        if reporter.stop_run:
            raise optuna.TrialPruned(f"pruned after epoch {reporter.last_step}")
        return reporter.best

    @staticmethod
    def _is_new_best(trial: optuna.Trial, value: float) -> bool:
        """Only a trial that beats every completed one stores a full model."""
        completed = trial.study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
        if not completed:
            return True
        best = [t.value for t in completed if t.value is not None]
        if trial.study.direction == optuna.study.StudyDirection.MAXIMIZE:
            return value > max(best)
        return value < min(best)


class _EpochReporter(keras.callbacks.Callback):
    """Reports the metric to Optuna every epoch; asks the pruner; tracks the best epoch."""

    def __init__(self, trial: optuna.Trial, metric: str, direction: str) -> None:
        super().__init__()
        self.trial = trial
        self.metric = metric
        self.maximize = direction == "maximize"
        self.best = float("-inf") if self.maximize else float("inf")
        self.last_step = 0
        self.stop_run = False

    def on_epoch_end(self, epoch: int, logs: Mapping[str, Any] | None = None) -> None:
        value = float((logs or {})[self.metric])
        self.best = max(self.best, value) if self.maximize else min(self.best, value)
        self.last_step = epoch + 1
        self.trial.report(value, step=self.last_step)
        if self.trial.should_prune():
            self.stop_run = True
            self.model.stop_training = True


class _DataMemo:
    """Keeps the last loaded dataset: trials of one sweep usually share it."""

    def __init__(self) -> None:
        self._key: tuple[str, int] | None = None
        self._data: ImageData | None = None

    def load(self, cfg: DataConfig, input_size: int) -> ImageData:
        key = (to_yaml(Config(data=cfg)), input_size)
        if key != self._key or self._data is None:
            self._data = load_data(cfg, input_size)
            self._key = key
        return self._data


# --- summarising -----------------------------------------------------------------------------


def summarize(study: optuna.Study, spec: SweepSpec, parent_run_id: str) -> SweepSummary:
    """Leaderboard, plots, best trial and the registered champion, all on the parent run."""
    s = spec.settings
    board = leaderboard(study, parent_run_id)
    tracking.log_leaderboard(parent_run_id, board, s.metric)
    figures = optuna_figures(study)
    try:
        tracking.log_figures(parent_run_id, figures)
    finally:  # pyplot keeps every figure open until closed: one leak per summary otherwise
        import matplotlib.pyplot as plt

        for figure in figures.values():
            plt.close(figure)
    counts = {
        state.name.lower(): _count(study, (state,))
        for state in (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL)
    }
    tracking.log_parent_metrics(parent_run_id, {f"trials_{k}": v for k, v in counts.items()})
    best = _best_trial(study)
    if best is None:
        return SweepSummary(s.study_name, parent_run_id, board, None, None, None)
    best_run = best.user_attrs.get(RUN_ID_ATTR)
    row = board[board["trial"] == best.number].iloc[0].to_dict()
    tracking.record_best(
        parent_run_id,
        best.number,
        best_run,
        best.params,
        {"best_value": best.value, **_test_metrics(row)},
    )
    champion = tracking.register_champion(best_run, s.study_name) if best_run else None
    return SweepSummary(s.study_name, parent_run_id, board, best_run, best.value, champion)


def leaderboard(study: optuna.Study, parent_run_id: str | None = None) -> pd.DataFrame:
    """All trials, best first, joined with their runs' final metrics."""
    rows = []
    for t in study.get_trials(deepcopy=False):
        value = t.value if t.state == TrialState.COMPLETE else _best_intermediate(t, study)
        rows.append(
            {
                "trial": t.number,
                "state": t.state.name,
                "value": value,
                **t.params,
                "duration_s": t.duration.total_seconds() if t.duration else None,
                "run_id": t.user_attrs.get(RUN_ID_ATTR),
                "reason": t.user_attrs.get(FAIL_REASON_ATTR),
            }
        )
    trials = pd.DataFrame(rows)
    runs = tracking.child_runs_frame(parent_run_id) if parent_run_id else None
    maximize = study.direction == optuna.study.StudyDirection.MAXIMIZE
    return report.leaderboard(trials, runs, maximize=maximize)


def optuna_figures(study: optuna.Study) -> dict[str, Any]:
    """Optuna's matplotlib plots; those that cannot be drawn yet (too few trials) are left out."""
    from optuna.visualization import matplotlib as ovm

    plots = {
        "optimization_history": ovm.plot_optimization_history,
        "param_importances": ovm.plot_param_importances,
        "parallel_coordinate": ovm.plot_parallel_coordinate,
        "slice": ovm.plot_slice,
        "intermediate_values": ovm.plot_intermediate_values,
    }
    figures = {}
    verbosity = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(optuna.logging.ERROR)  # "no completed trials yet" and such
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for name, plot in plots.items():
            try:
                axes = plot(study)
            except (ValueError, RuntimeError, ZeroDivisionError):
                continue
            first = axes.flat[0] if hasattr(axes, "flat") else axes
            figures[name] = first.figure
    optuna.logging.set_verbosity(verbosity)
    return figures


def best_run_id(study_name: str, storage: str | None = None) -> str:
    """The MLflow run of a study's best trial (for ``tlsweep reproduce --best``)."""
    study = load_study(study_name, storage)
    best = _best_trial(study)
    if best is None or RUN_ID_ATTR not in best.user_attrs:
        raise UserError(f"sweep {study_name} has no completed trial yet")
    return best.user_attrs[RUN_ID_ATTR]


def parent_run_id(study: optuna.Study) -> str | None:
    return study.user_attrs.get(PARENT_RUN_ATTR)


def _best_trial(study: optuna.Study) -> optuna.trial.FrozenTrial | None:
    try:
        return study.best_trial
    except ValueError:
        return None


def _best_intermediate(trial: optuna.trial.FrozenTrial, study: optuna.Study) -> float | None:
    values = list(trial.intermediate_values.values())
    if not values:
        return None
    maximize = study.direction == optuna.study.StudyDirection.MAXIMIZE
    return max(values) if maximize else min(values)


def _count(study: optuna.Study, states: tuple[TrialState, ...]) -> int:
    return len(study.get_trials(deepcopy=False, states=states))


def _test_metrics(row: Mapping[str, Any]) -> dict[str, float]:
    return {
        f"best_{k}": float(v)
        for k, v in row.items()
        if k.startswith("test_") and v is not None and pd.notna(v)
    }


def _parent_tags(spec: SweepSpec) -> dict[str, str]:
    s = spec.settings
    tags = {f"sweep.{key}": str(value) for key, value in vars(s).items() if key != "storage"}
    tags["sweep.storage"] = tracking.redact(storage_url(s))
    tags["sweep.base"] = " ".join(spec.base)
    for dim in spec.space:
        tags[f"space.{dim.key}"] = _describe(dim)
    return tags


def _describe(dim: Dimension) -> str:
    if dim.kind == "categorical":
        return f"choice{tuple(dim.choices)}"
    text = f"{dim.kind}[{dim.low}, {dim.high}]"
    return text + (f" step {dim.step}" if dim.step else "") + (" log" if dim.log else "")
