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
import json
import os
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import asdict
from pathlib import Path
from typing import IO, Any

import optuna
from optuna.storages import BaseStorage
from optuna.storages.journal import JournalFileBackend, JournalStorage
from optuna.trial import FrozenTrial, TrialState

from tlsweep import interrupts, tracking
from tlsweep.errors import NO_SPACE, UserError
from tlsweep.redaction import redact_url
from tlsweep.sweep import _samplers
from tlsweep.sweep._common import FAIL_REASON_ATTR, RUN_ID_ATTR, WORKER_ATTR
from tlsweep.sweep._optuna_private import storage_of, trial_id_of
from tlsweep.sweep._patience import is_connection_error, patient
from tlsweep.sweepspec import SweepSettings, SweepSpec

LOCK_TIMEOUT = 600.0  # seconds a process waits for the study lock before reporting a fault
DEFAULT_STORAGE = Path("mlruns") / "optuna.db"
DEFAULT_JOURNAL = Path("mlruns") / "optuna.journal"
SESSIONS_ATTR = "tlsweep_sessions"  # how many processes have opened the study
EXPERIMENT_ATTR = "tlsweep_experiment"  # the base and search space it was started with
UNRELATED_KEYS = ("cache.", "tracking.")  # base keys that may change between runs of a study


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
        _move_study(settings.study_name, sqlite, journal)
    return journal


def _move_study(name: str, source_url: str, target_url: str) -> None:
    """Copy the study ``name`` to the target storage and delete it from the source, under the
    source's study lock: of several supervisors starting at once, one moves it."""
    source = open_storage(source_url)
    with StudyLock(source, source_url, name).held():
        if name not in _names(source_url, source):  # moved meanwhile
            return
        optuna.copy_study(
            from_study_name=name, from_storage=source, to_storage=open_storage(target_url)
        )
        optuna.delete_study(study_name=name, storage=source)


