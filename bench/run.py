"""Benchmark: what the feature cache saves, and what tlsweep costs per trial.

The reference grid (2x2x2 over dense units, dropout and batch size) on the bundled digits,
in one process:

  a. tlsweep with the feature cache (a fresh store and cache: the one feature pass is included)
  g. the same with ``sweep.group_size: 8``: the trials asked together, their heads trained in
     one step per batch size (`tlsweep.grouped`)
  b. tlsweep with the cache off (every epoch runs the frozen backbone over the images)
  c. the floor: one feature pass, then the same eight head fits in a bare Keras loop
  d. the same floor fitted the way tlsweep fits (``steps_per_execution``, validation by direct
     calls on the features, test features, one prediction of validation and test per head):
     what tlsweep would cost without its own work

a, g, c and d run in interleaved rounds (``--rounds``, default 3) and are reported as medians:
this machine's speed drifts by 20% from one minute to the next. b runs once, at the end.
Prints wall times, the ratios b/a, a/c, g/c and a/g, the best validation accuracy of a, g
and b (they must agree), and tlsweep's own cost, split in two: per trial (each trial's
duration, as Optuna recorded it, minus the time the same trial spent building the backbone,
in the feature pass, the fits and the predictions: the work d does too) and once per sweep
(loading the data, opening the study and the MLflow parent run, the summary, the champion
model); then the machine and library versions.

    python -m bench.run                     # ResNet50 at 64x64, 3 epochs (the issue's setting)
    python -m bench.run --backbone mobilenet_v2 --size 96
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import os
import platform
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from statistics import median

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

import keras
import numpy as np
import yaml

GRID = {"head.dense_units": [256, 512], "head.dropout": [0.1, 0.3], "train.batch_size": [10, 30]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backbone", default="resnet50")
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--pooling", default="avg")
    parser.add_argument("--rounds", type=int, default=3, help="rounds of a, c, d (medians)")
    parser.add_argument("--skip-uncached", action="store_true", help="a, c and d only (quick)")
    args = parser.parse_args()

    base = {
        "data": "digits",
        "backbone": args.backbone,
        "backbone.weights": None,
        "backbone.input_size": args.size,
        "head.pooling": args.pooling,
        "train.epochs": args.epochs,
        "train.early_stopping.patience": None,
    }
    print(machine_report())
    print(
        f"grid: {GRID}; {args.backbone} at {args.size}x{args.size}, {args.epochs} epochs, "
        f"{args.pooling} pooling, digits (1,077 train / 270 val images)\n"
    )
    rounds: dict[str, list[tuple]] = {"a": [], "g": [], "c": [], "d": []}
    with tempfile.TemporaryDirectory() as tmp:
        os.chdir(tmp)
        for number in range(1, args.rounds + 1):  # interleaved: drifts hit every way alike
            rounds["a"].append(timed_sweep(Path(tmp), f"cached{number}", base, cache=True))
            rounds["g"].append(
                timed_sweep(Path(tmp), f"grouped{number}", base, cache=True, group_size=8)
            )
            rounds["c"].append(timed_floor(base))
            rounds["d"].append(timed_floor(base, like_tlsweep=True))
            times = "  ".join(f"{way} {runs[-1][0]:6.1f} s" for way, runs in rounds.items())
            print(f"round {number}: {times}", flush=True)
        a_time, g_time, c_time, d_time = (median(run[0] for run in rounds[w]) for w in "agcd")
        a_best, g_best, c_best, d_best = (rounds[way][0][1] for way in "agcd")
        print()
        print(f"a. tlsweep, feature cache:   {a_time:7.1f} s   best val_accuracy {a_best:.4f}")
        print(f"g. the same, grouped (8):     {g_time:7.1f} s   best val_accuracy {g_best:.4f}")
        print(f"c. bare Keras floor:          {c_time:7.1f} s   best val_accuracy {c_best:.4f}")
        print(f"d. floor, fitted as tlsweep:  {d_time:7.1f} s   best val_accuracy {d_best:.4f}")
        repeats = {round(run[1], 9) for run in rounds["a"]}
        print(
            f"   (medians of {args.rounds} rounds; a's best is the same in every round: "
            f"{'yes' if len(repeats) == 1 else 'NO'})"
        )
        if not args.skip_uncached:
            b_time, b_best, *_ = timed_sweep(Path(tmp), "uncached", base, cache=False)
            print(f"b. tlsweep, cache off:        {b_time:7.1f} s   best val_accuracy {b_best:.4f}")
            print(f"\nb/a = {b_time / a_time:.1f}x   (the cache's saving; target >= 8)")
            agree = "agree" if abs(a_best - b_best) < 1e-9 else "DIFFER"
            print(f"best val_accuracy cached {a_best:.4f} vs uncached {b_best:.4f}: {agree}")
        print(f"a/c = {a_time / c_time:.2f}   (tlsweep against the floor; target <= 1.3)")
        print(f"a/d = {a_time / d_time:.2f}   (tlsweep against the same fits, bare)")
        print(f"g/c = {g_time / c_time:.2f}   (tlsweep grouped against the floor; target < 1)")
        print(f"a/g = {a_time / g_time:.2f}   (what grouping saves in a whole sweep)")
        agree = "agree" if abs(a_best - g_best) < 1e-9 else "DIFFER"
        print(f"best val_accuracy one at a time {a_best:.4f} vs grouped {g_best:.4f}: {agree}")
        report_overheads(rounds["a"])


def report_overheads(a_runs: list[tuple]) -> None:
    """tlsweep's own cost, per trial (trial durations, as Optuna recorded them, minus the work
    a bare loop does too, timed inside the same trials) and once per sweep; medians."""
    trials = int(np.prod([len(v) for v in GRID.values()]))
    per_trial = median((sum(run[2]) - run[3]) / trials for run in a_runs)
    once = median(run[0] - sum(run[2]) for run in a_runs)
    _, _, durations, work = a_runs[0]
    print(
        f"tlsweep overhead per trial: {per_trial:.2f} s  (round 1: trial durations "
        f"{sum(durations):.1f} s - backbone, feature pass, fits and predictions {work:.1f} s, "
        f"/ {trials}: config, Optuna, MLflow logging, evaluation report, figures, head weights; "
        "target < 1 s)"
    )
    print(
        f"tlsweep once per sweep: {once:.1f} s  (data, study and parent run, leaderboard, plots, "
        "the champion's full model and its registration)"
    )


def timed_sweep(
    tmp: Path, name: str, base: dict, cache: bool, group_size: int = 1
) -> tuple[float, float, list[float], float]:
    """Time one whole ``tlsweep sweep`` of the grid (fresh store, fresh feature cache): seconds,
    best value, each trial's duration as Optuna recorded it, and seconds of `timed_work`."""
    import optuna

    from tlsweep.progress import SweepProgress
    from tlsweep.sweep import run_sweep
    from tlsweep.sweepspec import load_sweep

    document = {
        "base": {**base, "cache.enabled": cache, "cache.dir": str(tmp / f"cache-{name}")},
        "search_space": {k: f"choice({', '.join(map(str, v))})" for k, v in GRID.items()},
        "sweep": {
            "study_name": name,
            "sampler": "grid",
            "pruner": "none",
            "n_trials": 8,
            "group_size": group_size,
            "storage": f"sqlite:///{tmp / f'{name}.db'}",
        },
    }
    path = tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump(document))
    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{tmp / f'mlflow-{name}.db'}"
    quiet = SweepProgress(8, "val_accuracy", console=_null_console())
    with timed_work() as work:
        start = time.perf_counter()
        summary = run_sweep(load_sweep(str(path)), progress=quiet)
        elapsed = time.perf_counter() - start
    study = optuna.load_study(study_name=name, storage=document["sweep"]["storage"])
    durations = [t.duration.total_seconds() for t in study.trials if t.duration]
    return elapsed, float(summary.best_value or 0.0), durations, work.seconds


