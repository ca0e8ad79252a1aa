"""Which way each metric is better, decided here once for early stopping, the best epoch,
the sweep's objective, the leaderboard and the report."""

from __future__ import annotations

from typing import Literal

Direction = Literal["minimize", "maximize"]
COST_METRICS = ("latency_ms", "params")  # what a model costs: less is better


def direction(metric: str) -> Direction:
    """Losses and costs are minimized (``val_loss``, ``latency_ms``, ``params``); every other
    metric (accuracy, F1, AUC...) is maximized."""
    return "minimize" if "loss" in metric or metric in COST_METRICS else "maximize"


def keras_mode(metric: str) -> Literal["min", "max"]:
    """`direction` in the words of Keras callbacks (``mode=``), whose "auto" would minimize
    any metric without "acc" in its name (an F1 or AUC included)."""
    return "min" if direction(metric) == "minimize" else "max"