def open_storage(url: str, settings: SweepSettings | None = None) -> optuna.storages.BaseStorage:
    """An Optuna storage for ``url``; unreachable or malformed URLs raise `UserError`.

    ``journal:///path`` is a journal file; anything else is an SQLAlchemy URL.
    """
    settings = settings or SweepSettings()
    try:
        if url.startswith("journal:"):
            path = Path(url.removeprefix("journal:").removeprefix("//")).expanduser()
            path.parent.mkdir(parents=True, exist_ok=True)
            return journal_storage(path)
        if url.startswith("sqlite:///"):
            Path(url.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
        return _rdb_storage(url, settings)
    except Exception as exc:
        reason = " ".join(str(exc).split())[:200]
        raise UserError(f"cannot open sweep.storage {redact_url(url)}: {reason}") from None


def journal_storage(path: Path) -> JournalStorage:
    """Optuna's journal file at ``path``, locked with `JournalFlock`, a torn last line (a
    write cut short by a full disk) cut off first."""
    lock = JournalFlock(path)
    with _held(lock):
        _cut_torn_line(path)
    return JournalStorage(_WholeLinesJournal(path, lock))


class _WholeLinesJournal(JournalFileBackend):
    """Optuna's journal file, whole lines only: an append that fails (a full disk) cuts the
    part it wrote before it raises, naming the journal (Python's error names no file), so
    that the next append does not glue a line onto half of one."""

    def __init__(self, path: Path, lock: JournalFlock) -> None:
        super().__init__(str(path), lock_obj=lock)
        self._path, self._flock = path, lock

    def append_logs(self, logs: list[dict[str, Any]]) -> None:
        try:
            super().append_logs(logs)
        except OSError as exc:
            with _held(self._flock):
                _cut_torn_line(self._path)
            if exc.errno in NO_SPACE:
                raise OSError(exc.errno, exc.strerror, str(self._path)) from exc
            raise


class JournalFlock:
    """The lock Optuna's journal backend takes to append: an ``flock`` on ``PATH.flock``.

    Optuna's own symlink lock is a file that a process killed while holding it leaves
    behind, and every other process then waits 30 s before breaking it; the kernel releases
    an ``flock`` the moment its holder dies. (Every tlsweep process opens journals this way,
    so they all take the same lock.)
    """

    def __init__(self, journal: Path) -> None:
        self._path = Path(f"{journal}.flock")
        self._handle: IO[str] | None = None
        self._thread_lock = threading.Lock()  # one holder per process, too

    def acquire(self) -> bool:
        """Exception-safe: a signal that interrupts the wait for the ``flock`` (another
        process is appending) must not leave the thread lock held, or this process's own
        clean-up (failing its trial in the journal) would wait for it forever."""
        self._thread_lock.acquire()
        try:
            handle = self._path.open("a")
            try:
                fcntl.flock(handle, fcntl.LOCK_EX)
            except BaseException:
                handle.close()
                raise
        except BaseException:
            self._thread_lock.release()
            raise
        self._handle = handle
        return True

    def release(self) -> None:
        handle, self._handle = self._handle, None
        try:
            if handle is not None:
                fcntl.flock(handle, fcntl.LOCK_UN)
                handle.close()
        finally:
            self._thread_lock.release()


@contextlib.contextmanager
def _held(lock: JournalFlock) -> Iterator[None]:
    lock.acquire()
    try:
        yield
    finally:
        lock.release()


def _cut_torn_line(path: Path) -> bool:
    """Drop an incomplete last line of the journal: Optuna skips it while it is last, but the
    next line appended would join it and make the whole journal unreadable."""
    if not path.is_file() or path.stat().st_size == 0:
        return False
    with path.open("rb+") as handle:
        handle.seek(-1, 2)
        if handle.read(1) == b"\n":
            return False
        data_end = handle.seek(0, 2)
        keep = max(0, data_end - 1)
        while keep > 0:  # back to the last complete line
            handle.seek(keep - 1)
            if handle.read(1) == b"\n":
                break
            keep -= 1
        handle.truncate(keep)
    return True


def _rdb_storage(
    url: str, settings: SweepSettings, attempts: int = 3
) -> optuna.storages.BaseStorage:
    """RDBStorage with heartbeats, made patient with database outages (`_patience`). Workers
    starting together on a fresh database race to create Optuna's tables; the loser's error
    ("already exists") just means they now exist: retry. A database unreachable as the sweep
    opens is refused at once."""
    grace = settings.grace_period or 4 * settings.heartbeat_interval
    engine = {} if url.startswith("sqlite") else {"pool_pre_ping": True}
    for attempt in range(attempts):
        try:
            inner = optuna.storages.RDBStorage(
                url,
                engine_kwargs=engine,
                heartbeat_interval=settings.heartbeat_interval,
                grace_period=grace,
                heartbeat_stale_trial_callback=RetryLostTrial(settings.max_retry),
            )
            return patient(inner, settings.storage_patience, grace)
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
    _check_experiment(study, spec)
    if study.metric_names is None:
        study.set_metric_names(s.objective_names)
    elif len(directions) > 1 and study.metric_names != s.objective_names:
        raise UserError(
            f"study {s.study_name} exists with objectives {_describe(study)}; "
            f"sweep.objectives={dict(s.objective_pairs)} would corrupt it; "
            "use another sweep.study_name"
        )
    return study


def experiment_of(spec: SweepSpec) -> dict[str, dict[str, object]]:
    """What makes a study one experiment: the base every trial starts from and the search
    space. Where features are cached and where runs are tracked (``cache.*``, ``tracking.*``)
    change no result and may differ from one run of the sweep to the next."""
    base = dict(override.split("=", 1) for override in spec.base if "=" in override)
    kept = {k: v for k, v in base.items() if not k.lstrip("+~").startswith(UNRELATED_KEYS)}
    space = {d.key: {k: v for k, v in asdict(d).items() if k != "key"} for d in spec.space}
    return {"base": kept, "search_space": json.loads(json.dumps(space, default=str))}


def _check_experiment(study: optuna.Study, spec: SweepSpec) -> None:
    """Record the study's experiment when it starts; refuse to run another one in it."""
    current = experiment_of(spec)
    started = study.user_attrs.get(EXPERIMENT_ATTR)
    if started is None:  # a new study (or one started before tlsweep recorded this)
        study.set_user_attr(EXPERIMENT_ATTR, current)
        return
    if started == current:
        return
    name = spec.settings.study_name
    raise UserError(
        f"study {name} was started with {_first_difference(started, current)}; one study is one "
        f"experiment: start a new one with sweep.study_name={name}-2, or run the sweep as it was "
        "started"
    )


def _first_difference(started: dict, current: dict) -> str:
    for part, label in (("search_space", "search space"), ("base", "base")):
        before, now = started.get(part, {}), current.get(part, {})
        for key in sorted(set(before) | set(now)):
            if before.get(key) != now.get(key):
                was = _shown(part, before.get(key))
                return f"{label} {key}={was}, this sweep has {_shown(part, now.get(key))}"
    return "another base or search space"


def _shown(part: str, value: object) -> str:
    if value is None:
        return "none"
    if part == "base":
        return str(value)
    spec = dict(value)  # type: ignore[call-overload]
    if spec.get("kind") == "categorical":
        return f"choice({', '.join(map(str, spec['choices']))})"
    log = ", log" if spec.get("log") else ""
    return f"{spec.get('kind')} in [{spec.get('low')}, {spec.get('high')}]{log}"


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
    """An existing study, for the leaderboard, the report and reproduce (`find_study`)."""
    _, store = find_study(study_name, storage)
    return optuna.load_study(study_name=study_name, storage=store)


def find_study(study_name: str, storage: str | None = None) -> tuple[str, BaseStorage]:
    """The URL and opened storage of an existing study: in ``storage``, else in the default
    files, else where the sweep recorded it (`recorded_storage`); unknown names list the
    known ones. Connect tracking first."""
    urls = [storage] if storage else _default_urls()
    if storage is None and (recorded := recorded_storage(study_name)) not in (None, *urls):
        urls.append(recorded)
    for url in urls:
        store = open_storage(url)
        if study_name in _names(url, store):
            return url, store
    known = ", ".join(study_names(storage)) or "none yet"
    where = redact_url(storage) if storage else "mlruns/"
    raise UserError(f"no sweep named '{study_name}' in {where}; known: {known}")


def recorded_storage(study_name: str) -> str | None:
    """The storage the sweep ``study_name`` recorded on its parent run (tag ``sweep.storage``,
    its password hidden), without the password: the database client then takes it from the
    environment (``PGPASSWORD``, ``~/.pgpass``). None when no sweep of that name is tracked."""
    tag = tracking.sweep_tag(study_name, "sweep.storage")
    if not tag:
        return None
    from sqlalchemy.engine import URL, make_url

    try:
        url = make_url(tag)
    except Exception:  # journal:///path: no credentials in it
        return tag
    fields = ("drivername", "username", "host", "port", "database", "query")
    without_password = URL.create(**{name: getattr(url, name) for name in fields})
    return without_password.render_as_string(hide_password=False)


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
            self._held = self._advisory_lock()
        elif self._path is not None:
            handle = self._path.open("a")
            fcntl.flock(handle, fcntl.LOCK_EX)
            self._held = handle

    def _advisory_lock(self) -> object:
        """PostgreSQL's advisory lock on a connection of its own, tried every half second
        (a database restart in between is waited out: `_patience`) for at most
        `LOCK_TIMEOUT` seconds: a lock held longer than that is a fault to report."""
        from sqlalchemy import text

        deadline = time.monotonic() + LOCK_TIMEOUT
        while True:
            try:
                connection = self._engine.connect()
                query = text("SELECT pg_try_advisory_lock(:key)")
                if connection.execute(query, {"key": self._key}).scalar():
                    return connection
                connection.close()
            except Exception as exc:
                if not is_connection_error(exc) or time.monotonic() > deadline:
                    raise
            if time.monotonic() > deadline:
                raise TimeoutError(f"the study lock was held for {LOCK_TIMEOUT:g} s")
            interrupts.raise_pending()  # one held back in database code stops the wait
            time.sleep(0.5)

    def release(self) -> None:
        held, self._held = self._held, None
        if held is None:
            return
        if self._engine is not None:
            from sqlalchemy import text

            try:  # a connection the database dropped took the lock with it
                held.execute(text("SELECT pg_advisory_unlock(:key)"), {"key": self._key})  # type: ignore[attr-defined]
                held.close()  # type: ignore[attr-defined]
            except Exception as exc:
                if not is_connection_error(exc):
                    raise
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


def fail_lost_trials(
    study: optuna.Study, worker: str | None, reason: str, max_retry: int
) -> list[int]:
    """Fail the trials ``worker`` was running (it died; None: trials that recorded no worker),
    close their runs, queue retries the way Optuna's heartbeat callback does (a WAITING copy
    with the same parameters)."""
    lost = [
        t
        for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
        if t.user_attrs.get(WORKER_ATTR) == worker
    ]
    retry = optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=max_retry)
    for trial in lost:
        # Optuna has no public setter for another process's trial; the storage call is the one
        # its own heartbeat callbacks use.
        storage_of(study).set_trial_user_attr(trial_id_of(trial), FAIL_REASON_ATTR, reason)
        study.tell(trial.number, state=TrialState.FAIL)
        retry(study, _retry_template(study.trials[trial.number]))
        _close_lost_run(trial, reason)
    return [t.number for t in lost]


