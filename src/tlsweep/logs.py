"""How much the commands say: ``-q`` / ``-v``, for this process and the workers it starts.

-1 (``-q``): summaries and errors only. 0: progress, with third-party INFO logging (MLflow's
database migrations, model registrations) kept out. 1 (``-v``): that logging too. Worker
processes inherit the level through ``TLSWEEP_VERBOSITY``; ``MLFLOW_LOGGING_LEVEL``, when set,
wins for MLflow.
"""

from __future__ import annotations

import logging
import os

VERBOSITY_ENV = "TLSWEEP_VERBOSITY"
THIRD_PARTY_LOGGERS = ("mlflow", "alembic", "absl")


def set_verbosity(level: int) -> None:
    os.environ[VERBOSITY_ENV] = str(level)
    apply_verbosity()


def apply_verbosity() -> None:
    """Set the third-party loggers for the current level (also in a worker, from its
    environment)."""
    level = "INFO" if verbosity() > 0 else "WARNING"
    os.environ.setdefault("MLFLOW_LOGGING_LEVEL", level)  # MLflow sets its loggers on import
    for name in THIRD_PARTY_LOGGERS:
        logging.getLogger(name).setLevel(level)


def verbosity() -> int:
    try:
        return int(os.environ.get(VERBOSITY_ENV, "0"))
    except ValueError:
        return 0
