"""Running a sweep: open the study and its parent run, run trials until done, summarise.

Every process (a lone ``tlsweep sweep``, a local worker, a worker on another machine) runs
the same loop: under the study lock it asks whether the study still needs a trial (finished
plus running below ``n_trials``) and starts one, so that workers starting at the same moment
never overshoot; the lock is released as soon as the trial is RUNNING.
"""

from __future__ import annotations

import dataclasses
import os
import socket
import time
from dataclasses import dataclass, field

import optuna
import pandas as pd
from optuna.trial import TrialState

from tlsweep import interrupts, tracking
from tlsweep.backbones import BackboneCache
from tlsweep.config import ComposedBase, Config
from tlsweep.experiment import prepare
from tlsweep.progress import SweepProgress
from tlsweep.sweep import _artifacts, _group, _promote, _samplers
from tlsweep.sweep._common import (
    ENDED_STATES,
    FINISHED_STATES,
    N_TRIALS_ATTR,
    PARENT_RUN_ATTR,
    SUMMARIZED_ATTR,
    count,
)
from tlsweep.sweep._objective import DataMemo, Objective, trial_configs
from tlsweep.sweep._storage import (
    SESSIONS_ATTR,
    StudyLock,
    fail_dead_trials,
    open_storage,
    open_study,
    reconcile_runs,
    sessions_opened,
    storage_url,
)
from tlsweep.sweep._summary import SweepSummary, parent_tags, summarize
from tlsweep.sweepspec import SweepSettings, SweepSpec


@dataclass
class Session:
    """An opened study with its lock and MLflow parent run, as one process sees it."""

    spec: SweepSpec
    url: str
    study: optuna.Study
    lock: StudyLock
    parent_run_id: str
    configs: ComposedBase  # the base config, composed once; trials add their values
    data: DataMemo  # the data the trials train on (loaded once, if they all share it)
    backbones: BackboneCache = field(default_factory=BackboneCache)  # trials and the champion
    supervised: bool = False  # a local worker: its supervisor handles its dead siblings
    artifacts: _artifacts.ArtifactFolder | None = None  # Optuna's artifact store of the trials


def run_sweep(spec: SweepSpec, progress: SweepProgress | None = None) -> SweepSummary:
    """Run (or resume, or join) the study until ``n_trials`` have finished, then summarise."""
    session = open_session(spec)
    progress = progress or default_progress(spec)
    with tracking.guard_run(session.parent_run_id, end=False):
        progress.started(
            spec.settings.study_name, done=min(finished(session), spec.settings.n_trials)
        )
        stopped = work(session, progress)
    return finish(session, progress, stopped)


def run_worker(spec: SweepSpec, summarize: bool = False) -> SweepSummary | None:
    """One of several workers: run trials on the shared study. A local supervisor summarises
    its workers' sweep; a worker with no supervisor (a Slurm job: ``summarize``) summarises
    it itself if it is the one that finds the study complete (`summarize_if_complete`)."""
    session = open_session(spec)
    session.supervised = not summarize
    progress = default_progress(spec, prefix=os.environ.get("TLSWEEP_WORKER_LABEL", ""))
    stopped = work(session, progress)
    return summarize_if_complete(session, progress, stopped) if summarize else None


def summarize_if_complete(
    session: Session, progress: SweepProgress, stopped: str
) -> SweepSummary | None:
    """Summarise the sweep if it is complete and no other process is still running a trial
    or has summarised it already (at this many finished trials): under the study lock, so
    exactly one of many workers does it."""
    study = session.study
    with session.lock.held():
        _promote.promote_if_due(study, session.spec.settings)
        done = finished(session)
        complete = shortfall(session, "done") is None
        if not complete or count(study, (TrialState.RUNNING, TrialState.WAITING)):
            return None
        if study.user_attrs.get(SUMMARIZED_ATTR) == done:
            return None
        summary = finish(session, progress, stopped)
        study.set_user_attr(SUMMARIZED_ATTR, done)
    return summary


