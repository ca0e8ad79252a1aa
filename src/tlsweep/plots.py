"""Figures (matplotlib, headless)."""

from __future__ import annotations

from collections.abc import Sequence

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt
import numpy as np
from matplotlib.figure import Figure


def confusion_matrix_figure(
    confusion: np.ndarray, class_names: Sequence[str], title: str
) -> Figure:
    """Counts and row-normalized rates side by side, class names on both axes."""
    n = len(class_names)
    side = max(4.0, 0.45 * n + 2.5)
    fig, axes = plt.subplots(1, 2, figsize=(2 * side + 1, side))
    totals = confusion.sum(axis=1, keepdims=True)
    normalized = np.divide(confusion, totals, out=np.zeros(confusion.shape), where=totals > 0)
    panels = ((confusion, "counts", "d"), (normalized, "normalized by true class", ".2f"))
    for ax, (matrix, label, fmt) in zip(axes, panels, strict=True):
        image = ax.imshow(matrix, cmap="Blues", vmin=0)
        fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04)
        ax.set(
            xticks=range(n),
            yticks=range(n),
            xlabel="predicted",
            ylabel="true",
            title=f"{title}: {label}",
        )
        ax.set_xticklabels(class_names, rotation=45, ha="right")
        ax.set_yticklabels(class_names)
        if n <= 30:
            threshold = matrix.max() / 2 if matrix.size else 0
            for (i, j), value in np.ndenumerate(matrix):
                color = "white" if value > threshold else "black"
                ax.text(j, i, format(value, fmt), ha="center", va="center", color=color, fontsize=8)
    # A fixed layout: constrained layout costs more than the drawing itself.
    fig.subplots_adjust(left=0.08, right=0.96, bottom=0.16, top=0.92, wspace=0.35)
    plt.close(fig)
    return fig
