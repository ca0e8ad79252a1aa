"""Benchmark: many heads trained in one step (`tlsweep.grouped`) against one fit per head.

The reference grid (2x2x2 over dense units {256, 512}, dropout {0.1, 0.3}, batch size {10, 30}),
adam, 3 epochs, no early stopping, on the same cached features: ResNet50 with random weights at
64x64 on the bundled digits, pooled features computed once before any timing (1,077 train /
270 val / 450 test rows of 2,048 features). Two ways, in one process, on the same features,
each classifier built on one shared trunk right after seeding, as a sweep trial builds it (so
both ways start from the same initial weights and dropout seeds):

  sequential  eight `train.train` calls, one per config: what eight cached trials fit, each
              with its own compiled head and optimizer
  grouped     two `grouped.train_group` calls, one per batch size (`group_key`), four heads
              each

Both return the same `TrainResult`s (best weights restored, validation and test evaluated):
what is timed is training and evaluation only, not building the models. The ways run in
interleaved rounds (``--rounds``, default 3) and are reported as medians of wall and CPU
seconds (the CPU time of this process moves less when other work shares the machine), with
the speed-ups; where the time goes (the first execution of each train step, which traces and
compiles it, against the rest); the largest difference between the two ways' per-config best
validation accuracy (0 on TensorFlow: same weights, same dropout seeds, same batches; on JAX a
group pads the short last batch of an epoch, where dropout then draws other masks: 0 with
``--dropout 0``); and the cost of one warm grouped step with adam and with plain SGD (the
optimizer's share of the per-weight work). The machine and the versions come first.

    python -m bench.grouped                                  # the issue's setting
    python -m bench.grouped --dropout 0 --rounds 1           # quicker; results agree on JAX too
    KERAS_BACKEND=jax python -m bench.grouped
"""

from __future__ import annotations

import argparse
import contextlib
import os
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from statistics import median

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras
import numpy as np

from bench.run import GRID, machine_report
from tlsweep.config import OptimizerConfig

FEATURE_BATCH = 64


@dataclass
class Timed:
    """One way's run: wall and CPU seconds, seconds in first executions, best values."""

    wall: float
    cpu: float
    first: float
    best: list[float]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backbone", default="resnet50")
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument(
        "--dropout",
        type=float,
        nargs="+",
        help="other dropout values for the grid (0: both ways must give the same results)",
    )
    args = parser.parse_args()

    print(machine_report())
    grid = {**GRID, "head.dropout": args.dropout or GRID["head.dropout"]}
    setup = Setup(args.backbone, args.size, args.epochs, grid)
    print(
        f"grid: {grid}; adam, {args.epochs} epochs, no early stopping; {args.backbone} "
        f"(random weights) at {args.size}x{args.size}, avg pooling, digits; cached features "
        f"{setup.features.train.shape[1]}-d: {len(setup.features.train)} train / "
        f"{len(setup.features.val)} val / {len(setup.features.test)} test "
        f"(feature pass {setup.pass_seconds:.1f} s, not timed below)\n"
    )
    runs: dict[str, list[Timed]] = {"sequential": [], "grouped": []}
    for number in range(1, args.rounds + 1):  # interleaved: drifts hit both ways alike
        runs["sequential"].append(setup.timed(setup.sequential))
        runs["grouped"].append(setup.timed(setup.grouped))
        seq, grp = runs["sequential"][-1], runs["grouped"][-1]
        print(
            f"round {number}: sequential {seq.wall:6.1f} s (cpu {seq.cpu:6.1f} s)   "
            f"grouped {grp.wall:6.1f} s (cpu {grp.cpu:6.1f} s)   {seq.wall / grp.wall:.2f}x",
            flush=True,
        )
    report(runs, args.rounds, setup.steps, len(setup.cfgs))
    print(setup.step_costs())


