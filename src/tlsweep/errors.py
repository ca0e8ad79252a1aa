"""The one exception type that means "the user asked for something invalid"."""

from __future__ import annotations

import errno
from collections.abc import Callable

NO_SPACE = (errno.ENOSPC, errno.EDQUOT)


class UserError(Exception):
    """Bad input: the CLI prints the message on one line and exits with status 2.

    The message names the bad value and what is allowed. Raised before any damage is done
    (no run started, no study touched) wherever that can be checked up front.
    """

    exit_code = 2

    def __str__(self) -> str:
        return " ".join(str(self.args[0]).split()) if self.args else ""


class OutageError(Exception):
    """Something the sweep needs is gone: the tracking server stayed unreachable past its
    retries, or a disk is full.

    Not the trial's fault and nothing is lost: the interrupted trial is queued again and its
    run closed by the next reconciliation. The CLI prints one line and exits with status 75
    (``EX_TEMPFAIL``: try again later); a supervisor stops its workers on it.
    """

    exit_code = 75

    def __str__(self) -> str:
        return " ".join(str(self.args[0]).split()) if self.args else ""


def find_cause(
    exc: BaseException, matches: Callable[[BaseException], bool]
) -> BaseException | None:
    """The first of ``exc`` and the exceptions it was raised from (``__cause__``, else
    ``__context__``) that ``matches``; None if none does."""
    seen: set[int] = set()
    cause: BaseException | None = exc
    while cause is not None and id(cause) not in seen:
        if matches(cause):
            return cause
        seen.add(id(cause))
        cause = cause.__cause__ or cause.__context__
    return None


def full_disk(exc: BaseException) -> OSError | None:
    """The "no space left" (or quota) error ``exc`` is, or was raised from; else None."""
    found = find_cause(exc, lambda e: isinstance(e, OSError) and e.errno in NO_SPACE)
    return found if isinstance(found, OSError) else None


def full_disk_message(exc: OSError) -> str:
    where = f" writing {exc.filename}" if exc.filename else ""
    return (
        f"no space left on device{where}; nothing is lost: free some space and run the same "
        "command again"
    )
