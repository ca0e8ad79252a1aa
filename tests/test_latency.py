"""Latency at batch 1: warm-up calls untimed, the median of the timed ones."""

from __future__ import annotations

import statistics
from collections.abc import Callable

import keras
import pytest

from tlsweep.config import Config
from tlsweep.latency import measure_latency
from tlsweep.model import build_classifier

pytestmark = pytest.mark.backend  # runs on every Keras backend in CI


def tiny_model() -> keras.Model:
    inputs = keras.Input((8, 8, 3), name="image")
    x = keras.layers.Flatten()(inputs)
    return keras.Model(inputs, keras.layers.Dense(3, activation="softmax")(x))


def test_latency_is_a_positive_median_of_the_repeats() -> None:
    latency = measure_latency(tiny_model(), warmup=2, repeats=7)
    assert latency.repeats == 7 and latency.warmup == 2
    assert all(sample > 0 for sample in latency.samples_ms)
    assert latency.median_ms > 0
    assert latency.median_ms == statistics.median(latency.samples_ms)


def test_warmup_calls_are_untimed_and_repeats_are_timed(monkeypatch: pytest.MonkeyPatch) -> None:
    model = tiny_model()
    calls: list[tuple[int, ...]] = []
    original = model.predict_on_batch

    def counting(images):
        calls.append(images.shape)
        return original(images)

    monkeypatch.setattr(model, "predict_on_batch", counting)
    # Timed call k (from 1) starts at second k and lasts k ms: samples 1, 2, 3, 4, 5 ms.
    readings = iter([value for k in range(1, 6) for value in (k, k + k / 1000)])
    timed: list[float] = []

    def clock() -> float:
        timed.append(next(readings))
        return timed[-1]

    latency = measure_latency(model, warmup=3, repeats=5, clock=clock)
    assert len(calls) == 3 + 5  # every call at batch 1, on the model's input shape
    assert set(calls) == {(1, 8, 8, 3)}
    assert len(timed) == 2 * 5  # the clock brackets the timed calls only
    assert latency.samples_ms == pytest.approx((1.0, 2.0, 3.0, 4.0, 5.0))
    assert latency.median_ms == pytest.approx(3.0)


@pytest.mark.parametrize(
    "kwargs", [{"warmup": -1}, {"repeats": 0}, {"batch_size": 0}], ids=["warmup", "repeats", "bs"]
)
def test_bad_arguments_are_refused(kwargs: dict) -> None:
    with pytest.raises(ValueError, match="repeats >= 1"):
        measure_latency(tiny_model(), **kwargs)


def test_a_raw_image_classifier_is_timed_uncompiled(make_config: Callable[..., Config]) -> None:
    cfg = make_config()
    model = build_classifier(cfg.backbone, cfg.head, num_classes=3)
    latency = measure_latency(model, warmup=1, repeats=3)
    assert latency.median_ms > 0 and latency.repeats == 3
