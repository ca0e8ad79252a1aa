"""The MLflow UI as a person sees it: ``tlsweep ui`` on a store holding a small sweep, opened in
headless Chromium (Debian's /usr/bin/chromium, driven by Playwright for Python; no browser is
downloaded).

Checks that the sweep's experiment lists the parent run with its trials nested under it (hidden
until the parent is expanded, then indented below it), that a trial's confusion matrix is
served as a PNG and rendered in the artifact view, that the runs table's Datasets column and
filter show the splits each trial logged, that a trial's page charts its system metrics, and
that the experiment's Models tab lists the logged model with its params and metrics.

Screenshots are kept in ``tests/artifacts/ui/`` (``$TLSWEEP_TEST_ARTIFACTS/ui`` if set; the
folder ignores itself for git) and their paths are printed. Without Chromium the test is
skipped, unless ``$CI`` is set: in CI it must run.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote

import mlflow
import pytest

pytestmark = pytest.mark.slow

CHROMIUM = Path("/usr/bin/chromium")
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
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
CONFUSION_PNG = "evaluation/test_confusion_matrix.png"
STUDY = "uitiny"
SLOW = 180_000  # ms: the React app on a busy 2-core machine takes its time
CPU = "system/cpu_utilization_percentage"
ML = "workflowType=machine_learning"  # the UI's "Model training" view (Runs, Models tabs)


def artifacts_dir() -> Path:
    root = Path(os.environ.get("TLSWEEP_TEST_ARTIFACTS") or Path(__file__).parent / "artifacts")
    folder = root / "ui"
    folder.mkdir(parents=True, exist_ok=True)
    ignore = root / ".gitignore"
    if not ignore.exists():
        ignore.write_text("# screenshots of test runs, kept out of git\n*\n")
    return folder


@pytest.fixture(scope="module")
def playwright_api():
    """Playwright's sync API; a skip only where Chromium is missing outside CI."""
    if not CHROMIUM.exists():
        if os.environ.get("CI"):
            pytest.fail(f"{CHROMIUM} is missing in CI: .ci/run installs the chromium package")
        pytest.skip(f"{CHROMIUM} is not installed (apt-get install chromium); CI runs this test")
    from playwright.sync_api import sync_playwright

    return sync_playwright


@dataclass
class Store:
    folder: Path
    experiment_id: str
    parent_run_id: str
    child_run_ids: list[str]
    uri: str

    @property
    def client(self) -> mlflow.MlflowClient:
        return mlflow.MlflowClient(tracking_uri=self.uri)


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory, write_sweep, playwright_api) -> Store:
    """A two-trial sweep in the default stores of a fresh folder (mlruns/ under it)."""
    from tlsweep.sweep import run_sweep
    from tlsweep.sweepspec import load_sweep

    folder = tmp_path_factory.mktemp("ui")
    path = write_sweep(
        folder,
        {"head.dropout": "choice(0.0, 0.5)"},
        {"study_name": STUDY, "sampler": "grid", "pruner": "none", "n_trials": 2, "storage": None},
    )
    uri = f"sqlite:///{folder / 'mlruns' / 'mlflow.db'}"
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(folder)
        mp.setenv("MLFLOW_TRACKING_URI", uri)
        summary = run_sweep(load_sweep(str(path)))
    client = mlflow.MlflowClient(tracking_uri=uri)
    experiment = client.get_experiment_by_name(STUDY).experiment_id
    children = client.search_runs(
        [experiment], filter_string=f"tags.mlflow.parentRunId = '{summary.parent_run_id}'"
    )
    ids = [r.info.run_id for r in sorted(children, key=lambda r: r.info.run_name)]
    assert len(ids) == 2
    return Store(folder, experiment, summary.parent_run_id, ids, uri)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# Straight to loopback: urllib.request.urlopen's global opener keeps the proxies of the first
# call in this process, which may have been an offline test's closed-port proxy.
DIRECT = urllib.request.build_opener(urllib.request.ProxyHandler({}))


