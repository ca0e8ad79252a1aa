"""Inference latency of a raw-image model: one image at a time, on this machine.

Keras only (no MLflow, no Optuna). The model is called through its compiled predict step
(``predict_on_batch``: a traced, graph-mode function, not an eager ``model(x)``), first
``warmup`` times untimed (tracing, XLA compilation, caches), then ``repeats`` times timed one
by one; the median of those calls is the latency. The input is a fixed batch of one random
image of the model's input shape (values 0-255, as the raw-image model expects).
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import keras
import numpy as np

DEFAULT_WARMUP = 5
DEFAULT_REPEATS = 30


@dataclass(frozen=True)
class Latency:
    """Milliseconds per call at batch 1: the median and every timed call."""

    median_ms: float
    samples_ms: tuple[float, ...]
    warmup: int

    @property
    def repeats(self) -> int:
        return len(self.samples_ms)


def measure_latency(
    model: keras.Model,
    *,
    warmup: int = DEFAULT_WARMUP,
    repeats: int = DEFAULT_REPEATS,
    batch_size: int = 1,
    seed: int = 0,
    clock: Callable[[], float] = time.perf_counter,
) -> Latency:
    """Time ``model.predict_on_batch`` on ``batch_size`` images: ``warmup`` untimed calls,
    then the median of ``repeats`` timed calls, in milliseconds per call."""
    if warmup < 0 or repeats < 1 or batch_size < 1:
        raise ValueError(
            f"need warmup >= 0, repeats >= 1 and batch_size >= 1; got {warmup}, {repeats}, "
            f"{batch_size}"
        )
    shape = tuple(model.input_shape[1:])
    if any(side is None for side in shape):
        raise ValueError(f"the model's input shape {model.input_shape} is not fixed")
    images = np.random.default_rng(seed).uniform(0, 255, (batch_size, *shape)).astype("float32")
    for _ in range(warmup):
        model.predict_on_batch(images)
    samples = []
    for _ in range(repeats):
        start = clock()
        model.predict_on_batch(images)  # returns NumPy: the call has finished when it returns
        samples.append((clock() - start) * 1000.0)
    return Latency(statistics.median(samples), tuple(samples), warmup)
