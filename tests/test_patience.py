"""The patient storage: a database outage is waited out, other errors are not.

The real thing (a PostgreSQL server restarted, then stopped for 45 s, under two workers) is
tests/test_workers.py's last test; here a storage that fails on cue.
"""

from __future__ import annotations

import time
from pathlib import Path

import optuna
import pytest
import sqlalchemy.exc
from optuna.trial import TrialState

from tlsweep.sweep import _patience
from tlsweep.sweep._patience import is_connection_error, patient

DROPPED = sqlalchemy.exc.OperationalError("SELECT 1", {}, ConnectionError("server closed"))


class Flaky:
    """Wraps a real RDB storage; its next ``fail`` calls raise as a dropped connection does."""

    def __init__(self, inner: optuna.storages.RDBStorage) -> None:
        self.inner, self.fail, self.calls = inner, 0, 0

    def __getattr__(self, name: str):
        method = getattr(self.inner, name)

        def call(*args, **kwargs):
            self.calls += 1
            if self.fail:
                self.fail -= 1
                raise optuna.exceptions.StorageInternalError("commit failed") from DROPPED
            return method(*args, **kwargs)

        return call


@pytest.fixture
def flaky(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Flaky:
    monkeypatch.setattr(time, "sleep", lambda seconds: None)  # the backoff, not the test
    inner = optuna.storages.RDBStorage(f"sqlite:///{tmp_path / 'o.db'}", heartbeat_interval=1)
    return Flaky(inner)


def test_connection_errors_are_told_from_the_others() -> None:
    assert is_connection_error(DROPPED)
    wrapped = optuna.exceptions.StorageInternalError("commit failed")
    wrapped.__cause__ = DROPPED
    assert is_connection_error(wrapped)
    assert not is_connection_error(optuna.exceptions.StorageInternalError("value too long"))
    assert not is_connection_error(KeyError("Record does not exist."))


def test_an_outage_is_waited_out_and_said_once(
    flaky: Flaky, capsys: pytest.CaptureFixture[str]
) -> None:
    storage = patient(flaky, patience=60, grace_period=8)
    study = optuna.create_study(storage=storage, study_name="s")
    flaky.fail = 3
    trial = study.ask()  # three failed attempts, then it goes through
    assert study.trials[0].number == trial.number
    err = capsys.readouterr().err
    assert err.count("database is unreachable") == 1
    assert err.count("database is reachable again") == 1


def test_past_its_patience_the_error_is_raised(flaky: Flaky, monkeypatch) -> None:
    clock = iter(range(0, 10_000, 7))
    monkeypatch.setattr(_patience.time, "monotonic", lambda: next(clock))
    storage = patient(flaky, patience=30, grace_period=8)
    flaky.fail = 10**6
    with pytest.raises(optuna.exceptions.StorageInternalError):
        storage.get_all_studies()
    assert 3 <= flaky.calls <= 7  # tried for about 30 s of the fake clock, then gave up


def test_other_errors_are_not_retried(flaky: Flaky) -> None:
    storage = patient(flaky, patience=60, grace_period=8)
    with pytest.raises(KeyError):
        storage.get_study_id_from_name("no such study")
    assert flaky.calls == 1


def test_a_failed_heartbeat_is_skipped_and_old_ones_are_forgiven_after_an_outage(
    flaky: Flaky,
) -> None:
    storage = patient(flaky, patience=60, grace_period=8)
    study = optuna.create_study(storage=storage, study_name="s")
    trial = study.ask()
    flaky.fail = 1
    storage.record_heartbeat(trial._trial_id)  # no exception: Optuna's thread would die of it
    flaky.inner._get_stale_trial_ids = lambda study_id: [trial._trial_id]  # its beats are old
    assert storage._get_stale_trial_ids(study._study_id) == [trial._trial_id]
    flaky.fail = 1
    assert len(study.trials) == 1  # a call that waits out an outage
    assert storage._get_stale_trial_ids(study._study_id) == []  # for one grace period


def test_a_final_state_written_before_the_connection_dropped_counts(flaky: Flaky) -> None:
    storage = patient(flaky, patience=60, grace_period=8)
    study = optuna.create_study(storage=storage, study_name="s")
    trial = study.ask()
    flaky.inner.set_trial_state_values(trial._trial_id, TrialState.COMPLETE, [1.0])  # committed
    assert storage.set_trial_state_values(trial._trial_id, TrialState.COMPLETE, [1.0])
    with pytest.raises(optuna.exceptions.UpdateFinishedTrialError):
        storage.set_trial_state_values(trial._trial_id, TrialState.FAIL)
