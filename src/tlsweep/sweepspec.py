"""Sweep files: the base overrides a sweep starts from, its search space and its settings.

A sweep file (``sweeps/NAME.yaml``)::

    base:                    # Hydra overrides of conf/, applied to every trial
      backbone: resnet50
      backbone.weights: null
    search_space:            # Hydra's sweep grammar, parsed by Hydra's own parser
      head.dense_units: choice(64, 128, 256)
      head.dropout: interval(0.0, 0.5)
      optimizer.learning_rate: tag(log, interval(1e-4, 1e-2))
    enqueue:                 # known configurations, tried first (optional)
      - {head.dense_units: 128, head.dropout: 0.2}
    sweep:                   # study settings (SweepSettings)
      n_trials: 10

Several objectives (accuracy against cost) replace ``metric``/``direction``::

    sweep:
      objectives: {val_accuracy: maximize, latency_ms: minimize}   # or a list: defaults
      sampler: nsga2                                                # pruner: none (implied)

Command-line arguments refine it: ``sweep.KEY=VALUE`` sets a setting, ``KEY=choice(...)`` (any
sweep expression) adds or replaces a dimension, and a plain ``KEY=VALUE`` is a base override
that also fixes KEY if it was searched.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from importlib import resources
from pathlib import Path
from typing import Any, Literal

import yaml
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from tlsweep import metrics
from tlsweep.config import CONFIG_GROUPS, compose
from tlsweep.errors import UserError

WORKER_STORAGE_ENV = "TLSWEEP_WORKER_STORAGE"

SAMPLERS = ("tpe", "random", "grid", "cmaes", "gp", "qmc", "nsga2", "nsga3")
MULTI_OBJECTIVE_SAMPLERS = ("nsga2", "nsga3", "tpe", "random", "grid", "gp", "qmc")
PRUNERS = ("median", "hyperband", "successive_halving", "none")
EPOCH_METRICS = ("val_accuracy", "val_loss", "accuracy", "loss")
# Measured once per completed trial on its trained raw-image model (not per epoch):
# latency_ms: median milliseconds per image at batch 1 on the machine running the trial;
# params: the model's total parameter count.
COST_METRICS = metrics.COST_METRICS
OBJECTIVE_METRICS = (*EPOCH_METRICS, *COST_METRICS)
DIRECTIONS = ("maximize", "minimize")

Scalar = str | int | float | bool | None


@dataclass
class PromoteSettings:
    """``sweep.promote``: once the search's ``n_trials`` have finished, continue its best
    ``top_k`` trials with ``overrides`` (Hydra overrides: a fine-tuning stage, augmentation,
    more epochs), each from its trained head, as trials of the same study."""

    top_k: int = 2
    overrides: list[str] = field(default_factory=list)


@dataclass
class SweepSettings:
    study_name: str = "sweep"
    metric: str = "val_accuracy"
    direction: str | None = None  # null: minimize losses, maximize the rest
    # Several objectives, in order: {name: maximize | minimize | null}. When set, ``metric`` and
    # ``direction`` follow its one training metric (early stopping, progress).
    objectives: dict[str, str | None] | None = None
    sampler: str = "tpe"
    sampler_options: dict[str, Any] = field(default_factory=dict)  # passed to the sampler
    seed: int | None = 0
    pruner: str = "median"
    pruner_options: dict[str, Any] = field(default_factory=dict)
    n_trials: int = 10
    timeout: float | None = None  # seconds for this invocation; null: no limit
    storage: str | None = None  # null: sqlite:///mlruns/optuna.db (a journal file for workers)
    artifacts: str | None = None  # trial artifacts; null: optuna-artifacts/ beside the storage
    heartbeat_interval: int = 20  # seconds between a running trial's heartbeats (RDB storages)
    grace_period: int | None = None  # silence after which a trial is lost; null: 4 heartbeats
    max_retry: int = 2  # how often a lost trial (dead worker) is retried
    storage_patience: float = 300  # seconds to wait out an unreachable database mid-sweep
    latency_warmup: int = 5  # untimed calls before timing latency_ms
    latency_repeats: int = 30  # timed calls at batch 1; latency_ms is their median
    # Head-only trials on cached features asked and trained together, their heads in one
    # compiled step (tlsweep.grouped), at most this many at a time; 1: one trial at a time.
    group_size: int = 1
    promote: PromoteSettings | None = None  # a second stage for the best trials (null: none)

    def __post_init__(self) -> None:
        if self.objectives:
            self.objectives = {
                name: direction or default_direction(name)
                for name, direction in self.objectives.items()
            }
            trained = [name for name in self.objectives if name in EPOCH_METRICS]
            if len(trained) == 1:  # otherwise validate_sweep refuses the settings
                self.metric, self.direction = trained[0], self.objectives[trained[0]]

    @property
    def resolved_direction(self) -> str:
        return self.direction or default_direction(self.metric)

    @property
    def objective_pairs(self) -> tuple[tuple[str, str], ...]:
        """(name, direction) of each objective, in order; one pair for ``metric``/``direction``."""
        if self.objectives:
            return tuple((name, str(d)) for name, d in self.objectives.items())
        return ((self.metric, self.resolved_direction),)

    @property
    def objective_names(self) -> list[str]:
        return [name for name, _ in self.objective_pairs]

    @property
    def multi_objective(self) -> bool:
        return len(self.objective_pairs) > 1


def default_direction(metric: str) -> str:
    """Losses and costs are minimized, the rest maximized (`metrics.direction`)."""
    return metrics.direction(metric)


@dataclass(frozen=True)
class Dimension:
    """One searched key: categorical choices, or an int/float interval (optionally stepped, log)."""

    key: str
    kind: Literal["categorical", "int", "float"]
    choices: tuple[Scalar, ...] = ()
    low: float = 0.0
    high: float = 0.0
    step: float | None = None
    log: bool = False

    def grid_values(self) -> list[Scalar]:
        """All values, for the grid sampler: choices, or the points of a stepped range."""
        if self.kind == "categorical":
            return list(self.choices)
        if self.step is None:
            raise UserError(
                f"search space {self.key}: the grid sampler needs choice(...) or range(...), "
                "not an interval"
            )
        count = round((self.high - self.low) / self.step) + 1
        values = [self.low + i * self.step for i in range(count)]
        return [int(v) for v in values] if self.kind == "int" else [_tidy(v) for v in values]


@dataclass(frozen=True)
class SweepSpec:
    """A parsed sweep: what every trial starts from, what it searches, how the study runs."""

    name: str
    base: tuple[str, ...]
    space: tuple[Dimension, ...]
    settings: SweepSettings
    enqueue: tuple[dict[str, Scalar], ...] = ()  # configurations tried first (`enqueued`)

    def trial_overrides(self, params: Mapping[str, Scalar]) -> list[str]:
        """The Hydra overrides of one trial: the base, then the sampled values."""
        return [*self.base, *param_overrides(params)]

    def searches(self, *prefixes: str) -> bool:
        """Whether a searched key is one of ``prefixes`` or lies under one (``data``:
        ``data=folder``, ``data.path``...)."""
        return any(d.key == p or d.key.startswith(f"{p}.") for d in self.space for p in prefixes)


def param_overrides(params: Mapping[str, Scalar]) -> list[str]:
    """Sampled values as Hydra overrides."""
    return [to_override(key, value) for key, value in params.items()]


def sweeps_dir() -> Path:
    """``$TLSWEEP_SWEEPS_DIR``, the checkout's ``sweeps/``, or the packaged copy."""
    import os

    if env := os.environ.get("TLSWEEP_SWEEPS_DIR"):
        return Path(env).expanduser().resolve()
    checkout = Path(__file__).resolve().parents[2] / "sweeps"
    if checkout.is_dir():
        return checkout
    return Path(str(resources.files("tlsweep") / "_sweeps"))


