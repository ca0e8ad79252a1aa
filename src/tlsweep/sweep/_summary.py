"""The end of a sweep: leaderboard, Optuna's plots, best trial and champion model.

With several objectives the best trials form a Pareto front (``study.best_trials``): every
member's full model is assembled and registered under the study name with the alias
``pareto-K`` (K = 1 is the best on the first objective), the best on the training metric is
also ``champion``, and the front is logged as ``pareto.csv``/``.md`` and
``plots/pareto_front.png``.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import optuna
import pandas as pd
from optuna.trial import FrozenTrial, TrialState

from tlsweep import report, tracking
from tlsweep.backbones import BackboneCache
from tlsweep.config import ComposedBase, Config
from tlsweep.errors import UserError
from tlsweep.experiment import materialize_model
from tlsweep.redaction import redact, redact_url
from tlsweep.report import STATE_ORDER
from tlsweep.sweep import _promote
from tlsweep.sweep._common import FAIL_REASON_ATTR, PARENT_RUN_ATTR, RUN_ID_ATTR, count
from tlsweep.sweep._objective import monitor_override, trial_configs
from tlsweep.sweep._storage import load_study
from tlsweep.sweepspec import (
    EPOCH_METRICS,
    Dimension,
    SweepSpec,
    param_overrides,
    promoted_overrides,
)


@dataclass(frozen=True)
class SweepSummary:
    """What a sweep invocation leaves behind."""

    study_name: str
    parent_run_id: str
    leaderboard: pd.DataFrame
    best_run_id: str | None
    best_value: float | None
    champion_uri: str | None
    pareto_front: pd.DataFrame | None = None  # multi-objective sweeps: the front, with aliases
    shortfall: str | None = None  # why the study ended short of n_trials, if it did


def trial_config(
    spec: SweepSpec, trial: FrozenTrial, configs: ComposedBase | None = None
) -> Config:
    """The config ``trial`` trained, composed here from the sweep in hand (as its trial did)
    rather than read back from the tracking store. ``configs``: the sweep's base, composed."""
    promoted = promoted_overrides(spec) if _promote.continues(trial) is not None else []
    overrides = [*param_overrides(trial.params), *promoted, monitor_override(spec.settings.metric)]
    return (configs or trial_configs(spec)).load(overrides)


def _reason(trial: FrozenTrial) -> str | None:
    """A failed trial's reason, scrubbed of secrets (studies written before tlsweep did)."""
    reason = trial.user_attrs.get(FAIL_REASON_ATTR)
    return None if reason is None else redact(str(reason))


def summarize(
    study: optuna.Study,
    spec: SweepSpec,
    parent_run_id: str,
    backbones: BackboneCache | None = None,
) -> SweepSummary:
    """Leaderboard, plots, best trial and the registered champion, all on the parent run."""
    s = spec.settings
    board = leaderboard(study, parent_run_id)
    title = f"leaderboard ({', '.join(s.objective_names)})"
    pages = {"html": report.to_html(board, title=title), "md": report.to_markdown(board)}
    tracking.log_table(parent_run_id, board, "leaderboard", pages)
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
    if _is_multi(study):
        return _summarize_front(study, spec, parent_run_id, board, backbones)
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
    shown = ", ".join(f"{k}={v}" for k, v in best.params.items())
    best_line = f"Best so far: trial {best.number}, {s.metric} {best.value:.4f} ({shown})."
    tracking.set_tags(parent_run_id, {NOTE: sweep_description(spec, best_line)})
    champion = None
    if best_run and materialize_model(best_run, backbones, trial_config(spec, best)):
        champion = tracking.register_champion(
            best_run,
            s.study_name,
            description=f"Best trial ({best.number}) of sweep {s.study_name}: {s.metric} "
            f"{best.value:.4f}; {shown}",
            tags={"study": s.study_name, "trial": best.number, s.metric: best.value},
        )
    return SweepSummary(s.study_name, parent_run_id, board, best_run, best.value, champion)


