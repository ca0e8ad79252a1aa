"""System metrics: MLflow's own monitor (CPU, memory, disk, network; GPUs with ``pynvml``)
samples the machine while a run works."""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

import mlflow

if TYPE_CHECKING:
    from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

SYSTEM_PREFIX = "system/"  # MLflow's system metrics: system/cpu_utilization_percentage, ...
SYSTEM_SAMPLING_S = 2.0  # unless $MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL says otherwise
SYSTEM_STOP_S = 10.0  # the longest a run's end waits for the monitor's last write
_log = logging.getLogger(__name__)


@contextmanager
def monitor_system(run_id: str, enabled: bool = True) -> Iterator[None]:
    """Record CPU, memory, disk and network use (GPUs too where ``pynvml`` is installed) as
    ``system/*`` metrics of ``run_id`` while the block runs, through MLflow's own monitor: a
    sample every `SYSTEM_SAMPLING_S` seconds unless ``$MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL``
    and ``$MLFLOW_SYSTEM_METRICS_SAMPLES_BEFORE_LOGGING`` say otherwise.

    Best effort: a monitor that cannot start or write (a tracking outage) costs its metrics,
    never the run; leaving the block stops it on every path and waits at most `SYSTEM_STOP_S`
    seconds for its last write."""
    monitor = _start_monitor(run_id) if enabled else None
    try:
        yield
    finally:
        if monitor is not None:
            _stop_monitor(monitor)


def _start_monitor(run_id: str) -> SystemMetricsMonitor | None:
    """MLflow's `SystemMetricsMonitor` for ``run_id``, started; None if it cannot be (psutil
    missing, say)."""
    try:
        from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

        monitor = SystemMetricsMonitor(
            run_id, sampling_interval=SYSTEM_SAMPLING_S, tracking_uri=mlflow.get_tracking_uri()
        )
        monitor.start()
    except Exception as exc:
        _log.warning("no system metrics for run %s: %s", run_id, exc)
        return None
    return monitor


def _stop_monitor(monitor: SystemMetricsMonitor) -> None:
    """Stop the monitor's thread and write what it sampled, from a helper thread that the
    caller waits for at most `SYSTEM_STOP_S` seconds (a store that does not answer keeps the
    helper, a daemon, not the run)."""
    helper = threading.Thread(
        target=_finish_monitor, args=(monitor,), name="tlsweep-system-metrics", daemon=True
    )
    helper.start()
    helper.join(SYSTEM_STOP_S)


def _finish_monitor(monitor: SystemMetricsMonitor) -> None:
    """``finish`` (ends the sampling thread, flushes), then log the samples taken since the
    last write: MLflow drops them, and a trial shorter than the interval would have none."""
    try:
        monitor.finish()
        if last := monitor.aggregate_metrics():
            monitor.publish_metrics(last)
            monitor.mlflow_logger.flush()
    except Exception as exc:
        _log.warning("system metrics: the last samples were not logged: %s", exc)