def available_sweeps() -> list[str]:
    return sorted(p.stem for p in sweeps_dir().glob("*.yaml"))


def load_sweep(name: str, cli_overrides: Sequence[str] = ()) -> SweepSpec:
    """Read ``sweeps/NAME.yaml`` (or a path), apply command-line overrides, validate."""
    path = _sweep_path(name)
    document = _read_document(path)
    base = [to_override(k, v) for k, v in (document.get("base") or {}).items()]
    space = {
        key: parse_dimension(key, _expression(value))
        for key, value in (document.get("search_space") or {}).items()
    }
    settings = dict(document.get("sweep") or {})
    settings.setdefault("study_name", path.stem)
    searched = set(space)
    _apply_cli(cli_overrides, base, space, settings)
    _objective_defaults(settings)
    fixed = searched - set(space)  # fixed on the command line: that value wins
    entries = [{k: v for k, v in e.items() if k not in fixed} for e in document["enqueue"]]
    enqueue = enqueued(entries, tuple(space.values()))
    spec = SweepSpec(path.stem, tuple(base), tuple(space.values()), _settings(settings), enqueue)
    validate_sweep(spec)
    return spec


def multirun_spec(overrides: Sequence[str]) -> SweepSpec:
    """``tlsweep train -m a=1,2 b=x,y c=3``: a grid sweep over the comma-separated values
    (or any ``choice``/``range`` expression), tracked like any sweep: one parent run, a child
    run per combination. Its study is named after the overrides (``multirun-`` and a short
    hash) unless ``sweep.study_name=`` says otherwise, so the same command resumes it."""
    import hashlib

    base: list[str] = []
    space: dict[str, Dimension] = {}
    digest = hashlib.sha256("\0".join(overrides).encode()).hexdigest()[:8]
    settings: dict[str, Any] = {"study_name": f"multirun-{digest}", "sampler": "grid"}
    _apply_cli(overrides, base, space, settings)
    if not space:
        raise UserError(
            "-m/--multirun needs at least one KEY=A,B (or choice(...), range(...)) to sweep; "
            "without one, drop -m"
        )
    grid = math.prod(len(dim.grid_values()) for dim in space.values())
    settings.setdefault("n_trials", grid)
    _objective_defaults(settings)
    name = str(settings["study_name"])
    spec = SweepSpec(name, tuple(base), tuple(space.values()), _settings(settings))
    validate_sweep(spec)
    return spec