def _summarize_front(
    study: optuna.Study,
    spec: SweepSpec,
    parent_run_id: str,
    board: pd.DataFrame,
    backbones: BackboneCache | None = None,
) -> SweepSummary:
    """Materialize and register every front member, crown the best on the training metric."""
    s = spec.settings
    front = pareto_front(study)
    champion = _best_trial(study)
    if champion is None:
        return SweepSummary(s.study_name, parent_run_id, board, None, None, None)
    configs = trial_configs(spec)  # the base, composed once for every member
    aliases: dict[str, str] = {}
    for rank, trial in enumerate(front, 1):
        run_id = trial.user_attrs.get(RUN_ID_ATTR)
        if run_id and materialize_model(run_id, backbones, trial_config(spec, trial, configs)):
            aliases[f"pareto-{rank}"] = run_id
    champion_run = champion.user_attrs.get(RUN_ID_ATTR)
    if champion_run in aliases.values():
        aliases["champion"] = champion_run
    uris = tracking.register_aliases(s.study_name, aliases, stale_prefix="pareto-")
    table = front_table(study, front, board, uris)
    tracking.log_table(parent_run_id, table, "pareto", {"md": report.to_markdown(table)})
    primary = _primary_index(study)
    row = board[board["trial"] == champion.number].iloc[0].to_dict()
    costs = {
        f"best_{name}": value
        for i, (name, value) in enumerate(
            zip(_objective_names(study), champion.values, strict=True)
        )
        if i != primary
    }
    tracking.record_best(
        parent_run_id,
        champion.number,
        champion_run,
        champion.params,
        {
            "best_value": champion.values[primary],
            **costs,
            **_test_metrics(row),
            "pareto_front_size": len(front),
        },
    )
    return SweepSummary(
        s.study_name,
        parent_run_id,
        board,
        champion_run,
        champion.values[primary],
        uris.get("champion"),
        table,
    )


def pareto_front(study: optuna.Study) -> list[optuna.trial.FrozenTrial]:
    """``study.best_trials``, best first on the first objective (ties: on the next ones)."""
    return sorted(study.best_trials, key=lambda t: (_signed(study, t), t.number))


def front_table(
    study: optuna.Study,
    front: list[optuna.trial.FrozenTrial],
    board: pd.DataFrame,
    uris: dict[str, str],
) -> pd.DataFrame:
    """One row per front member: its alias, objective values, params, run and test metrics."""
    champion = _champion_number(study) if "champion" in uris else None
    extra = [c for c in ("test_accuracy", "test_f1_macro") if c in board.columns]
    by_trial = board.set_index("trial")
    rows = []
    for rank, trial in enumerate(front, 1):
        rows.append(
            {
                "rank": rank,
                "trial": trial.number,
                **dict(zip(_objective_names(study), trial.values, strict=True)),
                **trial.params,
                **{c: by_trial.at[trial.number, c] for c in extra},
                "model": uris.get(f"pareto-{rank}", ""),
                "champion": "yes" if trial.number == champion else "",
                "run_id": trial.user_attrs.get(RUN_ID_ATTR),
            }
        )
    return pd.DataFrame(rows)


def leaderboard(study: optuna.Study, parent_run_id: str | None = None) -> pd.DataFrame:
    """All trials, best first, joined with their runs' final metrics.

    Several objectives: a column per objective and ``pareto_rank`` (1: on the Pareto front,
    2: on the front once those are removed, ...); ranked trials first, by rank then by the
    first objective.
    """
    if _is_multi(study):
        return _multi_objective_leaderboard(study, parent_run_id)
    # Not study.trials_dataframe(): a pruned trial is ranked by its best reported value, and
    # a failed one keeps its reason; the frame would need both added and its columns renamed.
    rows = []
    trials = study.get_trials(deepcopy=False)
    staged = _promote.promoted(study) is not None
    for t in trials:
        value = t.value if t.state == TrialState.COMPLETE else _best_intermediate(t, study)
        stages = {"stage": _promote.stage(t), "continues": _promote.continues(t)} if staged else {}
        rows.append(
            {
                "trial": t.number,
                "state": t.state.name,
                "value": value,
                **stages,
                **t.params,
                "duration_s": t.duration.total_seconds() if t.duration else None,
                "run_id": t.user_attrs.get(RUN_ID_ATTR),
                "reason": _reason(t),
            }
        )
    frame = pd.DataFrame(rows)
    runs = tracking.child_runs_frame(parent_run_id) if parent_run_id else None
    maximize = study.direction == optuna.study.StudyDirection.MAXIMIZE
    board = report.leaderboard(frame, runs, maximize=maximize)
    if staged and not board.empty:  # the final stage first: the champion is its best
        if "continues" in board:  # (gone when no promoted trial exists yet)
            board["continues"] = board["continues"].astype("Int64")
        board = board.sort_values(
            "stage", key=lambda stage: stage.ne(_promote.PROMOTED), kind="stable"
        )
        board = board.reset_index(drop=True)
    return board


