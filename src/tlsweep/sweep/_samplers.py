"""Samplers, pruners and sampling one dimension."""

from __future__ import annotations

import inspect
from collections.abc import Callable

import optuna

from tlsweep.errors import UserError
from tlsweep.sweep._optuna_private import ResumableGridSampler
from tlsweep.sweepspec import Dimension, Scalar, SweepSettings

SamplerFactory = Callable[[int], optuna.samplers.BaseSampler]


def make_sampler(
    settings: SweepSettings, space: tuple[Dimension, ...], session: int = 0
) -> optuna.samplers.BaseSampler:
    """The sampler named by ``sweep.sampler``, seeded by ``sweep.seed`` (+ ``session``)."""
    return sampler_factory(settings, space)(session)


def sampler_factory(settings: SweepSettings, space: tuple[Dimension, ...]) -> SamplerFactory:
    """Check ``sweep.sampler`` and ``sweep.sampler_options`` now (bad ones raise `UserError`
    before anything is opened); the returned function builds the sampler of session k once the
    session number is known: seeded with ``seed + k``, so that a resumed sweep or a second
    worker does not redraw the first session's values. Not the grid: Optuna shuffles its grid
    with the seed, so grid ids keep their meaning only under one seed (and it picks among the
    unvisited points anyway)."""
    name = settings.sampler
    options = dict(settings.sampler_options)
    args: tuple = ()
    defaults: dict[str, object] = {}
    cls: Callable[..., optuna.samplers.BaseSampler]
    if name == "tpe":  # trials asked together (a group) must not be told the same values
        cls, defaults = optuna.samplers.TPESampler, {"n_startup_trials": min(5, settings.n_trials)}
        if settings.group_size > 1:
            defaults["constant_liar"] = True
    elif name == "random":
        cls = optuna.samplers.RandomSampler
    elif name == "grid":
        cls, args = ResumableGridSampler, ({d.key: d.grid_values() for d in space},)
    elif name == "cmaes":
        cls, defaults = optuna.samplers.CmaEsSampler, {"warn_independent_sampling": False}
    elif name == "qmc":
        cls, defaults = optuna.samplers.QMCSampler, {"warn_independent_sampling": False}
    elif name in ("nsga2", "nsga3"):
        cls = optuna.samplers.NSGAIISampler if name == "nsga2" else optuna.samplers.NSGAIIISampler
        defaults = {"population_size": nsga_population(settings.n_trials)}
    elif name == "gp":
        try:
            import torch  # noqa: F401  (GPSampler's requirement)
        except ImportError:
            raise UserError("sweep.sampler=gp needs PyTorch: pip install torch") from None
        cls = optuna.samplers.GPSampler
    else:
        raise UserError(f"sweep.sampler={name} is not allowed")
    if "seed" in options:
        raise UserError("sweep.sampler_options.seed is not allowed: set sweep.seed")
    kwargs = {**defaults, **options}
    try:
        inspect.signature(cls).bind(*args, seed=None, **kwargs)
    except TypeError as exc:
        raise UserError(f"sweep.sampler_options={options} do not fit {name}: {exc}") from None

    def build(session: int = 0) -> optuna.samplers.BaseSampler:
        offset = 0 if name == "grid" else session
        seed = None if settings.seed is None else settings.seed + offset
        try:
            return cls(*args, seed=seed, **kwargs)
        except (TypeError, ValueError) as exc:
            raise UserError(f"sweep.sampler_options={options} do not fit {name}: {exc}") from None

    return build


def nsga_population(n_trials: int) -> int:
    """NSGA-II/III generation size: Optuna's 50 would leave a short sweep all random; a
    quarter of the trials gives a few generations. At least 6: smaller generations breed
    near-copies of their few parents (identical trials, wasted)."""
    return min(50, max(6, n_trials // 4))


def make_pruner(settings: SweepSettings) -> optuna.pruners.BasePruner:
    """The pruner named by ``sweep.pruner``; ``sweep.pruner_options`` go to its constructor."""
    options = dict(settings.pruner_options)
    factories: dict[str, Callable[..., optuna.pruners.BasePruner]] = {
        "median": lambda **kw: optuna.pruners.MedianPruner(
            **{"n_startup_trials": 3, "n_warmup_steps": 1, **kw}
        ),
        "hyperband": lambda **kw: optuna.pruners.HyperbandPruner(**{"min_resource": 1, **kw}),
        "successive_halving": lambda **kw: optuna.pruners.SuccessiveHalvingPruner(
            **{"min_resource": 1, **kw}
        ),
        "none": lambda **kw: optuna.pruners.NopPruner(),
    }
    try:
        return factories[settings.pruner](**options)
    except TypeError as exc:
        raise UserError(
            f"sweep.pruner_options={options} do not fit {settings.pruner}: {exc}"
        ) from None


def suggest(trial: optuna.Trial, dim: Dimension) -> Scalar:
    """Sample one dimension."""
    if dim.kind == "categorical":
        return trial.suggest_categorical(dim.key, list(dim.choices))
    if dim.kind == "int":
        step = int(dim.step or 1)
        return trial.suggest_int(dim.key, int(dim.low), int(dim.high), step=step, log=dim.log)
    return trial.suggest_float(dim.key, dim.low, dim.high, step=dim.step, log=dim.log)


# --- running ---------------------------------------------------------------------------------
