"""Leaderboards: ordering, the join with run metrics, Markdown, HTML and text renderings."""

from __future__ import annotations

import math

import pandas as pd
import pytest

from tlsweep import report


def trials_frame() -> pd.DataFrame:
    """Trials as `sweep.leaderboard` builds them: FAILs have no value, PRUNED their best."""
    rows = [
        (0, "COMPLETE", 0.80, 64, "r0", None),
        (1, "FAIL", None, 128, "r1", "ValueError: boom"),
        (2, "PRUNED", 0.40, 256, "r2", None),
        (3, "COMPLETE", 0.95, 64, "r3", None),
        (4, "PRUNED", 0.60, 128, "r4", None),
        (5, "COMPLETE", 0.70, 512, "r5", None),
        (6, "COMPLETE", 0.80, 32, "r6", None),
        (7, "FAIL", None, 256, None, "UserError: head.dropout=1.5 is not allowed"),
    ]
    columns = ["trial", "state", "value", "head.dense_units", "run_id", "reason"]
    frame = pd.DataFrame(rows, columns=columns)
    frame["duration_s"] = [1.5, 0.1, 0.7, 2.0, 0.9, 1.1, 1.2, 0.05]
    return frame


def runs_frame() -> pd.DataFrame:
    return pd.DataFrame(
        {
            "run_id": ["r0", "r1", "r2", "r3", "r4", "r5", "r6"],
            "run_status": ["FINISHED", "FAILED", *["FINISHED"] * 5],
            "test_accuracy": [0.79, None, 0.41, 0.93, 0.58, 0.71, 0.77],
            "best_epoch": [3, None, 1, 4, 2, 3, 5],
        }
    )


def test_maximize_complete_best_first_then_pruned_then_failed() -> None:
    board = report.leaderboard(trials_frame(), runs_frame(), maximize=True)
    assert board["trial"].tolist() == [3, 0, 6, 5, 4, 2, 1, 7]
    assert board["state"].tolist() == ["COMPLETE"] * 4 + ["PRUNED"] * 2 + ["FAIL"] * 2


def test_minimize_complete_lowest_first_then_pruned_then_failed() -> None:
    board = report.leaderboard(trials_frame(), runs_frame(), maximize=False)
    assert board["trial"].tolist() == [5, 0, 6, 3, 2, 4, 1, 7]


def test_ties_keep_trial_order() -> None:
    board = report.leaderboard(trials_frame(), None, maximize=True)
    tied = board[board["value"] == 0.80]["trial"].tolist()
    assert tied == [0, 6]


def test_running_and_waiting_sit_between_pruned_and_failed() -> None:
    trials = pd.DataFrame(
        {
            "trial": [0, 1, 2, 3, 4],
            "state": ["FAIL", "WAITING", "RUNNING", "PRUNED", "COMPLETE"],
            "value": [None, None, None, 0.5, 0.1],
            "run_id": ["a", "b", "c", "d", "e"],
        }
    )
    board = report.leaderboard(trials, None, maximize=True)
    assert board["state"].tolist() == ["COMPLETE", "PRUNED", "RUNNING", "WAITING", "FAIL"]


def test_join_with_run_metrics_and_column_order() -> None:
    board = report.leaderboard(trials_frame(), runs_frame(), maximize=True)
    first = board.iloc[0]
    assert first["run_id"] == "r3"
    assert first["test_accuracy"] == 0.93
    assert first["run_status"] == "FINISHED"
    no_run = board[board["trial"] == 7].iloc[0]
    assert math.isnan(no_run["test_accuracy"])
    columns = board.columns.tolist()
    assert columns[:4] == ["trial", "state", "value", "head.dense_units"]
    trailing = [c for c in report.TRAILING if c in columns]
    assert columns[-len(trailing) :] == trailing
    assert columns[-2:] == ["run_id", "reason"]


def test_all_empty_columns_are_dropped() -> None:
    trials = trials_frame()
    trials["never_set"] = None
    board = report.leaderboard(trials, None, maximize=True)
    assert "never_set" not in board.columns
    assert "value" in board.columns


def test_empty_study() -> None:
    empty = pd.DataFrame()
    assert report.leaderboard(empty, None, maximize=True).empty


def test_markdown_has_every_row_in_order() -> None:
    board = report.leaderboard(trials_frame(), runs_frame(), maximize=True)
    text = report.to_markdown(board)
    lines = text.strip().splitlines()
    assert lines[0] == "| " + " | ".join(board.columns) + " |"
    assert set(lines[1].replace("|", "").split()) == {"---"}
    assert len(lines) == 2 + len(board)
    for line, (_, row) in zip(lines[2:], board.iterrows(), strict=True):
        cells = [c.strip() for c in line.strip("|").split(" | ")]
        assert cells[0] == str(row["trial"])
        assert cells[1] == row["state"]
    assert "| 0.95 |" in lines[2]  # floats to 4 significant digits
    assert "UserError: head.dropout=1.5 is not allowed" in text


def test_markdown_escapes_pipes_and_newlines() -> None:
    board = pd.DataFrame({"trial": [0], "reason": ["a|b\nc"], "value": [None]})
    text = report.to_markdown(board)
    assert "a\\|b c" in text
    assert text.count("\n") == 3  # header, rule, one row
    assert "nan" not in text.lower()


def test_html_page_has_every_row() -> None:
    board = report.leaderboard(trials_frame(), runs_frame(), maximize=True)
    page = report.to_html(board, title="leaderboard <val_accuracy>")
    assert page.startswith("<!doctype html>")
    assert "<title>leaderboard &lt;val_accuracy&gt;</title>" in page
    assert page.count("<tr") == 1 + len(board)  # header row + one per trial
    for run_id in ("r0", "r2", "r3", "r4", "r5", "r6"):
        assert f"<td>{run_id}</td>" in page
    assert page.index("<td>r3</td>") < page.index("<td>r0</td>") < page.index("<td>r2</td>")


def test_text_rendering_drops_the_reason() -> None:
    board = report.leaderboard(trials_frame(), runs_frame(), maximize=True)
    text = report.to_text(board)
    assert "boom" not in text
    assert len(text.splitlines()) == 1 + len(board)
    assert text.splitlines()[1].split()[:3] == ["3", "COMPLETE", "0.95"]


@pytest.mark.parametrize("maximize", [True, False])
def test_input_is_not_modified(maximize: bool) -> None:
    trials = trials_frame()
    before = trials.copy()
    report.leaderboard(trials, runs_frame(), maximize=maximize)
    pd.testing.assert_frame_equal(trials, before)
