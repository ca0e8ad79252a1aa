"""Leaderboards (ordering, the join with run metrics, Markdown, HTML and text renderings), the
sweep report and the comparison of two runs (pages built from plain data, then end to end)."""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path

import mlflow
import pandas as pd
import pytest

from tlsweep import report
from tlsweep.cli import main


def trials_frame() -> pd.DataFrame:
    """Trials as `sweep.leaderboard` builds them: FAILs have no value, PRUNED their best."""
    rows = [
        (0, "COMPLETE", 0.80, 64, "r0", None),
        (1, "FAIL", None, 128, "r1", "ValueError: boom"),
        (2, "PRUNED", 0.40, 256, "r2", None),
        (3, "COMPLETE", 0.95, 64, "r3", None),
        (4, "PRUNED", 0.60, 128, "r4", None),
        (5, "COMPLETE", 0.70, 512, "r5", None),
        (6, "COMPLETE", 0.80, 32, "r6", None),
        (7, "FAIL", None, 256, None, "UserError: head.dropout=1.5 is not allowed"),
    ]
    columns = ["trial", "state", "value", "head.dense_units", "run_id", "reason"]
    frame = pd.DataFrame(rows, columns=columns)
    frame["duration_s"] = [1.5, 0.1, 0.7, 2.0, 0.9, 1.1, 1.2, 0.05]
    return frame


def runs_frame() -> pd.DataFrame:
    return pd.DataFrame(
        {
            "run_id": ["r0", "r1", "r2", "r3", "r4", "r5", "r6"],
            "run_status": ["FINISHED", "FAILED", *["FINISHED"] * 5],
            "test_accuracy": [0.79, None, 0.41, 0.93, 0.58, 0.71, 0.77],
            "best_epoch": [3, None, 1, 4, 2, 3, 5],
        }
    )


def test_maximize_complete_best_first_then_pruned_then_failed() -> None:
    board = report.leaderboard(trials_frame(), runs_frame(), maximize=True)
    assert board["trial"].tolist() == [3, 0, 6, 5, 4, 2, 1, 7]
    assert board["state"].tolist() == ["COMPLETE"] * 4 + ["PRUNED"] * 2 + ["FAIL"] * 2


def test_minimize_complete_lowest_first_then_pruned_then_failed() -> None:
    board = report.leaderboard(trials_frame(), runs_frame(), maximize=False)
    assert board["trial"].tolist() == [5, 0, 6, 3, 2, 4, 1, 7]


def test_ties_keep_trial_order() -> None:
    board = report.leaderboard(trials_frame(), None, maximize=True)
    tied = board[board["value"] == 0.80]["trial"].tolist()
    assert tied == [0, 6]


def test_running_and_waiting_sit_between_pruned_and_failed() -> None:
    trials = pd.DataFrame(
        {
            "trial": [0, 1, 2, 3, 4],
            "state": ["FAIL", "WAITING", "RUNNING", "PRUNED", "COMPLETE"],
            "value": [None, None, None, 0.5, 0.1],
            "run_id": ["a", "b", "c", "d", "e"],
        }
    )
    board = report.leaderboard(trials, None, maximize=True)
    assert board["state"].tolist() == ["COMPLETE", "PRUNED", "RUNNING", "WAITING", "FAIL"]


def test_join_with_run_metrics_and_column_order() -> None:
    board = report.leaderboard(trials_frame(), runs_frame(), maximize=True)
    first = board.iloc[0]
    assert first["run_id"] == "r3"
    assert first["test_accuracy"] == 0.93
    assert first["run_status"] == "FINISHED"
    no_run = board[board["trial"] == 7].iloc[0]
    assert math.isnan(no_run["test_accuracy"])
    columns = board.columns.tolist()
    assert columns[:4] == ["trial", "state", "value", "head.dense_units"]
    trailing = [c for c in report.TRAILING if c in columns]
    assert columns[-len(trailing) :] == trailing
    assert columns[-2:] == ["run_id", "reason"]


