"""Leaderboards and their renderings (pandas): no MLflow, no Optuna here."""

from __future__ import annotations

import base64
import html
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd

STATE_ORDER = {"COMPLETE": 0, "PRUNED": 1, "RUNNING": 2, "WAITING": 3, "FAIL": 4}
TRAILING = (
    "test_accuracy",
    "test_loss",
    "test_f1_macro",
    "best_epoch",
    "epochs_run",
    "duration_s",
    "run_status",
    "run_id",
    "reason",
)


def leaderboard(trials: pd.DataFrame, runs: pd.DataFrame | None, *, maximize: bool) -> pd.DataFrame:
    """Trials joined with their runs' metrics; completed best first, then pruned, then failed."""
    if trials.empty:
        return trials
    board = trials.copy()
    if runs is not None and not runs.empty:
        board = board.merge(runs, on="run_id", how="left")
    board["_state"] = board["state"].map(STATE_ORDER).fillna(9)
    board["_value"] = board["value"].astype("float64") * (-1 if maximize else 1)
    board = board.sort_values(["_state", "_value", "trial"], na_position="last")
    board = board.drop(columns=["_state", "_value"]).reset_index(drop=True)
    board = board.dropna(axis="columns", how="all")
    leading = [c for c in board.columns if c not in TRAILING]
    return board[leading + [c for c in TRAILING if c in board.columns]]


def to_markdown(board: pd.DataFrame) -> str:
    """A GitHub-flavoured Markdown table."""
    cells = board.map(_cell)
    header = "| " + " | ".join(map(str, board.columns)) + " |"
    rule = "| " + " | ".join("---" for _ in board.columns) + " |"
    rows = ["| " + " | ".join(row) + " |" for row in cells.itertuples(index=False)]
    return "\n".join([header, rule, *rows]) + "\n"


def to_html(board: pd.DataFrame, title: str = "leaderboard") -> str:
    """A self-contained HTML page with the table."""
    table = board.to_html(index=False, float_format=lambda v: f"{v:.4g}", na_rep="", border=0)
    style = (
        "body{font-family:sans-serif;margin:2em}table{border-collapse:collapse}"
        "td,th{padding:4px 10px;border-bottom:1px solid #ddd;text-align:right}"
        "tr:first-child td{font-weight:bold}"
    )
    return (
        f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}"
        f"</title><style>{style}</style></head><body><h1>{html.escape(title)}</h1>"
        f"{table}</body></html>"
    )


def to_text(board: pd.DataFrame) -> str:
    """The terminal rendering used by ``tlsweep runs``."""
    shown = board.drop(columns=[c for c in ("reason",) if c in board.columns])
    return shown.to_string(index=False, float_format=lambda v: f"{v:.4g}", na_rep="-")


def _cell(value: object) -> str:
    if value is None or (isinstance(value, float) and pd.isna(value)):
        return ""
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value).replace("|", "\\|").replace("\n", " ")


# --- the sweep report and the comparison of two runs (plain data in, HTML out) -----------------

PAGE_STYLE = """
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:0;color:#1f2328;
background:#f6f8fa}
header{background:#0b3d91;color:#fff;padding:18px 32px}header h1{margin:0;font-size:1.6em}
header p{margin:4px 0 0;opacity:.85}
nav{padding:8px 32px;background:#e8eef8;font-size:.9em}nav a{margin-right:14px;color:#0b3d91}
main{padding:8px 32px 40px}
section{background:#fff;border:1px solid #d0d7de;border-radius:6px;padding:12px 20px;
margin:16px 0}
h2{font-size:1.2em;margin:4px 0 10px}h3{font-size:1em;margin:14px 0 6px}
table{border-collapse:collapse;font-size:.85em}
td,th{padding:3px 10px;border-bottom:1px solid #e1e4e8;text-align:right;white-space:nowrap}
th{background:#f6f8fa}td.l,th.l{text-align:left}
tr.best td{font-weight:bold;background:#eef7ee}
.figures{display:flex;flex-wrap:wrap;gap:16px;align-items:flex-start}
figure{margin:0}figcaption{font-size:.85em;color:#57606a;text-align:center}
img{max-width:100%;height:auto;border:1px solid #eee}
pre{background:#f6f8fa;padding:10px;border-radius:6px;overflow-x:auto;font-size:.85em}
.note{color:#57606a;font-size:.9em}.scroll{overflow-x:auto;max-width:100%}
.charts{display:grid;grid-template-columns:repeat(auto-fit,minmax(520px,1fr));gap:16px}
figure.chart{min-width:0}
"""


