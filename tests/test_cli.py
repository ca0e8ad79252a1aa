"""The ``tlsweep train`` command: help, --cfg job, bad input (exit 2, one line), end to end."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

import pytest
import yaml

from tlsweep.cli import main
from tlsweep.config import CONFIG_GROUPS, group_choices

_SCRIPT = Path(sys.executable).with_name("tlsweep")
TLSWEEP = [str(_SCRIPT)] if _SCRIPT.exists() else [sys.executable, "-m", "tlsweep.cli"]
ERROR_PREFIX = "tlsweep: error: "


def tlsweep(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """The console script, in this test's directory and environment (store, proxies)."""
    return subprocess.run(
        [*TLSWEEP, *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=Path.cwd(),
        env=dict(os.environ),
        check=False,
    )


def assert_one_error_line(stderr: str, *fragments: str) -> str:
    lines = stderr.splitlines()
    assert len(lines) == 1, f"expected exactly one line on stderr, got {len(lines)}:\n{stderr}"
    line = lines[0]
    assert line.startswith(ERROR_PREFIX), line
    for fragment in fragments:
        assert fragment in line, f"{fragment!r} not in {line!r}"
    return line


# --- help and --cfg job --------------------------------------------------------------------


def test_train_help_lists_groups_and_choices() -> None:
    done = tlsweep("train", "--help")
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    for group in CONFIG_GROUPS:
        (line,) = [line for line in lines if line.strip().startswith(f"{group} ")]
        listed = {choice.strip() for choice in line.split(maxsplit=1)[1].split(",")}
        assert listed == set(group_choices(group)), group
    assert "cifar10" in done.stdout
    assert "resnet50" in done.stdout
    assert "rmsprop" in done.stdout
    assert "head.dropout" in done.stdout  # the key reference


def test_cfg_job_prints_the_resolved_config(store_runs: Callable[..., list]) -> None:
    done = tlsweep("train", "--cfg", "job", "head.dropout=0.1", "backbone=vgg16")
    assert done.returncode == 0, done.stderr
    assert done.stderr == ""
    printed = yaml.safe_load(done.stdout)
    assert printed["head"]["dropout"] == 0.1
    assert printed["backbone"]["name"] == "vgg16"
    assert printed["backbone"]["weights"] == "imagenet"
    assert printed["train"]["epochs"] == 5
    assert store_runs() == []


def test_cfg_job_in_process(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["train", "--cfg", "job", "head.dropout=0.1"]) == 0
    out, err = capsys.readouterr()
    assert yaml.safe_load(out)["head"]["dropout"] == 0.1
    assert err == ""


# --- bad input -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("overrides", "fragments"),
    [
        (["backbone=resnet5"], ["resnet5", "resnet50", "vgg16"]),
        (["data=imagenet"], ["imagenet", "digits", "folder", "cifar10"]),
        (["optimizer=lbfgs"], ["lbfgs", "adam", "sgd"]),
        (["head.dropout=1.0"], ["head.dropout=1.0", "[0, 1)"]),
        (["head.dropout=-0.1"], ["head.dropout=-0.1"]),
        (["head.dense_units=0"], ["head.dense_units=0", ">= 1"]),
        (["train.batch_size=0"], ["train.batch_size=0", ">= 1"]),
        (["optimizer.learning_rate=0"], ["optimizer.learning_rate=0", "> 0"]),
        (["optimizer.learning_rate=-1"], ["optimizer.learning_rate=-1", "> 0"]),
        (["backbone=inception_v3", "backbone.input_size=50"], ["backbone.input_size=50", "75"]),
        (["data=folder"], ["data.path"]),
        (["backbone.weights=/no/such/file.weights.h5"], ["/no/such/file.weights.h5"]),
        (["head.units=3"], ["head.units", "dense_units"]),
        (["head.dense_units=abc"], ["head.dense_units", "abc"]),
    ],
)
def test_bad_config_exits_2_with_one_line(
    overrides: list[str], fragments: list[str], store_runs: Callable[..., list]
) -> None:
    done = tlsweep("train", *overrides)
    assert done.returncode == 2
    assert_one_error_line(done.stderr, *fragments)
    assert done.stdout == ""
    assert store_runs() == []


