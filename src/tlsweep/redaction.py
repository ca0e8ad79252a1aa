"""Keep secrets out of everything tlsweep stores or prints.

Storage and tracking URLs may carry a password (``postgresql://user:secret@host/db``), and
exception texts may quote them. `redact_url` renders a URL the way SQLAlchemy does with
``hide_password=True``; `redact` scrubs any text of every ``scheme://user:password@`` and
``password=...`` it holds. Everything that reaches MLflow, Optuna's attributes, a report or
the console passes through one of them.
"""

from __future__ import annotations

import re

HIDDEN = "***"
_CREDENTIALS = re.compile(r"(?P<head>\b[a-zA-Z][a-zA-Z0-9+.-]*://[^\s:/@]+):[^\s@]*@")
_PASSWORD_PARAMETER = re.compile(r"(?P<head>\b(?:password|passwd|pwd)=)[^\s&;,'\"]+", re.I)


def redact_url(url: str) -> str:
    """``url`` with its password hidden, as SQLAlchemy renders it; any other text scrubbed."""
    try:
        from sqlalchemy.engine import make_url

        rendered = make_url(url).render_as_string(hide_password=True)
    except Exception:  # not an SQLAlchemy URL (journal:///..., a path): scrub it as text
        rendered = url
    return redact(rendered)


def redact(text: str) -> str:
    """``text`` without the passwords of the URLs (and ``password=`` parameters) it holds."""
    text = _CREDENTIALS.sub(rf"\g<head>:{HIDDEN}@", text)
    return _PASSWORD_PARAMETER.sub(rf"\g<head>{HIDDEN}", text)
