"""Figures: the confusion matrix, training curves of several runs, per-class accuracy, PNG bytes."""

from __future__ import annotations

import io

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
from PIL import Image

from tlsweep import plots

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def history_frame() -> pd.DataFrame:
    """Two runs, three epochs of val_accuracy and loss; run b has no loss logged."""
    rows = []
    for label, offset in (("trial 0", 0.0), ("trial 1", 0.1)):
        for step in (1, 2, 3):
            rows.append((label, "val_accuracy", step, 0.5 + offset + 0.1 * step))
            if label == "trial 0":
                rows.append((label, "loss", step, 1.0 / step))
    return pd.DataFrame(rows, columns=["label", "metric", "step", "value"])


def test_training_curves_one_panel_per_logged_metric_one_line_per_run() -> None:
    history = history_frame()
    figure = plots.training_curves_figure(history, ["val_accuracy", "val_loss", "loss"], "top 2")
    axes = figure.axes
    assert [ax.get_title() for ax in axes] == ["val_accuracy", "loss"]  # val_loss never logged
    accuracy = axes[0].get_lines()
    assert [line.get_label() for line in accuracy] == ["trial 0", "trial 1"]
    assert list(accuracy[1].get_xdata()) == [1, 2, 3]
    np.testing.assert_allclose(accuracy[1].get_ydata(), [0.7, 0.8, 0.9])
    assert len(axes[1].get_lines()) == 1
    assert accuracy[0].get_color() != accuracy[1].get_color()
    assert figure._suptitle.get_text() == "top 2"
    legend_labels = [t.get_text() for t in figure.legends[0].get_texts()]
    assert legend_labels == ["trial 0", "trial 1"]


def test_training_curves_ignore_a_global_style_and_stay_closed() -> None:
    before = plt.get_fignums()
    with plt.style.context("ggplot"):  # what Optuna's matplotlib plots leave behind
        figure = plots.training_curves_figure(history_frame(), ["val_accuracy"])
    assert figure.axes[0].get_facecolor()[:3] == (1.0, 1.0, 1.0)
    assert plt.get_fignums() == before


def test_per_class_accuracy_bars() -> None:
    per_class = pd.DataFrame(
        {"class": ["cat", "dog", "owl"], "accuracy": [0.5, 1.0, np.nan], "support": [4, 2, 0]}
    )
    figure = plots.per_class_accuracy_figure(per_class, "test set")
    (ax,) = figure.axes
    widths = [patch.get_width() for patch in ax.patches]
    assert widths == [0.5, 1.0, 0.0]
    assert [t.get_text() for t in ax.get_yticklabels()] == ["cat", "dog", "owl"]
    assert any("n=4" in t.get_text() for t in ax.texts)


def test_to_png_gives_a_decodable_image() -> None:
    figure = plots.confusion_matrix_figure(np.array([[3, 1], [0, 4]]), ["a", "b"], "test set")
    data = plots.to_png(figure)
    assert data.startswith(PNG_MAGIC)
    image = Image.open(io.BytesIO(data))
    assert image.width > 200 and image.height > 100


def test_to_png_closes_a_pyplot_figure() -> None:
    figure, ax = plt.subplots()
    ax.plot([1, 2], [3, 4])
    assert figure.number in plt.get_fignums()
    assert plots.to_png(figure).startswith(PNG_MAGIC)
    assert figure.number not in plt.get_fignums()
