"""Where studies live: Optuna storages, studies, the study lock and lost trials.

* One process: the SQLite file ``mlruns/optuna.db`` (the default).
* Several workers on one machine: Optuna's journal file ``mlruns/optuna.journal`` (SQLite is
  not safe for concurrent writers). A study that already lives in the SQLite file moves there.
* Several machines: PostgreSQL (``sweep.storage=postgresql://...``).

RDB storages (SQLite, PostgreSQL) keep a heartbeat per running trial: a trial whose worker
stopped beating for ``grace_period`` seconds is failed by the next live worker, its MLflow run
closed as FAILED, and a copy queued to be retried. Journal files have no heartbeat in Optuna 5;
there the local supervisor, which sees its workers die, does the same.
"""

from __future__ import annotations

import contextlib
import copy
import fcntl
import hashlib
from collections.abc import Iterator
from pathlib import Path

import optuna
from optuna.storages.journal import JournalFileBackend, JournalStorage
from optuna.trial import FrozenTrial, TrialState

from tlsweep import tracking
from tlsweep.errors import UserError
from tlsweep.sweep import _samplers
from tlsweep.sweep._common import FAIL_REASON_ATTR, RUN_ID_ATTR, WORKER_ATTR
from tlsweep.sweepspec import SweepSettings, SweepSpec

DEFAULT_STORAGE = Path("mlruns") / "optuna.db"
DEFAULT_JOURNAL = Path("mlruns") / "optuna.journal"
SESSIONS_ATTR = "tlsweep_sessions"  # how many processes have opened the study


def storage_url(settings: SweepSettings, workers: int = 1) -> str:
    """``sweep.storage``, else where the study already is, else the default for ``workers``."""
    if settings.storage:
        if workers > 1 and settings.storage.startswith("sqlite"):
            raise UserError(
                f"sweep.storage={settings.storage} is not safe for {workers} concurrent workers; "
                f"use a journal file (journal:///path/optuna.journal) or postgresql://..."
            )
        return settings.storage
    sqlite, journal = _sqlite_url(DEFAULT_STORAGE), _journal_url(DEFAULT_JOURNAL)
    if DEFAULT_JOURNAL.is_file() and settings.study_name in _names(journal):
        return journal
    if workers == 1:
        return sqlite
    if DEFAULT_STORAGE.is_file() and settings.study_name in _names(sqlite):
        optuna.copy_study(
            from_study_name=settings.study_name,
            from_storage=open_storage(sqlite),
            to_storage=open_storage(journal),
        )
        optuna.delete_study(study_name=settings.study_name, storage=open_storage(sqlite))
    return journal