def _folder_with_one_class(image_folder: Callable[..., Path], tmp_path: Path) -> list[str]:
    return ["data=folder", f"data.path={image_folder({'only': 6})}"]


def _folder_with_broken_image(image_folder: Callable[..., Path], tmp_path: Path) -> list[str]:
    root = image_folder({"cat": 6, "dog": 6})
    (root / "cat" / "broken.jpg").write_bytes(b"not an image")
    return ["data=folder", f"data.path={root}"]


def _missing_folder(image_folder: Callable[..., Path], tmp_path: Path) -> list[str]:
    return ["data=folder", f"data.path={tmp_path / 'nowhere'}"]


def _mismatched_weights(image_folder: Callable[..., Path], tmp_path: Path) -> list[str]:
    import keras

    path = tmp_path / "wide.weights.h5"
    net = keras.applications.MobileNetV2(
        input_shape=(32, 32, 3), alpha=0.5, include_top=False, weights=None
    )
    net.save_weights(path)
    return [f"backbone.weights={path}"]


@pytest.mark.filterwarnings("ignore:Skipping nested container:UserWarning")
@pytest.mark.parametrize(
    ("make_overrides", "fragments"),
    [
        (_missing_folder, ["nowhere", "no such directory"]),
        (_folder_with_one_class, ["at least 2"]),
        (_folder_with_broken_image, ["broken.jpg"]),
        (lambda *_: ["data=cifar10"], ["cifar10", "download"]),
        (lambda *_: ["backbone.weights=imagenet"], ["backbone.weights=null"]),
        (_mismatched_weights, ["wide.weights.h5", "does not fit"]),
    ],
    ids=["missing-dir", "one-class", "broken-image", "cifar10", "imagenet", "weights-file"],
)
def test_bad_data_or_weights_exit_2_with_one_line(
    make_overrides: Callable[..., list[str]],
    fragments: list[str],
    offline: Path,
    image_folder: Callable[..., Path],
    tmp_path: Path,
    capfd: pytest.CaptureFixture[str],
    store_runs: Callable[..., list],
    tiny_overrides: tuple[str, ...],
) -> None:
    overrides = make_overrides(image_folder, tmp_path)
    capfd.readouterr()
    assert main(["train", *tiny_overrides, *overrides]) == 2
    _, err = capfd.readouterr()
    assert_one_error_line(err, *fragments)
    assert store_runs() == []


def test_offline_download_error_is_one_line_from_the_script(
    offline: Path, store_runs: Callable[..., list], tiny_overrides: tuple[str, ...]
) -> None:
    """The real console script, TensorFlow's start-up included: still exactly one line."""
    done = tlsweep("train", *tiny_overrides, "data=cifar10")
    assert done.returncode == 2
    assert_one_error_line(done.stderr, "cifar10", "download")
    assert store_runs() == []


# --- end to end ----------------------------------------------------------------------------

E2E: Sequence[str] = (
    "data=digits",
    "backbone=mobilenet_v2",
    "backbone.weights=null",
    "backbone.input_size=32",
    "train.epochs=2",
)


@pytest.mark.slow
def test_train_end_to_end_twice_gives_identical_results(
    store_runs: Callable[..., list],
) -> None:
    first = tlsweep("train", *E2E, timeout=600)
    assert first.returncode == 0, first.stderr[-3000:]
    runs = store_runs()
    assert len(runs) == 1
    assert runs[0].info.status == "FINISHED"
    assert runs[0].info.run_id in first.stdout
    assert "test_accuracy=" in first.stdout

    second = tlsweep("train", *E2E, timeout=600)
    assert second.returncode == 0, second.stderr[-3000:]
    runs = store_runs()
    assert len(runs) == 2
    assert {run.info.status for run in runs} == {"FINISHED"}
    accuracies = [run.data.metrics["test_accuracy"] for run in runs]
    assert accuracies[0] == accuracies[1]
    losses = [run.data.metrics["test_loss"] for run in runs]
    assert losses[0] == losses[1]
    assert len({run.data.params["data.fingerprint"] for run in runs}) == 1


