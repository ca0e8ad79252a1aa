"""Termination signals end a tlsweep process the way Ctrl-C does.

Schedulers preempt with SIGTERM (``scancel``, ``docker stop``, systemd, Kubernetes), and a
closed terminal sends SIGHUP. Their default action kills the process on the spot, leaving its
trial RUNNING in the study and its MLflow run RUNNING forever. `install` turns SIGINT, SIGTERM
and SIGHUP into `Interrupted` (a ``KeyboardInterrupt``) raised in the main thread, so that the
same clean-up runs for all three: the trial is failed and queued again, its run ends KILLED,
the parent run can be resumed, and the process exits with 128 + the signal's number.

Only the first signal interrupts: the clean-up that follows it must not be cut short by the
second copy a process group receives (the supervisor forwards the signal to its workers,
which may have had it already). A second Ctrl-C still stops a process that hangs.

An exception raised by a signal handler can land where Python swallows it: in a ``__del__``
or a weakref callback run by the garbage collector, which only prints "Exception ignored".
The interruption is then remembered and raised again at the next safe point
(`raise_pending`: every training batch, every trial, the trial loop, the feature pass, the
waits for a database or the study lock, the end of the command).

Nor is it raised inside code that cannot take it (`PROTECTED_MODULES`), where it is held back
until the next safe point instead:

- database code (SQLAlchemy, the SQLite and PostgreSQL drivers, MLflow's SQL stores, Optuna's
  storages): an exception cut through a transaction there can leave this process holding the
  database's lock (seen with MLflow's SQLite store: every later write, this process's own
  clean-up included, then waits out the 20 s busy timeout and fails);
- TensorFlow and Keras, which catch every exception in places (bare ``except:``) and raise
  another: a SIGTERM landing in ``tf.int32.min`` became ``TypeError: Cannot find minimum
  value`` (seen in CI), failing the trial as broken instead of queueing it again. Training
  loops reach a safe point every batch (`tlsweep.train.Interruptible`).
"""

from __future__ import annotations

import signal
from types import FrameType

SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
PROTECTED_MODULES = (
    "sqlalchemy",
    "sqlite3",
    "psycopg",
    "psycopg2",
    "alembic",
    "mlflow.store.db",
    "mlflow.store.tracking.sqlalchemy_store",
    "mlflow.store.model_registry.sqlalchemy_store",
    "optuna.storages",
    "tensorflow",
    "keras",
)
_pending: Interrupted | None = None  # the signal received, until it is seen handled


def raise_pending() -> None:
    """Raise the interruption that a signal raised where it was swallowed; nothing if none
    came or it is being handled (`handled`)."""
    if _pending is not None:
        raise _pending


def handled(exc: BaseException) -> None:
    """Say that ``exc``, an interruption, reached code that handles it: safe points stop
    raising it again (its clean-up must run to its end)."""
    global _pending
    if isinstance(exc, KeyboardInterrupt):
        _pending = None


class Interrupted(KeyboardInterrupt):
    """A termination signal arrived: ``signum`` is which one."""

    def __init__(self, signum: int = signal.SIGINT) -> None:
        self.signum = int(signum)
        super().__init__(self.description)

    @property
    def description(self) -> str:
        """``Ctrl-C`` for SIGINT, else the signal's name (``SIGTERM``, ``SIGHUP``)."""
        return "Ctrl-C" if self.signum == signal.SIGINT else signal.Signals(self.signum).name

    @property
    def exit_code(self) -> int:
        return 128 + self.signum


def install() -> None:
    """Make SIGINT, SIGTERM and SIGHUP raise `Interrupted` in this process's main thread."""
    for signum in SIGNALS:
        signal.signal(signum, _interrupt)


def description(exc: BaseException) -> str:
    """How an interruption came: ``Ctrl-C``, ``SIGTERM``, ``SIGHUP``."""
    return exc.description if isinstance(exc, Interrupted) else "Ctrl-C"


def exit_code(exc: BaseException) -> int:
    """128 + the signal's number (130 for a plain ``KeyboardInterrupt``)."""
    return exc.exit_code if isinstance(exc, Interrupted) else 128 + signal.SIGINT


def in_protected_code(frame: FrameType | None) -> bool:
    """Whether ``frame`` or a caller of it runs in one of the `PROTECTED_MODULES`."""
    while frame is not None:
        module = frame.f_globals.get("__name__", "")
        if any(module == m or module.startswith(f"{m}.") for m in PROTECTED_MODULES):
            return True
        frame = frame.f_back
    return False


def _interrupt(signum: int, frame: FrameType | None) -> None:
    global _pending
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # the clean-up runs to its end...
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.default_int_handler)  # ...unless Ctrl-C is pressed again
    _pending = Interrupted(signum)
    if in_protected_code(frame):
        return  # raised at the next safe point, the transaction or library call done
    raise _pending
