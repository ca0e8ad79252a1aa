"""Secrets: URLs' passwords hidden wherever tlsweep stores or prints text."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path

import mlflow
import pytest

from custom_backbones import LEAKED_URL
from tlsweep import sweep
from tlsweep.cli import main
from tlsweep.redaction import redact, redact_url
from tlsweep.sweep import FAIL_REASON_ATTR, RUN_ID_ATTR, run_sweep
from tlsweep.sweepspec import load_sweep

SECRET = "s3cret-pw"


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("postgresql://tl:pw@db/optuna", "postgresql://tl:***@db/optuna"),
        ("postgresql+psycopg://tl:p%40ss@db:5432/x", "postgresql+psycopg://tl:***@db:5432/x"),
        ("sqlite:////tmp/mlruns/optuna.db", "sqlite:////tmp/mlruns/optuna.db"),
        ("journal:///tmp/optuna.journal", "journal:///tmp/optuna.journal"),
        ("http://user:token@tracking:5000", "http://user:***@tracking:5000"),
        ("postgresql://db/x?user=tl&password=pw", "postgresql://db/x?password=***&user=tl"),
    ],
)
def test_urls_are_rendered_without_their_password(url: str, shown: str) -> None:
    assert redact_url(url) == shown


def test_any_text_is_scrubbed_of_every_url_password() -> None:
    text = (
        "OperationalError: connection to postgresql://a:one@h1/x failed; "
        "retried mysql+pymysql://b:two@h2:3306/y and 'https://c:three@h3/z'; dsn password=four"
    )
    scrubbed = redact(text)
    for secret in ("one", "two", "three", "four"):
        assert f":{secret}@" not in scrubbed and f"={secret}" not in scrubbed
    assert "postgresql://a:***@h1/x" in scrubbed and "password=***" in scrubbed
    assert redact("no secrets: https://example.com/a:b") == "no secrets: https://example.com/a:b"


@pytest.mark.slow  # a sweep of three failing trials (~20 s)
def test_a_trial_quoting_a_password_stores_and_shows_it_nowhere(
    tmp_path: Path,
    write_sweep: Callable[..., Path],
    capsys: pytest.CaptureFixture[str],
) -> None:
    path = write_sweep(
        tmp_path,
        {"backbone.input_size": "choice(32, 48)"},  # searched: each trial builds its backbone
        {"study_name": "leaky", "sampler": "grid", "n_trials": 1},
        base={
            "backbone": "custom",
            "backbone._target_": "custom_backbones:leaks_a_password",
            "backbone.preprocess": "tf",
        },
    )
    summary = run_sweep(load_sweep(str(path)))
    out = capsys.readouterr()
    study = sweep.load_study("leaky", f"sqlite:///{tmp_path / 'optuna.db'}")
    failed = [t for t in study.trials if t.user_attrs.get(FAIL_REASON_ATTR)]
    assert failed, "the trials failed, quoting the URL"
    assert "ended short: 0 of 1 trials finished (stopped after 3 failed trials)" in str(
        summary.shortfall
    )
    client = mlflow.MlflowClient(tracking_uri=os.environ["MLFLOW_TRACKING_URI"])
    stored = [out.out, out.err, summary.shortfall or ""]
    stored += [summary.leaderboard.to_csv(), json.dumps([t.user_attrs for t in study.trials])]
    for trial in failed:
        assert "tlsweep:***@db.example" in trial.user_attrs[FAIL_REASON_ATTR]
        run_id = trial.user_attrs[RUN_ID_ATTR]
        run = client.get_run(run_id)
        stored += [json.dumps(run.data.tags), json.dumps(run.data.params)]
        stored.append(mlflow.artifacts.load_text(f"{run.info.artifact_uri}/error.txt"))
    assert any(LEAKED_URL.replace(SECRET, "***") in text for text in stored)
    assert not [text for text in stored if SECRET in text]


def test_a_refusal_quoting_a_password_prints_it_hidden(
    tmp_path: Path, write_sweep: Callable[..., Path], capsys: pytest.CaptureFixture[str]
) -> None:
    """The base's backbone is built as the sweep opens: it fails before any study exists, and
    the one-line error shows the URL without its password."""
    path = write_sweep(
        tmp_path,
        {"head.dropout": "choice(0.1, 0.2)"},
        {"study_name": "leaky"},
        base={
            "backbone": "custom",
            "backbone._target_": "custom_backbones:leaks_a_password",
            "backbone.preprocess": "tf",
        },
    )
    assert main(["sweep", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("tlsweep: error: backbone._target_=custom_backbones:leaks_a_password")
    assert LEAKED_URL.replace(SECRET, "***") in err and SECRET not in err
    assert not (tmp_path / "optuna.db").exists()
