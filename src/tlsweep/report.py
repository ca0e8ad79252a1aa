"""Leaderboards and their renderings (pandas): no MLflow, no Optuna here."""

from __future__ import annotations

import html

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
