"""``tlsweep dashboard NAME``: optuna-dashboard on the sweep's storage and artifact store.

The study is found the way ``tlsweep runs`` finds it (`load_study`): in ``--storage``, else
in the default files, else at the storage its sweep recorded. Its artifact folder is the one
the sweep recorded on the study (`_artifacts.ARTIFACTS_ATTR`) unless ``--artifacts`` names
one. The server is Python's own WSGI server, one request at a time, as optuna-dashboard's
``run_server``; a termination signal stops it (`interrupts`).
"""

from __future__ import annotations

import errno
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

import optuna

from tlsweep.errors import UserError
from tlsweep.redaction import redact_url
from tlsweep.sweep._artifacts import ArtifactFolder, recorded_folder
from tlsweep.sweep._storage import find_study

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Dashboard:
    """What the dashboard serves: one sweep's storage and artifact folder."""

    study_name: str
    url: str  # the storage's URL (password included: never print it as is)
    storage: optuna.storages.BaseStorage
    artifacts: ArtifactFolder | None

    def describe(self) -> str:
        folder = self.artifacts.path if self.artifacts else "none"
        return f"storage {redact_url(self.url)}, artifacts {folder}"


def open_dashboard(
    study_name: str, storage: str | None = None, artifacts: str | None = None
) -> Dashboard:
    """The storage holding ``study_name`` and its artifact folder (``artifacts`` overrides
    the one recorded; a folder that does not exist is a `UserError`)."""
    url, store = find_study(study_name, storage)
    if artifacts is not None:
        folder = Path(artifacts).expanduser().resolve()
        if not folder.is_dir():
            raise UserError(f"--artifacts={artifacts}: no such folder")
        return Dashboard(study_name, url, store, ArtifactFolder(folder))
    study = optuna.load_study(study_name=study_name, storage=store)
    return Dashboard(study_name, url, store, recorded_folder(study))


def serve_dashboard(
    dashboard: Dashboard, host: str, port: int, ready: Callable[[str], None]
) -> None:
    """Serve until interrupted; ``ready`` gets the URL once the port is open. Needs the
    optuna-dashboard package (the extra ``tlsweep[dashboard]``)."""
    from optuna_dashboard import wsgi

    app = wsgi(dashboard.storage, artifact_store=dashboard.artifacts)
    server = _listen(host, port, app)
    try:
        ready(f"http://{_url_host(host)}:{server.server_port}/")
        server.serve_forever()
    finally:
        server.server_close()


def _listen(host: str, port: int, app: Any) -> WSGIServer:
    try:
        return make_server(host, port, app, handler_class=_QuietHandler)
    except OSError as exc:
        if exc.errno == errno.EADDRINUSE:
            raise UserError(f"port {port} on {host} is in use; choose another: --port N") from None
        reason = exc.strerror or str(exc)
        raise UserError(f"cannot serve on {host}:{port}: {reason}") from None


def _url_host(host: str) -> str:
    """Where a browser on this machine reaches the server."""
    return "127.0.0.1" if host in ("", "0.0.0.0") else host


class _QuietHandler(WSGIRequestHandler):
    """Requests are logged at DEBUG (``-v``), not printed one per line."""

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("%s " + format, self.address_string(), *args)