def test_all_empty_columns_are_dropped() -> None:
    trials = trials_frame()
    trials["never_set"] = None
    board = report.leaderboard(trials, None, maximize=True)
    assert "never_set" not in board.columns
    assert "value" in board.columns


def test_empty_study() -> None:
    empty = pd.DataFrame()
    assert report.leaderboard(empty, None, maximize=True).empty


def test_markdown_has_every_row_in_order() -> None:
    board = report.leaderboard(trials_frame(), runs_frame(), maximize=True)
    text = report.to_markdown(board)
    lines = text.strip().splitlines()
    assert lines[0] == "| " + " | ".join(board.columns) + " |"
    assert set(lines[1].replace("|", "").split()) == {"---"}
    assert len(lines) == 2 + len(board)
    for line, (_, row) in zip(lines[2:], board.iterrows(), strict=True):
        cells = [c.strip() for c in line.strip("|").split(" | ")]
        assert cells[0] == str(row["trial"])
        assert cells[1] == row["state"]
    assert "| 0.95 |" in lines[2]  # floats to 4 significant digits
    assert "UserError: head.dropout=1.5 is not allowed" in text


def test_markdown_escapes_pipes_and_newlines() -> None:
    board = pd.DataFrame({"trial": [0], "reason": ["a|b\nc"], "value": [None]})
    text = report.to_markdown(board)
    assert "a\\|b c" in text
    assert text.count("\n") == 3  # header, rule, one row
    assert "nan" not in text.lower()


def test_html_page_has_every_row() -> None:
    board = report.leaderboard(trials_frame(), runs_frame(), maximize=True)
    page = report.to_html(board, title="leaderboard <val_accuracy>")
    assert page.startswith("<!doctype html>")
    assert "<title>leaderboard &lt;val_accuracy&gt;</title>" in page
    assert page.count("<tr") == 1 + len(board)  # header row + one per trial
    for run_id in ("r0", "r2", "r3", "r4", "r5", "r6"):
        assert f"<td>{run_id}</td>" in page
    assert page.index("<td>r3</td>") < page.index("<td>r0</td>") < page.index("<td>r2</td>")


def test_text_rendering_drops_the_reason() -> None:
    board = report.leaderboard(trials_frame(), runs_frame(), maximize=True)
    text = report.to_text(board)
    assert "boom" not in text
    assert len(text.splitlines()) == 1 + len(board)
    assert text.splitlines()[1].split()[:3] == ["3", "COMPLETE", "0.95"]


@pytest.mark.parametrize("maximize", [True, False])
def test_input_is_not_modified(maximize: bool) -> None:
    trials = trials_frame()
    before = trials.copy()
    report.leaderboard(trials, runs_frame(), maximize=maximize)
    pd.testing.assert_frame_equal(trials, before)


# --- the sweep report and the comparison of two runs -------------------------------------------

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def tiny_png(color: str = "red") -> bytes:
    import io

    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (4, 3), color).save(buffer, format="PNG")
    return buffer.getvalue()


def confusion() -> pd.DataFrame:
    names = ["cat", "dog", "owl"]
    return pd.DataFrame([[3, 1, 0], [2, 2, 0], [0, 0, 0]], index=names, columns=names)


def embedded_pngs(page: str) -> list[bytes]:
    import base64
    import re

    found = re.findall(r"src='data:image/png;base64,([A-Za-z0-9+/=]+)'", page)
    return [base64.b64decode(data) for data in found]


def external_references(page: str) -> list[str]:
    """Every src/href that would need something beyond the file itself (inline scripts are
    code, not references: plotly.js holds URLs it never loads offline)."""
    import re

    assert not re.search(r"<script[^>]*\bsrc\s*=", page)  # no script loaded from elsewhere
    markup = re.sub(r"<script>.*?</script>", "", page, flags=re.DOTALL)
    targets = re.findall(r"""(?:src|href)\s*=\s*["']([^"']*)["']""", markup)
    return [t for t in targets if not t.startswith(("data:", "#"))]


