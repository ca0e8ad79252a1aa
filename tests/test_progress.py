"""Progress lines in a terminal and in a log file; -q and -v."""

from __future__ import annotations

import io
import logging

import pytest
from rich.console import Console

from tlsweep import logs, progress
from tlsweep.cli import main
from tlsweep.progress import SweepProgress


def _log_file_progress() -> tuple[SweepProgress, io.StringIO]:
    out = io.StringIO()
    console = Console(file=out, force_terminal=False, width=200, highlight=False)
    return SweepProgress(3, "val_accuracy", console=console), out


def test_a_log_file_gets_timestamped_trial_lines_and_sparse_epoch_lines(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    clock = [1000.0]
    monkeypatch.setattr(progress.time, "monotonic", lambda: clock[0])
    sweep, out = _log_file_progress()
    sweep.trial_started(0, {"head.dropout": 0.25})
    for epoch in range(1, 6):  # five epochs within a second: no line
        clock[0] += 0.2
        sweep.epoch_done(epoch, 40, {"val_accuracy": 0.5})
    clock[0] += progress.BATCH_EPOCH_SECONDS
    sweep.epoch_done(6, 40, {"val_accuracy": 0.625})
    sweep.trial_finished(0, "COMPLETE", 0.625, 12.0)

    lines = out.getvalue().splitlines()
    assert len(lines) == 3, lines
    assert all(line[:8].count(":") == 2 and line[8] == " " for line in lines)  # HH:MM:SS
    assert lines[0].endswith("trial 1/3 (#0) head.dropout=0.25")
    assert "epoch 6/40  val_accuracy 0.6250" in lines[1]
    assert "#0 COMPLETE val_accuracy=0.6250" in lines[2]


def test_quiet_keeps_failures_and_drops_the_rest(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(logs.VERBOSITY_ENV, "-1")
    sweep, out = _log_file_progress()
    sweep.trial_started(0, {"head.dropout": 0.25})
    sweep.trial_finished(0, "COMPLETE", 0.5, 1.0)
    sweep.trial_started(1, {"head.dropout": 0.3})
    sweep.trial_finished(1, "FAIL", None, 1.0, "ValueError: boom")
    text = out.getvalue()
    assert "#0" not in text and "trial 1/3" not in text
    assert "#1 FAIL ValueError: boom" in text


@pytest.mark.parametrize(("flag", "level"), [(None, "WARNING"), ("-v", "INFO")])
def test_third_party_info_logging_only_with_verbose(
    flag: str | None, level: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(logs.VERBOSITY_ENV, "0")  # restored after the test: -v sets it
    monkeypatch.setenv("MLFLOW_LOGGING_LEVEL", "unset")  # so that the test's value is undone
    monkeypatch.delenv("MLFLOW_LOGGING_LEVEL")
    main(["cache", "ls", *([flag] if flag else [])])
    assert logging.getLevelName(logging.getLogger("mlflow").level) == level
    assert logs.verbosity() == (1 if flag else 0)


def test_quiet_and_verbose_exclude_each_other(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["runs", "-q", "-v"])
    assert "not allowed with argument" in capsys.readouterr().err


def test_mlflow_prints_are_hidden_unless_verbose(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """MLflow prints "Successfully registered model ..." (not logging): kept out by default."""
    import sys

    from tlsweep.tracking._models import _quiet_unless_verbose

    monkeypatch.setenv(logs.VERBOSITY_ENV, "0")
    with _quiet_unless_verbose():
        print("Successfully registered model 'x'.", file=sys.stderr)
    assert capsys.readouterr().err == ""
    monkeypatch.setenv(logs.VERBOSITY_ENV, "1")
    with _quiet_unless_verbose():
        print("Successfully registered model 'x'.", file=sys.stderr)
    assert "registered" in capsys.readouterr().err
