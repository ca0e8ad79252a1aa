"""Benchmark: does a long sweep keep its memory flat?

One process runs a long sweep of small trials (the quickstart's data and backbone: digits at
32x32, ResNet50 with random weights, cached features; a random search over the head, 2 epochs,
no pruning) and records its resident memory (RSS) after every trial. Prints RSS at trials 20,
100, 200 and the last, the growth from trial 20 to the last, and MB per trial.

Target (issue 12): RSS growth below 10 % from trial 20 to trial 300.

    python -m bench.memory                  # 300 trials
    python -m bench.memory --trials 120     # quicker
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

import yaml

PAGE = os.sysconf("SC_PAGE_SIZE")


def rss_mb() -> float:
    """This process's resident memory now, in MB."""
    pages = int(Path("/proc/self/statm").read_text().split()[1])
    return pages * PAGE / 1e6


def sweep_file(folder: Path, trials: int) -> Path:
    document = {
        "base": {
            "data": "digits",
            "backbone": "resnet50",
            "backbone.weights": None,
            "backbone.input_size": 32,
            "train.epochs": 2,
            "train.early_stopping.patience": None,
            "cache.dir": str(folder / "features"),
        },
        "search_space": {
            "head.dense_units": "choice(32, 64, 128)",
            "head.dropout": "interval(0.0, 0.5)",
            "optimizer.learning_rate": "tag(log, interval(1e-4, 1e-2))",
            "train.batch_size": "choice(32, 64)",
        },
        "sweep": {
            "study_name": "memory",
            "sampler": "random",
            "pruner": "none",
            "n_trials": trials,
            "storage": f"sqlite:///{folder / 'optuna.db'}",
        },
    }
    path = folder / "memory.yaml"
    path.write_text(yaml.safe_dump(document, sort_keys=False))
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=300)
    args = parser.parse_args()

    from bench.run import _null_console, machine_report
    from tlsweep.progress import SweepProgress
    from tlsweep.sweep import _objective, run_sweep
    from tlsweep.sweepspec import load_sweep

    print(machine_report())
    samples: list[float] = []
    call = _objective.Objective.__call__

    def measured(self, trial):  # type: ignore[no-untyped-def]
        try:
            return call(self, trial)
        finally:
            samples.append(rss_mb())

    _objective.Objective.__call__ = measured  # type: ignore[method-assign]
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        os.chdir(folder)
        spec = load_sweep(str(sweep_file(folder, args.trials)))
        progress = SweepProgress(
            args.trials, spec.settings.metric, maximize=True, console=_null_console()
        )
        started = time.perf_counter()
        run_sweep(spec, progress)
        wall = time.perf_counter() - started
    print(f"{args.trials} trials in one process, {wall:.0f} s ({wall / args.trials:.2f} s each)")
    marks = [m for m in (1, 20, 50, 100, 200, 300) if m <= len(samples)]
    print("RSS after trial " + ", ".join(f"{m}: {samples[m - 1]:.0f} MB" for m in marks))
    first, last = samples[min(19, len(samples) - 1)], samples[-1]
    growth = (last - first) / first
    per_trial = (last - first) / max(1, len(samples) - 20)
    verdict = "met" if growth < 0.10 else "MISSED"
    print(
        f"growth from trial 20 to {len(samples)}: {growth:+.1%} ({per_trial:+.2f} MB per trial); "
        f"target < 10 %: {verdict}"
    )


if __name__ == "__main__":
    main()
