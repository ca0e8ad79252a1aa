"""A database storage that waits out restarts and outages instead of failing.

PostgreSQL restarts (upgrades, failovers, a full disk cleared) drop every connection: Optuna's
``RDBStorage`` then raises on the next call, and a worker dies with a traceback in the middle
of a trial. `PatientStorage` wraps it: a call that fails for want of a connection is retried
with backoff (0.5 s doubling to 10 s) for up to ``patience`` seconds, then raises as before.
The engine pre-pings pooled connections, so a restarted server is picked up at once.

Two calls are special. A heartbeat that cannot be written is skipped, not retried (the next
one follows ``heartbeat_interval`` later; Optuna's heartbeat thread would die of an
exception). And after an outage every worker's heartbeats are old, the live ones' too: for one
grace period after this process reconnects it reports no stale trial, so that only trials
whose worker is really gone are failed.

A retried write that had in fact been committed before the connection dropped is
recognised where it matters: a trial's final state found already set to the state being
written counts as written.
"""

from __future__ import annotations

import sys
import threading
import time
from collections.abc import Callable
from typing import Any

import optuna
from optuna.storages import BaseStorage, RDBStorage

from tlsweep import interrupts
from tlsweep.sweep._optuna_private import STALE_TRIAL_IDS, BaseHeartbeat

MAX_DELAY = 10.0  # seconds between attempts, at most


def is_connection_error(exc: BaseException) -> bool:
    """Whether ``exc`` (or what caused it) is a lost or refused database connection."""
    import sqlalchemy.exc

    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, sqlalchemy.exc.OperationalError | ConnectionError):
            return True
        if isinstance(seen, sqlalchemy.exc.DBAPIError) and seen.connection_invalidated:
            return True
        if type(seen).__name__ == "OperationalError":  # the driver's own (psycopg, sqlite3)
            return True
        seen = seen.__cause__ or seen.__context__
    return False


class _PatientBase(BaseStorage, BaseHeartbeat):
    def __init__(self, inner: RDBStorage, patience: float, grace_period: float) -> None:
        self._inner = inner
        self._patience = patience
        self._grace_period = grace_period
        self._reconnected_at = float("-inf")
        self._lock = threading.Lock()

    @property
    def engine(self) -> Any:
        """The SQLAlchemy engine (the study lock takes its advisory lock through it)."""
        return self._inner.engine

    def record_heartbeat(self, trial_id: int) -> None:
        try:
            self._inner.record_heartbeat(trial_id)
        except Exception as exc:
            if not is_connection_error(exc):
                raise

    def stale_trial_ids(self, study_id: int) -> list[int]:
        """Optuna's `STALE_TRIAL_IDS` hook (what ``fail_stale_trials`` asks)."""
        if time.monotonic() - self._reconnected_at < self._grace_period:
            return []  # every heartbeat is old after an outage: wait for the live ones
        return self._call(STALE_TRIAL_IDS, study_id)

    def set_trial_state_values(
        self, trial_id: int, state: optuna.trial.TrialState, values: Any = None
    ) -> bool:
        try:
            return self._call("set_trial_state_values", trial_id, state, values)
        except optuna.exceptions.UpdateFinishedTrialError:
            if self._inner.get_trial(trial_id).state == state:  # the lost attempt committed
                return True
            raise

    def _call(self, name: str, *args: Any, **kwargs: Any) -> Any:
        method: Callable[..., Any] = getattr(self._inner, name)
        deadline, delay = None, 0.5
        while True:
            try:
                result = method(*args, **kwargs)
            except Exception as exc:
                if not is_connection_error(exc):
                    raise
                now = time.monotonic()
                if deadline is None:
                    deadline = now + self._patience
                    self._say(
                        f"the study's database is unreachable; retrying for {self._patience:g} s"
                    )
                if now >= deadline:
                    raise
                interrupts.raise_pending()  # one held back in database code stops the wait
                time.sleep(min(delay, max(0.0, deadline - now)))
                delay = min(2 * delay, MAX_DELAY)
                continue
            if deadline is not None:
                self._reconnected_at = time.monotonic()
                self._say("the study's database is reachable again")
            return result

    def _say(self, message: str) -> None:
        with self._lock:
            print(f"tlsweep: {message}", file=sys.stderr, flush=True)


def _patient(name: str) -> Callable[..., Any]:
    def call(self: _PatientBase, *args: Any, **kwargs: Any) -> Any:
        return self._call(name, *args, **kwargs)

    call.__name__ = call.__qualname__ = name
    return call


_SPECIAL = {"record_heartbeat", STALE_TRIAL_IDS, "set_trial_state_values"}
_DELEGATED = sorted(
    {
        name
        for base in (BaseStorage, BaseHeartbeat)
        for name, value in vars(base).items()
        if callable(value) and not name.startswith("__") and name not in _SPECIAL
    }
)

# Every other storage method, retried the same way (built from Optuna's two base classes, so
# that a method Optuna adds is retried too).
PatientStorage = type(
    "PatientStorage",
    (_PatientBase,),
    {
        **{name: _patient(name) for name in _DELEGATED},
        STALE_TRIAL_IDS: _PatientBase.stale_trial_ids,
    },
)
PatientStorage.__doc__ = __doc__


def patient(inner: RDBStorage, patience: float, grace_period: float) -> BaseStorage:
    """``inner``, retrying what fails for want of a connection for ``patience`` seconds."""
    return PatientStorage(inner, patience, grace_period)