@pytest.fixture(scope="module")
def ui(store: Store):
    """``tlsweep ui`` on a free port, on the folder's default store (no MLFLOW_TRACKING_URI)."""
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_TRACKING")}
    env.update(MLFLOW_DISABLE_TELEMETRY="true", TF_CPP_MIN_LOG_LEVEL="3")
    log = (store.folder / "ui.log").open("w")
    process = subprocess.Popen(
        [TLSWEEP, "ui", "--port", str(port)],
        cwd=store.folder,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,  # its own process group: the server's workers end with it
    )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 240
        while True:
            if process.poll() is not None:
                pytest.fail(f"tlsweep ui exited {process.returncode}:\n{_tail(store)}")
            try:
                with DIRECT.open(f"{base}/health", timeout=5) as response:
                    if response.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"tlsweep ui did not answer on {base}:\n{_tail(store)}")
            time.sleep(1)
        yield base
    finally:
        _stop(process)
        log.close()


def _tail(store: Store) -> str:
    return (store.folder / "ui.log").read_text()[-3000:]


def _stop(process: subprocess.Popen) -> None:
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


@pytest.fixture(scope="module")
def browser_page(ui: str, playwright_api, tmp_path_factory: pytest.TempPathFactory):
    profile = tmp_path_factory.mktemp("chromium-profile")  # a fresh user-data-dir
    with playwright_api() as p:
        context = p.chromium.launch_persistent_context(
            str(profile),
            executable_path=str(CHROMIUM),
            args=CHROMIUM_ARGS,
            headless=True,
            viewport={"width": 1600, "height": 1000},
        )
        context.set_default_timeout(SLOW)
        from playwright.sync_api import expect

        expect.set_options(timeout=SLOW)
        try:
            yield context.new_page()
        finally:
            context.close()


def screenshot(page, name: str) -> Path:
    path = artifacts_dir() / name
    page.screenshot(path=str(path))
    print(f"screenshot: {path}")
    return path


def test_experiment_lists_the_sweep_with_nested_trials(ui: str, store: Store, browser_page) -> None:
    page = browser_page
    page.goto(f"{ui}/#/experiments/{store.experiment_id}/runs")
    left = page.locator(".ag-pinned-left-cols-container")  # the run name column
    parent = left.locator(f'[role="row"][row-id="{store.parent_run_id}"]')
    parent.wait_for()
    assert parent.get_by_role("link", name=STUDY, exact=True).is_visible()
    page.get_by_text(f"{1 + len(store.child_run_ids)} matching runs").wait_for()
    for child in store.child_run_ids:  # nested: not shown until the parent is expanded
        assert left.locator(f'[row-id="{child}"]').count() == 0

    parent.locator('button[data-component-id*="runnamecellrenderer"]').click()
    parent_name = parent.get_by_role("link", name=STUDY, exact=True).bounding_box()
    rows = left.locator('[role="row"]')
    for number, child in enumerate(store.child_run_ids):
        row = left.locator(f'[role="row"][row-id="{child}"]')
        row.wait_for()
        name = row.get_by_role("link", name=f"trial-{number}", exact=True)
        assert name.is_visible()
        box = name.bounding_box()
        assert box["x"] > parent_name["x"] + 10  # indented under the parent
        assert box["y"] > parent_name["y"]  # and below it
    assert rows.count() == 1 + len(store.child_run_ids)
    screenshot(page, "experiment_runs.png")


def test_trial_confusion_matrix_is_served_and_rendered(ui: str, store: Store, browser_page) -> None:
    page = browser_page
    child = store.child_run_ids[0]
    view = f"{ui}/#/experiments/{store.experiment_id}/runs/{child}/artifacts/{CONFUSION_PNG}"

    def is_the_matrix(response) -> bool:
        url = unquote(response.url)
        return "get-artifact" in url and CONFUSION_PNG in url and child in url

    with page.expect_response(is_the_matrix) as served:
        page.goto(view)
    response = served.value  # what the artifact view asked for (its body goes to a blob: URL)
    logged = list((store.folder / "mlruns").rglob(f"{child}/artifacts/{CONFUSION_PNG}"))
    assert len(logged) == 1
    png = logged[0].read_bytes()
    assert response.status == 200
    assert response.headers["content-type"] == "image/png"
    assert int(response.headers["content-length"]) == len(png)

    image = page.locator(f'img[alt="{CONFUSION_PNG}"]').first
    image.wait_for()
    page.wait_for_function(
        "img => img.complete && img.naturalWidth > 0", arg=image.element_handle()
    )
    width, height = image.evaluate("img => [img.naturalWidth, img.naturalHeight]")
    assert width > 300 and height > 150  # decoded by the browser: a real image
    assert image.bounding_box()["width"] > 100  # laid out, not hidden

    # the bytes, through the same endpoint, as any client fetches them: the logged PNG
    direct = page.request.get(
        f"{ui}/get-artifact", params={"path": CONFUSION_PNG, "run_uuid": child}
    )
    assert direct.ok
    assert direct.body().startswith(PNG_MAGIC)
    assert direct.body() == png
    screenshot(page, "trial_confusion_matrix.png")


