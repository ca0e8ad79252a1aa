"""Benchmark: the GPU path on the JAX backend, with no TensorFlow needed.

ResNet50 with random weights at 224x224 on generated JPEG images (2,000 train + 2,000 test by
default, 20 % of train held out for validation), in fresh processes (one per phase, so that
each reports its own peak device memory):

  pass    the feature pass (images streamed from disk, decoded in threads, one compiled
          batch shape) in images/s, against a bare ``predict`` of the same backbone on the
          same images already in memory; both warm (compiled), timed on a second pass
  cached  the reference 2x2x2 grid (dense units {256, 512}, dropout {0.1, 0.3}, batch size
          {10, 30}), grid sampler, no pruning, mixed precision on a GPU: ``tlsweep sweep``
          with the feature cache
  workers the same grid with two workers sharing the GPU (``--gpus 0,0``): small heads leave
          a GPU idle (GPU only)
  uncached the same grid with the cache off (every epoch runs the backbone over the images)

Prints wall times, images/s, best validation accuracies (cached and uncached must agree to
mixed-precision rounding), peak device memory per phase, the machine and the versions.
Without a GPU, run it with small sizes and say so:

    python -m bench.gpu                                   # on a GPU: the issue's setting
    python -m bench.gpu --images 200 --size 64 --epochs 2 # a CPU smoke run
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("KERAS_BACKEND", "jax")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

import yaml

GRID = {"head.dense_units": [256, 512], "head.dropout": [0.1, 0.3], "train.batch_size": [10, 30]}
CLASSES = 10


def write_images(root: Path, per_split: int, side: int = 256) -> None:
    """``root/train/<class>/*.jpg`` and ``root/test/<class>/*.jpg``: class-coloured gradients
    with noise (the classes are learnable from random-weight features)."""
    from bench.scale import write_folder

    for offset, split in enumerate(("train", "test")):
        write_folder(root / split, per_split, seed_offset=offset * 10**6, side=side)


def sweep_file(folder: Path, data: Path, args: argparse.Namespace, cached: bool) -> Path:
    document = {
        "base": {
            "data": "folder",
            "data.path": str(data),
            "backbone": args.backbone,
            "backbone.weights": None,
            "backbone.input_size": args.size,
            "head.pooling": "avg",
            "train.epochs": args.epochs,
            "train.early_stopping.patience": None,
            "train.mixed_precision": True,  # float16 compute on a GPU; ignored on a CPU
            "cache.enabled": cached,
            "cache.dir": str(folder / "features"),
        },
        "search_space": {key: f"choice({', '.join(map(str, v))})" for key, v in GRID.items()},
        "sweep": {
            "study_name": folder.name,
            "sampler": "grid",
            "pruner": "none",
            "n_trials": 8,
            "storage": f"sqlite:///{folder / 'optuna.db'}",
        },
    }
    path = folder / "grid.yaml"
    folder.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(document, sort_keys=False))
    return path


def phase_pass(data: Path, args: argparse.Namespace) -> dict:
    """The feature pass against a bare predict, both warm."""
    import keras

    from tlsweep import backend
    from tlsweep.config import load_config
    from tlsweep.data import load_run_data
    from tlsweep.features import feature_batch_size, feature_blocks
    from tlsweep.model import build_classifier, feature_extractor

    cfg = load_config(
        [
            "data=folder",
            f"data.path={data}",
            f"backbone={args.backbone}",
            "backbone.weights=null",
            f"backbone.input_size={args.size}",
            "train.mixed_precision=true",
        ]
    )
    device = backend.configure_devices(cfg.train.mixed_precision)
    images = load_run_data(cfg)
    model = build_classifier(cfg.backbone, cfg.head, images.num_classes)
    extractor = feature_extractor(model)
    batch = feature_batch_size(cfg.cache)
    split = images.test
    timings = []
    for _ in range(2):  # the first pass compiles
        started = time.perf_counter()
        for _block in feature_blocks(extractor, split, batch):
            pass
        timings.append(time.perf_counter() - started)
    in_memory = split.read().astype("float32")
    bare = []
    for _ in range(2):
        started = time.perf_counter()
        keras.ops.convert_to_numpy(extractor.predict(in_memory, batch_size=batch, verbose=0))
        bare.append(time.perf_counter() - started)
    return {
        "device": device,
        "batch": batch,
        "images": len(split),
        "pass_first_s": timings[0],
        "pass_s": timings[1],
        "bare_first_s": bare[0],
        "bare_s": bare[1],
        "peak_bytes": backend.peak_device_memory(),
    }


def phase_sweep(path: Path, workers: str | None) -> dict:
    from tlsweep import backend
    from tlsweep.cli import main

    args = ["sweep", str(path)]
    if workers:
        args += ["--gpus", workers]
    started = time.perf_counter()
    code = main(args)
    wall = time.perf_counter() - started
    if code:
        raise SystemExit(f"sweep {path} failed ({code})")
    import optuna

    study = optuna.load_study(study_name=path.parent.name, storage=_storage_of(path))
    # With workers, this process (the supervisor) trained nothing: their memory is theirs.
    peak = None if workers else backend.peak_device_memory()
    return {"wall_s": wall, "best": study.best_value, "peak_bytes": peak}


def _storage_of(path: Path) -> str:
    settings = yaml.safe_load(path.read_text())["sweep"]
    storage = settings["storage"]
    journal = path.parent / "optuna.journal"
    if journal.exists():  # several workers moved the study to a journal file
        from tlsweep.sweep._storage import journal_storage

        return journal_storage(journal)
    return storage


def run_phase(name: str, *extra: str) -> dict:
    """One phase in a fresh process (its own peak device memory); its JSON report."""
    command = [sys.executable, "-m", "bench.gpu", "--phase", name, *extra]
    root = str(Path(__file__).resolve().parents[1])
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")])),
    }
    result = subprocess.run(command, capture_output=True, text=True, env=env)
    if result.returncode != 0:
        raise SystemExit(f"phase {name} failed:\n{result.stdout[-2000:]}\n{result.stderr[-4000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def gib(value: int | None) -> str:
    return "n/a (no GPU)" if value is None else f"{value / 2**30:.2f} GiB"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=2000, help="train images (and test)")
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--backbone", default="resnet50")
    parser.add_argument("--phase", help=argparse.SUPPRESS)
    parser.add_argument("--data", help=argparse.SUPPRESS)
    parser.add_argument("--sweep", help=argparse.SUPPRESS)
    parser.add_argument("--gpus", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.phase == "pass":
        print(json.dumps(phase_pass(Path(args.data), args)))
        return
    if args.phase == "sweep":
        from contextlib import redirect_stdout

        with redirect_stdout(sys.stderr):
            report = phase_sweep(Path(args.sweep), args.gpus)
        print(json.dumps(report))
        return

    from bench.run import machine_report
    from tlsweep import backend

    started = time.perf_counter()
    print(machine_report())
    try:
        import tensorflow  # noqa: F401

        print("tensorflow: importable (not used by this benchmark)")
    except ImportError:
        print("tensorflow: absent")
    sizes = f"--images {args.images} --size {args.size} --epochs {args.epochs}"
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        os.chdir(work)
        data = work / "images"
        t0 = time.perf_counter()
        write_images(data, args.images)
        print(f"wrote {2 * args.images} JPEGs (256x256) in {time.perf_counter() - t0:.0f} s")
        common = ["--images", str(args.images), "--size", str(args.size)]
        common += ["--epochs", str(args.epochs), "--backbone", args.backbone]
        feature_pass = run_phase("pass", *common, "--data", str(data))
        gpu = feature_pass["device"] == "gpu"
        n, batch = feature_pass["images"], feature_pass["batch"]
        print(
            f"feature pass ({args.backbone} {args.size}x{args.size}, batch {batch}, "
            f"{n} images from disk): {n / feature_pass['pass_s']:.0f} img/s warm "
            f"(first pass, compiling: {feature_pass['pass_first_s']:.1f} s); bare predict on "
            f"the same images in memory: {n / feature_pass['bare_s']:.0f} img/s warm; "
            f"ratio {feature_pass['bare_s'] / feature_pass['pass_s']:.2f}; "
            f"peak device memory {gib(feature_pass['peak_bytes'])}",
            flush=True,
        )
        results = {}
        phases = [("cached", True, None)]
        if gpu:
            phases.append(("workers", True, "0,0"))
        phases.append(("uncached", False, None))
        for name, cached, gpus in phases:
            path = sweep_file(work / name, data, args, cached)
            extra = ["--sweep", str(path), *(["--gpus", gpus] if gpus else [])]
            results[name] = run_phase("sweep", *extra)
            r = results[name]
            print(
                f"{name:>8}: 8-trial grid {r['wall_s']:6.1f} s, best val_accuracy "
                f"{r['best']:.4f}, peak device memory {gib(r['peak_bytes'])}",
                flush=True,
            )
    cached, uncached = results["cached"], results["uncached"]
    print(
        f"uncached/cached = {uncached['wall_s'] / cached['wall_s']:.1f}x; best val_accuracy "
        f"cached {cached['best']:.4f} vs uncached {uncached['best']:.4f}"
    )
    if "workers" in results:
        print(
            f"two workers on one GPU: {cached['wall_s'] / results['workers']['wall_s']:.2f}x "
            "the one-worker speed"
        )
    print(f"({sizes}; device {backend.device_kind()}; total {time.perf_counter() - started:.0f} s)")


if __name__ == "__main__":
    main()