def parse_dimension(key: str, expression: str) -> Dimension:
    """``choice(...)``, ``range(a, b, step=s)``, ``interval(a, b)``, ``int(interval(...))`` and
    ``tag(log, ...)``, parsed by Hydra's override parser."""
    override = _parse_override(f"{key}={expression}")
    if not override.is_sweep_override():
        raise UserError(
            f"search space {key}: '{expression}' is a fixed value; use choice(...), range(...) "
            "or interval(...), or move it to base"
        )
    value = override.value()
    log = "log" in getattr(value, "tags", set())
    if override.is_choice_sweep():
        return Dimension(key, "categorical", choices=tuple(override.sweep_iterator()))
    if override.is_range_sweep():
        points = [_tidy(v) for v in override.sweep_iterator()]
        if not points:
            raise UserError(f"search space {key}: '{expression}' is empty")
        kind = "int" if all(isinstance(p, int) for p in points) else "float"
        step = value.step
        return Dimension(key, kind, low=points[0], high=points[-1], step=step, log=log)
    start, end = value.start, value.end
    if start is None or end is None or not start < end:
        raise UserError(f"search space {key}: '{expression}' needs start < end")
    kind = "int" if isinstance(start, int) and isinstance(end, int) else "float"
    if log and start <= 0:
        raise UserError(f"search space {key}: a log interval needs start > 0, got {start}")
    return Dimension(key, kind, low=start, high=end, log=log)