def test_cache_ls_lists_entries_and_clear_removes_them(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import numpy as np

    from tlsweep.features import FeatureStore

    store = FeatureStore(tmp_path / "features", max_bytes=10**9)
    description = {"backbone": "resnet50", "input_size": 32, "pooling": "avg", "split": "val"}
    store.get_or_compute("k1", (5, 8), lambda: [np.ones((5, 8))], {**description, "n": 5})
    store.get_or_compute("k2", (3, 8), lambda: [np.ones((3, 8))], {**description, "n": 3})
    (store.directory / "manifests").mkdir()
    (store.directory / "manifests" / "0123.json").write_text("{}")
    where = f"cache.dir={tmp_path / 'features'}"

    assert main(["cache", "ls", where]) == 0
    listing = capsys.readouterr().out
    assert "2 entries" in listing
    assert listing.count("resnet50") == 2 and "n=5" in listing and "n=3" in listing

    assert main(["cache", "clear", where]) == 0
    assert "removed 2 entries" in capsys.readouterr().out
    assert store.entries() == []
    assert not (store.directory / "manifests").exists()  # folder manifests go too
    assert main(["cache", "ls", where]) == 0
    assert "0 entries" in capsys.readouterr().out


# --- tlsweep report and tlsweep compare: bad input ---------------------------------------------


@pytest.mark.parametrize(
    ("args", "fragments"),
    [
        (["report", "nosuch"], ["no sweep named 'nosuch'", "known: none yet"]),
        (["report", "nosuch", "--top", "0"], ["--top=0", ">= 1"]),
        (["compare", "0" * 32, "1" * 32], ["no MLflow run " + "0" * 32]),
    ],
    ids=["unknown-sweep", "bad-top", "unknown-run"],
)
def test_report_and_compare_bad_input_exit_2_with_one_line(
    args: list[str],
    fragments: list[str],
    capfd: pytest.CaptureFixture[str],
    store_runs: Callable[..., list],
) -> None:
    capfd.readouterr()
    assert main(args) == 2
    out, err = capfd.readouterr()
    assert_one_error_line(err, *fragments)
    assert out == ""
    assert store_runs() == []
    assert not list(Path.cwd().glob("*.html"))


def test_compare_unknown_run_from_the_script(store_runs: Callable[..., list]) -> None:
    """The console script: one line, exit 2, even when the first run exists and the second not."""
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=os.environ["MLFLOW_TRACKING_URI"])
    run = client.create_run(client.create_experiment("e"), run_name="real")
    client.set_terminated(run.info.run_id)
    done = tlsweep("compare", run.info.run_id, "f" * 32)
    assert done.returncode == 2
    assert_one_error_line(done.stderr, "no MLflow run " + "f" * 32)
    assert done.stdout == ""
    assert not list(Path.cwd().glob("*.html"))


# --- arguments in any order; the same study from anywhere ------------------------------------