def open_session(spec: SweepSpec, workers: int = 1, trains: bool = True) -> Session:
    """Check the settings, open storage and study, and the parent run (created once).

    A process that ``trains`` (not a supervisor, which must not touch a GPU its workers need)
    also builds the base config's model first, so that a backbone or weights file that cannot
    be built is refused before any study or run exists; the trials then reuse that backbone.

    The sampler is built once, under the study lock, seeded with ``seed + session number``
    (the number of processes that opened the study before this one): a fresh one-process
    sweep repeats exactly, while a resumed sweep or a second worker does not redraw the same
    values (the grid keeps ``seed``: see `sampler_factory`).
    """
    s = spec.settings
    configs = trial_configs(spec)
    base = configs.load()
    data = preload_data(spec, base)  # bad data stops here, before any study or run exists
    backbones = BackboneCache()
    if trains and not spec.searches("data", "backbone"):  # so does a bad backbone
        prepare(base, load=data.load, backbones=backbones)
    sampler_for = _samplers.sampler_factory(s, spec.space)  # refuse bad settings early
    pruner = _samplers.make_pruner(s)
    url = storage_url(s, workers)
    storage = open_storage(url, s)
    artifacts = _artifacts.open_folder(s, url)
    lock = StudyLock(storage, url, s.study_name)
    tracking.connect(base.tracking)
    with lock.held():  # one parent run and distinct session numbers, however many start at once
        session_number = sessions_opened(storage, s.study_name)
        study = open_study(spec, storage, sampler_for(session_number), pruner)
        fail_dead_trials(study, s.max_retry)
        enqueue_known(study, spec)
        _artifacts.record_folder(study, artifacts)
        parent = tracking.open_parent_run(
            s.study_name, run_id=study.user_attrs.get(PARENT_RUN_ATTR), tags=parent_tags(spec, url)
        )
        reconcile_runs(study, parent)
        study.set_user_attr(PARENT_RUN_ATTR, parent)
        study.set_user_attr(SESSIONS_ATTR, session_number + 1)
        study.set_user_attr(N_TRIALS_ATTR, s.n_trials)  # for tlsweep status
    return Session(spec, url, study, lock, parent, configs, data, backbones, artifacts=artifacts)


def enqueue_known(study: optuna.Study, spec: SweepSpec) -> None:
    """Queue the sweep file's known configurations (``enqueue``) to run first. Each is queued
    once: skipped while any trial of the study, in any state, already has its values, so that
    resuming, or several workers opening the study, adds none twice. Call it under the study
    lock."""
    for params in spec.enqueue:
        study.enqueue_trial(dict(params), skip_if_exists=True)


def preload_data(spec: SweepSpec, base: Config) -> DataMemo:
    """The data of the base config, loaded now unless the search space changes it (then each
    trial loads its own): a folder that cannot be read is refused before the first trial."""
    memo = DataMemo()
    if not spec.searches("data", "backbone"):  # e.g. backbone.input_size: resized images
        memo.load(base)
    return memo


def work(session: Session, progress: SweepProgress, worker: str | None = None) -> str:
    """Run trials until the study has ``n_trials`` finished or running ones.

    Failed trials do not count and are replaced, up to ``max(3, n_trials)`` failures in this
    process; the loop also ends at the timeout and when a grid has every point done. Trials
    left RUNNING by a process of this machine that is gone, or by one that died before
    recording itself, are failed and queued again first (`fail_dead_trials`). Returns why it
    stopped: ``done``, ``timeout`` or ``failures``. A tracking server unreachable past
    MLflow's retries, or a full disk, raises `OutageError` once the trial is queued again.
    With ``sweep.group_size`` > 1 it asks up to that many trials at a time and trains their
    heads together (`_group`).
    """
    s, study = session.spec.settings, session.study
    objective = Objective(
        session.spec,
        session.parent_run_id,
        progress,
        session.backbones,
        session.configs,
        session.data,
    )
    objective.worker = worker or worker_id()
    objective.artifacts = session.artifacts
    size = _group.group_size(objective, session.configs.load())
    deadline = None if s.timeout is None else time.monotonic() + s.timeout
    max_failures, failures = max(3, s.n_trials), 0
    patience = 2 * (s.grace_period or 4 * s.heartbeat_interval)  # bound on waiting for others
    waited = 0.0
    while failures < max_failures:
        interrupts.raise_pending()  # a signal swallowed where it landed stops the loop here
        if deadline is not None and time.monotonic() >= deadline:
            return "timeout"
        optuna.storages.fail_stale_trials(study)  # trials of workers that stopped beating
        session.lock.acquire()
        try:
            fail_dead_trials(study, s.max_retry)  # under the lock: see its docstring
            _promote.promote_if_due(study, s)  # the search complete: queue its best for more
            if not _needs_trial(study, s.n_trials):
                if not _others_may_fail(session) or waited > patience:
                    return "done"
                session.lock.release()
                time.sleep(s.heartbeat_interval)  # until they finish, or go stale and are retried
                waited += s.heartbeat_interval
                continue
            waited = 0.0
            ended, failed = count(study, ENDED_STATES), count(study, (TrialState.FAIL,))
            if size > 1:  # several trials at once, their heads in one step (`_group`)
                asked = _group.ask(study, objective, _group.trials_to_ask(study, s.n_trials, size))
                session.lock.release()
                _group.run_group(study, objective, asked)
            else:
                objective.on_start = session.lock.release  # once the trial is RUNNING
                # No gc_after_trial: a full collection costs ~0.5 s among TensorFlow's objects;
                # experiment.prepare collects before building a backbone, when it matters.
                study.optimize(objective, n_trials=1, catch=(Exception,))
        finally:
            session.lock.release()
        if objective.outage is not None:  # a server gone past its retries, a full disk
            raise objective.outage
        if count(study, ENDED_STATES) == ended:
            return "done"  # no trial ran: the sampler stopped the study
        failures += count(study, (TrialState.FAIL,)) - failed
    return "failures"


