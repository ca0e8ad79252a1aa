"""The one exception type that means "the user asked for something invalid"."""

from __future__ import annotations


class UserError(Exception):
    """Bad input: the CLI prints the message on one line and exits with status 2.

    The message names the bad value and what is allowed. Raised before any damage is done
    (no run started, no study touched) wherever that can be checked up front.
    """

    exit_code = 2

    def __str__(self) -> str:
        return " ".join(str(self.args[0]).split()) if self.args else ""
