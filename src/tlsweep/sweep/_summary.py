"""The end of a sweep: leaderboard, Optuna's plots, best trial and champion model."""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import optuna
import pandas as pd
from optuna.trial import TrialState

from tlsweep import report, tracking
from tlsweep.errors import UserError
from tlsweep.experiment import materialize_model
from tlsweep.sweep._common import FAIL_REASON_ATTR, PARENT_RUN_ATTR, RUN_ID_ATTR, count
from tlsweep.sweep._storage import load_study
from tlsweep.sweepspec import Dimension, SweepSpec


@dataclass(frozen=True)
class SweepSummary:
    """What a sweep invocation leaves behind."""

    study_name: str
    parent_run_id: str
    leaderboard: pd.DataFrame
    best_run_id: str | None
    best_value: float | None
    champion_uri: str | None


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
        state.name.lower(): count(study, (state,))
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
    champion = None
    if best_run and materialize_model(best_run):
        champion = tracking.register_champion(best_run, s.study_name)
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


def _test_metrics(row: Mapping[str, Any]) -> dict[str, float]:
    return {
        f"best_{k}": float(v)
        for k, v in row.items()
        if k.startswith("test_") and v is not None and pd.notna(v)
    }


def parent_tags(spec: SweepSpec, url: str) -> dict[str, str]:
    s = spec.settings
    tags = {f"sweep.{key}": str(value) for key, value in vars(s).items() if key != "storage"}
    tags["sweep.storage"] = tracking.redact(url)
    tags["sweep.base"] = " ".join(spec.base)
    for dim in spec.space:
        tags[f"space.{dim.key}"] = _describe(dim)
    return tags


def _describe(dim: Dimension) -> str:
    if dim.kind == "categorical":
        return f"choice{tuple(dim.choices)}"
    text = f"{dim.kind}[{dim.low}, {dim.high}]"
    return text + (f" step {dim.step}" if dim.step else "") + (" log" if dim.log else "")
