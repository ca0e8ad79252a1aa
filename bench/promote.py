"""Benchmark: promotion (``sweep.promote``) against fine-tuning every trial.

Two whole sweeps in one process, the same search space, sampler and seed, on the bundled
digits with ResNet50 (random weights, offline) at ``--size`` pixels, each with fresh stores
and a fresh feature cache:

  every     the ``finetune`` sweep's way: every trial trains its head (5 epochs, on cached
            features), then fine-tunes the top of the backbone (``--ft-epochs``, on images)
  promote   ``sweep.promote``: the same trials train their heads only, then the best
            ``--top-k`` continue from their trained heads into the same fine-tuning stage

Both spend the same budget of ``--trials`` sampled trials (promote adds its ``top_k``
continuations). For each: the whole sweep's seconds, its best validation accuracy (promote:
the best of its final stage, its champion), and the time to reach that best (from the sweep's
start to the end of the trial that scored it). Targets: promote reaches at least every's best
value in at most a third of every's time to reach it. The machine and the versions come first.

    python -m bench.promote                     # 8 trials, top 2, 2 fine-tuning epochs
    python -m bench.promote --trials 4 --top-k 1 --ft-epochs 1   # quicker
"""

from __future__ import annotations

import argparse
import datetime
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

import yaml

from bench.run import _null_console, machine_report

SPACE = {
    "head.dense_units": "choice(64, 128, 256)",
    "head.dropout": "interval(0.0, 0.5)",
    "optimizer.learning_rate": "tag(log, interval(1e-4, 3e-3))",
}


@dataclass
class Swept:
    seconds: float
    best: float
    to_best: float  # seconds from the sweep's start to the end of the best trial
    trials: int
    fine_tuned: int
    lines: list[str]  # each trial: its number, value, seconds, and what it continues


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=32)
    parser.add_argument("--trials", type=int, default=8)
    parser.add_argument("--top-k", type=int, default=2)
    parser.add_argument("--ft-epochs", type=int, default=2)
    parser.add_argument("--unfreeze", type=int, default=20)
    args = parser.parse_args()

    print(machine_report())
    fine_tune = {
        "train.fine_tune.epochs": args.ft_epochs,
        "train.fine_tune.unfreeze_layers": args.unfreeze,
        "train.fine_tune.learning_rate": 1e-4,
    }
    base = {
        "data": "digits",
        "backbone": "resnet50",
        "backbone.weights": None,
        "backbone.input_size": args.size,
        "head.pooling": "avg",
        "train.epochs": 5,
        "train.early_stopping.patience": None,
    }
    print(
        f"search: {SPACE}; TPE (seed 0), no pruning, {args.trials} trials; resnet50 (random "
        f"weights) at {args.size}x{args.size}, digits; head 5 epochs; fine-tuning: "
        f"{fine_tune}\n"
    )
    overrides = [f"{key}={value}" for key, value in fine_tune.items()]
    with tempfile.TemporaryDirectory() as tmp:
        os.chdir(tmp)
        promote = sweep(
            Path(tmp),
            "promote",
            base,
            args.trials,
            promote={"top_k": args.top_k, "overrides": overrides},
        )
        show("promote", promote)
        every = sweep(Path(tmp), "every", {**base, **fine_tune}, args.trials)
        show("every", every)
    print(
        f"\nbest val_accuracy: promote {promote.best:.4f}, every {every.best:.4f} "
        f"({'at least as good' if promote.best >= every.best else 'LOWER'})"
    )
    print(
        f"time to the best: every/promote = {every.to_best / promote.to_best:.2f}x "
        f"(target >= 3); whole sweeps: every/promote = {every.seconds / promote.seconds:.2f}x"
    )


def sweep(tmp: Path, name: str, base: dict, trials: int, promote: dict | None = None) -> Swept:
    """Run one whole sweep (fresh stores and cache) and time it."""
    import optuna

    from tlsweep.progress import SweepProgress
    from tlsweep.sweep import RUN_ID_ATTR, run_sweep
    from tlsweep.sweep._promote import continues
    from tlsweep.sweepspec import load_sweep

    storage = f"sqlite:///{tmp / f'{name}.db'}"
    settings = {
        "study_name": name,
        "sampler": "tpe",
        "seed": 0,
        "pruner": "none",
        "n_trials": trials,
        "storage": storage,
        **({"promote": promote} if promote else {}),
    }
    document = {
        "base": {**base, "cache.dir": str(tmp / f"cache-{name}")},
        "search_space": SPACE,
        "sweep": settings,
    }
    path = tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump(document))
    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{tmp / f'mlflow-{name}.db'}"
    quiet = SweepProgress(trials, "val_accuracy", console=_null_console())
    started_at = datetime.datetime.now()
    start = time.perf_counter()
    summary = run_sweep(load_sweep(str(path)), progress=quiet)
    seconds = time.perf_counter() - start
    study = optuna.load_study(study_name=name, storage=storage)
    best = next(t for t in study.trials if t.user_attrs.get(RUN_ID_ATTR) == summary.best_run_id)
    to_best = (best.datetime_complete - started_at).total_seconds()
    tuned = sum(1 for t in study.trials if promote is None or continues(t) is not None)
    lines = [
        f"  #{t.number:<2d} {t.state.name:8s} {t.value or 0:.4f} "
        f"{t.duration.total_seconds() if t.duration else 0:5.1f} s"
        + (f"  continues #{continues(t)}" if continues(t) is not None else "")
        for t in study.trials
    ]
    best_value = float(summary.best_value or 0.0)
    return Swept(seconds, best_value, to_best, len(study.trials), tuned, lines)


def show(name: str, swept: Swept) -> None:
    print(
        f"{name:8s} {swept.seconds:7.1f} s for {swept.trials} trials ({swept.fine_tuned} "
        f"fine-tuned); best val_accuracy {swept.best:.4f}, reached after {swept.to_best:.1f} s",
        flush=True,
    )
    print("\n".join(swept.lines), flush=True)


if __name__ == "__main__":
    main()
