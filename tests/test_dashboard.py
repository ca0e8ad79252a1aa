"""``tlsweep dashboard NAME``: optuna-dashboard on a sweep's study and trial artifacts."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import optuna
import pytest
import yaml

from tlsweep.cli import main

_SCRIPT = Path(sys.executable).with_name("tlsweep")
TLSWEEP = [str(_SCRIPT)] if _SCRIPT.exists() else [sys.executable, "-m", "tlsweep.cli"]
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
ENQUEUED = {"head.dropout": 0.5}


def error_line(capsys: pytest.CaptureFixture[str]) -> str:
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1, err
    assert err.startswith("tlsweep: error: ")
    return err


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def journal_study(folder: Path, name: str = "board") -> str:
    """A finished one-trial study in a journal file; returns its storage URL."""
    from tlsweep.sweep import open_storage

    url = f"journal://{folder / 'studies' / 'optuna.journal'}"
    study = optuna.create_study(study_name=name, storage=open_storage(url))
    study.add_trial(optuna.trial.create_trial(value=0.5, params={}, distributions={}))
    return url


# --- refusals: one line, exit 2 ----------------------------------------------------------------


def test_without_optuna_dashboard_it_says_how_to_install_it(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setitem(sys.modules, "optuna_dashboard", None)  # as if not installed
    assert main(["dashboard", "quickstart"]) == 2
    assert "pip install 'tlsweep[dashboard]'" in error_line(capsys)


def test_an_unknown_sweep_lists_the_known_ones(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    url = journal_study(tmp_path)
    assert main(["dashboard", "nowhere", f"sweep.storage={url}"]) == 2
    assert "no sweep named 'nowhere'" in (line := error_line(capsys)) and "known: board" in line


@pytest.mark.parametrize(
    ("extra", "fragment"),
    [
        (["--port", "70000"], "--port=70000 is not allowed"),
        (["--artifacts", "no/such/folder"], "--artifacts=no/such/folder: no such folder"),
        (["--port", "{busy}"], "is in use; choose another"),
    ],
    ids=["port-range", "artifacts", "port-in-use"],
)
def test_bad_options_are_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], extra: list[str], fragment: str
) -> None:
    url = journal_study(tmp_path)
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = str(busy.getsockname()[1])
        argv = ["dashboard", "board", "--storage", url, *(a.format(busy=port) for a in extra)]
        assert main(argv) == 2
    assert fragment in error_line(capsys)


# --- a finished sweep, served ----------------------------------------------------------------


@dataclass
class Swept:
    folder: Path
    storage: str
    tracking_uri: str

    def study(self) -> optuna.Study:
        from tlsweep.sweep import open_storage

        return optuna.load_study(study_name="board", storage=open_storage(self.storage))


@pytest.fixture(scope="module")
def swept(tmp_path_factory: pytest.TempPathFactory, write_sweep: Callable[..., Path]) -> Swept:
    """Two trials in a journal file, the first one enqueued by the sweep file."""
    from tlsweep.sweep import run_sweep
    from tlsweep.sweepspec import load_sweep

    folder = tmp_path_factory.mktemp("board")
    storage = f"journal://{folder / 'studies' / 'optuna.journal'}"
    path = write_sweep(
        folder,
        {"head.dropout": "choice(0.0, 0.25, 0.5)"},
        {"study_name": "board", "sampler": "random", "pruner": "none", "n_trials": 2},
    )
    document = yaml.safe_load(path.read_text())
    document["sweep"]["storage"] = storage
    document["enqueue"] = [ENQUEUED]
    path.write_text(yaml.safe_dump(document, sort_keys=False))
    uri = f"sqlite:///{folder / 'mlruns' / 'mlflow.db'}"
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(folder)
        mp.setenv("MLFLOW_TRACKING_URI", uri)
        run_sweep(load_sweep(str(path)))
    return Swept(folder, storage, uri)


@pytest.mark.slow
def test_the_enqueued_configuration_is_the_first_trial(swept: Swept) -> None:
    study = swept.study()
    assert [t.state.name for t in study.trials] == ["COMPLETE", "COMPLETE"]
    assert study.trials[0].params == ENQUEUED
    folder = swept.folder / "studies" / "optuna-artifacts"  # beside the journal
    assert study.user_attrs["tlsweep_artifacts"] == str(folder)
    assert len(list(folder.iterdir())) == 2  # a confusion matrix per trial


def start_dashboard(swept: Swept, port: int) -> subprocess.Popen[str]:
    """``tlsweep dashboard board`` from the sweep's folder: the study is found through the
    storage its sweep recorded on the parent run (no --storage)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "TLSWEEP_"))}
    env.update(MLFLOW_TRACKING_URI=swept.tracking_uri, PYTHONUNBUFFERED="1")
    return subprocess.Popen(
        [*TLSWEEP, "dashboard", "board", "--port", str(port)],
        cwd=swept.folder,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def wait_for_port(process: subprocess.Popen[str], port: int, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return
        except OSError:
            assert process.poll() is None, process.communicate()[1][-3000:]
            assert time.monotonic() < deadline, f"the dashboard did not listen within {timeout} s"
            time.sleep(0.2)  # polling for the port, with a deadline


def get(port: int, path: str) -> tuple[int, str, bytes]:
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # no proxy
    with opener.open(f"http://127.0.0.1:{port}{path}", timeout=30) as response:
        return response.status, response.headers.get("Content-Type", ""), response.read()


@pytest.mark.slow
def test_the_dashboard_serves_the_study_and_its_trials_confusion_matrices(swept: Swept) -> None:
    port = free_port()
    process = start_dashboard(swept, port)
    try:
        wait_for_port(process, port)
        _, _, body = get(port, "/api/studies")
        (summary,) = [s for s in json.loads(body)["study_summaries"] if s["study_name"] == "board"]
        study_id = summary["study_id"]
        _, _, body = get(port, f"/api/studies/{study_id}")
        first = json.loads(body)["trials"][0]
        assert first["number"] == 0
        assert {p["name"]: p["param_external_value"] for p in first["params"]} == {
            "head.dropout": "0.5"
        }
        (artifact,) = first["artifacts"]
        assert artifact["filename"] == "test_confusion_matrix.png"
        status, kind, png = get(
            port, f"/artifacts/{study_id}/{first['trial_id']}/{artifact['artifact_id']}"
        )
        assert (status, kind) == (200, "image/png") and png.startswith(PNG_SIGNATURE)
        stored = swept.folder / "studies" / "optuna-artifacts" / artifact["artifact_id"]
        assert png == stored.read_bytes()
        process.send_signal(signal.SIGTERM)
        stdout, stderr = process.communicate(timeout=120)
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate()
    assert process.returncode == 128 + signal.SIGTERM, stderr[-3000:]
    assert stderr.strip().splitlines()[-1] == "tlsweep: interrupted (SIGTERM)"
    assert f"http://127.0.0.1:{port}/" in stdout and "optuna.journal" in stdout