def _multi_objective_leaderboard(
    study: optuna.Study, parent_run_id: str | None = None
) -> pd.DataFrame:
    names = _objective_names(study)
    trials = study.get_trials(deepcopy=False)
    complete = [t for t in trials if t.state == TrialState.COMPLETE and t.values is not None]
    ranks = pareto_ranks([_signed(study, t) for t in complete])
    rank_of = {t.number: r for t, r in zip(complete, ranks, strict=True)}
    order = sorted(
        trials, key=lambda t: (rank_of.get(t.number, len(trials) + 1), _order_key(study, t))
    )
    position = {t.number: i for i, t in enumerate(order)}
    rows = []
    for t in trials:
        values = t.values if t.state == TrialState.COMPLETE and t.values else [None] * len(names)
        rows.append(
            {
                "trial": t.number,
                "state": t.state.name,
                "value": position[t.number],  # the sort key: dropped below
                "pareto_rank": rank_of.get(t.number),
                **dict(zip(names, values, strict=True)),
                **t.params,
                "duration_s": t.duration.total_seconds() if t.duration else None,
                "run_id": t.user_attrs.get(RUN_ID_ATTR),
                "reason": _reason(t),
            }
        )
    frame = pd.DataFrame(rows)
    if frame.empty:
        return frame
    runs = tracking.child_runs_frame(parent_run_id) if parent_run_id else None
    board = report.leaderboard(frame, runs, maximize=False).drop(columns="value")
    if "pareto_rank" in board.columns:
        board["pareto_rank"] = board["pareto_rank"].astype("Int64")
    return board


def pareto_ranks(points: list[tuple[float, ...]]) -> list[int]:
    """Non-domination rank of each point (all objectives minimized): 1 for the Pareto front,
    2 for the front of what remains, and so on."""
    ranks = [0] * len(points)
    left = set(range(len(points)))
    rank = 0
    while left:
        rank += 1
        layer = {
            i for i in left if not any(_dominates(points[j], points[i]) for j in left if j != i)
        }
        for i in layer:
            ranks[i] = rank
        left -= layer
    return ranks


def _dominates(a: tuple[float, ...], b: tuple[float, ...]) -> bool:
    return all(x <= y for x, y in zip(a, b, strict=True)) and a != b


def optuna_figures(study: optuna.Study, kind: str = "matplotlib") -> dict[str, Any]:
    """Optuna's plots, as matplotlib figures (logged as PNGs) or, with ``kind="plotly"``,
    as its interactive Plotly figures (the HTML report); those that cannot be drawn yet (too
    few trials) are left out.

    Several objectives: the Pareto front (2 or 3 objectives), and the others drawn for the
    training metric.
    """
    plots = _optuna_plots(study, kind)
    figures = {}
    verbosity = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(optuna.logging.ERROR)  # "no completed trials yet" and such
    # Optuna's matplotlib plots switch matplotlib to its ggplot style for the whole process:
    # keep that to these figures, not the confusion matrices and curves drawn later.
    try:
        style = _matplotlib_style_kept() if kind == "matplotlib" else contextlib.nullcontext()
        with warnings.catch_warnings(), style:
            warnings.simplefilter("ignore")
            for name, plot in plots.items():
                try:
                    drawn = plot(study)
                except (ValueError, RuntimeError, ZeroDivisionError):
                    continue
                if kind == "matplotlib":
                    drawn = (drawn.flat[0] if hasattr(drawn, "flat") else drawn).figure
                figures[name] = drawn
    finally:
        optuna.logging.set_verbosity(verbosity)
    return figures


