"""Which way a metric is better: one answer for early stopping, the objective and reports."""

from __future__ import annotations

import pytest

from tlsweep import metrics


@pytest.mark.parametrize(
    ("metric", "expected"),
    [
        ("val_accuracy", "maximize"),
        ("accuracy", "maximize"),
        ("val_f1_macro", "maximize"),  # Keras's "auto" would minimize it: no "acc" in the name
        ("val_auc", "maximize"),
        ("val_loss", "minimize"),
        ("loss", "minimize"),
        ("latency_ms", "minimize"),
        ("params", "minimize"),
    ],
)
def test_losses_and_costs_are_minimized_the_rest_maximized(metric: str, expected: str) -> None:
    assert metrics.direction(metric) == expected
    assert metrics.keras_mode(metric) == expected[:3]


def test_early_stopping_follows_the_same_direction() -> None:
    from tlsweep.config import TrainConfig
    from tlsweep.train import KeepBestWeights, early_stopping

    tc = TrainConfig()
    tc.early_stopping.monitor = "val_f1_macro"
    tc.early_stopping.patience = 2
    stopping = early_stopping(tc)
    assert stopping.mode == "max"  # higher F1 is an improvement
    keeper = KeepBestWeights("val_f1_macro", target=None)  # type: ignore[arg-type]
    assert keeper.minimize is False
