"""Termination signals: SIGTERM and SIGHUP end a process the way Ctrl-C does, once."""

from __future__ import annotations

import os
import signal
from collections.abc import Iterator

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
