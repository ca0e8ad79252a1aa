"""Put this folder on PYTHONPATH with ``TLSWEEP_KILL_AT=<window>`` and the interpreter kills
itself (SIGKILL: no clean-up of any kind) at that point of a sweep, the first time it gets
there (``TLSWEEP_KILL_AT_CALL=n``: the n-th time). tests/test_killpoints.py resumes after each.

Windows: worker (a trial is RUNNING, its worker not yet recorded), run (the trial's MLflow run
just created), features (mid feature pass, the cache's temporary file half written), entry
(the cache's data file complete, its metadata not written), model (the trial's model saved,
not yet uploaded), journal (half a line appended to the journal file), champion (the model
registered, its alias not yet set).
"""

import os
import signal
from pathlib import Path

WINDOW = os.environ.get("TLSWEEP_KILL_AT")
CALL = int(os.environ.get("TLSWEEP_KILL_AT_CALL", "1"))


def _die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def _on_call(owner, name, before=True, when=lambda *a, **k: True):
    original = getattr(owner, name)
    calls = [0]

    def wrapped(*args, **kwargs):
        if when(*args, **kwargs):
            calls[0] += 1
            if before and calls[0] == CALL:
                _die()
        result = original(*args, **kwargs)
        if not before and when(*args, **kwargs) and calls[0] == CALL:
            _die()
        return result

    setattr(owner, name, wrapped)


def _install() -> None:
    if WINDOW == "worker":
        import optuna

        _on_call(optuna.trial.Trial, "set_user_attr", when=lambda self, key, value: key == "worker")
    elif WINDOW == "run":
        import mlflow

        child = lambda self, *a, **k: "mlflow.parentRunId" in (k.get("tags") or {})  # noqa: E731
        _on_call(mlflow.MlflowClient, "create_run", before=False, when=child)
    elif WINDOW in ("features", "entry"):
        from tlsweep import features

        if WINDOW == "features":
            _on_call(features._ArrayWriter, "append", before=False)
        else:
            _on_call(features._ArrayWriter, "__exit__", before=False)
    elif WINDOW == "model":
        import mlflow.keras

        _on_call(mlflow.keras, "save_model", before=False)
    elif WINDOW == "journal":
        from optuna.storages.journal import JournalFileBackend

        original = JournalFileBackend.append_logs
        calls = [0]

        def torn(self, logs):
            calls[0] += 1
            if calls[0] == CALL:
                with Path(self._file_path).open("ab") as handle:
                    handle.write(b'{"op_code": 4, "worker_id": "torn", "tri')
                _die()
            return original(self, logs)

        JournalFileBackend.append_logs = torn
    elif WINDOW == "champion":
        import mlflow

        _on_call(mlflow, "register_model", before=False)


if WINDOW:
    _install()