@dataclass
class RunEvaluation:
    """A run's evaluation on one split: the confusion matrix (class names on both axes; rows
    are the true classes) and, when logged, its figure as PNG bytes."""

    split: str
    confusion: pd.DataFrame
    png: bytes | None = None


@dataclass
class SweepReport:
    """Everything the sweep report shows, gathered beforehand (no MLflow, no Optuna here)."""

    name: str
    parent_run_id: str
    experiment: str
    metric: str
    direction: str
    board: pd.DataFrame
    settings: dict[str, str]  # sweep.* tags of the parent run, without the prefix
    base: list[str]  # the Hydra overrides every trial starts from
    space: dict[str, str]  # searched key -> its description
    counts: dict[str, int] = field(default_factory=dict)  # complete, pruned, fail
    best: dict[str, Any] = field(default_factory=dict)  # trial, run_id, value, params
    optuna_plots: dict[str, bytes] = field(default_factory=dict)  # name -> PNG
    optuna_charts: dict[str, str] = field(default_factory=dict)  # name -> Plotly HTML (preferred)
    plotly_js: str = ""  # inlined once when there are charts: the page stays self-contained
    curves_png: bytes | None = None
    curves_runs: list[str] = field(default_factory=list)
    best_evaluation: RunEvaluation | None = None
    per_class_png: bytes | None = None
    commands: list[tuple[str, str]] = field(default_factory=list)  # (command, what it does)
    generated: str = ""
    objectives: str | None = None  # a Pareto sweep's objectives; the board ranks its front first


@dataclass
class RunComparison:
    """Two runs side by side (`labels` name them in tables and plots)."""

    runs: list[dict[str, Any]]  # run_id, run_name, status, experiment
    labels: list[str]
    params: pd.DataFrame  # the differing params: param, <label a>, <label b>
    metrics: pd.DataFrame  # metric, <label a>, <label b>, difference
    same_params: int = 0
    curves_png: bytes | None = None
    evaluations: list[RunEvaluation | None] = field(default_factory=list)
    per_class: pd.DataFrame | None = None  # class, <label a>, <label b>
    generated: str = ""


def per_class_accuracy(confusion: pd.DataFrame) -> pd.DataFrame:
    """From a confusion matrix (rows true, columns predicted): each true class's accuracy (its
    recall), correct predictions and support."""
    counts = confusion.to_numpy()
    support = counts.sum(axis=1)
    correct = np.diag(counts)
    accuracy = np.divide(correct, support, out=np.full(len(support), np.nan), where=support > 0)
    return pd.DataFrame(
        {
            "class": [str(c) for c in confusion.index],
            "accuracy": accuracy,
            "correct": correct.astype(int),
            "support": support.astype(int),
        }
    )


def param_differences(
    a: Mapping[str, Any], b: Mapping[str, Any], labels: Sequence[str] = ("A", "B")
) -> pd.DataFrame:
    """The params whose values differ (or that only one run has), sorted by name."""
    rows = [
        {"param": key, labels[0]: a.get(key, ""), labels[1]: b.get(key, "")}
        for key in sorted(set(a) | set(b))
        if key not in a or key not in b or str(a[key]) != str(b[key])
    ]
    return pd.DataFrame(rows, columns=["param", *labels[:2]])