def test_per_class_accuracy_is_the_recall_of_each_true_class() -> None:
    table = report.per_class_accuracy(confusion())
    assert table["class"].tolist() == ["cat", "dog", "owl"]
    assert table["accuracy"].tolist()[:2] == [0.75, 0.5]
    assert math.isnan(table["accuracy"].iloc[2])  # no test image of that class
    assert table["correct"].tolist() == [3, 2, 0]
    assert table["support"].tolist() == [4, 4, 0]


def test_param_differences_only_lists_what_differs() -> None:
    a = {"head.dropout": "0.1", "seed": "0", "only_a": "x", "lr": "0.001"}
    b = {"head.dropout": "0.5", "seed": "0", "only_b": "y", "lr": "0.001"}
    table = report.param_differences(a, b, ["A", "B"])
    assert table.columns.tolist() == ["param", "A", "B"]
    assert table.to_dict("records") == [
        {"param": "head.dropout", "A": "0.1", "B": "0.5"},
        {"param": "only_a", "A": "x", "B": ""},
        {"param": "only_b", "A": "", "B": "y"},
    ]
    assert report.param_differences(a, dict(a)).empty


def test_metrics_side_by_side_test_and_best_first_with_difference() -> None:
    a = {"loss": 0.5, "test_accuracy": 0.8, "best_val_accuracy": 0.85, "only_a": 1.0}
    b = {"loss": 0.4, "test_accuracy": 0.9, "best_val_accuracy": 0.8}
    table = report.metrics_side_by_side(a, b, ["A", "B"])
    assert table["metric"].tolist() == ["test_accuracy", "best_val_accuracy", "loss", "only_a"]
    assert table["difference"].tolist()[:3] == pytest.approx([0.1, -0.05, -0.1])
    assert math.isnan(table["B"].iloc[3]) and math.isnan(table["difference"].iloc[3])


def test_sweep_commands() -> None:
    commands = [c for c, _ in report.sweep_commands("quickstart", "r1", "r2")]
    assert commands == [
        "tlsweep reproduce r1",
        "tlsweep reproduce --best quickstart",
        "tlsweep sweep quickstart",
        "tlsweep runs quickstart",
        "tlsweep compare r1 r2",
        "tlsweep ui",
    ]
    stored = [c for c, _ in report.sweep_commands("s", None, None, "journal:///j.log")]
    assert stored == [
        "tlsweep sweep s sweep.storage=journal:///j.log",
        "tlsweep runs s --storage journal:///j.log",
        "tlsweep ui",
    ]


def sample_report(**changes) -> report.SweepReport:
    board = report.leaderboard(trials_frame(), runs_frame(), maximize=True)
    fields = {
        "name": "tiny<sweep>",
        "parent_run_id": "p0",
        "experiment": "tiny",
        "metric": "val_accuracy",
        "direction": "maximize",
        "board": board,
        "settings": {"sampler": "tpe", "n_trials": "8"},
        "base": ["backbone=resnet50", "data=digits"],
        "space": {"head.dense_units": "choice(32, 64, 128, 256, 512)"},
        "counts": {"complete": 4, "pruned": 2, "fail": 2},
        "best": {"trial": 3, "run_id": "r3", "value": 0.95, "params": {"head.dense_units": 64}},
        "optuna_plots": {"optimization_history": tiny_png("blue"), "slice": tiny_png("green")},
        "curves_png": tiny_png("black"),
        "curves_runs": ["r3", "r0"],
        "best_evaluation": report.RunEvaluation("test", confusion(), tiny_png("white")),
        "per_class_png": tiny_png("gray"),
        "commands": report.sweep_commands("tiny", "r3", "r0"),
        "generated": "2026-01-01 12:00",
    }
    return report.SweepReport(**{**fields, **changes})


def test_sweep_report_is_one_self_contained_page() -> None:
    page = report.sweep_report_html(sample_report())
    assert page.startswith("<!doctype html>")
    assert external_references(page) == []
    assert "<script" not in page and "<link" not in page and "url(" not in page
    images = embedded_pngs(page)
    assert len(images) == 5  # 2 Optuna plots, curves, confusion matrix, per-class accuracy
    assert all(image.startswith(PNG_MAGIC) for image in images)
    for section in ("summary", "leaderboard", "optuna", "curves", "best", "settings", "reproduce"):
        assert f"<section id='{section}'>" in page
        assert f"href='#{section}'" in page
    assert "tiny&lt;sweep&gt;" in page and "tiny<sweep>" not in page


