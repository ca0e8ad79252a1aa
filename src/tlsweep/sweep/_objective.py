"""The objective: one trial is one MLflow child run, reported to Optuna every epoch.

With several objectives (accuracy against cost) a trial returns a tuple in the order of
``sweep.objectives``: its training metric's best epoch, then each cost measured on the trained
raw-image model (``latency_ms``, ``params``), also logged as metrics on its run. Optuna cannot
prune such studies, so nothing is reported per epoch, and every completed trial stores its
head's weights (small): any of them may end up on the Pareto front.
"""

from __future__ import annotations

import contextlib
import copy
import json
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
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
from tlsweep.model import head_of, parameter_counts
from tlsweep.progress import SweepProgress
from tlsweep.redaction import redact
from tlsweep.sweep import _promote
from tlsweep.sweep._artifacts import ArtifactFolder, upload_confusion_matrix
from tlsweep.sweep._common import FAIL_REASON_ATTR, RUN_ID_ATTR, WORKER_ATTR
from tlsweep.sweep._samplers import suggest
from tlsweep.sweep._storage import retry_interrupted
from tlsweep.sweepspec import Scalar, SweepSpec, param_overrides, promoted_overrides
from tlsweep.train import TrainResult


class Objective:
    """Samples a trial's values, trains it as a child run, reports every epoch.

    Called by ``study.optimize`` for a lone trial; `run_group` trains several asked trials
    whose heads can share a step as one group (`tlsweep.grouped`), each still its own child run,
    reports and outcome. Both go through the same steps: `sample`, `begin`, `open`, then
    `finish` or `fail`.
    """

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
        self.outage_cause: BaseException | None = None  # the error that told of it
        self.artifacts: ArtifactFolder | None = None  # each trial's confusion matrix goes there

    def __call__(self, trial: optuna.Trial) -> float | tuple[float, ...]:
        interrupts.raise_pending()
        trial.set_user_attr(WORKER_ATTR, self.worker)
        self.on_start()
        run = self.begin(trial, self.sample(trial))
        try:
            self.open(run)
            self.finish(run, *self.train(run))
        except BaseException as exc:  # Ctrl-C too: Optuna records it as FAIL, so must we
            self.fail(run, exc)
            raise
        return self.outcome(run)

    # --- the steps of a trial ------------------------------------------------------------------

    def sample(self, trial: optuna.Trial) -> dict[str, Scalar]:
        """The trial's values (an enqueued or retried trial's are fixed)."""
        return {dim.key: suggest(trial, dim) for dim in self.spec.space}

    def begin(self, trial: optuna.Trial, params: dict[str, Scalar]) -> TrialRun:
        """Announce the trial; nothing is opened yet. A promoted trial (`_promote`) reports
        no epoch to the pruner: it was picked to be run through."""
        s = self.spec.settings
        continued = _promote.continues(trial)
        report = not s.multi_objective and continued is None
        reporter = EpochReporter(trial, s.metric, s.resolved_direction, report=report)
        self.progress.trial_started(trial.number, params)
        return TrialRun(trial, params, reporter, time.monotonic(), continues=continued)

    def open(self, run: TrialRun) -> None:
        """Open the trial's child run (ended by `finish` or `fail`) and compose its config."""
        s, trial, params = self.spec.settings, run.trial, run.params
        tags = {
            "tlsweep.study": s.study_name,
            "tlsweep.trial_number": str(trial.number),
            "tlsweep.trial_state": "RUNNING",
            "tlsweep.sampled_params": json.dumps(params),
            "mlflow.note.content": f"Trial {trial.number} of sweep `{s.study_name}`: "
            + ", ".join(f"`{k}={v}`" for k, v in params.items()),
        }
        extra = []
        if run.continues is not None:
            extra = promoted_overrides(self.spec)
            tags.update(self._promotion_tags(run))
        run.run_id = run.stack.enter_context(
            tracking.start_run(
                s.study_name, f"trial-{trial.number}", parent_run_id=self.parent_run_id, tags=tags
            )
        )
        trial.set_user_attr(RUN_ID_ATTR, run.run_id)
        run.cfg = self.configs.load([*param_overrides(params), *extra, monitor_override(s.metric)])

    def _promotion_tags(self, run: TrialRun) -> dict[str, str]:
        """A promoted trial's link to the search trial it continues, on its run."""
        assert run.continues is not None
        continued = run.trial.study.get_trials(deepcopy=False)[run.continues]
        overrides = " ".join(promoted_overrides(self.spec))
        return {
            "tlsweep.stage": _promote.PROMOTED,
            "tlsweep.continues_trial": str(continued.number),
            tracking.CONTINUES_RUN_TAG: str(continued.user_attrs.get(RUN_ID_ATTR, "")),
            "mlflow.note.content": f"Trial {run.trial.number} of sweep "
            f"`{self.spec.settings.study_name}`: trial {continued.number} promoted, continued "
            f"from its head with `{overrides}`",
        }

    def train(self, run: TrialRun) -> tuple[TrainResult, Sequence[str]]:
        """Prepare and train the opened trial's model in its run; the result and class names.
        A promoted trial starts from the head weights of the trial it continues."""
        assert run.cfg is not None and run.run_id is not None
        prepared = prepare(run.cfg, load=self.data.load, backbones=self.backbones)
        head_epochs = None
        if run.continues is not None:
            with tempfile.TemporaryDirectory(prefix="tlsweep-") as folder:
                path, head_epochs = _promote.trained_head(run.trial.study, run.continues, folder)
                head_of(prepared.model).load_weights(path)
        result = execute(
            run.run_id,
            run.cfg,
            prepared,
            self.callbacks(run),
            self.model_policy(run),
            head_epochs=head_epochs,
        )
        return result, prepared.data.class_names

    def callbacks(self, run: TrialRun) -> list[keras.callbacks.Callback]:
        assert run.cfg is not None
        return [run.reporter, self.progress.epoch_callback(run.trial.number, run.cfg)]

    def model_policy(self, run: TrialRun) -> Callable[[object], bool]:
        """Whether the trial stores its model: every trial of a multi-objective study (any may
        end on the Pareto front) and every promoted one (the champion is among them); in a
        promoting sweep every completed search trial (its head may be continued); otherwise
        a completed trial that beats every completed one."""
        reporter, trial, s = run.reporter, run.trial, self.spec.settings
        if s.multi_objective or run.continues is not None:
            return lambda _: True
        if s.promote is not None:
            return lambda _: not reporter.stop_run
        return lambda _: not reporter.stop_run and self._is_new_best(trial, reporter.best)

    def finish(self, run: TrialRun, result: TrainResult, class_names: Sequence[str]) -> None:
        """After training: the trial's confusion matrix as an Optuna artifact, its costs, its
        state; then its run ends FINISHED."""
        assert run.run_id is not None
        if self.artifacts is not None:  # a full disk: handled by `fail`, as any is
            upload_confusion_matrix(run.trial, self.artifacts, result, class_names)
        if not run.reporter.stop_run:
            run.costs = measure_costs(result.model, self.spec)
            tracking.log_trial_costs(run.run_id, run.costs)
        state = "PRUNED" if run.reporter.stop_run else "COMPLETE"
        tracking.set_tags(run.run_id, {"tlsweep.trial_state": state})
        run.stack.close()

    def outcome(self, run: TrialRun) -> float | tuple[float, ...]:
        """What Optuna is told of a finished trial: its value(s), or pruned (raised)."""
        s, reporter = self.spec.settings, run.reporter
        state = "PRUNED" if reporter.stop_run else "COMPLETE"
        elapsed = time.monotonic() - run.started
        self.progress.trial_finished(run.trial.number, state, reporter.best, elapsed)
        if run.costs:
            shown = "  ".join(f"{k}={_short(v)}" for k, v in run.costs.items())
            self.progress.console.print(f"{self.progress.prefix}     {shown}")
        if reporter.stop_run:
            raise optuna.TrialPruned(f"pruned after epoch {reporter.last_step}")
        if not s.multi_objective:
            return reporter.best
        values = {s.metric: reporter.best, **run.costs}
        return tuple(values[name] for name in s.objective_names)

    def fail(self, run: TrialRun, exc: BaseException) -> None:
        """The trial failed with ``exc``: its run ends FAILED (KILLED on a signal) with the
        error recorded, the reason is kept on the trial, and a trial that was not at fault
        (a signal, a server gone, a full disk) is queued to run again."""
        trial, s = run.trial, self.spec.settings
        interrupts.handled(exc)
        run.stack.__exit__(type(exc), exc, exc.__traceback__)  # ends the run, if opened
        outage = tracking.is_unreachable(exc)
        full = full_disk(exc)
        if isinstance(exc, KeyboardInterrupt):  # SIGINT, SIGTERM or SIGHUP: run it again
            reason = f"interrupted ({interrupts.description(exc)})"
            retry_interrupted(trial.study, trial.number, s.max_retry)
        elif outage or full:  # not the trial's fault either: the work loop stops
            reason = "the tracking server was unreachable" if outage else "the disk was full"
            retry_interrupted(trial.study, trial.number, s.max_retry)
            message = full_disk_message(full) if full else tracking.unreachable_message(exc)
            self.outage, self.outage_cause = OutageError(message), exc
        else:  # the text may quote a URL with its password: never stored or shown as is
            reason = redact(f"{type(exc).__name__}: {exc}")
        trial.set_user_attr(FAIL_REASON_ATTR, reason[:2000])
        if run.run_id and not outage:  # else the next reconciliation closes the run
            tracking.set_tags(run.run_id, {"tlsweep.trial_state": "FAIL"})
        elapsed = time.monotonic() - run.started
        self.progress.trial_finished(trial.number, "FAIL", None, elapsed, reason)

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


@dataclass(eq=False)
class TrialRun:
    """One trial on its way: its values, its reporter, its child run (ended by closing
    ``stack``) and config once opened, and the costs measured at the end."""

    trial: optuna.Trial
    params: dict[str, Scalar]
    reporter: EpochReporter
    started: float
    stack: contextlib.ExitStack = field(default_factory=contextlib.ExitStack)
    run_id: str | None = None
    cfg: Config | None = None
    costs: dict[str, float] = field(default_factory=dict)
    continues: int | None = None  # a promoted trial: the search trial it continues


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