def metrics_side_by_side(
    a: Mapping[str, float], b: Mapping[str, float], labels: Sequence[str] = ("A", "B")
) -> pd.DataFrame:
    """Every final metric of either run, with the difference (B - A); test_ and best_ first."""

    def order(key: str) -> tuple[int, str]:
        return (0 if key.startswith("test_") else 1 if key.startswith("best_") else 2, key)

    rows = []
    for key in sorted(set(a) | set(b), key=order):
        first, second = a.get(key), b.get(key)
        both = first is not None and second is not None
        rows.append(
            {
                "metric": key,
                labels[0]: first,
                labels[1]: second,
                "difference": second - first if both else None,
            }
        )
    frame = pd.DataFrame(rows, columns=["metric", *labels[:2], "difference"])
    return frame.astype({labels[0]: "float64", labels[1]: "float64", "difference": "float64"})


def sweep_commands(
    name: str, best_run_id: str | None, runner_up_run_id: str | None, storage: str | None = None
) -> list[tuple[str, str]]:
    """The commands that reproduce or continue the sweep, each with what it does."""
    with_storage = f" --storage {storage}" if storage else ""
    sweep_storage = f" sweep.storage={storage}" if storage else ""
    commands = []
    if best_run_id:
        commands += [
            (f"tlsweep reproduce {best_run_id}", "retrain the best trial from its record"),
            (f"tlsweep reproduce --best {name}{with_storage}", "the same, found by sweep name"),
        ]
    commands += [
        (
            f"tlsweep sweep {name}{sweep_storage}",
            f"resume the study from sweeps/{name}.yaml (add sweep.n_trials=N for more trials)",
        ),
        (f"tlsweep runs {name}{with_storage}", "the leaderboard in the terminal"),
    ]
    if best_run_id and runner_up_run_id:
        commands.append(
            (
                f"tlsweep compare {best_run_id} {runner_up_run_id}",
                "the two best trials side by side",
            )
        )
    commands.append(("tlsweep ui", "browse the parent run and its trials in the MLflow UI"))
    return commands


