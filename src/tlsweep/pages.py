"""Gather what the HTML pages show: a sweep's report and two runs side by side.

The data comes from the record (``tracking``: runs, metric histories, evaluation artifacts)
and the study (``sweep``: leaderboard, Optuna's plots); the figures from ``plots``; the tables
and the HTML from ``report``, which stays free of I/O.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

import pandas as pd

from tlsweep import metrics, plots, report, tracking
from tlsweep.errors import UserError
from tlsweep.redaction import redact_url

CURVE_METRICS = ("val_accuracy", "accuracy", "val_loss", "loss")


def sweep_report(name: str, top: int = 5, storage: str | None = None) -> report.SweepReport:
    """Everything `report.sweep_report_html` shows about the sweep ``name``."""
    from tlsweep import sweep  # Optuna and Keras: only for this page

    study = sweep.load_study(name, storage)
    parent_id = sweep.parent_run_id(study)
    if not parent_id:
        raise UserError(f"sweep {name} has no MLflow parent run yet: run tlsweep sweep first")
    parent = tracking.run_data(parent_id)
    tags = parent["tags"]
    settings = _sweep_settings(tags)
    metric, direction, objectives = _objective(settings)
    space = {k.removeprefix("space."): v for k, v in tags.items() if k.startswith("space.")}
    board = sweep.leaderboard(study, parent_id)
    ranked = _ranking(board)
    best = _best(ranked, space, metric, champion=tags.get("best.run_id") if objectives else None)
    top_rows = ranked[:top]
    evaluation, per_class_png = _best_evaluation(best.get("run_id"))
    others = [r["run_id"] for r in ranked if r["run_id"] != best.get("run_id")]
    return report.SweepReport(
        name=name,
        parent_run_id=parent_id,
        experiment=parent["experiment"],
        metric=metric,
        direction=direction,
        objectives=objectives,
        board=board,
        settings=settings,
        base=tags.get("sweep.base", "").split(),
        space=space,
        counts=_state_counts(board),
        best=best,
        **_optuna_plots(sweep.optuna_figures, study),
        curves_png=_top_curves(top_rows, metric),
        curves_runs=[r["run_id"] for r in top_rows],
        best_evaluation=evaluation,
        per_class_png=per_class_png,
        commands=report.sweep_commands(  # logged on the parent run: no password
            name,
            best.get("run_id"),
            others[0] if best and others else None,
            redact_url(storage) if storage else None,
        ),
        generated=_now(),
    )


def run_comparison(run_a: str, run_b: str) -> report.RunComparison:
    """Everything `report.comparison_html` shows about two runs."""
    runs = [tracking.run_data(run_a), tracking.run_data(run_b)]
    labels = _labels(runs)
    a, b = runs
    common = set(a["params"]) & set(b["params"])
    evaluations, per_class = _evaluations(runs, labels)
    return report.RunComparison(
        runs=runs,
        labels=labels,
        params=report.param_differences(a["params"], b["params"], labels),
        metrics=report.metrics_side_by_side(a["metrics"], b["metrics"], labels),
        same_params=sum(str(a["params"][k]) == str(b["params"][k]) for k in common),
        curves_png=_pair_curves(runs, labels),
        evaluations=evaluations,
        per_class=per_class,
        generated=_now(),
    )


# --- the sweep report ----------------------------------------------------------------------------


def _optuna_plots(draw: Any, study: Any) -> dict[str, Any]:
    """Optuna's interactive Plotly charts with plotly.js to inline, else (no plotly) PNGs."""
    try:
        charts = draw(study, kind="plotly")
    except ImportError:
        return {"optuna_plots": {k: plots.to_png(f) for k, f in draw(study).items()}}
    return {
        "optuna_charts": {name: plots.plotly_div(figure) for name, figure in charts.items()},
        "plotly_js": plots.plotly_script() if charts else "",
    }


def _sweep_settings(tags: dict[str, str]) -> dict[str, str]:
    return {
        k.removeprefix("sweep."): v
        for k, v in tags.items()
        if k.startswith("sweep.") and k != "sweep.base"
    }


def _objective(settings: dict[str, str]) -> tuple[str, str, str | None]:
    """The training metric, its direction, and the objectives of a Pareto sweep (else None)."""
    metric = settings.get("metric", "val_accuracy")
    direction = settings.get("direction", "None")
    if direction in ("None", ""):
        direction = metrics.direction(metric)
    objectives = settings.get("objectives", "None")
    return metric, direction, None if objectives in ("None", "", "{}") else objectives


