"""Console progress (rich): one line per epoch."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import keras
from rich.console import Console

SHOWN = ("loss", "accuracy", "val_loss", "val_accuracy")


class EpochPrinter(keras.callbacks.Callback):
    """Prints ``epoch 3/5  loss 0.412  accuracy 0.881  val_loss ...`` after each epoch."""

    def __init__(self, total_epochs: int, prefix: str = "", console: Console | None = None) -> None:
        super().__init__()
        self.total_epochs = total_epochs
        self.prefix = prefix
        self.console = console or Console(stderr=True, highlight=False)

    def on_epoch_end(self, epoch: int, logs: Mapping[str, Any] | None = None) -> None:
        shown = "  ".join(f"{k} {float(logs[k]):.4f}" for k in SHOWN if k in (logs or {}))
        self.console.print(f"{self.prefix}epoch {epoch + 1}/{self.total_epochs}  {shown}")
