"""What the pages gather: the pure parts (the end-to-end pages are in test_report.py)."""

from __future__ import annotations

import pandas as pd

from tlsweep import pages


def _board() -> pd.DataFrame:
    return pd.DataFrame(
        {
            "trial": [2, 0, 1, 3],
            "state": ["COMPLETE", "COMPLETE", "PRUNED", "FAIL"],
            "value": [0.9, 0.8, 0.5, None],
            "head.dropout": [0.1, 0.2, 0.3, 0.4],
            "run_id": ["r2", "r0", "r1", None],
        }
    )


def test_ranking_puts_completed_trials_first_and_drops_runless_ones() -> None:
    ranked = pages._ranking(_board())
    assert [r["run_id"] for r in ranked] == ["r2", "r0", "r1"]
    assert pages._ranking(pd.DataFrame()) == []


def test_best_is_the_top_completed_trial_or_the_recorded_champion() -> None:
    ranked = pages._ranking(_board())
    space = {"head.dropout": "interval(0.0, 0.5)"}
    best = pages._best(ranked, space, "val_accuracy", champion=None)
    assert best == {"trial": 2, "run_id": "r2", "value": 0.9, "params": {"head.dropout": 0.1}}
    assert pages._best(ranked, space, "val_accuracy", champion="r0")["trial"] == 0
    assert pages._best(ranked, space, "val_accuracy", champion="gone")["trial"] == 2
    assert pages._best([], space, "val_accuracy", champion=None) == {}


def test_objective_defaults_and_pareto_objectives() -> None:
    assert pages._objective({}) == ("val_accuracy", "maximize", None)
    assert pages._objective({"metric": "val_loss", "direction": "None"}) == (
        "val_loss",
        "minimize",
        None,
    )
    pareto = {"metric": "val_accuracy", "objectives": "{val_accuracy: maximize}"}
    assert pages._objective(pareto)[2] == "{val_accuracy: maximize}"


def test_state_counts_name_only_the_states_present() -> None:
    assert pages._state_counts(_board()) == {"complete": 2, "pruned": 1, "fail": 1}
    assert pages._state_counts(pd.DataFrame()) == {}