def report(runs: dict[str, list[Timed]], rounds: int, steps: int, heads: int) -> None:
    """Medians, speed-ups, where the time goes, and how far the two ways' results are."""
    med = {
        way: {f: median(getattr(r, f) for r in done) for f in ("wall", "cpu", "first")}
        for way, done in runs.items()
    }
    seq, grp = med["sequential"], med["grouped"]
    print(f"\nmedians of {rounds} rounds:")
    for way, m in (("sequential, one fit per head", seq), ("grouped, a group per batch", grp)):
        print(f"{way} ({heads} heads): {m['wall']:6.1f} s wall  {m['cpu']:6.1f} s cpu")
    print(
        f"speed-up sequential/grouped = {seq['wall'] / grp['wall']:.2f}x wall, "
        f"{seq['cpu'] / grp['cpu']:.2f}x cpu   (target >= 3)"
    )
    for way, m in med.items():
        print(
            f"{way}: first executions of the train steps (tracing, compiling, their first "
            f"{steps} steps) {m['first']:5.1f} s; the rest (steps, validation, evaluation) "
            f"{m['wall'] - m['first']:5.1f} s"
        )
    a, b = runs["sequential"][0].best, runs["grouped"][0].best
    gap = max(abs(x - y) for x, y in zip(a, b, strict=True))
    print(
        f"best val_accuracy per config, largest difference between the ways: {gap:.4f}; "
        f"mean over the grid: sequential {np.mean(a):.4f}, grouped {np.mean(b):.4f}"
    )