@pytest.mark.parametrize(
    ("argv", "overrides", "option"),
    [
        (["sweep", "quickstart", "--workers", "2", "sweep.n_trials=3"], ["sweep.n_trials=3"], 2),
        (["sweep", "quickstart", "a=1", "--workers", "2", "b=2"], ["a=1", "b=2"], 2),
        (["sweep", "--workers", "2", "quickstart", "a=1"], ["a=1"], 2),
        (["train", "--cfg", "job", "head.dropout=0.3"], ["head.dropout=0.3"], "job"),
        (
            ["train", "head.dropout=0.3", "--cfg", "job", "+x.y=1"],
            ["head.dropout=0.3", "+x.y=1"],
            "job",
        ),
    ],
)
def test_options_and_overrides_interleave(argv: list[str], overrides: list[str], option) -> None:
    from tlsweep.cli import build_parser, parse_arguments

    args = parse_arguments(build_parser(), argv)
    assert args.overrides == overrides
    assert (args.workers if argv[0] == "sweep" else args.cfg) == option


def test_reading_commands_take_the_storage_as_sweep_files_do() -> None:
    from tlsweep.cli import build_parser, parse_arguments

    for command in (["runs", "s"], ["report", "s"], ["reproduce", "--best", "s"]):
        args = parse_arguments(build_parser(), [*command, "sweep.storage=sqlite:///x.db"])
        assert args.storage == "sqlite:///x.db"