def test_system_metrics_are_charted_on_a_trial_page(ui: str, store: Store, browser_page) -> None:
    from playwright.sync_api import expect

    page = browser_page
    child = store.child_run_ids[0]
    samples = store.client.get_metric_history(child, CPU)
    assert samples  # MLflow's monitor sampled the trial
    page.goto(f"{ui}/#/experiments/{store.experiment_id}/runs/{child}/system-metrics?{ML}")
    card = page.get_by_test_id("experiment-view-compare-runs-card").filter(
        has=page.locator(f'h4[title="{CPU}"]')
    )
    card.get_by_text(f"trial-0 ({CPU})").wait_for()  # the chart's legend: this run's series
    points = card.locator(".scatterlayer .trace .points path.point")
    expect(points).to_have_count(len(samples))  # one plotted point per logged sample
    screenshot(page, "trial_system_metrics.png")


def test_models_tab_lists_the_logged_model(ui: str, store: Store, browser_page) -> None:
    from playwright.sync_api import expect

    page = browser_page
    models = store.client.search_logged_models([store.experiment_id])
    assert len(models) == 1  # the champion's: trials kept their heads only
    model = models[0]
    source = store.client.get_run(model.source_run_id).info.run_name
    page.goto(f"{ui}/#/experiments/{store.experiment_id}/models?{ML}")
    row = page.locator(f'.ag-pinned-left-cols-container [role="row"][row-id="{model.model_id}"]')
    row.wait_for()
    link = row.get_by_role("link", name=model.name, exact=True)
    expect(link).to_have_attribute(
        "href", f"#/experiments/{store.experiment_id}/models/{model.model_id}"
    )
    expect(row.locator('[col-id="status"]')).to_have_text("Ready")
    center = page.locator(f'.ag-center-cols-container [role="row"][row-id="{model.model_id}"]')
    expect(center.locator('[col-id="source_run_id"]')).to_have_text(source)
    screenshot(page, "experiment_models.png")

    link.click()
    page.wait_for_url(f"**/models/{model.model_id}**")
    metrics = {m.key: m.value for m in model.metrics}
    expect(page.get_by_text(f"Metrics ({len(metrics)})")).to_be_visible()
    expect(page.get_by_text(f"Parameters ({len(model.params)})")).to_be_visible()
    for name in ("test_accuracy", "best_val_accuracy", "head.dropout"):
        expect(page.get_by_text(name, exact=True).first).to_be_visible()
    screenshot(page, "logged_model.png")


def test_runs_table_shows_and_filters_the_datasets(ui: str, store: Store, browser_page) -> None:
    """Each trial logged its splits (train, val, test) as dataset inputs: the Datasets filter
    offers them, and filtering by one leaves the trials (the parent logged none)."""
    from playwright.sync_api import expect

    page = browser_page
    logged = {
        f"{i.dataset.name} ({i.dataset.digest})": i.tags[0].value
        for child in store.child_run_ids
        for i in store.client.get_run(child).inputs.dataset_inputs
    }
    assert sorted(logged.values()) == ["test", "train", "val"]  # the same splits in both trials
    page.goto(f"{ui}/#/experiments/{store.experiment_id}/runs?{ML}")
    page.get_by_text(f"{1 + len(store.child_run_ids)} matching runs").wait_for()
    page.get_by_test_id("datasets-select-dropdown").click()
    options = page.get_by_role("option")
    expect(options).to_have_count(len(logged))
    for label, context in logged.items():
        option = options.filter(has_text=label)
        expect(option).to_contain_text(context, ignore_case=True)

    test_label = next(label for label, context in logged.items() if context == "test")
    options.filter(has_text=test_label).click()
    page.keyboard.press("Escape")
    page.get_by_text(f"{len(store.child_run_ids)} matching runs").wait_for()
    for child in store.child_run_ids:
        cell = page.locator(
            f'.ag-center-cols-container [row-id="{child}"] [col-id="attributes.`Dataset`"]'
        )
        for label in logged:  # the cell shows the first and counts the others: all are there
            expect(cell).to_contain_text(label)
    screenshot(page, "experiment_datasets.png")