def test_optuna_charts_take_the_place_of_their_pngs_with_plotly_js_inlined_once() -> None:
    charts = {"optimization_history": "<div id='h'>history</div>", "slice": "<div>slice</div>"}
    page = report.sweep_report_html(sample_report(optuna_charts=charts, plotly_js="var Plotly;"))
    assert external_references(page) == []
    assert page.count("<script>var Plotly;</script>") == 1
    assert page.index("var Plotly;") < page.index("<div id='h'>history</div>")  # loaded first
    assert len(embedded_pngs(page)) == 3  # the Optuna PNGs are not shown twice
    assert "optimization history" in page and "<div>slice</div>" in page
    page = report.sweep_report_html(sample_report(optuna_charts={}, plotly_js="var Plotly;"))
    assert "<script" not in page  # no chart: no 4.6 MB of plotly.js either


def test_sweep_report_content() -> None:
    page = report.sweep_report_html(sample_report())
    best_row = page[page.index("<tr class='best'>") :].split("</tr>")[0]
    assert ">r3<" in best_row and ">0.95<" in best_row
    assert page.count("<tr class='best'>") == 1
    assert page.index(">r3<") < page.index(">r0<") < page.index(">r2<")  # leaderboard order
    assert "trial 1: ValueError: boom" in page  # failed trials keep their reason
    assert "choice(32, 64, 128, 256, 512)" in page
    assert "backbone=resnet50\ndata=digits" in page
    for command in ("tlsweep reproduce r3", "tlsweep reproduce --best tiny", "tlsweep sweep tiny"):
        assert command in page
    per_class = page[page.index("Per-class accuracy") :]
    assert ">0.75<" in per_class and ">cat<" in per_class


def test_sweep_report_without_trials_or_figures() -> None:
    page = report.sweep_report_html(
        sample_report(
            board=pd.DataFrame(),
            best={},
            optuna_plots={},
            curves_png=None,
            best_evaluation=None,
            per_class_png=None,
        )
    )
    assert "no trials yet" in page
    assert embedded_pngs(page) == []
    assert "<section id='optuna'>" not in page and "<section id='curves'>" not in page


def test_comparison_page() -> None:
    runs = [
        {"run_id": "a" * 32, "run_name": "trial-0", "status": "FINISHED", "experiment": "tiny"},
        {"run_id": "b" * 32, "run_name": "trial-1", "status": "FINISHED", "experiment": "tiny"},
    ]
    labels = ["A: trial-0", "B: trial-1"]
    params = report.param_differences({"head.dropout": "0.0"}, {"head.dropout": "0.5"}, labels)
    metrics = report.metrics_side_by_side({"test_accuracy": 0.5}, {"test_accuracy": 0.75}, labels)
    comparison = report.RunComparison(
        runs=runs,
        labels=labels,
        params=params,
        metrics=metrics,
        same_params=41,
        curves_png=tiny_png(),
        evaluations=[report.RunEvaluation("test", confusion(), tiny_png()), None],
    )
    page = report.comparison_html(comparison)
    assert external_references(page) == []
    assert len(embedded_pngs(page)) == 2  # the curves and A's confusion matrix
    assert "B: trial-1: no confusion matrix figure logged" in page
    assert ">head.dropout<" in page and ">0.5<" in page
    assert "41 other params are identical" in page
    assert ">0.25<" in page  # the difference


def test_rich_table_renders_every_row() -> None:
    from rich.console import Console

    console = Console(record=True, width=120)
    table = report.metrics_side_by_side({"test_accuracy": 0.5}, {"test_accuracy": 0.75})
    console.print(report.rich_table(table, "metrics"))
    text = console.export_text()
    assert "metrics" in text and "test_accuracy" in text and "0.75" in text and "0.25" in text


# --- tlsweep report and tlsweep compare on a real (tiny) sweep ----------------------------------


