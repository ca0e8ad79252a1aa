"""Figures (matplotlib, headless)."""

from __future__ import annotations

import io
from collections.abc import Sequence
from typing import Any

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
from matplotlib.figure import Figure


def confusion_matrix_figure(
    confusion: np.ndarray, class_names: Sequence[str], title: str
) -> Figure:
    """Counts in the cells, coloured by the rate within each true class (recall on the
    diagonal), class names on both axes. One panel: every trial draws one, so it is cheap."""
    n = len(class_names)
    side = max(4.0, 0.45 * n + 2.0)
    fig = Figure(figsize=(side, side))
    ax = fig.add_subplot()
    totals = confusion.sum(axis=1, keepdims=True)
    rates = np.divide(confusion, totals, out=np.zeros(confusion.shape), where=totals > 0)
    ax.imshow(rates, cmap="Blues", vmin=0, vmax=1)
    ax.set(
        xticks=range(n),
        yticks=range(n),
        xlabel="predicted",
        ylabel="true",
        title=f"{title}: counts (colour: share of the true class)",
    )
    ax.title.set_fontsize(9)
    ax.set_xticklabels(class_names, rotation=45, ha="right")
    ax.set_yticklabels(class_names)
    if n <= 30:
        for (i, j), value in np.ndenumerate(confusion):
            color = "white" if rates[i, j] > 0.5 else "black"
            ax.text(j, i, str(value), ha="center", va="center", color=color, fontsize=8)
    # A fixed layout: constrained layout costs more than the drawing itself.
    fig.subplots_adjust(left=0.16, right=0.97, bottom=0.16, top=0.92)
    return fig


def training_curves_figure(
    history: pd.DataFrame, metrics: Sequence[str], title: str | None = None
) -> Figure:
    """One panel per metric, one line per run (x: epoch).

    ``history`` has the columns ``label`` (the run's name in the legend), ``metric``, ``step``
    (the epoch) and ``value``; runs keep their order of first appearance.
    """
    with plt.style.context("default"):  # not the style a plot left behind (Optuna's ggplot)
        return _training_curves(history, metrics, title)


def _training_curves(history: pd.DataFrame, metrics: Sequence[str], title: str | None) -> Figure:
    shown = [m for m in metrics if (history["metric"] == m).any()] or list(metrics[:1])
    fig, axes = plt.subplots(1, len(shown), figsize=(4.2 * len(shown) + 0.6, 3.6), squeeze=False)
    labels = list(dict.fromkeys(history["label"]))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, metric in zip(axes[0], shown, strict=True):
        for i, label in enumerate(labels):
            rows = history[(history["label"] == label) & (history["metric"] == metric)]
            if rows.empty:
                continue
            rows = rows.sort_values("step")
            color = colors[i % len(colors)]
            ax.plot(rows["step"], rows["value"], "o-", ms=3, lw=1.6, label=label, color=color)
        ax.set(xlabel="epoch", title=metric)
        ax.grid(alpha=0.3)
        ax.xaxis.get_major_locator().set_params(integer=True)
    handles, names = axes[0][0].get_legend_handles_labels()
    if handles:
        columns = min(len(names), 5)
        fig.legend(handles, names, loc="lower center", ncol=columns, fontsize=8, frameon=False)
    if title:
        fig.suptitle(title)
    fig.subplots_adjust(left=0.07, right=0.98, bottom=0.3, top=0.85 if title else 0.9, wspace=0.3)
    plt.close(fig)
    return fig


def per_class_accuracy_figure(per_class: pd.DataFrame, title: str) -> Figure:
    """Horizontal bars: the fraction of each true class predicted correctly (``class``,
    ``accuracy`` and ``support`` columns)."""
    with plt.style.context("default"):
        n = len(per_class)
        fig, ax = plt.subplots(figsize=(6.0, max(2.0, 0.3 * n + 1.2)))
        positions = np.arange(n)
        ax.barh(positions, per_class["accuracy"].fillna(0), color="#4c72b0")
        ax.set_yticks(positions, [str(c) for c in per_class["class"]])
        ax.invert_yaxis()
        ax.set(xlim=(0, 1.3), xlabel="accuracy (recall of the true class)", title=title)
        rows = zip(per_class["accuracy"].fillna(0), per_class["support"], strict=True)
        for y, (value, support) in enumerate(rows):
            ax.text(value + 0.01, y, f"{value:.2f} (n={support})", va="center", fontsize=8)
        ax.grid(axis="x", alpha=0.3)
        fig.subplots_adjust(left=0.2, right=0.97, bottom=0.2, top=0.88)
    plt.close(fig)
    return fig


def to_png(figure: Figure, dpi: int = 100) -> bytes:
    """The figure as PNG bytes (for embedding in an HTML page); the figure is closed."""
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=dpi, bbox_inches="tight")
    plt.close(figure)  # pyplot keeps figures made by others (Optuna's) open until closed
    return buffer.getvalue()


def plotly_div(figure: Any) -> str:
    """A Plotly figure as an HTML fragment for a page that embeds plotly.js once
    (`plotly_script`): interactive (zoom, hover), drawn offline."""
    return figure.to_html(
        full_html=False, include_plotlyjs=False, config={"displaylogo": False, "responsive": True}
    )


def plotly_script() -> str:
    """plotly.js itself (about 4.6 MB), to inline once in a self-contained page."""
    from plotly.offline import get_plotlyjs

    return get_plotlyjs()
