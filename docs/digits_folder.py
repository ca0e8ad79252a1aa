"""Write scikit-learn's bundled digits as an image folder: a stand-in for your own photos.

    python docs/digits_folder.py photos              # photos/0/*.png ... photos/9/*.png
    python docs/digits_folder.py photos --per-class 30 --classes 3 5 8

One subfolder per class, as ``data=folder`` expects; each 8x8 digit is upscaled to 64x64
grayscale PNG (tlsweep resizes and converts to RGB itself). Needs no network.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from PIL import Image
from sklearn.datasets import load_digits


def write_folder(root: Path, per_class: int, classes: list[int]) -> int:
    """Write up to ``per_class`` PNGs of each class under ``root/<class>/``; return the count."""
    digits = load_digits()
    written = 0
    for label in classes:
        folder = root / str(label)
        folder.mkdir(parents=True, exist_ok=True)
        for i, image in enumerate(digits.images[digits.target == label][:per_class]):
            pixels = (image / 16.0 * 255).astype(np.uint8)
            Image.fromarray(pixels).resize((64, 64), Image.NEAREST).save(folder / f"{i}.png")
            written += 1
    return written


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("root", type=Path)
    parser.add_argument("--per-class", type=int, default=60)
    parser.add_argument("--classes", type=int, nargs="+", default=list(range(10)))
    args = parser.parse_args()
    count = write_folder(args.root, args.per_class, args.classes)
    print(f"wrote {count} images under {args.root}/<class>/")


if __name__ == "__main__":
    main()
