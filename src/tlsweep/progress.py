"""Console progress (rich): a live line per trial in a terminal; in a log file (a batch job),
timestamped lines: a trial's start, an epoch at most every `BATCH_EPOCH_SECONDS`, its end.
With ``-q`` (`tlsweep.logs.verbosity` below 0) only failures and summaries."""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any

import keras
from rich.console import Console
from rich.markup import escape

from tlsweep.logs import verbosity

SHOWN = ("loss", "accuracy", "val_loss", "val_accuracy")
BATCH_EPOCH_SECONDS = 10.0  # at most one epoch line this often in a log file


class EpochPrinter(keras.callbacks.Callback):
    """Prints ``epoch 3/5  loss 0.412  accuracy 0.881  val_loss ...`` after each epoch."""

    def __init__(self, total_epochs: int, prefix: str = "", console: Console | None = None) -> None:
        super().__init__()
        self.total_epochs = total_epochs
        self.prefix = prefix
        self.console = console or Console(stderr=True, highlight=False)

    def on_epoch_end(self, epoch: int, logs: Mapping[str, Any] | None = None) -> None:
        if verbosity() < 0:
            return
        shown = "  ".join(f"{k} {float(logs[k]):.4f}" for k in SHOWN if k in (logs or {}))
        stamp = _stamp(self.console)
        self.console.print(f"{stamp}{self.prefix}epoch {epoch + 1}/{self.total_epochs}  {shown}")


class SweepProgress:
    """A live line per trial (trial k/N, epoch, metric, best so far) and a closing summary."""

    def __init__(
        self,
        n_trials: int,
        metric: str,
        maximize: bool = True,
        console: Console | None = None,
        prefix: str = "",
    ) -> None:
        self.prefix = escape(prefix)  # e.g. "[w2] " for one of several workers (not markup)
        self.n_trials = n_trials
        self.metric = metric
        self.maximize = maximize
        self.console = console or Console(highlight=False)
        self.done = 0
        self.best: float | None = None
        self.study_name = ""
        self._status: Any = None
        self._running = 0  # trials started and not finished (a group trains several)
        self._quiet = verbosity() < 0
        self._last_epoch_line = 0.0

    def started(self, study_name: str, done: int) -> None:
        self.study_name, self.done = study_name, done
        todo = max(self.n_trials - done, 0)
        resumed = f" (resuming: {done} finished)" if done else ""
        self.console.print(f"sweep [bold]{study_name}[/]: {todo} trial(s) to run{resumed}")

    def trial_started(self, number: int, params: Mapping[str, Any]) -> None:
        self._last_epoch_line = time.monotonic()
        self._running += 1
        if self._quiet:
            return
        shown = ", ".join(f"{k}={_short(v)}" for k, v in params.items())
        self.console.print(
            f"{_stamp(self.console)}{self.prefix}trial {self._k()}/{self.n_trials} (#{number}) "
            f"{shown}"
        )
        if self.console.is_terminal and self._status is None:  # one live line at a time
            self._status = self.console.status(f"trial {self._k()}/{self.n_trials} starting")
            self._status.start()

    def epoch_callback(self, number: int, cfg: Any) -> keras.callbacks.Callback:
        total = cfg.train.epochs + cfg.train.fine_tune.epochs
        return _LiveEpochLine(self, total)

    def epoch_done(self, epoch: int, total: int, logs: Mapping[str, Any]) -> None:
        value = logs.get(self.metric)
        shown = f"{self.metric} {float(value):.4f}" if value is not None else ""
        best = f"  best so far {self.best:.4f}" if self.best is not None else ""
        trial = f"{self.prefix}trial {self._k()}/{self.n_trials}"
        line = f"{trial}  epoch {epoch}/{total}  {shown}{best}"
        if self._status is not None:
            self._status.update(line)
        elif not self._quiet and not self.console.is_terminal:  # a log file: now and then
            now = time.monotonic()
            if now - self._last_epoch_line >= BATCH_EPOCH_SECONDS:
                self.console.print(f"{_stamp(self.console)}{line}")
                self._last_epoch_line = now

    def trial_finished(
        self,
        number: int,
        state: str,
        value: float | None,
        seconds: float,
        reason: str | None = None,
    ) -> None:
        self._running = max(self._running - 1, 0)
        if self._status is not None:
            self._status.stop()
            self._status = None
        if state in ("COMPLETE",) and value is not None:
            self.best = value if self.best is None else self._better(value, self.best)
        if state != "FAIL":
            self.done += 1
        if self._quiet and state != "FAIL":
            return
        shown = f"{self.metric}={value:.4f}" if value is not None else (reason or "")[:160]
        best = f"  best {self.best:.4f}" if self.best is not None else ""
        color = {"COMPLETE": "green", "PRUNED": "yellow", "FAIL": "red"}.get(state, "white")
        self.console.print(
            f"{_stamp(self.console)}{self.prefix}  #{number} [{color}]{state}[/] {shown}{best}  "
            f"{seconds:.1f}s"
        )

    def finished(self, board: Any, best_value: float | None, champion_uri: str | None) -> None:
        self.console.rule(f"sweep {self.study_name}")
        if board is not None and len(board):
            from tlsweep.report import to_text

            self.console.print(to_text(board.head(10)), soft_wrap=True)
        if best_value is None:
            self.console.print("no completed trial yet")
            return
        self.console.print(f"best {self.metric}: {best_value:.4f}")
        if champion_uri:
            self.console.print(f"champion model: {champion_uri}")
        self.console.print(
            "next:\n"
            f"  tlsweep runs {self.study_name}              # the leaderboard\n"
            f"  tlsweep report {self.study_name}            # one HTML page of the sweep\n"
            f"  tlsweep reproduce --best {self.study_name}  # retrain the best trial and compare\n"
            "  tlsweep ui                          # browse runs in the MLflow UI"
        )

    def _k(self) -> int:
        return min(self.done + max(self._running, 1), self.n_trials)

    def _better(self, a: float, b: float) -> float:
        return max(a, b) if self.maximize else min(a, b)


class _LiveEpochLine(keras.callbacks.Callback):
    def __init__(self, progress: SweepProgress, total: int) -> None:
        super().__init__()
        self.progress = progress
        self.total = total

    def on_epoch_end(self, epoch: int, logs: Mapping[str, Any] | None = None) -> None:
        self.progress.epoch_done(epoch + 1, self.total, logs or {})


def _short(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def _stamp(console: Console) -> str:
    """``HH:MM:SS `` before each line in a log file; nothing in a terminal."""
    return "" if console.is_terminal else time.strftime("%H:%M:%S ")