def open_storage(url: str, settings: SweepSettings | None = None) -> optuna.storages.BaseStorage:
    """An Optuna storage for ``url``; unreachable or malformed URLs raise `UserError`.

    ``journal:///path`` is a journal file; anything else is an SQLAlchemy URL.
    """
    settings = settings or SweepSettings()
    try:
        if url.startswith("journal:"):
            path = Path(url.removeprefix("journal:").removeprefix("//")).expanduser()
            path.parent.mkdir(parents=True, exist_ok=True)
            return JournalStorage(JournalFileBackend(str(path)))
        if url.startswith("sqlite:///"):
            Path(url.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
        return _rdb_storage(url, settings)
    except Exception as exc:
        reason = " ".join(str(exc).split())[:200]
        raise UserError(f"cannot open sweep.storage {tracking.redact(url)}: {reason}") from None


def _rdb_storage(
    url: str, settings: SweepSettings, attempts: int = 3
) -> optuna.storages.RDBStorage:
    """RDBStorage with heartbeats. Workers starting together on a fresh database race to create
    Optuna's tables; the loser's error ("already exists") just means they now exist: retry."""
    for attempt in range(attempts):
        try:
            return optuna.storages.RDBStorage(
                url,
                heartbeat_interval=settings.heartbeat_interval,
                grace_period=settings.grace_period or 4 * settings.heartbeat_interval,
                heartbeat_stale_trial_callback=RetryLostTrial(settings.max_retry),
            )
        except Exception as exc:
            if "already exists" not in str(exc) or attempt == attempts - 1:
                raise
    raise AssertionError("unreachable")


def open_study(
    spec: SweepSpec,
    storage: optuna.storages.BaseStorage,
    sampler: optuna.samplers.BaseSampler | None = None,
    pruner: optuna.pruners.BasePruner | None = None,
) -> optuna.Study:
    """Create the study, or load it to resume, with this session's sampler and pruner (built
    from the settings unless given). A study's directions and objective names are fixed."""
    s = spec.settings
    directions = [direction for _, direction in s.objective_pairs]
    study = optuna.create_study(
        study_name=s.study_name,
        storage=storage,
        sampler=_samplers.make_sampler(s, spec.space) if sampler is None else sampler,
        pruner=_samplers.make_pruner(s) if pruner is None else pruner,
        directions=directions,
        load_if_exists=True,
    )
    existing = [d.name.lower() for d in study.directions]
    if existing != directions:
        if len(existing) == len(directions) == 1:
            raise UserError(
                f"study {s.study_name} exists with direction {existing[0]}; sweep.direction="
                f"{directions[0]} would corrupt it; use another sweep.study_name"
            )
        raise UserError(
            f"study {s.study_name} exists with objectives {_describe(study)}; "
            f"sweep.objectives={dict(s.objective_pairs)} would corrupt it; "
            "use another sweep.study_name"
        )
    if study.metric_names is None:
        study.set_metric_names(s.objective_names)
    elif len(directions) > 1 and study.metric_names != s.objective_names:
        raise UserError(
            f"study {s.study_name} exists with objectives {_describe(study)}; "
            f"sweep.objectives={dict(s.objective_pairs)} would corrupt it; "
            "use another sweep.study_name"
        )
    return study


def _describe(study: optuna.Study) -> dict[str, str] | list[str]:
    directions = [d.name.lower() for d in study.directions]
    if study.metric_names and len(study.metric_names) == len(directions):
        return dict(zip(study.metric_names, directions, strict=True))
    return directions


def sessions_opened(storage: optuna.storages.BaseStorage, study_name: str) -> int:
    """How many processes have opened the study so far (0 for a study not yet created)."""
    try:
        study_id = storage.get_study_id_from_name(study_name)
    except KeyError:
        return 0
    return int(storage.get_study_user_attrs(study_id).get(SESSIONS_ATTR, 0))


def load_study(study_name: str, storage: str | None = None) -> optuna.Study:
    """An existing study, for the leaderboard and reproduce; unknown names list the known ones."""
    for url in [storage] if storage else _default_urls():
        store = open_storage(url)
        if study_name in _names(url, store):
            return optuna.load_study(study_name=study_name, storage=store)
    known = ", ".join(study_names(storage)) or "none yet"
    where = tracking.redact(storage) if storage else "mlruns/"
    raise UserError(f"no sweep named '{study_name}' in {where}; known: {known}")


def study_names(storage: str | None = None) -> list[str]:
    """Every study in ``storage``, or in the default SQLite and journal files."""
    return sorted(
        {name for url in ([storage] if storage else _default_urls()) for name in _names(url)}
    )


class StudyLock:
    """Serialises "does the study need another trial?" and starting it, across processes.

    PostgreSQL: an advisory lock on the storage's own database (workers on several machines).
    Files (SQLite, journal): ``fcntl`` on a lock file beside the storage file.
    Other storages get no lock; the study may then overshoot ``n_trials`` by a few trials.
    """

    def __init__(self, storage: optuna.storages.BaseStorage, url: str, study_name: str) -> None:
        self._key = int.from_bytes(
            hashlib.sha256(study_name.encode()).digest()[:8], "big", signed=True
        )
        self._engine = getattr(storage, "engine", None) if url.startswith("postgresql") else None
        self._path = _lock_path(url, study_name)
        self._held: object | None = None

    def acquire(self) -> None:
        if self._engine is not None:
            from sqlalchemy import text

            connection = self._engine.connect()
            connection.execute(text("SELECT pg_advisory_lock(:key)"), {"key": self._key})
            self._held = connection
        elif self._path is not None:
            handle = self._path.open("a")
            fcntl.flock(handle, fcntl.LOCK_EX)
            self._held = handle

    def release(self) -> None:
        held, self._held = self._held, None
        if held is None:
            return
        if self._engine is not None:
            from sqlalchemy import text

            held.execute(text("SELECT pg_advisory_unlock(:key)"), {"key": self._key})  # type: ignore[attr-defined]
            held.close()  # type: ignore[attr-defined]
        else:
            fcntl.flock(held, fcntl.LOCK_UN)  # type: ignore[arg-type]
            held.close()  # type: ignore[attr-defined]

    @contextlib.contextmanager
    def held(self) -> Iterator[None]:
        self.acquire()
        try:
            yield
        finally:
            self.release()


class RetryLostTrial:
    """Heartbeat-stale trials: Optuna's retry (a WAITING copy), and the MLflow run closed."""

    def __init__(self, max_retry: int) -> None:
        self._retry = optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=max_retry)

    def __call__(self, study: optuna.Study, trial: FrozenTrial) -> None:
        self._retry(study, _retry_template(trial))
        _close_lost_run(trial, "its worker stopped sending heartbeats")