def fail_dead_trials(study: optuna.Study, max_retry: int) -> list[int]:
    """Fail, close and queue again the RUNNING trials whose process is gone. Call it while
    holding the study lock.

    Two kinds are found without waiting for heartbeats (which a journal file does not have):
    trials whose worker (``host:pid``, recorded as a trial starts) is a process of this
    machine that no longer exists (killed, out of memory, the machine restarted), and trials
    with no worker at all. A process asks for a trial and records itself on it while holding
    the lock, so a trial seen without a worker by the lock's holder was left by a process that
    died in between. Other machines' trials are left to heartbeats (PostgreSQL).
    """
    host, me = socket.gethostname(), os.getpid()
    dead: set[str] = set()
    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        worker = trial.user_attrs.get(WORKER_ATTR)
        machine, _, pid = (worker or "").rpartition(":")
        if not worker or (machine == host and pid.isdigit() and not _alive(int(pid), me)):
            dead.add(worker or "")
    lost: list[int] = []
    for worker in sorted(dead):
        reason = f"its worker {worker} is gone" if worker else "its worker died as it started"
        lost += fail_lost_trials(study, worker or None, reason, max_retry)
    return lost


def reconcile_runs(study: optuna.Study, parent_run_id: str) -> list[str]:
    """End the MLflow runs left RUNNING although their trial has ended: FINISHED for the run
    of a finished trial, FAILED otherwise (a process stopped between creating its run and
    recording it on the trial, or the tracking server was unreachable when the trial ended).
    Runs of trials still running are left alone. Returns the run ids it ended."""
    trials = {t.number: t for t in study.get_trials(deepcopy=False)}
    ended = []
    for run_id, number in tracking.running_children(parent_run_id):
        trial = trials.get(number) if number is not None else None
        if trial is not None and trial.state in (TrialState.RUNNING, TrialState.WAITING):
            continue
        finished = (
            trial is not None
            and trial.state in (TrialState.COMPLETE, TrialState.PRUNED)
            and trial.user_attrs.get(RUN_ID_ATTR) == run_id
        )
        if finished:
            tracking.finish_run(run_id)
        else:
            state = trial.state.name if trial is not None else "unknown"
            tracking.close_lost_run(run_id, f"trial {number} ended ({state}) with this run open")
        ended.append(run_id)
    return ended


def _alive(pid: int, me: int) -> bool:
    if pid == me:
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process: it exists
        return True
    return True


def retry_interrupted(study: optuna.Study, number: int, max_retry: int) -> None:
    """Queue a copy of trial ``number``, which a signal is interrupting, as a lost trial's is
    queued: the next process to ask for a trial runs the same values again."""
    trial = study.get_trials(deepcopy=False)[number]
    optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=max_retry)(
        study, _retry_template(trial)
    )


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
        try:
            tracking.close_lost_run(run_id, f"trial {trial.number} lost: {reason}")
        except Exception as exc:  # the trial is failed and queued all the same
            if not tracking.is_unreachable(exc):
                raise  # with the server away, `reconcile_runs` closes the run later


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
