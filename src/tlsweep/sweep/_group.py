"""Trials trained in groups: several head-only trials asked at once, one step for all heads.

With ``sweep.group_size: k`` (k > 1) and a base config whose heads train on cached features
(`tlsweep.grouped.groupable`), the work loop asks Optuna for up to k trials at once, under the
study lock, each one's values sampled before the next is asked: TPE's constant liar (on
unless ``sampler_options`` says otherwise) and the grid's running points make them differ. The
asked trials are then split by what their heads must share (`tlsweep.grouped.group_key`: a
batch size, an optimizer kind...) and each part trains as one model (`execute_group`). Every
trial keeps what a lone one has: its values, its child run, its per-epoch reports to the
pruner, its early stopping, its logged head or model, its own outcome told to Optuna. A trial
whose config cannot join a group (it fine-tunes, or augments) trains alone.

Faults: a head that fails (NaN loss, an error logging it) fails its trial only; a signal or an
outage fails every trial of the group that has not ended yet, each queued again as a lone
trial's would be (`Objective.fail`); heartbeats are kept for each asked trial.
"""

from __future__ import annotations

import contextlib
import warnings
from collections import defaultdict
from collections.abc import Hashable, Sequence

import optuna
from optuna.trial import TrialState

from tlsweep import interrupts, tracking
from tlsweep.config import Config
from tlsweep.experiment import execute_group, prepare_group
from tlsweep.grouped import Outcome, group_key, groupable
from tlsweep.sweep._common import FINISHED_STATES, WORKER_ATTR, count
from tlsweep.sweep._objective import Objective, TrialRun
from tlsweep.sweep._optuna_private import grid_points_to_do, heartbeat
from tlsweep.sweepspec import Scalar
from tlsweep.train import TrainResult

GROUP_TAG = "tlsweep.group"  # on each run of a group: the trial numbers that trained together


def group_size(objective: Objective, base: Config) -> int:
    """How many trials to ask at once: ``sweep.group_size`` when the base config's heads can
    train in groups, else 1 (`study.optimize`, one trial at a time)."""
    size = objective.spec.settings.group_size
    return size if size > 1 and groupable(base) else 1


def trials_to_ask(study: optuna.Study, n_trials: int, size: int) -> int:
    """At most ``size``, no more than the study still needs, nor than a grid has points left."""
    needed = n_trials - count(study, (*FINISHED_STATES, TrialState.RUNNING))
    if isinstance(study.sampler, optuna.samplers.GridSampler):
        waiting = count(study, (TrialState.WAITING,))  # retries: they take no new point
        needed = min(needed, grid_points_to_do(study.sampler, study) + waiting)
    return max(min(size, needed), 1)


def ask(
    study: optuna.Study, objective: Objective, k: int
) -> list[tuple[optuna.Trial, dict[str, Scalar]]]:
    """Ask ``k`` trials, each sampled before the next is asked (call it under the study lock:
    the trials are RUNNING when it returns)."""
    asked = []
    for _ in range(k):
        with warnings.catch_warnings():  # "heartbeat ... supposed to be used with optimize"
            warnings.simplefilter("ignore", UserWarning)  # `run_group` keeps the heartbeats
            trial = study.ask()
        trial.set_user_attr(WORKER_ATTR, objective.worker)
        asked.append((trial, objective.sample(trial)))
    return asked


def run_group(
    study: optuna.Study,
    objective: Objective,
    asked: Sequence[tuple[optuna.Trial, dict[str, Scalar]]],
) -> None:
    """Train the asked trials, in groups where their heads can share a step, and tell Optuna
    each one's outcome. A signal, or an error of Optuna's storage, fails every trial not yet
    told (a signal queues it again) and is raised; an outage (a server gone, a full disk) does
    the same to the group but is left on ``objective.outage``, as `Objective.__call__` leaves
    it."""
    runs = [objective.begin(trial, dict(params)) for trial, params in asked]
    told: set[int] = set()
    with contextlib.ExitStack() as beats:
        for run in runs:
            beats.enter_context(heartbeat(study, run.trial))
        try:
            _train_all(study, objective, runs, told)
        except BaseException as exc:
            interrupts.handled(exc)
            for run in runs:
                if run.trial.number not in told:
                    _tell_failed(study, objective, run, exc, told)
            if exc is not objective.outage_cause:
                raise


