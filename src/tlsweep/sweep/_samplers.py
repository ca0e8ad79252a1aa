"""Samplers, pruners and sampling one dimension."""

from __future__ import annotations

from collections.abc import Callable

import optuna
from optuna.trial import TrialState

from tlsweep.errors import UserError
from tlsweep.sweep._common import FINISHED_STATES
from tlsweep.sweepspec import Dimension, Scalar, SweepSettings


def make_sampler(
    settings: SweepSettings, space: tuple[Dimension, ...]
) -> optuna.samplers.BaseSampler:
    """The sampler named by ``sweep.sampler``, seeded by ``sweep.seed``."""
    seed = settings.seed
    name = settings.sampler
    if name == "tpe":
        return optuna.samplers.TPESampler(seed=seed, n_startup_trials=min(5, settings.n_trials))
    if name == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    if name == "grid":
        return _ResumableGridSampler({d.key: d.grid_values() for d in space}, seed=seed)
    if name == "cmaes":
        return optuna.samplers.CmaEsSampler(seed=seed, warn_independent_sampling=False)
    if name == "qmc":
        return optuna.samplers.QMCSampler(seed=seed, warn_independent_sampling=False)
    if name == "gp":
        try:
            import torch  # noqa: F401  (GPSampler's requirement)
        except ImportError:
            raise UserError("sweep.sampler=gp needs PyTorch: pip install torch") from None
        return optuna.samplers.GPSampler(seed=seed)
    raise UserError(f"sweep.sampler={name} is not allowed")


class _ResumableGridSampler(optuna.samplers.GridSampler):
    """Optuna's grid sampler, except that a grid point whose trial FAILED (an error, Ctrl-C) is
    still to do: resuming the sweep runs it again instead of leaving a hole in the grid (and
    stopping the study one trial short of ``n_trials``)."""

    def _get_unvisited_grid_ids(self, study: optuna.Study) -> list[int]:
        done, running = set(), set()
        for t in study._storage.get_all_trials(study._study_id, deepcopy=False):
            attrs = t.system_attrs
            if "grid_id" not in attrs or not self._same_search_space(attrs["search_space"]):
                continue
            if t.state in FINISHED_STATES:
                done.add(attrs["grid_id"])
            elif t.state == TrialState.RUNNING:
                running.add(attrs["grid_id"])
        every = set(range(self._n_min_trials))
        return sorted(every - done - running) or sorted(every - done)


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