def sweep_report_html(rep: SweepReport) -> str:
    """One self-contained page, no external resource: figures are embedded PNGs, and Optuna's
    plots interactive Plotly charts when given (plotly.js inlined), else PNGs."""
    best = rep.best
    summary = [
        ("sweep (study)", rep.name),
        ("MLflow experiment", rep.experiment),
        ("parent run", rep.parent_run_id),
        ("objectives", rep.objectives)
        if rep.objectives
        else ("objective", f"{rep.direction} {rep.metric}"),
        ("trials", ", ".join(f"{v} {k}" for k, v in rep.counts.items()) or str(len(rep.board))),
    ]
    if best:
        first = "champion (on the Pareto front)" if rep.objectives else "best trial"
        summary += [
            (first, f"#{best.get('trial')}  ({rep.metric} = {_number(best.get('value'))})"),
            ("best run", best.get("run_id") or "-"),
        ]
        summary += [(f"best {k}", _precise(v)) for k, v in best.get("params", {}).items()]
    sections = [("summary", "Summary", _pairs_table(summary))]

    highlight = None
    if best and "trial" in rep.board.columns:
        matches = rep.board.index[rep.board["trial"].astype(str) == str(best.get("trial"))]
        highlight = matches[0] if len(matches) else None
    board = rep.board.drop(columns=[c for c in ("reason",) if c in rep.board.columns])
    failed = rep.board[rep.board["reason"].notna()] if "reason" in rep.board else rep.board[:0]
    body = _frame_table(board, highlight=highlight) if len(board) else "<p>no trials yet</p>"
    if len(failed):
        reasons = "".join(
            f"<li>trial {html.escape(str(r['trial']))}: {html.escape(str(r['reason']))}</li>"
            for _, r in failed.iterrows()
        )
        body += f"<h3>Failed trials</h3><ul>{reasons}</ul>"
    order = "Pareto rank, then the first objective" if rep.objectives else f"{rep.metric}"
    sections.append(("leaderboard", f"Leaderboard ({order}, best first)", body))

    if rep.optuna_charts and rep.plotly_js:
        charts = "".join(
            _chart(div, name.replace("_", " ")) for name, div in rep.optuna_charts.items()
        )
        sections.append(("optuna", "Optuna plots", f"<div class='charts'>{charts}</div>"))
    elif rep.optuna_plots:
        figures = "".join(
            _figure(png, name.replace("_", " ")) for name, png in rep.optuna_plots.items()
        )
        sections.append(("optuna", "Optuna plots", f"<div class='figures'>{figures}</div>"))

    if rep.curves_png:
        caption = f"per-epoch history of the top {len(rep.curves_runs)} trials"
        sections.append(("curves", "Training curves", _figure(rep.curves_png, caption)))

    if rep.best_evaluation is not None:
        ev = rep.best_evaluation
        per_class = per_class_accuracy(ev.confusion)
        parts = []
        if ev.png:
            parts.append(_figure(ev.png, f"confusion matrix, {ev.split} set"))
        else:
            parts.append(_frame_table(ev.confusion.reset_index(names="true \\ predicted")))
        if rep.per_class_png:
            parts.append(_figure(rep.per_class_png, f"per-class accuracy, {ev.split} set"))
        table = _frame_table(per_class)
        sections.append(
            (
                "best",
                f"Best run: confusion matrix and per-class accuracy ({ev.split} set)",
                f"<div class='figures'>{''.join(parts)}</div><h3>Per-class accuracy</h3>{table}",
            )
        )

    settings = _pairs_table(sorted(rep.settings.items()))
    space = _pairs_table(sorted(rep.space.items()), headers=("key", "searched over"))
    base = "<pre>" + html.escape("\n".join(rep.base) or "(none)") + "</pre>"
    sections.append(
        (
            "settings",
            "Sweep settings and search space",
            f"<h3>Search space</h3>{space}<h3>Base overrides (every trial)</h3>{base}"
            f"<h3>Study settings</h3>{settings}",
        )
    )
    if rep.commands:
        width = max(len(c) for c, _ in rep.commands)
        lines = "\n".join(f"{c:<{width}}  # {what}" for c, what in rep.commands)
        sections.append(("reproduce", "Reproduce", f"<pre>{html.escape(lines)}</pre>"))

    subtitle = f"parent run {rep.parent_run_id}" + (f" · {rep.generated}" if rep.generated else "")
    script = rep.plotly_js if rep.optuna_charts else ""
    return _page(f"sweep report: {rep.name}", subtitle, sections, script=script)


def comparison_html(c: RunComparison) -> str:
    """Two runs on one self-contained page: params that differ, metrics, curves, matrices."""
    a, b = c.labels
    heads = [
        (label, f"{r['run_name']} ({r['run_id']}), {r['status']}, experiment {r['experiment']}")
        for label, r in zip(c.labels, c.runs, strict=True)
    ]
    sections = [("runs", "Runs", _pairs_table(heads, headers=("", "run")))]
    params = _frame_table(c.params) if len(c.params) else "<p>no param differs</p>"
    params += f"<p class='note'>{c.same_params} other params are identical.</p>"
    sections.append(("params", "Config values that differ", params))
    sections.append(("metrics", "Metrics", _frame_table(c.metrics)))
    if c.curves_png:
        sections.append(("curves", "Training curves", _figure(c.curves_png, f"{a} and {b}")))
    matrices = [
        _figure(ev.png, f"{label}: {ev.split} set")
        if ev is not None and ev.png
        else f"<p>{html.escape(label)}: no confusion matrix figure logged</p>"
        for label, ev in zip(c.labels, c.evaluations, strict=False)
    ]
    if matrices:
        body = f"<div class='figures'>{''.join(matrices)}</div>"
        if c.per_class is not None and len(c.per_class):
            body += f"<h3>Per-class accuracy</h3>{_frame_table(c.per_class)}"
        sections.append(("confusion", "Confusion matrices", body))
    subtitle = f"{a} vs {b}" + (f" · {c.generated}" if c.generated else "")
    return _page(f"compare: {c.runs[0]['run_name']} vs {c.runs[1]['run_name']}", subtitle, sections)


