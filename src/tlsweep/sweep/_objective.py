"""The objective: one trial is one MLflow child run, reported to Optuna every epoch.

With several objectives (accuracy against cost) a trial returns a tuple in the order of
``sweep.objectives``: its training metric's best epoch, then each cost measured on the trained
raw-image model (``latency_ms``, ``params``), also logged as metrics on its run. Optuna cannot
prune such studies, so nothing is reported per epoch, and every completed trial stores its
head's weights (small): any of them may end up on the Pareto front.
"""

from __future__ import annotations

import copy
import json
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import keras
import optuna
from optuna.trial import TrialState

from tlsweep import interrupts, tracking
from tlsweep.backbones import BackboneCache
from tlsweep.config import ComposedBase, Config, DataConfig
from tlsweep.data import ImageData, load_run_data
from tlsweep.errors import OutageError, full_disk, full_disk_message
from tlsweep.experiment import execute, prepare
from tlsweep.latency import measure_latency
from tlsweep.model import parameter_counts
from tlsweep.progress import SweepProgress
from tlsweep.redaction import redact
from tlsweep.sweep._artifacts import ArtifactFolder, upload_confusion_matrix
from tlsweep.sweep._common import FAIL_REASON_ATTR, RUN_ID_ATTR, WORKER_ATTR
from tlsweep.sweep._samplers import suggest
from tlsweep.sweep._storage import retry_interrupted
from tlsweep.sweepspec import SweepSpec, param_overrides


class Objective:
    """Samples a trial's values, trains it as a child run, reports every epoch."""

    def __init__(
        self,
        spec: SweepSpec,
        parent_run_id: str,
        progress: SweepProgress,
        backbones: BackboneCache | None = None,
        configs: ComposedBase | None = None,
        data: DataMemo | None = None,
    ) -> None:
        self.spec = spec
        self.parent_run_id = parent_run_id
        self.progress = progress
        self.configs = configs or trial_configs(spec)  # the base, composed once
        self.data = data or DataMemo()
        self.backbones = backbones or BackboneCache()
        self.worker = ""  # recorded on each trial, to find a dead worker's trials
        self.on_start: Callable[[], None] = lambda: None  # called once the trial is RUNNING
        self.outage: OutageError | None = None  # a gone server or a full disk a trial met
        self.artifacts: ArtifactFolder | None = None  # each trial's confusion matrix goes there

    def __call__(self, trial: optuna.Trial) -> float | tuple[float, ...]:
        interrupts.raise_pending()
        trial.set_user_attr(WORKER_ATTR, self.worker)
        self.on_start()
        params = {dim.key: suggest(trial, dim) for dim in self.spec.space}
        s = self.spec.settings
        multi = s.multi_objective
        reporter = EpochReporter(trial, s.metric, s.resolved_direction, report=not multi)
        costs: dict[str, float] = {}
        tags = {
            "tlsweep.study": s.study_name,
            "tlsweep.trial_number": str(trial.number),
            "tlsweep.trial_state": "RUNNING",
            "tlsweep.sampled_params": json.dumps(params),
            "mlflow.note.content": f"Trial {trial.number} of sweep `{s.study_name}`: "
            + ", ".join(f"`{k}={v}`" for k, v in params.items()),
        }
        self.progress.trial_started(trial.number, params)
        started = time.monotonic()
        run_id = None
        try:
            with tracking.start_run(
                s.study_name, f"trial-{trial.number}", parent_run_id=self.parent_run_id, tags=tags
            ) as run_id:
                trial.set_user_attr(RUN_ID_ATTR, run_id)
                cfg = self.configs.load([*param_overrides(params), monitor_override(s.metric)])
                prepared = prepare(cfg, load=self.data.load, backbones=self.backbones)
                callbacks = [reporter, self.progress.epoch_callback(trial.number, cfg)]
                result = execute(
                    run_id,
                    cfg,
                    prepared,
                    callbacks,
                    log_model=lambda _: (
                        multi or (not reporter.stop_run and self._is_new_best(trial, reporter.best))
                    ),
                )
                if self.artifacts is not None:  # a full disk: handled below, as any is
                    names = prepared.data.class_names
                    upload_confusion_matrix(trial, self.artifacts, result, names)
                if not reporter.stop_run:
                    costs = measure_costs(result.model, self.spec)
                    tracking.log_trial_costs(run_id, costs)
                state = "PRUNED" if reporter.stop_run else "COMPLETE"
                tracking.set_tags(run_id, {"tlsweep.trial_state": state})
        except BaseException as exc:  # Ctrl-C too: Optuna records it as FAIL, so must we
            interrupts.handled(exc)
            outage = tracking.is_unreachable(exc)
            full = full_disk(exc)
            if isinstance(exc, KeyboardInterrupt):  # SIGINT, SIGTERM or SIGHUP: run it again
                reason = f"interrupted ({interrupts.description(exc)})"
                retry_interrupted(trial.study, trial.number, s.max_retry)
            elif outage or full:  # not the trial's fault either: the work loop stops
                reason = "the tracking server was unreachable" if outage else "the disk was full"
                retry_interrupted(trial.study, trial.number, s.max_retry)
                message = full_disk_message(full) if full else tracking.unreachable_message(exc)
                self.outage = OutageError(message)
            else:  # the text may quote a URL with its password: never stored or shown as is
                reason = redact(f"{type(exc).__name__}: {exc}")
            trial.set_user_attr(FAIL_REASON_ATTR, reason[:2000])
            if run_id and not outage:  # else the next reconciliation closes the run
                tracking.set_tags(run_id, {"tlsweep.trial_state": "FAIL"})
            self.progress.trial_finished(
                trial.number, "FAIL", None, time.monotonic() - started, reason
            )
            raise
        self.progress.trial_finished(trial.number, state, reporter.best, time.monotonic() - started)
        if costs:
            shown = "  ".join(f"{k}={_short(v)}" for k, v in costs.items())
            self.progress.console.print(f"{self.progress.prefix}     {shown}")
        if reporter.stop_run:
            raise optuna.TrialPruned(f"pruned after epoch {reporter.last_step}")
        if not multi:
            return reporter.best
        values = {s.metric: reporter.best, **costs}
        return tuple(values[name] for name in s.objective_names)

    @staticmethod
    def _is_new_best(trial: optuna.Trial, value: float) -> bool:
        """Only a trial that beats every completed one stores a full model."""
        completed = trial.study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
        if not completed:
            return True
        best = [t.value for t in completed if t.value is not None]
        if trial.study.direction == optuna.study.StudyDirection.MAXIMIZE:
            return value > max(best)
        return value < min(best)