def finish(session: Session, progress: SweepProgress, stopped: str = "done") -> SweepSummary:
    """Summarise on the parent run and mark it FINISHED; say so if the study ended short of
    ``n_trials`` (``stopped``: why this process's loop ended, see `work`)."""
    with tracking.guard_run(session.parent_run_id, end=False):
        reconcile_runs(session.study, session.parent_run_id)
        summary = summarize(session.study, session.spec, session.parent_run_id, session.backbones)
    tracking.finish_run(session.parent_run_id)
    progress.finished(summary.leaderboard, summary.best_value, summary.champion_uri)
    if summary.pareto_front is not None and len(summary.pareto_front):
        show_front(summary.pareto_front, progress)
    short = shortfall(session, stopped)
    if short:
        progress.console.print(short)
    if stopped == "timeout":  # asked for: said, but not an error
        return summary
    return dataclasses.replace(summary, shortfall=short)


def shortfall(session: Session, stopped: str) -> str | None:
    """A one-line account of a study that has fewer than ``n_trials`` finished trials (a grid
    with every point done is complete); None when it has them all."""
    s, study = session.spec.settings, session.study
    done = finished(session)
    if _promote.promoted(study) is not None:  # the search is over: only its promoted trials
        if _promotion_done(study):
            return None
        return (
            f"sweep {s.study_name} ended before its promoted trials finished ({done} trials "
            "finished); run the same command again to continue"
        )
    if done >= s.n_trials or (
        isinstance(study.sampler, optuna.samplers.GridSampler) and study.sampler.is_exhausted(study)
    ):
        if s.promote is None:
            return None
        return (
            f"sweep {s.study_name} ended before its promoted trials started ({done} trials "
            "finished); run the same command again to continue"
        )
    if stopped == "timeout":
        why = f"stopped at sweep.timeout={s.timeout} s"
    elif stopped == "failures":
        why = f"stopped after {count(study, (TrialState.FAIL,))} failed trials"
    else:
        why = "its workers stopped"
    return (
        f"sweep {s.study_name} ended short: {done} of {s.n_trials} trials finished ({why}); "
        "run the same command again to continue"
    )


def show_front(front: pd.DataFrame, progress: SweepProgress) -> None:
    """The Pareto front after the leaderboard: one line per member, with its model alias."""
    from tlsweep.report import to_text

    progress.console.print(
        f"Pareto front ({len(front)} trials, best first on the first objective):"
    )
    progress.console.print(to_text(front.drop(columns=["run_id"])), soft_wrap=True)


def finished(session: Session) -> int:
    return count(session.study, FINISHED_STATES)


def default_progress(spec: SweepSpec, prefix: str = "") -> SweepProgress:
    s = spec.settings
    return SweepProgress(
        s.n_trials, s.metric, maximize=s.resolved_direction == "maximize", prefix=prefix
    )


def worker_id() -> str:
    """How a trial names the process running it (a dead worker's trials are found by it)."""
    return f"{socket.gethostname()}:{os.getpid()}"


def _others_may_fail(session: Session) -> bool:
    """Whether to wait for other processes' running trials instead of leaving: on heartbeat
    storages (several machines, no supervisor) one of them may belong to a dead worker, and
    its retry needs a live one. Local journal workers have a supervisor that restarts them;
    Slurm jobs do not, so they wait too."""
    if session.supervised and session.url.startswith("journal:"):
        return False
    study = session.study
    return work_left(study, session.spec.settings) and bool(count(study, (TrialState.RUNNING,)))


def work_left(study: optuna.Study, settings: SweepSettings) -> bool:
    """Whether the sweep still has trials to finish: its ``n_trials`` (the search), then, with
    ``sweep.promote``, its promoted trials."""
    if _promote.promoted(study) is not None:
        return not _promotion_done(study)
    return count(study, FINISHED_STATES) < settings.n_trials or settings.promote is not None


def _promotion_done(study: optuna.Study) -> bool:
    """The promotion has happened and none of its trials is still queued or running."""
    if _promote.promoted(study) is None:
        return False
    return not any(
        _promote.continues(t) is not None and t.state in (TrialState.WAITING, TrialState.RUNNING)
        for t in study.get_trials(deepcopy=False)
    )


def _needs_trial(study: optuna.Study, n_trials: int) -> bool:
    if _promote.promoted(study) is not None:  # the search is over: its promoted trials are left
        return _promote.waiting_for_promotion(study)
    sampler = study.sampler
    if isinstance(sampler, optuna.samplers.GridSampler) and sampler.is_exhausted(study):
        return False
    return count(study, (*FINISHED_STATES, TrialState.RUNNING)) < n_trials