def validate_sweep(spec: SweepSpec) -> None:
    """Refuse bad settings and search spaces before a study or run is touched."""
    s = spec.settings
    if not spec.space:
        raise UserError(f"sweep {spec.name}: the search space is empty; add search_space entries")
    _choice("sweep.sampler", s.sampler, SAMPLERS)
    _choice("sweep.pruner", s.pruner, PRUNERS)
    if s.objectives is not None:
        _check_objectives(s)
    elif s.direction is not None:
        _choice("sweep.direction", s.direction, DIRECTIONS)
    if s.metric not in EPOCH_METRICS:
        raise UserError(
            f"sweep.metric={s.metric} is not logged by any trial's epochs; "
            f"choose from {', '.join(EPOCH_METRICS)}"
        )
    if s.n_trials < 1:
        raise UserError(f"sweep.n_trials={s.n_trials} is not allowed: must be >= 1")
    if s.heartbeat_interval < 1 or (s.grace_period is not None and s.grace_period < 1):
        raise UserError("sweep.heartbeat_interval and sweep.grace_period must be >= 1 second")
    if s.max_retry < 0:
        raise UserError(f"sweep.max_retry={s.max_retry} is not allowed: must be >= 0")
    if s.storage_patience < 0:
        raise UserError(
            f"sweep.storage_patience={s.storage_patience} is not allowed: seconds, >= 0"
        )
    if s.timeout is not None and s.timeout <= 0:
        raise UserError(f"sweep.timeout={s.timeout} is not allowed: seconds > 0, or null")
    if s.latency_warmup < 0 or s.latency_repeats < 1:
        raise UserError(
            f"sweep.latency_warmup={s.latency_warmup} and sweep.latency_repeats="
            f"{s.latency_repeats} are not allowed: warm-up >= 0 calls, repeats >= 1"
        )
    if s.group_size < 1:
        raise UserError(
            f"sweep.group_size={s.group_size} is not allowed: trials trained together, >= 1 "
            "(1: one at a time)"
        )
    if s.promote is not None:
        _check_promote(spec)
    if s.sampler == "grid":
        for dim in spec.space:
            dim.grid_values()
    enqueued(spec.enqueue, spec.space, whole=s.sampler == "grid")
    if len(spec.enqueue) > s.n_trials:
        raise UserError(
            f"sweep.n_trials={s.n_trials} is fewer than the {len(spec.enqueue)} enqueued "
            "configurations; raise it or enqueue fewer"
        )
    _check_keys(spec)


def enqueued(
    entries: Sequence[Mapping[str, Any]], space: Sequence[Dimension], whole: bool = False
) -> tuple[dict[str, Scalar], ...]:
    """The configurations a sweep file enqueues, each value checked against its dimension and
    given its type (``0`` for a float interval is ``0.0``); empty entries are left out.
    ``whole``: every entry must set every dimension (the grid sampler cannot fill in the rest)."""
    dims = {dim.key: dim for dim in space}
    out = []
    for number, entry in enumerate(entries, start=1):
        if not entry:
            continue
        where = f"enqueue entry {number}"
        unknown = [str(key) for key in entry if key not in dims]
        if unknown:
            raise UserError(
                f"{where}: {unknown[0]} is not a search-space dimension; "
                f"searched: {', '.join(dims)}"
            )
        missing = [key for key in dims if key not in entry]
        if whole and missing:
            raise UserError(
                f"{where}: with sweep.sampler=grid an entry sets every dimension; "
                f"missing: {', '.join(missing)}"
            )
        out.append({key: _enqueue_value(dims[key], value, where) for key, value in entry.items()})
    return tuple(out)


def describe_dimension(dim: Dimension) -> str:
    """``choice(64, 128)``, ``int in [16, 64] step 16``, ``float in [0.0001, 0.001] log``."""
    if dim.kind == "categorical":
        return f"choice({', '.join(_format(c) for c in dim.choices)})"
    low, high = (int(dim.low), int(dim.high)) if dim.kind == "int" else (dim.low, dim.high)
    text = f"{dim.kind} in [{low}, {high}]"
    return text + (f" step {_tidy(dim.step)}" if dim.step else "") + (" log" if dim.log else "")


def dimension_size(dim: Dimension) -> int | None:
    """How many values a dimension has; None for a float interval (continuous)."""
    if dim.kind == "categorical":
        return len(dim.choices)
    if dim.kind == "int":
        return int(dim.high - dim.low) // int(dim.step or 1) + 1
    return None if dim.step is None else round((dim.high - dim.low) / dim.step) + 1


def grid_size(space: Sequence[Dimension]) -> int | None:
    """The number of distinct configurations; None when a dimension is continuous."""
    sizes = [dimension_size(dim) for dim in space]
    return None if None in sizes else math.prod(s for s in sizes if s is not None)


def storage_file(url: str) -> Path | None:
    """The file a journal or SQLite storage URL names; None for a database server."""
    if url.startswith("journal:"):
        return Path(url.removeprefix("journal:").removeprefix("//")).expanduser()
    if url.startswith("sqlite:///") and url != "sqlite:///:memory:":
        return Path(url.removeprefix("sqlite:///")).expanduser()
    return None