def _optuna_plots(study: optuna.Study, kind: str) -> dict[str, Callable[[optuna.Study], Any]]:
    """The plotting functions of ``kind`` (matplotlib or plotly) that suit ``study``."""
    from functools import partial

    if kind == "plotly":
        import optuna.visualization as module
    else:
        from optuna.visualization import matplotlib as module
    plots: dict[str, Any] = {
        "optimization_history": module.plot_optimization_history,
        "param_importances": module.plot_param_importances,
        "parallel_coordinate": module.plot_parallel_coordinate,
        "slice": module.plot_slice,
        "intermediate_values": module.plot_intermediate_values,
    }
    if not _is_multi(study):
        return plots
    names, primary = _objective_names(study), _primary_index(study)
    target = partial(_value_of, index=primary)
    return {
        "pareto_front": partial(module.plot_pareto_front, target_names=names),
        **{
            key: partial(plot, target=target, target_name=names[primary])
            for key, plot in plots.items()
            if key != "intermediate_values"
        },
    }


@contextlib.contextmanager
def _matplotlib_style_kept() -> Iterator[None]:
    import matplotlib

    with matplotlib.rc_context():
        yield


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
    """The best trial; with several objectives the front member best on the training metric
    (the champion)."""
    if _is_multi(study):
        front = study.best_trials
        primary = _primary_index(study)
        if not front:
            return None
        return min(front, key=lambda t: (_signed(study, t)[primary], _signed(study, t), t.number))
    if _promote.promoted(study) is not None and (final := _promote.final_best(study)):
        return final  # a promoting sweep: the best of its final stage
    try:
        return study.best_trial
    except ValueError:
        return None


def _champion_number(study: optuna.Study) -> int | None:
    best = _best_trial(study)
    return None if best is None else best.number


def _is_multi(study: optuna.Study) -> bool:
    return len(study.directions) > 1


def _objective_names(study: optuna.Study) -> list[str]:
    names = study.metric_names
    if names and len(names) == len(study.directions):
        return list(names)
    return [f"objective_{i}" for i in range(len(study.directions))]


def _primary_index(study: optuna.Study) -> int:
    """Where the training metric is among the objectives (the first objective if unknown)."""
    names = _objective_names(study)
    return next((i for i, name in enumerate(names) if name in EPOCH_METRICS), 0)


def _signed(study: optuna.Study, trial: optuna.trial.FrozenTrial) -> tuple[float, ...]:
    """The trial's values, negated where maximized: smaller is better in every position."""
    return tuple(
        -v if d == optuna.study.StudyDirection.MAXIMIZE else v
        for v, d in zip(trial.values, study.directions, strict=True)
    )


def _order_key(study: optuna.Study, trial: optuna.trial.FrozenTrial) -> tuple:
    state = STATE_ORDER.get(trial.state.name, 9)
    if trial.state == TrialState.COMPLETE and trial.values:
        return (state, _signed(study, trial), trial.number)
    return (state, (), trial.number)


def _value_of(trial: optuna.trial.FrozenTrial, index: int) -> float:
    return trial.values[index]


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


NOTE = "mlflow.note.content"  # a run's description in the MLflow UI


def parent_tags(spec: SweepSpec, url: str) -> dict[str, str]:
    s = spec.settings
    tags = {f"sweep.{key}": str(value) for key, value in vars(s).items() if key != "storage"}
    tags["sweep.storage"] = redact_url(url)
    tags["sweep.base"] = " ".join(spec.base)
    for dim in spec.space:
        tags[f"space.{dim.key}"] = _describe(dim)
    tags[NOTE] = sweep_description(spec)
    return tags


def sweep_description(spec: SweepSpec, best: str = "") -> str:
    """The parent run's description (Markdown, shown in the MLflow UI)."""
    s = spec.settings
    objective = ", ".join(f"{name} ({direction})" for name, direction in s.objective_pairs)
    space = "\n".join(f"- `{dim.key}`: {_describe(dim)}" for dim in spec.space)
    text = (
        f"Sweep `{spec.name}` (study `{s.study_name}`): {s.n_trials} trials, sampler "
        f"`{s.sampler}`, pruner `{s.pruner}`, objective {objective}.\n\nSearch space:\n{space}"
    )
    return text + (f"\n\n{best}" if best else "")


def _describe(dim: Dimension) -> str:
    if dim.kind == "categorical":
        return f"choice{tuple(dim.choices)}"
    text = f"{dim.kind}[{dim.low}, {dim.high}]"
    return text + (f" step {dim.step}" if dim.step else "") + (" log" if dim.log else "")