def _ranking(board: pd.DataFrame) -> list[dict[str, Any]]:
    """The leaderboard's trials that have a run, completed first (best first), then pruned."""
    if not len(board) or "run_id" not in board.columns:
        return []
    rows = board[board["run_id"].notna()].to_dict("records")
    return [r for r in rows if r["state"] == "COMPLETE"] + [
        r for r in rows if r["state"] == "PRUNED"
    ]


def _best(
    ranked: list[dict[str, Any]], space: dict[str, str], metric: str, champion: str | None
) -> dict[str, Any]:
    """The best completed trial (in a Pareto sweep: the champion recorded on the parent)."""
    complete = [r for r in ranked if r["state"] == "COMPLETE"]
    row = next((r for r in complete if r["run_id"] == champion), None) if champion else None
    row = row or (complete[0] if complete else None)
    if row is None:
        return {}
    return {
        "trial": int(row["trial"]),
        "run_id": row.get("run_id"),
        "value": row.get("value", row.get(metric)),
        "params": {k: row[k] for k in space if k in row},
    }


def _state_counts(board: pd.DataFrame) -> dict[str, int]:
    if not len(board):
        return {}
    states = ("COMPLETE", "PRUNED", "FAIL", "RUNNING")
    return {
        s.lower(): int((board["state"] == s).sum()) for s in states if (board["state"] == s).any()
    }


def _top_curves(rows: list[dict[str, Any]], metric: str) -> bytes | None:
    """The per-epoch curves of ``rows``' runs overlaid, as PNG."""
    if not rows:
        return None
    labels = {r["run_id"]: f"trial {int(r['trial'])} ({r['state'].lower()})" for r in rows}
    keys = list(dict.fromkeys([metric, *CURVE_METRICS]))
    history = tracking.metric_histories(list(labels), keys)
    if not len(history):
        return None
    history["label"] = history["run_id"].map(labels)
    title = f"top {len(rows)} trials by {metric}"
    return plots.to_png(plots.training_curves_figure(history, keys, title))


def _best_evaluation(run_id: str | None) -> tuple[report.RunEvaluation | None, bytes | None]:
    """The best run's confusion matrix, and its per-class accuracy as a PNG figure."""
    found = tracking.evaluation_artifacts(run_id) if run_id else None
    if not found:
        return None, None
    per_class = report.per_class_accuracy(found["confusion"])
    figure = plots.per_class_accuracy_figure(per_class, f"best trial, {found['split']} set")
    evaluation = report.RunEvaluation(found["split"], found["confusion"], found["png"])
    return evaluation, plots.to_png(figure)


# --- two runs ------------------------------------------------------------------------------------


def _labels(runs: list[dict[str, Any]]) -> list[str]:
    names = [r["run_name"] or r["run_id"][:8] for r in runs]
    if names[0] == names[1]:
        names = [f"{n} ({r['run_id'][:8]})" for n, r in zip(names, runs, strict=True)]
    return [f"A: {names[0]}", f"B: {names[1]}"]


def _pair_curves(runs: list[dict[str, Any]], labels: list[str]) -> bytes | None:
    """Both runs' per-epoch curves on one plot, as PNG."""
    ids = [r["run_id"] for r in runs]
    history = tracking.metric_histories(ids, CURVE_METRICS)
    if not len(history):
        return None
    history["label"] = history["run_id"].map(dict(zip(ids, labels, strict=True)))
    if ids[0] == ids[1]:
        history["label"] = labels[0]
    return plots.to_png(plots.training_curves_figure(history, CURVE_METRICS))


def _evaluations(
    runs: list[dict[str, Any]], labels: list[str]
) -> tuple[list[report.RunEvaluation | None], pd.DataFrame | None]:
    """Each run's confusion matrix (None when it has none) and their per-class accuracy."""
    evaluations: list[report.RunEvaluation | None] = []
    per_class = []
    for run, label in zip(runs, labels, strict=True):
        found = tracking.evaluation_artifacts(run["run_id"])
        if not found:
            evaluations.append(None)
            continue
        evaluations.append(report.RunEvaluation(found["split"], found["confusion"], found["png"]))
        table = report.per_class_accuracy(found["confusion"])[["class", "accuracy"]]
        per_class.append(table.rename(columns={"accuracy": label}))
    merged = (
        per_class[0].merge(per_class[1], on="class", how="outer") if len(per_class) == 2 else None
    )
    return evaluations, merged


def _now() -> str:
    return datetime.now().strftime("%Y-%m-%d %H:%M")
