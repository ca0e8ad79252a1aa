"""Regenerate the README's pictures from a store that holds a sweep.

    .venv/bin/python docs/screenshots.py                 # sweep "quickstart", stores under ./mlruns
    .venv/bin/python docs/screenshots.py NAME --store DIR --out docs/images

Writes ``report.png`` (the top of ``tlsweep report NAME``'s page) and ``ui.png`` (``tlsweep ui``
showing the sweep's parent run with its trials expanded). Runs the commands in DIR (its default
stores, ``mlruns/``, or ``$MLFLOW_TRACKING_URI``), and uses Debian's Chromium through Playwright
(``pip install -e ".[dev]"``; nothing is downloaded). ``tlsweep report`` also logs the page on the
parent run, as it always does.
"""

from __future__ import annotations

import argparse
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
TLSWEEP = str(Path(sys.executable).with_name("tlsweep"))
SLOW = 180_000  # ms
UI_HIDDEN = ("Dataset", "Source", "Models")
UI_SHOWN = (
    "best_val_accuracy",
    "test_accuracy",
    "head.dense_units",
    "head.dropout",
    "optimizer.name",
    "optimizer.learning_rate",
    "train.batch_size",
)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("name", nargs="?", default="quickstart", help="the sweep (study) name")
    parser.add_argument("--store", type=Path, default=Path.cwd(), help="folder holding mlruns/")
    parser.add_argument(
        "--out", type=Path, default=Path(__file__).resolve().parent / "images", help="output folder"
    )
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true", "TF_CPP_MIN_LOG_LEVEL": "3"}
    from playwright.sync_api import sync_playwright

    with tempfile.TemporaryDirectory() as tmp, sync_playwright() as p:
        context = p.chromium.launch_persistent_context(
            str(Path(tmp) / "profile"),
            executable_path=CHROMIUM,
            args=CHROMIUM_ARGS,
            headless=True,
            viewport={"width": 1400, "height": 1100},
        )
        context.set_default_timeout(SLOW)
        page = context.new_page()

        html = Path(tmp) / "report.html"
        command = [TLSWEEP, "report", args.name, "--output", str(html)]
        subprocess.run(command, cwd=args.store, env=env, check=True)
        page.goto(html.as_uri())
        page.screenshot(path=str(args.out / "report.png"))
        print(f"wrote {args.out / 'report.png'}")

        page.set_viewport_size({"width": 1600, "height": 700})
        with running_ui(args.store, env) as base:
            experiment_id, parent_run_id = sweep_runs(base, args.name)
            page.goto(f"{base}/#/experiments/{experiment_id}/runs")
            parent = page.locator(
                f'.ag-pinned-left-cols-container [role="row"][row-id="{parent_run_id}"]'
            )
            parent.wait_for()
            page.get_by_text("Model training", exact=True).click()  # the runs-first layout
            page.get_by_text("Model registry", exact=True).wait_for()
            parent.wait_for()
            page.wait_for_timeout(2000)  # the table settles in its new layout
            close = page.get_by_role("button", name="Close", exact=True)  # the assistant panel
            if close.count():
                close.first.click()
            choose_columns(page, hide=UI_HIDDEN, show=UI_SHOWN)
            parent.locator('button[data-component-id*="runnamecellrenderer"]').click()
            page.get_by_text("trial-0", exact=True).first.wait_for()
            page.wait_for_timeout(1500)
            page.screenshot(path=str(args.out / "ui.png"))
            print(f"wrote {args.out / 'ui.png'}")
        context.close()
    return 0


def choose_columns(page, hide: tuple[str, ...], show: tuple[str, ...]) -> None:
    """Toggle columns in the runs table's Columns menu (names not offered are left alone)."""
    from playwright.sync_api import TimeoutError as PlaywrightTimeout

    menu = page.locator('[data-component-id="mlflow.experiment_page.runs_table.column_selector"]')
    collapsed = menu.locator(
        ".du-bois-light-tree-treenode-switcher-close"
        " .du-bois-light-tree-switcher:not(.du-bois-light-tree-switcher-noop)"
    )
    for name in (*hide, *show):
        if not menu.is_visible():
            page.get_by_role("button", name="Columns").click()
            menu.wait_for()
        menu.get_by_placeholder("Search columns").fill(name)
        page.wait_for_timeout(500)
        for _ in range(5):  # a matching group may show collapsed
            if not collapsed.count():
                break
            collapsed.first.click()
            page.wait_for_timeout(300)
        # the whole title: a search match is highlighted in a span of its own
        exactly = re.compile(f"^{re.escape(name)}$")
        item = menu.locator(".du-bois-light-tree-title").filter(has_text=exactly).first
        try:
            item.wait_for(timeout=10_000)
        except PlaywrightTimeout:
            print(f"warning: no column {name} in the Columns menu", file=sys.stderr)
            continue
        item.click()
        page.wait_for_timeout(300)
    page.keyboard.press("Escape")


def sweep_runs(base: str, name: str) -> tuple[str, str]:
    """The sweep's experiment id and parent run id, asked of the running server."""
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=base)
    experiment = client.get_experiment_by_name(name)
    if experiment is None:
        raise SystemExit(f"no experiment named {name}: run tlsweep sweep {name} first")
    parents = client.search_runs(
        [experiment.experiment_id], filter_string="tags.`tlsweep.role` = 'sweep'"
    )
    if not parents:
        raise SystemExit(f"experiment {name} holds no sweep parent run")
    return experiment.experiment_id, parents[0].info.run_id


class running_ui:  # noqa: N801 (used as a context manager, like a function)
    """``tlsweep ui`` on a free port in ``folder``, stopped (its whole process group) on exit."""

    def __init__(self, folder: Path, env: dict[str, str]) -> None:
        self.folder, self.env = folder, env

    def __enter__(self) -> str:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        self.process = subprocess.Popen(
            [TLSWEEP, "ui", "--port", str(port)],
            cwd=self.folder,
            env=self.env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        base = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and self.process.poll() is None:
            try:
                with urllib.request.build_opener(urllib.request.ProxyHandler({})).open(
                    f"{base}/health", timeout=5
                ):
                    return base
            except OSError:
                time.sleep(1)
        self.__exit__()
        raise SystemExit("tlsweep ui did not start")

    def __exit__(self, *exc: object) -> None:
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()


if __name__ == "__main__":
    sys.exit(main())
