"""Load benchmark: many tiny trials across local workers on one study.

Runs ``tlsweep sweep ... --workers W`` with N tiny trials (digits, a small head on cached
features of a random ResNet50 at 32x32, one epoch), then checks the record and reports:

  * trials per minute, wall clock;
  * tlsweep's overhead per trial: the mean trial duration minus the mean duration of the same
    head fit in a bare Keras loop, measured in this process beforehand;
  * lost or duplicated trials: the study must hold exactly N finished trials, each with exactly
    one MLflow child run under the one parent, and nothing RUNNING.

    python -m bench.load                        # 200 trials, 4 workers
    python -m bench.load --trials 40 --workers 2
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

import yaml

from bench.run import machine_report

BASE = {
    "data": "digits",
    "data.classes": [0, 1, 2, 3, 4],
    "backbone": "resnet50",
    "backbone.weights": None,
    "backbone.input_size": 32,
    "head.dense_units": 16,
    "train.epochs": 1,
    "train.early_stopping.patience": None,
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=200)
    parser.add_argument("--workers", type=int, default=4)
    args = parser.parse_args()
    print(machine_report())
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        bare = bare_fit_seconds(folder)
        path = write_sweep(folder, args.trials)
        env = dict(os.environ, MLFLOW_TRACKING_URI=f"sqlite:///{folder / 'mlruns' / 'mlflow.db'}")
        start = time.perf_counter()
        subprocess.run(
            [
                sys.executable,
                "-m",
                "tlsweep.cli",
                "sweep",
                str(path),
                "--workers",
                str(args.workers),
            ],
            cwd=folder,
            env=env,
            check=True,
            stdout=subprocess.DEVNULL,
        )
        wall = time.perf_counter() - start
        os.chdir(folder)
        os.environ["MLFLOW_TRACKING_URI"] = env["MLFLOW_TRACKING_URI"]
        report(folder, args.trials, args.workers, wall, bare)


def write_sweep(folder: Path, trials: int) -> Path:
    document = {
        "base": {**BASE, "cache.dir": str(folder / "cache")},
        "search_space": {
            "head.dropout": "interval(0.0, 0.5)",
            "optimizer.learning_rate": "tag(log, interval(1e-4, 1e-2))",
        },
        "sweep": {"study_name": "load", "sampler": "random", "pruner": "none", "n_trials": trials},
    }
    path = folder / "load.yaml"
    path.write_text(yaml.safe_dump(document))
    return path


def bare_fit_seconds(folder: Path, repeats: int = 5) -> float:
    """The same head on the same features in a bare Keras loop: seconds per fit."""
    from tlsweep.config import load_config
    from tlsweep.data import load_data
    from tlsweep.model import build_classifier, build_head, feature_extractor

    cfg = load_config(
        [f"{k}={'null' if v is None else v}" for k, v in BASE.items() if not isinstance(v, list)]
        + ["data.classes=[0,1,2,3,4]"]
    )
    data = load_data(cfg.data, cfg.backbone.input_size)
    extractor = feature_extractor(build_classifier(cfg.backbone, cfg.head, data.num_classes))
    x = extractor.predict(data.train.read().astype("float32"), verbose=0)
    xv = extractor.predict(data.val.read().astype("float32"), verbose=0)
    timings = []
    for _ in range(repeats):
        start = time.perf_counter()
        head = build_head(x.shape[1:], cfg.head, data.num_classes)
        head.compile("adam", "sparse_categorical_crossentropy", metrics=["accuracy"])
        head.fit(
            x,
            data.train.labels,
            validation_data=(xv, data.val.labels),
            epochs=1,
            batch_size=cfg.train.batch_size,
            verbose=0,
        )
        head.predict(xv, verbose=0)
        timings.append(time.perf_counter() - start)
    return sorted(timings)[len(timings) // 2]


def report(folder: Path, trials: int, workers: int, wall: float, bare: float) -> None:
    import mlflow
    import optuna

    from tlsweep.sweep import RUN_ID_ATTR, open_storage

    study = optuna.load_study(
        study_name="load", storage=open_storage(f"journal://{folder / 'mlruns' / 'optuna.journal'}")
    )
    states = Counter(t.state.name for t in study.trials)
    finished = states["COMPLETE"] + states["PRUNED"]
    durations = [t.duration.total_seconds() for t in study.trials if t.duration]
    client = mlflow.MlflowClient()
    parent_id = study.user_attrs["mlflow_parent_run_id"]
    experiment = client.get_run(parent_id).info.experiment_id
    children = client.search_runs(
        [experiment], f"tags.mlflow.parentRunId = '{parent_id}'", max_results=50_000
    )
    numbers = Counter(r.data.tags.get("tlsweep.trial_number") for r in children)
    run_of = {t.number: t.user_attrs.get(RUN_ID_ATTR) for t in study.trials}
    running = [
        r
        for r in client.search_runs([experiment], max_results=50_000)
        if r.info.status == "RUNNING"
    ]
    mean = sum(durations) / len(durations)
    print(f"\n{trials} trials, {workers} local workers (journal storage, SQLite MLflow store)")
    print(f"wall clock: {wall:.1f} s   trials per minute: {60 * finished / wall:.1f}")
    print(
        f"mean trial duration {mean:.2f} s; bare Keras head fit {bare:.2f} s; "
        f"tlsweep overhead per trial {mean - bare:.2f} s"
    )
    print(f"trial states: {dict(states)}  (finished {finished} of {trials})")
    print(
        f"lost trials (missing or extra): {abs(finished - trials)}; "
        f"duplicated child runs: {sum(n - 1 for n in numbers.values() if n > 1)}; "
        f"trials without their run: {sum(1 for r in run_of.values() if not r)}; "
        f"runs left RUNNING: {len(running)}"
    )


if __name__ == "__main__":
    main()