@dataclass
class Swept:
    folder: Path
    uri: str
    parent_run_id: str
    run_ids: list[str]  # by trial number
    best_run_id: str

    @property
    def client(self) -> mlflow.MlflowClient:
        return mlflow.MlflowClient(tracking_uri=self.uri)

    def enter(self, monkeypatch: pytest.MonkeyPatch) -> None:
        """Work in the sweep's folder, on its store (the defaults: mlruns/ under the cwd)."""
        monkeypatch.chdir(self.folder)
        monkeypatch.setenv("MLFLOW_TRACKING_URI", self.uri)


@pytest.fixture(scope="module")
def swept(tmp_path_factory: pytest.TempPathFactory, write_sweep) -> Swept:
    """Two trials of the tiny sweep (a grid over the dropout), in the default stores."""
    from tlsweep import sweep
    from tlsweep.sweep import run_sweep
    from tlsweep.sweepspec import load_sweep

    folder = tmp_path_factory.mktemp("report")
    path = write_sweep(
        folder,
        {"head.dropout": "choice(0.0, 0.5)"},
        {
            "study_name": "reptiny",
            "sampler": "grid",
            "pruner": "none",
            "n_trials": 2,
            "storage": None,
        },
        base={"train.epochs": 3},
    )
    uri = f"sqlite:///{folder / 'mlruns' / 'mlflow.db'}"
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(folder)
        mp.setenv("MLFLOW_TRACKING_URI", uri)
        summary = run_sweep(load_sweep(str(path)))
        study = sweep.load_study("reptiny")
        run_ids = [
            t.user_attrs[sweep.RUN_ID_ATTR] for t in sorted(study.trials, key=lambda t: t.number)
        ]
    return Swept(folder, uri, summary.parent_run_id, run_ids, summary.best_run_id)


@pytest.mark.slow
def test_report_command_writes_and_logs_a_self_contained_page(
    swept: Swept, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    swept.enter(monkeypatch)
    output = swept.folder / "out" / "report.html"
    assert main(["report", "reptiny", "--output", str(output)]) == 0
    out = capsys.readouterr().out
    assert f"wrote {output}" in out and swept.parent_run_id in out
    page = output.read_text()
    assert external_references(page) == []
    assert "<link" not in page
    images = embedded_pngs(page)
    assert all(image.startswith(PNG_MAGIC) for image in images)
    assert len(images) == 3  # the curves, the confusion matrix, per-class accuracy
    assert page.count("<figure class='chart'>") >= 3  # Optuna's, interactive: history, slice...
    assert "optimization history" in page and "parallel coordinate" in page
    for section in ("leaderboard", "optuna", "curves", "best", "settings", "reproduce"):
        assert f"<section id='{section}'>" in page
    for run_id in swept.run_ids:
        assert f">{run_id}<" in page
    for command in (
        f"tlsweep reproduce {swept.best_run_id}",
        "tlsweep reproduce --best reptiny",
        "tlsweep sweep reptiny",
    ):
        assert command in page
    assert "choice(0.0, 0.5)" in page and "train.epochs=3" in page

    # the best run's logged confusion matrix, as is, and the page itself on the parent run
    client = swept.client
    logged = Path(
        client.download_artifacts(
            swept.best_run_id, "evaluation/test_confusion_matrix.png", str(swept.folder / "dl")
        )
    ).read_bytes()
    assert logged in images
    assert "report.html" in {a.path for a in client.list_artifacts(swept.parent_run_id)}
    copy = client.download_artifacts(swept.parent_run_id, "report.html", str(swept.folder / "dl"))
    assert Path(copy).read_text() == page


CHROMIUM = Path("/usr/bin/chromium")


@pytest.mark.slow
def test_report_charts_draw_offline_in_a_real_browser(swept: Swept, monkeypatch) -> None:
    """The page from `tlsweep report`, opened from disk in headless Chromium with every
    request outside the file refused: each Optuna chart is drawn by the inlined plotly.js."""
    if not CHROMIUM.exists():
        if os.environ.get("CI"):
            pytest.fail(f"{CHROMIUM} is missing in CI: .ci/run installs the chromium package")
        pytest.skip(f"{CHROMIUM} is not installed; CI runs this test")
    from playwright.sync_api import sync_playwright

    swept.enter(monkeypatch)
    output = swept.folder / "browser" / "report.html"
    assert main(["report", "reptiny", "--output", str(output)]) == 0
    refused: list[str] = []
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=["--no-sandbox"])
        try:
            page = browser.new_page()
            page.route(
                "**/*",
                lambda route: (
                    route.continue_()
                    if route.request.url.startswith(("file:", "data:"))
                    else (refused.append(route.request.url), route.abort())
                ),
            )
            page.goto(output.as_uri())
            charts = page.locator("figure.chart .js-plotly-plot")
            charts.first.wait_for(state="visible", timeout=120_000)
            drawn = page.locator("figure.chart .js-plotly-plot .main-svg")
            assert drawn.count() >= charts.count() >= 3  # every chart has its SVG
            assert page.evaluate("typeof Plotly.newPlot") == "function"
        finally:
            browser.close()
    assert refused == []