def artifacts_dir(settings: SweepSettings, url: str) -> Path:
    """Where a study's trial artifacts live: ``sweep.artifacts``, else ``optuna-artifacts/``
    beside the storage's file, else (a database server) ``mlruns/optuna-artifacts/``; several
    machines need ``sweep.artifacts`` on a folder they share."""
    if settings.artifacts:
        return Path(settings.artifacts).expanduser().resolve()
    file = storage_file(url)
    return (file.parent if file else Path("mlruns")).resolve() / ARTIFACTS_FOLDER


def worker_overrides() -> list[str]:
    """In a local worker process: the ``sweep.storage`` its supervisor resolved, passed in the
    environment (`WORKER_STORAGE_ENV`) so that no command line shows the URL's password."""
    storage = os.environ.get(WORKER_STORAGE_ENV)
    return [to_override("sweep.storage", storage)] if storage else []


def to_override(key: str, value: Any) -> str:
    """``key=value`` in Hydra's override syntax (YAML values, quoted where needed)."""
    return f"{key}={_format(value)}"


def with_settings(spec: SweepSpec, **changes: Any) -> SweepSpec:
    return replace(spec, settings=replace(spec.settings, **changes))


# --- helpers ---------------------------------------------------------------------------------


SECTIONS = ("base", "search_space", "enqueue", "sweep")
ARTIFACTS_FOLDER = "optuna-artifacts"