def _train_all(
    study: optuna.Study, objective: Objective, runs: list[TrialRun], told: set[int]
) -> None:
    opened = []
    for run in runs:
        _stop_on_outage(objective)
        try:
            objective.open(run)
        except Exception as exc:
            _tell_failed(study, objective, run, exc, told)
        else:
            opened.append(run)
    for members in _partition(opened):
        interrupts.raise_pending()
        _stop_on_outage(objective)
        try:
            outcomes = _train(objective, members)
        except Exception as exc:  # the group's own failure (building it, say): all its trials
            outcomes = [(exc, ())] * len(members)
        for run, (outcome, names) in zip(members, outcomes, strict=True):
            if isinstance(outcome, Exception):
                _tell_failed(study, objective, run, outcome, told)
            else:
                _tell_finished(study, objective, run, outcome, names, told)


def _stop_on_outage(objective: Objective) -> None:
    """A trial met an outage: the group's other trials are not opened or trained (each would
    wait out the same outage), but failed and queued again with it (`run_group`)."""
    if objective.outage_cause is not None:
        raise objective.outage_cause


def _partition(runs: Sequence[TrialRun]) -> list[list[TrialRun]]:
    """Runs whose heads can share a step, together (in ask order); the others alone."""
    parts: dict[Hashable, list[TrialRun]] = defaultdict(list)
    for run in runs:
        cfg = _cfg(run)
        key: Hashable = ("alone", run.trial.number) if _alone(run) else group_key(cfg)
        parts[key].append(run)
    return list(parts.values())


def _train(objective: Objective, members: list[TrialRun]) -> list[tuple[Outcome, Sequence[str]]]:
    """Train one part: a lone trial as `Objective.__call__` would, or a group in one step.
    Each member's outcome (a result or the error that failed it alone) and class names."""
    if len(members) == 1 and _alone(members[0]):
        return [objective.train(members[0])]
    cfgs = [_cfg(run) for run in members]
    together = ",".join(str(run.trial.number) for run in members)
    for run in members:  # which trials shared the step, on each run
        tracking.set_tags(str(run.run_id), {GROUP_TAG: together})
    prepared = prepare_group(cfgs, load=objective.data.load, backbones=objective.backbones)
    outcomes = execute_group(
        [str(run.run_id) for run in members],
        cfgs,
        prepared,
        [objective.callbacks(run) for run in members],
        [objective.model_policy(run) for run in members],
    )
    names = prepared[0].data.class_names
    return [(outcome, names) for outcome in outcomes]


def _tell_finished(
    study: optuna.Study,
    objective: Objective,
    run: TrialRun,
    result: TrainResult,
    class_names: Sequence[str],
    told: set[int],
) -> None:
    """End a trained trial (`Objective.finish`) and tell Optuna its value, or that it was
    pruned; a failure to end it fails it."""
    try:
        objective.finish(run, result, class_names)
    except Exception as exc:
        _tell_failed(study, objective, run, exc, told)
        return
    try:
        values = objective.outcome(run)
    except optuna.TrialPruned:
        study.tell(run.trial, state=TrialState.PRUNED)
    else:
        study.tell(run.trial, values)
    told.add(run.trial.number)


def _tell_failed(
    study: optuna.Study,
    objective: Objective,
    run: TrialRun,
    exc: BaseException,
    told: set[int],
) -> None:
    told.add(run.trial.number)
    objective.fail(run, exc)
    study.tell(run.trial, state=TrialState.FAIL)


def _alone(run: TrialRun) -> bool:
    """A trial that trains alone: it cannot join a group, or it is promoted (it starts from
    its own trained head)."""
    return run.continues is not None or not groupable(_cfg(run))


def _cfg(run: TrialRun) -> Config:
    assert run.cfg is not None  # opened
    return run.cfg