class Stopwatch:
    """Seconds spent inside the functions it wraps (outermost calls only: no double count)."""

    def __init__(self) -> None:
        self.seconds = 0.0
        self._depth = 0

    def wrap(self, function: Callable) -> Callable:
        @functools.wraps(function)
        def timed(*args: object, **kwargs: object) -> object:
            self._depth += 1
            start = time.perf_counter()
            try:
                return function(*args, **kwargs)
            finally:
                self._depth -= 1
                if not self._depth:
                    self.seconds += time.perf_counter() - start

        return timed


@contextlib.contextmanager
def timed_work() -> Iterator[Stopwatch]:
    """Time, inside a tlsweep sweep, the work a bare loop does too: building the backbone, the
    feature pass, the head fits and the final predictions. The rest of a trial is tlsweep's
    own (config, Optuna, MLflow, evaluation report, figures, weights); measured in the same
    trials, that split does not drift with the machine's speed as a comparison with d does."""
    from tlsweep import backbones, experiment, train

    watch = Stopwatch()
    targets = [
        (backbones.BackboneCache, "get"),  # builds the backbone (first trial)
        (experiment, "cached_features"),  # the feature pass (a hit: loading the entries)
        (train, "fit_stages"),  # the head's fit, validation included
        (train, "predict_small"),  # validation and test predictions
    ]
    originals = [(owner, name, getattr(owner, name)) for owner, name in targets]
    for owner, name, function in originals:
        setattr(owner, name, watch.wrap(function))
    try:
        yield watch
    finally:
        for owner, name, function in originals:
            setattr(owner, name, function)