def rich_table(frame: pd.DataFrame, title: str | None = None) -> Any:
    """A `rich.table.Table` of the frame (floats to 4 significant digits), for the terminal."""
    from rich.table import Table

    table = Table(title=title, title_justify="left", header_style="bold")
    for column in frame.columns:
        numeric = pd.api.types.is_numeric_dtype(frame[column])
        table.add_column(str(column), justify="right" if numeric else "left")
    for row in frame.itertuples(index=False):
        table.add_row(*(_cell(value) or "-" for value in row))
    return table


def _page(
    title: str, subtitle: str, sections: Sequence[tuple[str, str, str]], script: str = ""
) -> str:
    nav = "".join(f"<a href='#{key}'>{html.escape(head)}</a>" for key, head, _ in sections)
    body = "".join(
        f"<section id='{key}'><h2>{html.escape(head)}</h2>{content}</section>"
        for key, head, content in sections
    )
    return (
        "<!doctype html><html lang='en'><head><meta charset='utf-8'>"
        f"<title>{html.escape(title)}</title><style>{PAGE_STYLE}</style>"
        + (f"<script>{script}</script>" if script else "")
        + "</head><body>"
        f"<header><h1>{html.escape(title)}</h1><p>{html.escape(subtitle)}</p></header>"
        f"<nav>{nav}</nav><main>{body}</main></body></html>\n"
    )


def _chart(div: str, caption: str) -> str:
    return f"<figure class='chart'>{div}<figcaption>{html.escape(caption)}</figcaption></figure>"


def _figure(png: bytes, caption: str) -> str:
    data = base64.b64encode(png).decode("ascii")
    return (
        f"<figure><img alt='{html.escape(caption)}' src='data:image/png;base64,{data}'>"
        f"<figcaption>{html.escape(caption)}</figcaption></figure>"
    )


def _pairs_table(pairs: Sequence[tuple[str, str]], headers: tuple[str, str] | None = None) -> str:
    head = ""
    if headers:
        cells = "".join(f"<th class='l'>{html.escape(h)}</th>" for h in headers)
        head = f"<tr>{cells}</tr>"
    rows = "".join(
        f"<tr><th class='l'>{html.escape(str(k))}</th><td class='l'>{html.escape(str(v))}</td></tr>"
        for k, v in pairs
    )
    return f"<table>{head}{rows}</table>"


def _frame_table(frame: pd.DataFrame, highlight: Any = None) -> str:
    columns = list(frame.columns)
    left = {c for c in columns if not pd.api.types.is_numeric_dtype(frame[c])}
    head = "".join(
        f"<th class='{'l' if c in left else ''}'>{html.escape(str(c))}</th>" for c in columns
    )
    rows = []
    for index, row in frame.iterrows():
        cells = "".join(
            f"<td class='{'l' if c in left else ''}'>{html.escape(_cell(row[c]))}</td>"
            for c in columns
        )
        mark = " class='best'" if highlight is not None and index == highlight else ""
        rows.append(f"<tr{mark}>{cells}</tr>")
    return f"<div class='scroll'><table><tr>{head}</tr>{''.join(rows)}</table></div>"


def _precise(value: Any) -> str:
    return f"{value:.6g}" if isinstance(value, float) else str(value)


def _number(value: Any) -> str:
    return "-" if value is None else _cell(value)
