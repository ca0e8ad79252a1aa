"""Promotion: the search's best trials continued into a costlier stage (``sweep.promote``).

The search stage runs ``n_trials`` head-only trials as any sweep does (on cached features,
grouped if asked). Once it is complete (every search trial finished, none running or queued),
the first process to see it, under the study lock, records which trials are promoted (the
best ``top_k`` completed ones) on the study and queues one trial for each: the same values,
with ``continues`` pointing at the trial it continues. A promoted trial composes its config
with ``sweep.promote.overrides`` (a fine-tuning stage, augmentation, more epochs), starts from
the head weights its first-stage trial logged (its epochs numbered on from that trial's), and
is not pruned (it was picked to be run
through). Its value is the best epoch of its own training; the sweep's champion is the best of
this final stage (the search's best until one of them has completed).

Faults: the promotion is recorded before its trials are queued, and queueing is repeated for
any promoted trial left without one, so a process killed in between loses nothing and
queues nothing twice; a promoted trial interrupted or lost is queued again like any trial
(its ``continues`` goes with it).
"""

from __future__ import annotations

from collections.abc import Sequence

import optuna
from optuna.trial import FrozenTrial, TrialState

from tlsweep import tracking
from tlsweep.sweep._common import FINISHED_STATES, RUN_ID_ATTR
from tlsweep.sweepspec import SweepSettings

CONTINUES_ATTR = "tlsweep.continues"  # a promoted trial: the number of the trial it continues
PROMOTED_ATTR = "tlsweep.promoted"  # the study: the numbers of the promoted search trials
SEARCH, PROMOTED = "search", "promoted"  # the two stages, as the leaderboard names them


def continues(trial: optuna.Trial | FrozenTrial) -> int | None:
    """The number of the search trial that ``trial`` continues; None for a search trial."""
    number = trial.user_attrs.get(CONTINUES_ATTR)
    return None if number is None else int(number)


def stage(trial: optuna.Trial | FrozenTrial) -> str:
    return SEARCH if continues(trial) is None else PROMOTED


def promoted(study: optuna.Study) -> list[int] | None:
    """The promoted search trials, once the promotion has happened; None before."""
    numbers = study.user_attrs.get(PROMOTED_ATTR)
    return None if numbers is None else [int(n) for n in numbers]


def promote_if_due(study: optuna.Study, settings: SweepSettings) -> list[int]:
    """Promote the best ``top_k`` search trials once the search is complete, and queue a
    trial for each promoted one that has none yet; the numbers queued now. Call it under the
    study lock."""
    if settings.promote is None:
        return []
    numbers = promoted(study)
    trials = study.get_trials(deepcopy=False)
    if numbers is None:
        if not _search_complete(study, trials, settings.n_trials):
            return []
        numbers = [t.number for t in best_of(study, _search(trials), settings.promote.top_k)]
        study.set_user_attr(PROMOTED_ATTR, numbers)  # first: a kill from here queues on resume
    queued = {continues(t) for t in trials}
    missing = [n for n in numbers if n not in queued]
    for number in missing:
        study.enqueue_trial(trials[number].params, user_attrs={CONTINUES_ATTR: number})
    return missing


def best_of(study: optuna.Study, trials: Sequence[FrozenTrial], k: int) -> list[FrozenTrial]:
    """The ``k`` best completed trials of ``trials``, best first (ties: the earlier)."""
    sign = -1.0 if study.direction == optuna.study.StudyDirection.MAXIMIZE else 1.0
    complete = [t for t in trials if t.state == TrialState.COMPLETE and t.value is not None]
    return sorted(complete, key=lambda t: (sign * float(t.value), t.number))[:k]


def final_best(study: optuna.Study) -> FrozenTrial | None:
    """The champion of a promoting sweep: the best completed promoted trial (None until one
    has completed)."""
    trials = [t for t in study.get_trials(deepcopy=False) if continues(t) is not None]
    best = best_of(study, trials, 1)
    return best[0] if best else None


def waiting_for_promotion(study: optuna.Study) -> bool:
    """Whether the sweep's remaining work is its promoted trials: promoted, and one of them
    still queued."""
    if promoted(study) is None:
        return False
    return any(
        t.state == TrialState.WAITING and continues(t) is not None
        for t in study.get_trials(deepcopy=False)
    )


def trained_head(study: optuna.Study, number: int, folder: str) -> tuple[str, int]:
    """The head weights that search trial ``number`` logged, downloaded into ``folder``, and
    the epochs it trained them for (its last reported step): the promoted trial numbers its
    own on."""
    trial = study.get_trials(deepcopy=False)[number]
    run_id = trial.user_attrs.get(RUN_ID_ATTR)
    path = tracking.download_head_weights(run_id, folder) if run_id else None
    if path is None:
        raise RuntimeError(
            f"trial {number} logged no head weights to continue from (run {run_id}); "
            "it cannot be promoted"
        )
    return path, max(trial.intermediate_values, default=0)


def _search(trials: Sequence[FrozenTrial]) -> list[FrozenTrial]:
    return [t for t in trials if continues(t) is None]


def _search_complete(study: optuna.Study, trials: Sequence[FrozenTrial], n_trials: int) -> bool:
    """``n_trials`` search trials finished (or the grid has no point left) and none running.
    A queued search trial beyond ``n_trials`` (``n_trials`` lowered since) does not hold the
    promotion back: the search would never run it."""
    search = _search(trials)
    if any(t.state == TrialState.RUNNING for t in search):
        return False
    finished = sum(t.state in FINISHED_STATES for t in search)
    sampler = study.sampler
    exhausted = isinstance(sampler, optuna.samplers.GridSampler) and sampler.is_exhausted(study)
    if finished >= n_trials:
        return True
    waiting = any(t.state == TrialState.WAITING for t in search)
    return exhausted and not waiting