@pytest.mark.slow
def test_report_reads_histories_and_evaluations(swept: Swept, monkeypatch) -> None:
    from tlsweep import tracking

    swept.enter(monkeypatch)
    tracking.connect()
    history = tracking.metric_histories(swept.run_ids[::-1], ["val_accuracy", "loss"])
    assert list(dict.fromkeys(history["run_id"])) == swept.run_ids[::-1]  # in the order asked
    for run_id in swept.run_ids:
        for metric in ("val_accuracy", "loss"):
            steps = history[(history["run_id"] == run_id) & (history["metric"] == metric)]["step"]
            assert steps.tolist() == [1, 2, 3]  # step = epoch
    found = tracking.evaluation_artifacts(swept.best_run_id)
    assert found["split"] == "test"
    assert found["png"].startswith(PNG_MAGIC)
    matrix = found["confusion"]
    assert list(matrix.index) == list(matrix.columns) == ["0", "1", "2"]
    run = swept.client.get_run(swept.best_run_id)
    assert int(matrix.to_numpy().sum()) == int(run.data.params["data.n_test"])
    per_class = report.per_class_accuracy(matrix)
    recalls = [found["report"][name]["recall"] for name in per_class["class"]]
    assert per_class["accuracy"].tolist() == pytest.approx(recalls)
    assert tracking.evaluation_artifacts(swept.parent_run_id) == {}


@pytest.mark.slow
def test_compare_command(
    swept: Swept, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    swept.enter(monkeypatch)
    monkeypatch.setenv("COLUMNS", "160")
    first, second = swept.run_ids
    assert main(["compare", first, second]) == 0
    out = capsys.readouterr().out
    assert f"A: trial-0  run {first}" in out and f"B: trial-1  run {second}" in out
    differs = out[out.index("config values that differ") : out.index("metrics")]
    assert "head.dropout" in differs and "0.5" in differs
    assert "data.fingerprint" not in differs  # same data, same value: not listed
    assert "test_accuracy" in out and "per-class accuracy" in out
    output = swept.folder / f"compare_{first[:8]}_{second[:8]}.html"
    assert f"wrote {output.name}" in out
    page = output.read_text()
    assert external_references(page) == []
    assert len(embedded_pngs(page)) == 3  # the curves, then both confusion matrices
    assert "A: trial-0" in page and "B: trial-1" in page
    params = page[page.index("<section id='params'>") : page.index("<section id='metrics'>")]
    assert ">head.dropout<" in params


def test_sweep_report_of_a_pareto_sweep_names_its_objectives() -> None:
    objectives = "{'val_accuracy': 'maximize', 'latency_ms': 'minimize'}"
    page = report.sweep_report_html(sample_report(objectives=objectives))
    assert "objectives" in page and "latency_ms" in page
    assert "champion (on the Pareto front)" in page
    assert "Leaderboard (Pareto rank, then the first objective, best first)" in page
    assert "maximize val_accuracy" not in page
