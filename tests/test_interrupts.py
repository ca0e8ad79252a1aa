"""Termination signals: SIGTERM and SIGHUP end a process the way Ctrl-C does, once."""

from __future__ import annotations

import os
import signal
import sqlite3
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from types import FrameType

import pytest

from tlsweep import interrupts
from tlsweep.interrupts import Interrupted


@pytest.fixture(autouse=True)
def _restore_handlers() -> Iterator[None]:
    saved = {signum: signal.getsignal(signum) for signum in interrupts.SIGNALS}
    yield
    for signum, handler in saved.items():
        signal.signal(signum, handler)
    interrupts._pending = None  # what a test's signal left for safe points


@pytest.mark.parametrize(
    ("signum", "code", "shown"),
    [
        (signal.SIGTERM, 143, "SIGTERM"),
        (signal.SIGHUP, 129, "SIGHUP"),
        (signal.SIGINT, 130, "Ctrl-C"),
    ],
)
def test_each_signal_interrupts_like_ctrl_c(signum: int, code: int, shown: str) -> None:
    interrupts.install()
    with pytest.raises(KeyboardInterrupt) as info:  # what every clean-up path catches
        os.kill(os.getpid(), signum)
    assert isinstance(info.value, Interrupted)
    assert interrupts.exit_code(info.value) == code
    assert interrupts.description(info.value) == shown


def test_only_the_first_termination_signal_interrupts() -> None:
    """The clean-up after the first must run to its end: a process group gets the signal
    twice when the supervisor passes it on to workers that had it already."""
    interrupts.install()
    with pytest.raises(Interrupted):
        os.kill(os.getpid(), signal.SIGTERM)
    os.kill(os.getpid(), signal.SIGTERM)  # ignored now...
    os.kill(os.getpid(), signal.SIGHUP)
    with pytest.raises(KeyboardInterrupt):  # ...but a second Ctrl-C still stops a hung process
        os.kill(os.getpid(), signal.SIGINT)


def test_a_plain_keyboard_interrupt_is_ctrl_c() -> None:
    assert interrupts.exit_code(KeyboardInterrupt()) == 130
    assert interrupts.description(KeyboardInterrupt()) == "Ctrl-C"


def test_an_interrupt_swallowed_by_a_finalizer_is_raised_at_the_next_safe_point() -> None:
    """A signal handled while the garbage collector runs a ``__del__`` (or a weakref
    callback) raises where Python only prints "Exception ignored": the chaos benchmark caught
    a worker that trained on after its SIGTERM. The interruption comes back at a safe point."""
    interrupts.install()

    class Finalized:
        def __del__(self) -> None:
            os.kill(os.getpid(), signal.SIGTERM)  # the handler raises in here

    Finalized()  # collected at once: the interruption is swallowed
    with pytest.raises(interrupts.Interrupted) as raised:
        interrupts.raise_pending()
    assert raised.value.signum == signal.SIGTERM
    interrupts.handled(raised.value)
    interrupts.raise_pending()  # being handled: its clean-up is not interrupted again


def _database_locked(path: Path) -> str | None:
    """SQLite's answer to a writer that will not wait: None when nobody holds a lock."""
    probe = sqlite3.connect(path, timeout=0, isolation_level=None)
    try:
        probe.execute("BEGIN EXCLUSIVE")
        probe.execute("ROLLBACK")
        return None
    except sqlite3.OperationalError as exc:
        return str(exc)
    finally:
        probe.close()


@pytest.mark.slow
def test_a_signal_landing_in_a_database_write_is_held_back_and_leaves_no_lock(
    tmp_path: Path,
) -> None:
    """MLflow's SQLite store, interrupted at every few steps of a write: an exception cut
    through SQLAlchemy there could leave this process holding the database's lock (its own
    clean-up then waited 20 s per write: CI's SIGTERM test timed out). The signal is held back
    to the next safe point instead, and no lock is ever left behind."""
    import mlflow

    path = tmp_path / "mlflow.db"
    client = mlflow.MlflowClient(f"sqlite:///{path}")
    run_id = client.create_run(client.create_experiment("e")).info.run_id
    steps = _traced_steps(lambda: client.set_tag(run_id, "k", "v"))
    held_back = 0
    for step in range(1, steps, 3):
        interrupts.install()
        raised, sent = None, []
        try:
            _signalled_at(step, lambda s=step: client.set_tag(run_id, "k", str(s)), sent)
        except KeyboardInterrupt as exc:  # landed outside database code: raised at once
            raised = exc
        if not sent:  # past the end of this write (the first one took more steps)
            break
        if raised is None:
            with pytest.raises(Interrupted):  # held back: the next safe point raises it
                interrupts.raise_pending()
            held_back += 1
        assert _database_locked(path) is None, f"a lock left by a signal at step {step}"
        interrupts._pending = None
    assert held_back > step // 6  # most of a write's steps are in database code
    assert client.get_run(run_id).data.tags["k"] == str(step)  # every write went through


def test_a_signal_landing_in_tensorflow_is_held_back_not_turned_into_another_error() -> None:
    """TensorFlow's ``DType.min`` catches every exception (a bare ``except:``) and raises a
    TypeError: a SIGTERM landing in it failed a CI trial as broken instead of queueing it
    again. Signalled at each of its Python steps, the interruption is held back (the call
    returns its value) and the next safe point raises it."""
    import tensorflow as tf

    steps = _traced_steps(lambda: tf.int32.min)
    held_back = 0
    for step in range(1, steps + 1):
        interrupts.install()
        got: list[object] = []
        try:
            _signalled_at(step, lambda got=got: got.append(tf.int32.min), [])
        except Interrupted:  # landed in this test's own frames: raised at once, as it should
            continue
        finally:
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
        assert got == [-(2**31)], f"step {step}"
        with pytest.raises(Interrupted):  # held back: the next safe point raises it
            interrupts.raise_pending()
        interrupts._pending = None
        held_back += 1
    assert held_back >= steps - 4  # all but the steps in this test's lambda


def _traced_steps(call: Callable[[], object]) -> int:
    """How many Python steps (calls and lines) ``call`` takes."""
    steps = 0

    def count(frame: FrameType, event: str, arg: object) -> Callable[..., object]:
        nonlocal steps
        steps += event in ("call", "line")
        return count

    sys.settrace(count)
    try:
        call()
    finally:
        sys.settrace(None)
    return steps


def _signalled_at(step: int, call: Callable[[], object], sent: list[int]) -> None:
    """Run ``call``, sending this process SIGTERM at its ``step``-th Python step (noted in
    ``sent``)."""
    steps = 0

    def signal_at(frame: FrameType, event: str, arg: object) -> Callable[..., object]:
        nonlocal steps
        steps += event in ("call", "line")
        if steps == step:
            sent.append(step)
            os.kill(os.getpid(), signal.SIGTERM)
        return signal_at

    sys.settrace(signal_at)
    try:
        call()
    finally:
        sys.settrace(None)