def _read_document(path: Path) -> dict[str, Any]:
    """The sweep file as a mapping of its sections, each a mapping (or empty); anything else
    (not UTF-8, not YAML, a list, a scalar, a section that is a list) is a one-line error."""
    try:
        document = yaml.safe_load(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as exc:
        raise UserError(
            f"{path}: not UTF-8 text (byte {exc.start} is 0x{exc.object[exc.start]:02x})"
        ) from None
    except yaml.YAMLError as exc:
        raise UserError(f"{path}: not valid YAML ({str(exc).splitlines()[0]})") from None
    except OSError as exc:
        raise UserError(f"{path}: cannot read it ({exc.strerror or exc})") from None
    if document is None:
        document = {}
    if not isinstance(document, dict):
        raise UserError(
            f"{path}: a sweep file is a mapping with the sections {', '.join(SECTIONS)}, "
            f"not a {_kind(document)}"
        )
    unknown = set(document) - set(SECTIONS)
    if unknown:
        raise UserError(
            f"{path}: unknown sections {sorted(map(str, unknown))}; allowed: {', '.join(SECTIONS)}"
        )
    for section in SECTIONS:
        value = document.get(section)
        if section == "enqueue":
            document[section] = _enqueue_section(path, value)
        elif value is not None and not isinstance(value, dict):
            raise UserError(
                f"{path}: section {section} is a {_kind(value)}; write it as KEY: VALUE lines"
            )
    return document


def _enqueue_section(path: Path, value: object) -> list[dict[str, Any]]:
    """``enqueue``: a list of mappings (one configuration each), or nothing."""
    entries = [] if value is None else value
    if not isinstance(entries, list) or not all(isinstance(e, dict) for e in entries):
        shown = _kind(entries) if not isinstance(entries, list) else "list of other things"
        raise UserError(
            f"{path}: section enqueue is a {shown}; write it as a list of configurations, "
            "e.g. - {head.dense_units: 128, head.dropout: 0.2}"
        )
    return entries


def _enqueue_value(dim: Dimension, value: Any, where: str) -> Scalar:
    """``value`` as a point of ``dim``, or a one-line `UserError` saying what is allowed."""
    refused = UserError(
        f"{where}: {dim.key}={_shown(value)} is not allowed; the search space has "
        f"{dim.key}: {describe_dimension(dim)}"
    )
    if dim.kind == "categorical":
        same = [c for c in dim.choices if c == value and _is_number(c) == _is_number(value)]
        if not same:
            raise refused
        return same[0]
    if not _is_number(value) or (dim.kind == "int" and not float(value).is_integer()):
        raise refused
    number = int(value) if dim.kind == "int" else float(value)
    offset = (number - dim.low) / dim.step if dim.step else 0.0
    if not dim.low <= number <= dim.high or abs(offset - round(offset)) > 1e-9:
        raise refused
    return number


def _shown(value: Any) -> str:
    """``value`` as YAML would read it back: text that YAML reads otherwise is quoted."""
    if isinstance(value, str) and yaml.safe_load(_format(value)) != value:
        return f"'{value}'"
    return _format(value)


def _is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _kind(value: object) -> str:
    return {list: "list", str: "string", int: "number", float: "number", bool: "boolean"}.get(
        type(value), type(value).__name__
    )


def _sweep_path(name: str) -> Path:
    candidate = Path(name).expanduser()
    if candidate.suffix in (".yaml", ".yml") and candidate.is_file():
        return candidate
    path = sweeps_dir() / f"{name}.yaml"
    if not path.is_file():
        raise UserError(f"unknown sweep '{name}'; available: {', '.join(available_sweeps())}")
    return path


def _expression(value: Any) -> str:
    if isinstance(value, list):  # YAML list shorthand for choice(...)
        return f"choice({', '.join(_format(v) for v in value)})"
    return str(value)


def _apply_cli(
    overrides: Sequence[str],
    base: list[str],
    space: dict[str, Dimension],
    settings: dict[str, Any],
) -> None:
    from_cli: set[str] = set()
    for text in overrides:
        override = _parse_override(text)
        key = override.key_or_group
        if key.startswith("sweep."):
            settings[key.removeprefix("sweep.")] = override.value()
            from_cli.add(key.removeprefix("sweep."))
        elif override.is_sweep_override():
            space[key] = parse_dimension(key, text.split("=", 1)[1])
        else:
            space.pop(key, None)
            base.append(text)
    if "objectives" in from_cli:  # they replace the file's metric, direction and pruner
        for key in ("metric", "direction", "pruner"):
            if key not in from_cli:
                settings.pop(key, None)


def _objective_defaults(settings: dict[str, Any]) -> None:
    """``objectives`` as a mapping (a list names objectives with their default directions);
    it excludes ``metric``/``direction``; several objectives imply ``pruner: none``."""
    objectives = settings.get("objectives")
    if objectives is None:
        return
    if isinstance(objectives, str):
        objectives = [objectives]
    if isinstance(objectives, Sequence):
        objectives = {str(name): None for name in objectives}
    if not isinstance(objectives, Mapping):
        raise UserError(
            f"sweep.objectives={objectives} is not allowed: a mapping like "
            "{val_accuracy: maximize, latency_ms: minimize}, or a list of names"
        )
    settings["objectives"] = {str(k): v for k, v in objectives.items()}
    clash = [key for key in ("metric", "direction") if key in settings]
    if clash:
        raise UserError(
            f"sweep.objectives replaces sweep.{' and sweep.'.join(clash)}: set the training "
            "metric and its direction in sweep.objectives only"
        )
    if len(objectives) > 1:
        settings.setdefault("pruner", "none")


def _check_objectives(s: SweepSettings) -> None:
    objectives = s.objectives or {}
    if not objectives:
        raise UserError("sweep.objectives is empty: name a training metric and its costs")
    for name, direction in objectives.items():
        if name not in OBJECTIVE_METRICS:
            raise UserError(
                f"sweep.objectives: {name} is not measured by any trial; choose from "
                f"{', '.join(OBJECTIVE_METRICS)}"
            )
        _choice(f"sweep.objectives.{name}", str(direction), DIRECTIONS)
    trained = [name for name in objectives if name in EPOCH_METRICS]
    if len(trained) != 1:
        raise UserError(
            f"sweep.objectives needs exactly one training metric ({', '.join(EPOCH_METRICS)}), "
            f"got {len(trained)}{': ' + ', '.join(trained) if trained else ''}"
        )
    if len(objectives) > 1 and s.pruner != "none":
        raise UserError(
            f"sweep.pruner={s.pruner} cannot be used with several objectives (Optuna prunes "
            "single-objective studies only); set sweep.pruner=none or leave it out"
        )
    if len(objectives) > 1 and s.sampler not in MULTI_OBJECTIVE_SAMPLERS:
        raise UserError(
            f"sweep.sampler={s.sampler} optimizes one objective; with several choose from "
            f"{', '.join(MULTI_OBJECTIVE_SAMPLERS)}"
        )


def _settings(values: Mapping[str, Any]) -> SweepSettings:
    try:
        merged = OmegaConf.merge(OmegaConf.structured(SweepSettings), dict(values))
        settings = OmegaConf.to_object(merged)
    except OmegaConfBaseException as exc:
        key = getattr(exc, "full_key", "") or ""
        first = str(exc).splitlines()[0]
        raise UserError(f"bad sweep setting {('sweep.' + key) if key else ''}: {first}") from None
    assert isinstance(settings, SweepSettings)
    return settings


def _check_promote(spec: SweepSpec) -> None:
    """A second stage needs one objective to rank by, a first stage that trains heads only
    (their weights are what it continues from), and overrides that make a valid config."""
    s, promote = spec.settings, spec.settings.promote
    assert promote is not None
    if not 1 <= promote.top_k <= s.n_trials:
        raise UserError(
            f"sweep.promote.top_k={promote.top_k} is not allowed: between 1 and "
            f"sweep.n_trials={s.n_trials}"
        )
    if s.multi_objective:
        raise UserError(
            "sweep.promote ranks trials by one objective: it cannot be used with several "
            "sweep.objectives"
        )
    if spec.searches("train.fine_tune"):
        raise UserError(
            "sweep.promote continues head-only trials: train.fine_tune cannot be searched; "
            "put the fine-tuning stage in sweep.promote.overrides"
        )
    searched = {dim.key for dim in spec.space}
    for text in promote.overrides:
        override = _parse_override(text)
        if override.is_sweep_override():
            raise UserError(f"sweep.promote.overrides: '{text}' is a search; give fixed values")
        key = override.key_or_group.lstrip("+~")
        if key in searched or key.startswith(PROMOTE_KEEPS):
            raise UserError(
                f"sweep.promote.overrides: '{text}' would change what the promoted trial "
                "continues (a searched value, its data, backbone or head's shape); allowed: "
                "train.*, optimizer.*, augment, head.dropout"
            )
    from tlsweep.config import load_config

    if load_config(spec.base).train.fine_tune.epochs:
        raise UserError(
            "sweep.promote continues head-only trials: set train.fine_tune.epochs=0 in base "
            "and the fine-tuning stage in sweep.promote.overrides"
        )
    load_config([*spec.base, *promote.overrides])  # bad overrides: a one-line error


# What a promoted trial keeps from the trial it continues: the features its head was trained
# on and the head's shape (its weights must load), besides the searched values.
PROMOTE_KEEPS = ("data", "backbone", "cache", "head.dense_units", "head.pooling", "seed")


def promoted_overrides(spec: SweepSpec) -> list[str]:
    """The overrides a promoted trial adds to its first-stage values."""
    promote = spec.settings.promote
    return list(promote.overrides) if promote is not None else []


def _check_keys(spec: SweepSpec) -> None:
    """Every searched key must exist in the composed base config (or be a config group)."""
    base = compose(spec.base)
    for dim in spec.space:
        if dim.key in CONFIG_GROUPS:
            from tlsweep.config import group_choices

            bad = [c for c in dim.choices if c not in group_choices(dim.key)]
            if bad:
                raise UserError(
                    f"search space {dim.key}: unknown choices {bad}; "
                    f"choose from {', '.join(group_choices(dim.key))}"
                )
        elif OmegaConf.select(base, dim.key, default="<missing>") == "<missing>":
            raise UserError(f"search space key {dim.key} is not in the config")


def _parse_override(text: str) -> Any:
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException

    try:
        return OverridesParser.create().parse_overrides([text])[0]
    except HydraException as exc:
        lines = [line for line in str(exc).splitlines() if line.strip()]
        useful = [line for line in lines if not line.startswith(("See https", "Error parsing"))]
        reason = (useful or lines or [type(exc).__name__])[0]
        raise UserError(f"malformed expression '{text}': {reason}") from None


def _choice(key: str, value: str, allowed: Sequence[str]) -> None:
    if value not in allowed:
        raise UserError(f"{key}={value} is not allowed: choose from {', '.join(allowed)}")


def _format(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(_tidy(value))
    if isinstance(value, list | tuple):
        return "[" + ",".join(_format(v) for v in value) + "]"
    text = str(value)
    if text and all(c.isalnum() or c in "_-./~:" for c in text):
        return text
    return "'" + text.replace("\\", "\\\\").replace("'", "\\'") + "'"


def _tidy(value: Any) -> Any:
    """Round away float noise from stepped ranges (0.30000000000000004 -> 0.3)."""
    if isinstance(value, float) and math.isfinite(value):
        return float(f"{value:.12g}")
    return value
