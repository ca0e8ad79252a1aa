"""Rerun a logged run from its record and compare: config, seed and data fingerprint come from
what the run logged; differences in data or package versions are reported as warnings."""

from __future__ import annotations

import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
import yaml

from tlsweep import tracking
from tlsweep.config import Config, to_config
from tlsweep.experiment import run, train_head

COMPARED = ("best_val_accuracy", "best_val_loss", "test_accuracy", "test_loss", "best_epoch")


@dataclass
class Reproduction:
    """The original run, its reproduction, their metrics side by side and any warnings."""

    original_run_id: str
    run_id: str
    table: pd.DataFrame
    tolerance: float
    warnings: list[str] = field(default_factory=list)

    @property
    def matches(self) -> bool:
        return bool((self.table["abs_diff"].fillna(float("inf")) <= self.tolerance).all())


def config_of(record: dict) -> Config:
    """The logged config, as a validated `Config`, logging to the original run's experiment."""
    cfg = to_config(yaml.safe_load(record["config_yaml"]))
    cfg.tracking.experiment = record["experiment"]
    cfg.tracking.run_name = f"reproduce-{record['run_name']}"
    cfg.tracking.uri = None  # the store we read from (the environment's), never a logged URI
    return cfg


def reproduce(run_id: str, tolerance: float = 0.0) -> Reproduction:
    """Retrain ``run_id``'s config as a new run tagged with the run it reproduces. A promoted
    sweep trial (tag ``tlsweep.continues_run``) started from the head another trial trained:
    that trial is retrained first (untracked), and the reproduction starts from its head."""
    tracking.connect()
    original = tracking.run_record(run_id)
    cfg = config_of(original)
    tags = {"tlsweep.reproduces": run_id}
    continued = original["tags"].get(tracking.CONTINUES_RUN_TAG)
    with tempfile.TemporaryDirectory() as tmp:
        head = None
        if continued:
            path = str(Path(tmp) / "head.weights.h5")
            head = (path, train_head(config_of(tracking.run_record(continued)), path))
        result = run(cfg, tags=tags, head=head)
    again = tracking.run_record(result.run_id)
    return Reproduction(
        original_run_id=run_id,
        run_id=result.run_id,
        table=compare_metrics(original["metrics"], again["metrics"]),
        tolerance=tolerance,
        warnings=differences(original, again),
    )


def compare_metrics(original: dict[str, float], again: dict[str, float]) -> pd.DataFrame:
    rows = [
        {"metric": key, "original": original.get(key), "reproduced": again.get(key)}
        for key in COMPARED
        if key in original or key in again
    ]
    table = pd.DataFrame(rows)
    table["abs_diff"] = (table["original"] - table["reproduced"]).abs()
    return table


def differences(original: dict, again: dict) -> list[str]:
    """Warnings for a different data fingerprint, package versions or an incomplete original."""
    notes = []
    before, after = original["params"], again["params"]
    if before.get("data.fingerprint") != after.get("data.fingerprint"):
        notes.append(
            f"data fingerprint differs: {before.get('data.fingerprint')} -> "
            f"{after.get('data.fingerprint')} (the data changed)"
        )
    for key in sorted(k for k in before if k.startswith("version.") or k == "keras.backend"):
        if before.get(key) != after.get(key):
            notes.append(f"{key} differs: {before[key]} -> {after.get(key)}")
    if original["tags"].get("tlsweep.trial_state") == "PRUNED":
        notes.append("the original trial was pruned; the reproduction trains the full schedule")
    if original["status"] != "FINISHED":
        notes.append(f"the original run is {original['status']}")
    return notes