class EpochReporter(keras.callbacks.Callback):
    """Reports the metric to Optuna every epoch; asks the pruner; tracks the best epoch."""

    def __init__(
        self, trial: optuna.Trial, metric: str, direction: str, report: bool = True
    ) -> None:
        super().__init__()
        self.trial = trial
        self.report = report  # False: only track the best epoch (multi-objective studies)
        self.metric = metric
        self.maximize = direction == "maximize"
        self.best = float("-inf") if self.maximize else float("inf")
        self.last_step = 0
        self.stop_run = False

    def on_epoch_end(self, epoch: int, logs: Mapping[str, Any] | None = None) -> None:
        value = float((logs or {})[self.metric])
        self.best = max(self.best, value) if self.maximize else min(self.best, value)
        self.last_step = epoch + 1
        if not self.report:
            return
        self.trial.report(value, step=self.last_step)
        if self.trial.should_prune():
            self.stop_run = True
            self.model.stop_training = True


def measure_costs(model: keras.Model, spec: SweepSpec) -> dict[str, float]:
    """The cost objectives of the sweep, measured on a trained raw-image model."""
    names = spec.settings.objective_names
    costs: dict[str, float] = {}
    if "latency_ms" in names:
        s = spec.settings
        latency = measure_latency(model, warmup=s.latency_warmup, repeats=s.latency_repeats)
        costs["latency_ms"] = latency.median_ms
    if "params" in names:
        costs["params"] = float(parameter_counts(model)["total_params"])
    return costs


def _short(value: float) -> str:
    return f"{value:.0f}" if value >= 1000 else f"{value:.4g}"


def trial_configs(spec: SweepSpec) -> ComposedBase:
    """The sweep's base config, composed once: each trial adds its sampled values, then the
    sweep's metric as the early-stopping monitor (the same as composing
    ``[*spec.trial_overrides(params), monitor_override(metric)]``)."""
    return ComposedBase([*spec.base, monitor_override(spec.settings.metric)])


def monitor_override(metric: str) -> str:
    return f"train.early_stopping.monitor={metric}"


class DataMemo:
    """Keeps the last loaded dataset: trials of one sweep usually share it."""

    def __init__(self) -> None:
        self._key: tuple[DataConfig, int, Path] | None = None
        self._data: ImageData | None = None

    def load(self, cfg: Config) -> ImageData:
        key = (cfg.data, cfg.backbone.input_size, cfg.cache.manifest_dir)
        if self._data is None or self._key != key:
            self._data = load_run_data(cfg)
            self._key = copy.deepcopy(key)
        return self._data

    def clear(self) -> None:
        self._key, self._data = None, None


# --- summarising -----------------------------------------------------------------------------