def timed_floor(base: dict, like_tlsweep: bool = False) -> tuple[float, float, float, float]:
    """One feature pass, then eight plain ``fit`` calls of the head on in-memory features:
    total seconds, best val_accuracy, seconds of the feature pass and of the fits.

    ``like_tlsweep``: fit as a tlsweep trial does (its ``steps_per_execution``, validation by
    `ValidationOnFeatures`), also compute the test features, and predict validation and test
    once per head (`predict_small`).
    """
    from tlsweep.config import load_config
    from tlsweep.data import load_data
    from tlsweep.model import build_classifier, build_head, feature_extractor
    from tlsweep.train import HEAD_STEPS_PER_EXECUTION, ValidationOnFeatures, predict_small

    overrides = [f"{k}={'null' if v is None else v}" for k, v in base.items()]
    start = time.perf_counter()
    cfg = load_config(overrides)
    keras.utils.set_random_seed(cfg.seed)
    data = load_data(cfg.data, cfg.backbone.input_size)
    pass_start = time.perf_counter()  # the backbone's construction counts with its pass
    extractor = feature_extractor(build_classifier(cfg.backbone, cfg.head, data.num_classes))
    splits = ("train", "val", "test") if like_tlsweep else ("train", "val")
    x = {
        split: extractor.predict(
            getattr(data, split).read().astype("float32"), batch_size=64, verbose=0
        )
        for split in splits
    }
    fits_start = time.perf_counter()
    best = 0.0
    for units in GRID["head.dense_units"]:
        for dropout in GRID["head.dropout"]:
            for batch in GRID["train.batch_size"]:
                cfg.head.dense_units, cfg.head.dropout = units, dropout
                head = build_head(x["train"].shape[1:], cfg.head, data.num_classes)
                head.compile(
                    "adam",
                    "sparse_categorical_crossentropy",
                    metrics=["accuracy"],
                    steps_per_execution=HEAD_STEPS_PER_EXECUTION if like_tlsweep else 1,
                )
                validation = (
                    {"callbacks": [ValidationOnFeatures(x["val"], data.val.labels)]}
                    if like_tlsweep
                    else {"validation_data": (x["val"], data.val.labels)}
                )
                history = head.fit(
                    x["train"],
                    data.train.labels,
                    batch_size=batch,
                    verbose=0,
                    epochs=cfg.train.epochs,
                    **validation,
                )
                best = max(best, max(history.history["val_accuracy"]))
                if like_tlsweep:
                    predict_small(head, np.concatenate([x["val"], x["test"]]))
    end = time.perf_counter()
    return end - start, best, fits_start - pass_start, end - fits_start


def machine_report() -> str:
    """The machine, Python, the Keras backend and its devices, and the library versions
    (those installed: a JAX machine may have no TensorFlow)."""
    from importlib import metadata

    from tlsweep import backend

    packages = ("keras", *backend.PACKAGES[backend.name()], "optuna", "mlflow", "numpy")
    found = []
    for package in (*packages, "pillow", "tlsweep"):
        try:
            found.append(f"{package} {metadata.version(package)}")
        except metadata.PackageNotFoundError:
            continue
    devices = ", ".join(str(d) for d in keras.distribution.list_devices())
    return (
        f"machine: {platform.platform()}, {os.cpu_count()} CPUs, {platform.processor() or '?'}; "
        f"python {platform.python_version()}; keras backend {keras.backend.backend()} on "
        f"{devices}\nversions: {', '.join(found)}"
    )


def _null_console():
    from rich.console import Console

    return Console(file=Path(os.devnull).open("w"))


if __name__ == "__main__":
    main()