class Setup:
    """The configs of the grid, the data, one shared trunk and the cached features."""

    def __init__(self, backbone: str, size: int, epochs: int, grid: dict[str, list]) -> None:
        from tlsweep.backbones import build_backbone
        from tlsweep.backend import configure_devices, seed_everything
        from tlsweep.config import load_config
        from tlsweep.data import load_data
        from tlsweep.features import Features, compute_features
        from tlsweep.model import build_classifier, build_trunk, feature_extractor
        from tlsweep.train import HEAD_STEPS_PER_EXECUTION

        base = [
            "data=digits",
            f"backbone={backbone}",
            "backbone.weights=null",
            f"backbone.input_size={size}",
            f"train.epochs={epochs}",
            "train.early_stopping.patience=null",
        ]
        self.cfgs = [
            load_config(
                [*base, f"head.dense_units={u}", f"head.dropout={d}", f"train.batch_size={b}"]
            )
            for u in grid["head.dense_units"]
            for d in grid["head.dropout"]
            for b in grid["train.batch_size"]
        ]
        cfg = self.cfgs[0]
        seed_everything(cfg.seed, cfg.train.deterministic)
        configure_devices(cfg.train.mixed_precision)
        self.data = load_data(cfg.data, cfg.backbone.input_size)
        start = time.perf_counter()
        self.trunk = build_trunk(cfg.backbone, cfg.head.pooling, build_backbone(cfg.backbone))
        model = build_classifier(cfg.backbone, cfg.head, self.data.num_classes, trunk=self.trunk)
        extractor = feature_extractor(model)
        self.features = Features(
            *(
                compute_features(extractor, getattr(self.data, split), FEATURE_BATCH)
                for split in ("train", "val", "test")
            ),
            status="miss",
        )
        self.pass_seconds = time.perf_counter() - start
        self.steps = HEAD_STEPS_PER_EXECUTION
        self.grid = grid

    def models(self) -> list[keras.Model]:
        """A fresh classifier per config, seeded as `experiment.prepare` seeds a trial's."""
        from tlsweep.backend import seed_everything
        from tlsweep.model import build_classifier

        built = []
        for cfg in self.cfgs:
            seed_everything(cfg.seed, cfg.train.deterministic)
            built.append(
                build_classifier(cfg.backbone, cfg.head, self.data.num_classes, trunk=self.trunk)
            )
        return built

    def timed(self, way: Callable[[list[keras.Model]], list[float]]) -> Timed:
        """Run one way on fresh models (built before the clock starts)."""
        models = self.models()
        with first_executions() as first:
            wall, cpu = time.perf_counter(), time.process_time()
            best = way(models)
            wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
        return Timed(wall, cpu, sum(first), best)

    def sequential(self, models: list[keras.Model]) -> list[float]:
        """Eight `train.train` calls; each config's best value."""
        from tlsweep.train import train

        return [
            train(cfg, self.data, model, features=self.features).best_value
            for cfg, model in zip(self.cfgs, models, strict=True)
        ]

    def grouped(self, models: list[keras.Model]) -> list[float]:
        """One `train_group` call per group (`group_key`); each config's best value."""
        from tlsweep.grouped import group_key, train_group

        groups: dict[tuple, list[int]] = defaultdict(list)
        for index, cfg in enumerate(self.cfgs):
            groups[group_key(cfg)].append(index)
        best: dict[int, float] = {}
        for members in groups.values():
            cfgs = [self.cfgs[i] for i in members]
            outcomes = train_group(cfgs, self.data, [models[i] for i in members], self.features)
            for index, outcome in zip(members, outcomes, strict=True):
                if isinstance(outcome, Exception):
                    raise outcome
                best[index] = outcome.best_value
        return [best[i] for i in range(len(self.cfgs))]

    def step_costs(self, repeats: int = 2) -> str:
        """What one warm step of a group (the smallest batch size's) costs, with the
        grid's optimizer (adam) and with plain SGD (one pass over the weights): the
        optimizer's per-weight work, which grouping cannot share, against the rest."""
        from tlsweep.grouped import GroupedHeads, grouped_optimizer
        from tlsweep.model import head_of

        batch = min(self.grid["train.batch_size"])
        members = [i for i, cfg in enumerate(self.cfgs) if cfg.train.batch_size == batch]
        models = self.models()
        heads = [head_of(models[i]) for i in members]
        x, y = self.features.train, self.data.train.labels
        costs = {}
        for name in ("adam", "sgd"):
            grouped = GroupedHeads(heads)
            cfg = replace(self.cfgs[members[0]], optimizer=OptimizerConfig(name))
            grouped.compile(
                optimizer=grouped_optimizer(cfg, grouped, [1e-3] * len(heads)),
                steps_per_execution=self.steps,
            )
            grouped.fit(x, y, batch_size=batch, epochs=1, verbose=0, shuffle=False)  # warm
            steps = repeats * -(-len(x) // batch)
            start = time.perf_counter()
            grouped.fit(x, y, batch_size=batch, epochs=repeats, verbose=0, shuffle=False)
            costs[name] = (time.perf_counter() - start) / steps * 1000
        params = sum(int(np.prod(v.shape)) for v in grouped.trainable_variables)
        return (
            f"one warm grouped step ({len(heads)} heads, {params:,} weights, batch {batch}): "
            f"adam {costs['adam']:.1f} ms, plain sgd {costs['sgd']:.1f} ms"
        )


@contextlib.contextmanager
def first_executions() -> Iterator[list[float]]:
    """Seconds of the first call of each model's train function (tracing, compiling and
    running its first ``steps_per_execution`` steps), timed from Keras' own hook."""
    timings: list[float] = []
    original = keras.Model.make_train_function  # the backend trainer's

    def timed_make(self: keras.Model, force: bool = False) -> object:
        result = original(self, force)
        function = self.train_function
        if function is not None and not getattr(function, "_bench_timed", False):
            calls = {"n": 0}

            def first_timed(*args: object, **kwargs: object) -> object:
                if calls["n"]:
                    return function(*args, **kwargs)
                calls["n"] += 1
                start = time.perf_counter()
                out = function(*args, **kwargs)
                np.asarray(keras.tree.flatten(out)[0])  # wait for it (JAX runs ahead)
                timings.append(time.perf_counter() - start)
                return out

            first_timed._bench_timed = True  # type: ignore[attr-defined]
            self.train_function = first_timed
        return result

    keras.Model.make_train_function = timed_make  # type: ignore[method-assign]
    try:
        yield timings
    finally:
        del keras.Model.make_train_function  # inherited again


if __name__ == "__main__":
    main()