def fail_lost_trials(study: optuna.Study, worker: str, reason: str, max_retry: int) -> list[int]:
    """Fail the trials ``worker`` was running (it died), close their runs, queue retries the
    way Optuna's heartbeat callback does (a WAITING copy with the same parameters)."""
    lost = [
        t
        for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
        if t.user_attrs.get(WORKER_ATTR) == worker
    ]
    retry = optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=max_retry)
    for trial in lost:
        # Optuna has no public setter for another process's trial; the storage call is the one
        # its own heartbeat callbacks use.
        study._storage.set_trial_user_attr(trial._trial_id, FAIL_REASON_ATTR, reason)
        study.tell(trial.number, state=TrialState.FAIL)
        retry(study, _retry_template(study.trials[trial.number]))
        _close_lost_run(trial, reason)
    return [t.number for t in lost]


def _retry_template(trial: FrozenTrial) -> FrozenTrial:
    """What Optuna's retry copies: the lost trial without its run, worker and fail reason (the
    WAITING copy must not point at the failed run until a worker takes it)."""
    template = copy.deepcopy(trial)
    template.user_attrs = {
        k: v
        for k, v in trial.user_attrs.items()
        if k not in (RUN_ID_ATTR, WORKER_ATTR, FAIL_REASON_ATTR)
    }
    return template


def retry_of(trial: FrozenTrial) -> int | None:
    """The number of the lost trial that ``trial`` retries (the first of a chain), or None."""
    history = optuna.storages.RetryHeartbeatStaleTrialCallback.retry_history(trial)
    return history[0] if history else None


def _close_lost_run(trial: FrozenTrial, reason: str) -> None:
    run_id = trial.user_attrs.get(RUN_ID_ATTR)
    if run_id:
        tracking.close_lost_run(run_id, f"trial {trial.number} lost: {reason}")


def _lock_path(url: str, study_name: str) -> Path | None:
    if url.startswith("journal:"):
        base = Path(url.removeprefix("journal:").removeprefix("//")).expanduser()
    elif url.startswith("sqlite:///"):
        base = Path(url.removeprefix("sqlite:///"))
    else:
        return None
    digest = hashlib.sha256(study_name.encode()).hexdigest()[:12]
    return base.with_name(f".{base.name}.{digest}.lock")


def _names(url: str, store: optuna.storages.BaseStorage | None = None) -> list[str]:
    store = store or open_storage(url)
    return [s.study_name for s in optuna.get_all_study_summaries(store, include_best_trial=False)]


def _default_urls() -> list[str]:
    urls = [_sqlite_url(DEFAULT_STORAGE)]
    if DEFAULT_JOURNAL.is_file():
        urls.append(_journal_url(DEFAULT_JOURNAL))
    return urls


def _sqlite_url(path: Path) -> str:
    return f"sqlite:///{path.resolve()}"


def _journal_url(path: Path) -> str:
    return f"journal://{path.resolve()}"