@pytest.mark.parametrize("argv", [["runs", "s", "head.dropout=0.1"], ["compare", "a", "b", "x=1"]])
def test_overrides_a_command_does_not_take_are_refused(
    argv: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    assert exit_.value.code == 2
    assert f"unrecognized arguments: {argv[-1]}" in capsys.readouterr().err


def test_a_study_elsewhere_is_found_through_its_parent_run(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """After ``tlsweep sweep NAME sweep.storage=journal:///elsewhere``, the printed next step
    ``tlsweep runs NAME`` works as printed: the sweep recorded its storage on its parent run."""
    import mlflow
    import optuna

    from tlsweep import tracking
    from tlsweep.sweep import open_storage

    url = f"journal://{tmp_path / 'elsewhere' / 'studies.journal'}"
    (tmp_path / "elsewhere").mkdir()
    study = optuna.create_study(study_name="away", storage=open_storage(url))
    study.add_trial(optuna.trial.create_trial(value=0.5, params={}, distributions={}))
    tracking.connect()
    client = mlflow.MlflowClient()
    parent = client.create_run(tracking.experiment_id("away"), tags={"sweep.storage": url})
    study.set_user_attr("mlflow_parent_run_id", parent.info.run_id)

    assert main(["runs", "away"]) == 0
    assert "0.5" in capsys.readouterr().out
    assert main(["runs", "nowhere"]) == 2  # still a one-line error for unknown names


def test_a_recorded_database_url_loses_its_hidden_password(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The tag holds the URL as SQLAlchemy renders it (``***``); the lookup drops it, so that
    the driver reads the password from ``PGPASSWORD`` or ``~/.pgpass``."""
    from tlsweep import tracking
    from tlsweep.sweep._storage import recorded_storage

    tag = "postgresql://tlsweep:***@db.example:5432/optuna"
    monkeypatch.setattr(tracking, "sweep_tag", lambda name, key: tag)
    assert recorded_storage("s") == "postgresql://tlsweep@db.example:5432/optuna"


# --- Hydra's flags, --version, completion, -m -------------------------------------------------


def test_cfg_hydra_and_all(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["train", "--cfg", "hydra", "backbone=vgg16"]) == 0
    hydra = yaml.safe_load(capsys.readouterr().out)["hydra"]
    assert hydra["runtime"]["choices"]["backbone"] == "vgg16"
    assert main(["train", "--cfg", "all", "--resolve", "head.dropout=0.2"]) == 0
    both = capsys.readouterr().out
    assert "dropout: 0.2" in both and "\nhydra:\n" in f"\n{both}"


def test_sweep_cfg_job_prints_the_base_every_trial_starts_from(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert main(["sweep", "quickstart", "--cfg", "job", "train.epochs=7"]) == 0
    assert yaml.safe_load(capsys.readouterr().out)["train"]["epochs"] == 7


def test_info_shows_the_search_path_and_defaults(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["train", "--info", "optimizer=sgd"]) == 0
    out = capsys.readouterr().out
    assert "search path:" in out and "file://" in out
    assert "  optimizer: sgd" in out and "  backbone: resnet50" in out
    assert "backbone: " in out.split("choices:")[1]


def test_config_dir_and_name_choose_another_root_config(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import shutil

    from tlsweep.config import config_dir

    monkeypatch.setenv("TLSWEEP_CONFIG_DIR", str(config_dir()))  # restored after the test:
    monkeypatch.setenv("TLSWEEP_CONFIG_NAME", "config")  # -cd/-cn set them for workers
    mine = tmp_path / "myconf"
    shutil.copytree(config_dir(), mine)
    root = (mine / "config.yaml").read_text().replace("backbone: resnet50", "backbone: vgg16")
    (mine / "vgg.yaml").write_text(root)
    assert main(["train", "--cfg", "job", "-cd", str(mine), "-cn", "vgg"]) == 0
    assert yaml.safe_load(capsys.readouterr().out)["backbone"]["name"] == "vgg16"
    assert main(["train", "--cfg", "job", "-cd", str(tmp_path / "none")]) == 2
    assert "--config-dir=" in capsys.readouterr().err


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    from importlib.metadata import version

    with pytest.raises(SystemExit) as done:
        main(["--version"])
    assert done.value.code == 0
    assert capsys.readouterr().out.strip() == f"tlsweep {version('tlsweep')}"


def test_bash_completion_completes_commands_groups_choices_and_sweeps(tmp_path: Path) -> None:
    script = tmp_path / "complete.sh"
    done = tlsweep("completion", "bash")
    assert done.returncode == 0, done.stderr
    script.write_text(done.stdout)
    probe = (
        f"source {script}; compopt() {{ :; }}\n"
        't() { COMP_LINE="$1"; COMP_POINT=${#COMP_LINE}; _tlsweep; echo "${COMPREPLY[*]}"; }\n'
        't "tlsweep tr"; t "tlsweep train backbone=vg"; t "tlsweep train --cf"; '
        't "tlsweep sweep quick"; t "tlsweep sweep q sweep.sampler=r"\n'
    )
    out = subprocess.run(["bash", "-c", probe], capture_output=True, text=True, check=True)
    assert out.stdout.splitlines() == ["train", "vgg16 vgg19", "--cfg", "quickstart", "random"]


def test_multirun_without_a_swept_key_is_refused(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["train", "-m", "head.dropout=0.1"]) == 2
    assert "-m/--multirun needs at least one KEY=A,B" in capsys.readouterr().err


@pytest.mark.slow
def test_multirun_is_a_tracked_grid_sweep(
    store_runs: Callable[..., list], capsys: pytest.CaptureFixture[str]
) -> None:
    tiny = ["data=digits", "data.classes=[0,1,2]", "data.train_limit=60", "data.test_limit=30"]
    tiny += ["backbone.weights=null", "backbone.input_size=32", "train.epochs=1"]
    argv = ["train", "-m", *tiny, "head.dropout=0.1,0.3", "sweep.study_name=grid"]
    assert main(argv) == 0
    runs = store_runs()
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId")]
    assert len(parents) == 1 and len(children) == 2
    assert sorted(float(r.data.params["head.dropout"]) for r in children) == [0.1, 0.3]
    assert main(argv) == 0  # the same command: the grid is done, nothing runs again
    assert len(store_runs()) == 3


# --- sweep --dry-run ------------------------------------------------------------------------


def files_under(folder: Path) -> list[Path]:
    return sorted(p.relative_to(folder) for p in folder.rglob("*"))


def plan_file(folder: Path, sweep: dict) -> Path:
    document = {
        "base": {"data": "digits", "backbone.weights": None},
        "search_space": {
            "head.dense_units": "choice(64, 128)",
            "head.dropout": "interval(0.0, 0.5)",
            "optimizer.learning_rate": "tag(log, interval(1e-4, 1e-2))",
            "train.batch_size": "range(16, 49, step=16)",
        },
        "enqueue": [{"head.dense_units": 128, "head.dropout": 0.2}, {"train.batch_size": 48}],
        "sweep": sweep,
    }
    path = folder / "sweeps" / "plan.yaml"
    path.parent.mkdir()
    path.write_text(yaml.safe_dump(document, sort_keys=False))
    return path


def test_sweep_dry_run_prints_the_plan_and_creates_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], store_runs: Callable[..., list]
) -> None:
    settings = {"sampler": "random", "n_trials": 6, "storage": "postgresql://u:s3cret@db/optuna"}
    path = plan_file(tmp_path, settings)
    before = files_under(tmp_path)
    assert main(["sweep", str(path), "--dry-run", "train.epochs=3", "sweep.seed=7"]) == 0
    out, err = capsys.readouterr()
    lines = [line.strip() for line in out.splitlines()]
    assert lines[0] == "sweep plan: study plan, nothing run (--dry-run)"
    expected = [
        "head.dense_units         choice(64, 128)  (2 values)",
        "head.dropout             float in [0.0, 0.5]  (continuous)",
        "optimizer.learning_rate  float in [0.0001, 0.01] log  (continuous)",
        "train.batch_size         int in [16, 48] step 16  (3 values)",
        "grid size: infinite (head.dropout, optimizer.learning_rate)",
        "objective  val_accuracy (maximize)",
        "sampler    random, seed 7",
        "pruner     median",
        "n_trials   6",
        "groups     off",
        "storage    postgresql://u:***@db/optuna",
        f"artifacts  {tmp_path / 'mlruns' / 'optuna-artifacts'}",
        "enqueued (2):",
        "1. head.dense_units=128 head.dropout=0.2",
        "2. train.batch_size=48",
        "base: data=digits backbone.weights=null train.epochs=3",
    ]
    for line in expected:
        assert line in lines, f"{line!r} not in:\n{out}"
    assert "s3cret" not in out + err and err == ""
    assert files_under(tmp_path) == before  # no study, storage file or artifact folder
    assert store_runs() == []


def test_dry_run_gives_the_grid_size_and_the_default_storage(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = plan_file(tmp_path, {"n_trials": 6})
    before = files_under(tmp_path)
    argv = ["sweep", str(path), "--dry-run", "--workers", "2", "head.dropout=choice(0.2, 0.4)"]
    assert main([*argv, "optimizer.learning_rate=choice(0.001)"]) == 0
    lines = [line.strip() for line in capsys.readouterr().out.splitlines()]
    assert "grid size: 12" in lines  # 2 x 2 x 1 x 3
    assert "promote" not in " ".join(lines)
    journal = tmp_path / "mlruns" / "optuna.journal"  # where several workers' study goes
    assert f"storage    journal://{journal} (default)" in lines
    assert files_under(tmp_path) == before


def test_dry_run_shows_groups_and_promotion(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    promote = {"top_k": 2, "overrides": ["train.fine_tune.epochs=1"]}
    path = plan_file(tmp_path, {"n_trials": 6, "group_size": 3, "promote": promote})
    assert main(["sweep", str(path), "--dry-run"]) == 0
    lines = [line.strip() for line in capsys.readouterr().out.splitlines()]
    assert "groups     up to 3 trials at a time" in lines
    assert "promote    the best 2, continued with train.fine_tune.epochs=1" in lines


def test_dry_run_of_a_bad_sweep_is_one_line(tmp_path: Path) -> None:
    path = plan_file(tmp_path, {"n_trials": 6})
    done = tlsweep("sweep", str(path), "--dry-run", "head.dense_units=choice(16, 32)")
    assert done.returncode == 2
    assert_one_error_line(
        done.stderr, "enqueue entry 1: head.dense_units=128 is not allowed", "choice(16, 32)"
    )
    assert done.stdout == ""
