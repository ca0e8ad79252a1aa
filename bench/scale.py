"""Benchmark: peak memory and wall time of a cached ``tlsweep train`` as the folder grows.

Generated JPEG folders of 2,000, 8,000 and 32,000 images at 256x256 (10 classes, each image
distinct), and for each a cached ``tlsweep train`` at ``backbone.input_size=224`` with a small
custom backbone (`tiny_backbone`: two strided convolutions), so that the CPU time stays short
while the images are full size: decoding and resizing them is most of the work. Each run is a
fresh process; it reports its own peak RSS. Then the same command once more on the largest
folder, when the folder manifest and the feature cache are warm. ``--end-to-end`` adds a run
with the cache off (both stages on streamed images) on the smallest and largest folders.

Target (issue 11): peak RSS at 32,000 images within 1.5 GB of the 2,000-image run plus the
size of the features.

    python -m bench.scale                       # 2,000, 8,000 and 32,000 images
    python -m bench.scale --sizes 500 2000      # quicker
    git worktree add /tmp/before c41f511 && python -m bench.scale --baseline /tmp/before
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

CLASSES = 10
SIDE = 256


def tiny_backbone(input_shape: tuple[int, int, int]):
    """``backbone._target_=bench.scale:tiny_backbone``: 224 -> 28x28x32 in two strided convs."""
    import keras

    inputs = keras.Input(input_shape)
    x = keras.layers.Conv2D(16, 3, strides=4, padding="same", activation="relu")(inputs)
    x = keras.layers.Conv2D(32, 3, strides=2, padding="same", activation="relu")(x)
    return keras.Model(inputs, x, name="tiny")


def write_folder(root: Path, count: int, seed_offset: int = 0, side: int = SIDE) -> None:
    """``count`` distinct ``side`` x ``side`` JPEGs under ``root/<class>/``: a class-coloured
    gradient with noise, so each file is a real photo-sized JPEG (about 20-30 KB at 256)."""
    from PIL import Image

    ramp = np.linspace(0, 1, side, dtype="float32")
    base = ramp[None, :, None] * ramp[:, None, None]

    def write(i: int) -> None:
        label = i % CLASSES
        rng = np.random.default_rng(i + seed_offset)
        colour = np.array([(label * 37) % 256, (label * 91) % 256, (label * 53) % 256])
        pixels = base * colour + rng.normal(0, 24, (side, side, 3))
        folder = root / f"class{label}"
        image = Image.fromarray(np.clip(pixels, 0, 255).astype("uint8"))
        image.save(folder / f"{i:06d}.jpg", quality=85)

    for label in range(CLASSES):
        (root / f"class{label}").mkdir(parents=True, exist_ok=True)
    with ThreadPoolExecutor(os.cpu_count() or 2) as pool:
        list(pool.map(write, range(count)))


def train_command(folder: Path, cache: Path, cached: bool = True) -> list[str]:
    return [
        "train",
        "data=folder",
        f"data.path={folder}",
        "backbone=custom",
        "backbone._target_=bench.scale:tiny_backbone",
        "backbone.preprocess=tf",
        "backbone.input_size=224",
        "train.epochs=2",
        "train.batch_size=64",
        "tracking.log_model=false",
        f"cache.dir={cache}",
        f"cache.enabled={'true' if cached else 'false'}",
    ]


def measure(args: list[str], cwd: Path, source: Path | None = None) -> dict:
    """Run ``tlsweep ARGS`` in a fresh process; its wall time and peak RSS. ``source``: a
    checkout whose ``src/`` is imported instead of this one (``--baseline``)."""
    paths = [str(source / "src")] if source else []
    paths.append(str(Path(__file__).resolve().parents[1]))  # this bench, for tiny_backbone
    started = time.perf_counter()
    result = subprocess.run(
        [sys.executable, "-m", "bench.scale", "--child", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": os.pathsep.join(paths)},
    )
    wall = time.perf_counter() - started
    if result.returncode != 0:
        raise SystemExit(f"tlsweep {' '.join(args)} failed:\n{result.stderr[-3000:]}")
    report = json.loads(result.stdout.strip().splitlines()[-1])
    return {"wall_s": wall, **report}


def child(args: list[str]) -> None:
    """In the measured process: run the command, then print its own peak RSS as JSON."""
    from contextlib import redirect_stdout

    from tlsweep.cli import main

    with redirect_stdout(sys.stderr):
        code = main(args)
    if code:
        raise SystemExit(code)
    peak_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"peak_rss_gb": peak_kb / 1e6}))


def feature_bytes(cache: Path) -> int:
    return sum(p.stat().st_size for p in cache.glob("*.npy") if not p.name.startswith("."))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[2000, 8000, 32000])
    parser.add_argument("--end-to-end", action="store_true", help="also runs with the cache off")
    parser.add_argument(
        "--baseline",
        type=Path,
        metavar="CHECKOUT",
        help="also measure another checkout of tlsweep (e.g. a git worktree of an older commit)",
    )
    parser.add_argument("--child", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child is not None:
        child(args.child)
        return

    from bench.run import machine_report

    print(machine_report())
    print(
        f"{SIDE}x{SIDE} JPEGs, {CLASSES} classes; tlsweep train at 224x224, tiny backbone, cached"
    )
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        (work / "mlruns").mkdir()
        for size in args.sizes:
            folder = work / f"images{size}"
            started = time.perf_counter()
            write_folder(folder, size)
            written = time.perf_counter() - started
            on_disk = sum(p.stat().st_size for p in folder.rglob("*.jpg"))
            cache = work / f"cache{size}"
            row = measure(train_command(folder, cache), work)
            row.update(images=size, features_gb=feature_bytes(cache) / 1e9, folder_gb=on_disk / 1e9)
            rows.append(row)
            print(
                f"{size:>6} images ({on_disk / 1e9:.2f} GB of JPEG, written in {written:.0f} s): "
                f"wall {row['wall_s']:6.1f} s  peak RSS {row['peak_rss_gb']:.2f} GB  "
                f"features {row['features_gb'] * 1e3:.1f} MB",
                flush=True,
            )
            if args.baseline:
                old = measure(train_command(folder, work / f"base{size}"), work, args.baseline)
                print(
                    f"{'':>6} baseline {args.baseline.name}: wall {old['wall_s']:6.1f} s  "
                    f"peak RSS {old['peak_rss_gb']:.2f} GB",
                    flush=True,
                )
        largest = args.sizes[-1]
        warm = measure(train_command(work / f"images{largest}", work / f"cache{largest}"), work)
        print(
            f"{largest:>6} images again (manifest and features warm): wall {warm['wall_s']:6.1f} s"
            f"  peak RSS {warm['peak_rss_gb']:.2f} GB",
            flush=True,
        )
        if args.end_to_end:
            for size in (args.sizes[0], largest):
                folder, cache = work / f"images{size}", work / f"e2e{size}"
                e2e = measure(train_command(folder, cache, cached=False), work)
                print(
                    f"{size:>6} images, cache off (end to end): wall {e2e['wall_s']:6.1f} s  "
                    f"peak RSS {e2e['peak_rss_gb']:.2f} GB",
                    flush=True,
                )
    first, last = rows[0], rows[-1]
    allowed = first["peak_rss_gb"] + 1.5 + last["features_gb"]
    verdict = "met" if last["peak_rss_gb"] <= allowed else "MISSED"
    growth = (last["peak_rss_gb"] - first["peak_rss_gb"]) / (last["images"] - first["images"])
    print(
        f"peak RSS {last['images']:,} images {last['peak_rss_gb']:.2f} GB vs {first['images']:,}: "
        f"{first['peak_rss_gb']:.2f} GB (+{growth * 1e6:.2f} MB per 1,000 images); target "
        f"<= {allowed:.2f} GB (the smaller run + 1.5 GB + features): {verdict}"
    )


if __name__ == "__main__":
    main()
