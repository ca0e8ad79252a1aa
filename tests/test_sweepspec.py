"""Sweep files: expressions -> dimensions, settings, command-line refinements, refusals."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from tlsweep.config import load_config
from tlsweep.errors import UserError
from tlsweep.sweepspec import (
    Dimension,
    SweepSettings,
    artifacts_dir,
    available_sweeps,
    describe_dimension,
    dimension_size,
    grid_size,
    load_sweep,
    parse_dimension,
    sweeps_dir,
    to_override,
)

SHIPPED = ("quickstart", "head_grid", "backbones", "finetune", "pareto", "promote")


def sweep_file(folder: Path, document: dict, name: str = "spec") -> Path:
    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump(document, sort_keys=False))
    return path


@pytest.fixture
def spec_file(tmp_path: Path):
    """A small valid sweep file (digits, random weights) plus optional changes."""

    def make(space: dict | None = None, settings: dict | None = None, base: dict | None = None):
        document = {
            "base": {"data": "digits", "backbone.weights": None, **(base or {})},
            "search_space": {"head.dropout": "choice(0.1, 0.3)"} if space is None else space,
            "sweep": dict(settings or {}),
        }
        return sweep_file(tmp_path, document)

    return make


def assert_one_line(exc: pytest.ExceptionInfo[UserError], *fragments: str) -> str:
    message = str(exc.value)
    assert message and "\n" not in message
    for fragment in fragments:
        assert fragment in message, message
    return message


# --- expressions -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("key", "expression", "expected"),
    [
        (
            "head.dense_units",
            "choice(64, 128, 256)",
            Dimension("head.dense_units", "categorical", choices=(64, 128, 256)),
        ),
        (
            "backbone",
            "choice(resnet50, vgg16)",
            Dimension("backbone", "categorical", choices=("resnet50", "vgg16")),
        ),
        (
            "head.dropout",
            "choice(0.1, 0.3)",
            Dimension("head.dropout", "categorical", choices=(0.1, 0.3)),
        ),
        (
            "train.batch_size",
            "range(8, 40, step=8)",
            Dimension("train.batch_size", "int", low=8, high=32, step=8),
        ),
        ("train.epochs", "range(1, 5)", Dimension("train.epochs", "int", low=1, high=4, step=1)),
        (
            "head.dropout",
            "range(0.1, 0.5, step=0.1)",
            Dimension("head.dropout", "float", low=0.1, high=0.4, step=0.1),
        ),
        (
            "head.dropout",
            "interval(0.0, 0.5)",
            Dimension("head.dropout", "float", low=0.0, high=0.5),
        ),
        (
            "train.fine_tune.unfreeze_layers",
            "int(interval(10, 120))",
            Dimension("train.fine_tune.unfreeze_layers", "int", low=10, high=120),
        ),
        (
            "optimizer.learning_rate",
            "tag(log, interval(1e-4, 1e-2))",
            Dimension("optimizer.learning_rate", "float", low=1e-4, high=1e-2, log=True),
        ),
        (
            "head.dense_units",
            "tag(log, int(interval(8, 512)))",
            Dimension("head.dense_units", "int", low=8, high=512, log=True),
        ),
    ],
)
def test_expressions_map_to_dimensions(key: str, expression: str, expected: Dimension) -> None:
    dim = parse_dimension(key, expression)
    assert dim == expected
    assert type(dim.low) is type(expected.low)  # int ranges stay int, intervals float


def test_interval_is_float_even_with_integer_bounds() -> None:
    dim = parse_dimension("head.dropout", "interval(0, 1)")
    assert dim.kind == "float"
    assert (dim.low, dim.high) == (0.0, 1.0)


def test_float_range_noise_is_tidied() -> None:
    dim = parse_dimension("head.dropout", "range(0.0, 1.0, step=0.1)")
    assert dim.kind == "float"
    assert dim.high == 0.9  # not 0.8999999999999999
    values = dim.grid_values()
    assert values == [0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9]
    assert 0.30000000000000004 not in values


def test_grid_values() -> None:
    assert parse_dimension("backbone", "choice(resnet50, vgg16)").grid_values() == [
        "resnet50",
        "vgg16",
    ]
    ints = parse_dimension("train.batch_size", "range(8, 40, step=8)").grid_values()
    assert ints == [8, 16, 24, 32]
    assert all(type(v) is int for v in ints)
    for expression in ("interval(0.0, 0.5)", "int(interval(1, 9))", "tag(log, interval(1, 2))"):
        with pytest.raises(UserError) as exc:
            parse_dimension("head.dropout", expression).grid_values()
        assert_one_line(exc, "grid sampler", "interval")


@pytest.mark.parametrize(
    "expression",
    ["choice(0.1", "interval(0.1)", "choice(]", "range(1,", "interval(0.1, 0.2"],
)
def test_malformed_expression(expression: str) -> None:
    with pytest.raises(UserError) as exc:
        parse_dimension("head.dropout", expression)
    assert_one_line(exc, "malformed expression", expression)


@pytest.mark.parametrize(
    ("expression", "fragment"),
    [
        ("0.5", "fixed value"),
        ("interval(0.5, 0.1)", "start < end"),
        ("interval(0.3, 0.3)", "start < end"),
        ("tag(log, interval(0.0, 1.0))", "start > 0"),
    ],
)
def test_bad_dimensions(expression: str, fragment: str) -> None:
    with pytest.raises(UserError) as exc:
        parse_dimension("head.dropout", expression)
    assert_one_line(exc, "head.dropout", fragment)


# --- sweep files ---------------------------------------------------------------------------


def test_load_by_path(spec_file) -> None:
    spec = load_sweep(str(spec_file()))
    assert spec.name == "spec"
    assert spec.settings.study_name == "spec"  # defaults to the file's name
    assert spec.base == ("data=digits", "backbone.weights=null")
    assert spec.space == (Dimension("head.dropout", "categorical", choices=(0.1, 0.3)),)
    assert spec.settings.resolved_direction == "maximize"


def test_yaml_list_is_a_choice(spec_file) -> None:
    spec = load_sweep(str(spec_file(space={"head.dense_units": [16, 32]})))
    assert spec.space == (Dimension("head.dense_units", "categorical", choices=(16, 32)),)


def test_plus_key_in_base_composes(spec_file) -> None:
    base = {"backbone": "mobilenet_v2", "+backbone.options.alpha": 0.35}
    spec = load_sweep(str(spec_file(base=base)))
    assert "+backbone.options.alpha=0.35" in spec.base
    cfg = load_config(spec.trial_overrides({"head.dropout": 0.3}))
    assert cfg.backbone.options == {"alpha": 0.35}
    assert cfg.backbone.architecture == "MobileNetV2"
    assert cfg.head.dropout == 0.3


def test_trial_overrides_are_base_then_params() -> None:
    spec = load_sweep("quickstart")
    overrides = spec.trial_overrides({"head.dropout": 0.30000000000000004, "optimizer": "adamw"})
    assert overrides[: len(spec.base)] == list(spec.base)
    assert overrides[len(spec.base) :] == ["head.dropout=0.3", "optimizer=adamw"]
    cfg = load_config(overrides)
    assert (cfg.head.dropout, cfg.optimizer.name) == (0.3, "adamw")


@pytest.mark.parametrize(
    ("value", "text"),
    [
        (None, "k=null"),
        (True, "k=true"),
        (3, "k=3"),
        (0.1 + 0.2, "k=0.3"),
        ("resnet50", "k=resnet50"),
        ("/data/my photos", "k='/data/my photos'"),
        ([1, 2], "k=[1,2]"),
    ],
)
def test_to_override(value, text: str) -> None:
    assert to_override("k", value) == text


def test_direction_defaults_follow_the_metric() -> None:
    assert SweepSettings(metric="val_accuracy").resolved_direction == "maximize"
    assert SweepSettings(metric="val_loss").resolved_direction == "minimize"
    assert SweepSettings(metric="val_loss", direction="maximize").resolved_direction == "maximize"


# --- command-line refinements ----------------------------------------------------------------


def test_cli_settings(spec_file) -> None:
    url = "postgresql://user:s3cret@db.example.com:5432/optuna"
    spec = load_sweep(
        str(spec_file()),
        [
            "sweep.n_trials=40",
            f"sweep.storage={url}",
            "sweep.sampler=random",
            "sweep.pruner_options={n_startup_trials: 1}",
            "sweep.timeout=null",
            "sweep.metric=val_loss",
        ],
    )
    s = spec.settings
    assert s.n_trials == 40 and isinstance(s.n_trials, int)
    assert s.storage == url  # ':' and '@' survive, unescaped
    assert s.sampler == "random"
    assert s.pruner_options == {"n_startup_trials": 1}
    assert s.timeout is None
    assert s.resolved_direction == "minimize"


def test_cli_dimension_added_and_replaced(spec_file) -> None:
    spec = load_sweep(
        str(spec_file()),
        [
            "head.dropout=interval(0.0, 0.5)",
            "backbone=choice(resnet50, vgg16)",
            "optimizer.learning_rate=tag(log, interval(1e-5, 1e-3))",
        ],
    )
    dims = {d.key: d for d in spec.space}
    assert list(dims) == ["head.dropout", "backbone", "optimizer.learning_rate"]
    assert dims["head.dropout"] == Dimension("head.dropout", "float", low=0.0, high=0.5)
    assert dims["backbone"].choices == ("resnet50", "vgg16")
    assert dims["optimizer.learning_rate"].log


def test_cli_plain_value_fixes_a_searched_key(spec_file) -> None:
    spec = load_sweep(
        str(spec_file(space={"head.dropout": "choice(0.1, 0.3)", "head.dense_units": [8, 16]})),
        ["head.dropout=0.2", "train.epochs=3"],
    )
    assert [d.key for d in spec.space] == ["head.dense_units"]
    assert spec.base[-2:] == ("head.dropout=0.2", "train.epochs=3")
    cfg = load_config(spec.trial_overrides({"head.dense_units": 8}))
    assert (cfg.head.dropout, cfg.train.epochs, cfg.head.dense_units) == (0.2, 3, 8)


# --- several objectives --------------------------------------------------------------------


def test_objectives_mapping(spec_file) -> None:
    objectives = {"val_accuracy": "maximize", "latency_ms": "minimize", "params": None}
    s = load_sweep(str(spec_file(settings={"objectives": objectives, "sampler": "nsga2"}))).settings
    assert s.objective_pairs == (
        ("val_accuracy", "maximize"),
        ("latency_ms", "minimize"),
        ("params", "minimize"),  # null: the default direction (costs are minimized)
    )
    assert s.objective_names == ["val_accuracy", "latency_ms", "params"]
    assert s.multi_objective
    assert (s.metric, s.resolved_direction) == ("val_accuracy", "maximize")  # what trains
    assert s.pruner == "none"  # implied by several objectives


def test_objectives_list_and_order(spec_file) -> None:
    s = load_sweep(
        str(spec_file(settings={"objectives": ["params", "val_loss"], "sampler": "tpe"}))
    ).settings
    assert s.objective_pairs == (("params", "minimize"), ("val_loss", "minimize"))
    assert (s.metric, s.resolved_direction) == ("val_loss", "minimize")


def test_objectives_from_the_command_line(spec_file) -> None:
    spec = load_sweep(
        str(spec_file()),
        ["sweep.objectives={val_accuracy: maximize, latency_ms: minimize}", "sweep.sampler=nsga3"],
    )
    assert spec.settings.objective_names == ["val_accuracy", "latency_ms"]
    assert (spec.settings.sampler, spec.settings.pruner) == ("nsga3", "none")


def test_single_metric_form_is_one_objective(spec_file) -> None:
    s = load_sweep(str(spec_file(settings={"metric": "val_loss"}))).settings
    assert s.objectives is None
    assert s.objective_pairs == (("val_loss", "minimize"),)
    assert not s.multi_objective and s.pruner == "median"
    one = load_sweep(str(spec_file(settings={"objectives": {"accuracy": None}}))).settings
    assert one.objective_pairs == (("accuracy", "maximize"),) and not one.multi_objective
    assert one.pruner == "median"  # one objective can still be pruned


@pytest.mark.parametrize(
    ("settings", "fragments"),
    [
        (
            {"objectives": {"val_accuracy": None, "latency_ms": None}, "pruner": "median"},
            ("sweep.pruner=median", "several objectives", "sweep.pruner=none"),
        ),
        (
            {"objectives": {"val_accuracy": None, "params": None}, "sampler": "cmaes"},
            ("sweep.sampler=cmaes", "nsga2"),
        ),
        (
            {"objectives": {"val_accuracy": None, "params": None}, "metric": "val_loss"},
            ("sweep.objectives replaces sweep.metric",),
        ),
        (
            {"objectives": ["val_accuracy"], "direction": "maximize"},
            ("sweep.objectives replaces sweep.direction",),
        ),
        ({"objectives": {"f1": "maximize"}}, ("sweep.objectives: f1", "latency_ms", "params")),
        (
            {"objectives": {"val_accuracy": "up", "params": None}},
            ("sweep.objectives.val_accuracy=up", "maximize"),
        ),
        ({"objectives": ["latency_ms", "params"]}, ("exactly one training metric", "got 0")),
        (
            {"objectives": ["val_accuracy", "val_loss", "params"]},
            ("exactly one training metric", "val_accuracy, val_loss"),
        ),
        ({"objectives": {}}, ("sweep.objectives is empty",)),
        ({"objectives": 3}, ("sweep.objectives=3", "mapping")),
        ({"latency_repeats": 0}, ("sweep.latency_repeats=0", "repeats >= 1")),
        ({"latency_warmup": -1}, ("sweep.latency_warmup=-1",)),
    ],
)
def test_bad_objectives_are_refused(spec_file, settings: dict, fragments: tuple[str]) -> None:
    with pytest.raises(UserError) as exc:
        load_sweep(str(spec_file(settings=settings)))
    assert_one_line(exc, *fragments)


# --- refusals ------------------------------------------------------------------------------


def test_unknown_sweep_lists_the_available_ones() -> None:
    with pytest.raises(UserError) as exc:
        load_sweep("no_such_sweep")
    assert_one_line(exc, "no_such_sweep", *SHIPPED)


@pytest.mark.parametrize(
    ("overrides", "fragments"),
    [
        (["sweep.sampler=annealing"], ("sweep.sampler=annealing", "tpe", "grid")),
        (["sweep.pruner=always"], ("sweep.pruner=always", "median", "hyperband")),
        (["sweep.metric=f1"], ("sweep.metric=f1", "val_accuracy", "val_loss")),
        (["sweep.n_trials=0"], ("sweep.n_trials=0", ">= 1")),
        (["sweep.n_trials=-3"], ("sweep.n_trials=-3", ">= 1")),
        (["sweep.n_trials=many"], ("sweep.n_trials", "many")),
        (["sweep.direction=up"], ("sweep.direction=up", "maximize")),
        (["sweep.timeout=0"], ("sweep.timeout",)),
        (["head.nonexistent=choice(1, 2)"], ("head.nonexistent", "not in the config")),
        (["backbone=choice(resnet50, nonet)"], ("nonet", "resnet50")),
        (["sweep.sampler=grid", "head.dropout=interval(0.1, 0.5)"], ("grid", "interval")),
        (["head.dropout=choice(0.1"], ("malformed expression", "head.dropout=choice(0.1")),
        (["head.dropout=0.2"], ("search space is empty",)),
    ],
)
def test_bad_sweeps_are_refused(spec_file, overrides: list[str], fragments: tuple[str]) -> None:
    with pytest.raises(UserError) as exc:
        load_sweep(str(spec_file()), overrides)
    assert_one_line(exc, *fragments)


def test_empty_search_space_in_file(spec_file) -> None:
    with pytest.raises(UserError) as exc:
        load_sweep(str(spec_file(space={})))
    assert_one_line(exc, "search space is empty")


def test_unknown_section_and_bad_yaml(tmp_path: Path) -> None:
    bad = sweep_file(tmp_path, {"search_space": {"head.dropout": "[0.1]"}, "extra": 1}, "bad")
    with pytest.raises(UserError) as exc:
        load_sweep(str(bad))
    assert_one_line(exc, "extra")
    broken = tmp_path / "broken.yaml"
    broken.write_text("search_space: [unclosed\n")
    with pytest.raises(UserError) as exc:
        load_sweep(str(broken))
    assert_one_line(exc, "not valid YAML")


@pytest.mark.parametrize(
    ("content", "fragments"),
    [
        (b"- base\n- search_space\n", ["a sweep file is a mapping", "not a list"]),
        (b"just a sentence\n", ["a sweep file is a mapping", "not a string"]),
        (b"42\n", ["not a number"]),
        (b"base:\n  - backbone=vgg16\nsearch_space: {head.dropout: [0.1]}\n", ["base is a list"]),
        (b"search_space: choice(1, 2)\n", ["search_space is a string"]),
        (b"sweep: [n_trials, 3]\n", ["sweep is a list"]),
        (b"search_space: {head.dropout: [0.1]}\n# caf\xe9\n", ["not UTF-8", "0xe9"]),
    ],
    ids=["list", "scalar", "number", "list-base", "scalar-space", "list-sweep", "latin-1"],
)
def test_malformed_sweep_files_are_one_line_errors(
    tmp_path: Path, content: bytes, fragments: list[str]
) -> None:
    path = tmp_path / "malformed.yaml"
    path.write_bytes(content)
    with pytest.raises(UserError) as exc:
        load_sweep(str(path))
    for fragment in fragments:
        assert_one_line(exc, fragment)
    assert str(path) in str(exc.value)


# --- the shipped sweeps --------------------------------------------------------------------


def test_shipped_sweeps_are_listed() -> None:
    assert set(SHIPPED) <= set(available_sweeps())
    assert all((sweeps_dir() / f"{name}.yaml").is_file() for name in SHIPPED)


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_sweep_loads(name: str) -> None:
    spec = load_sweep(name)
    assert spec.name == name and spec.settings.study_name == name
    assert spec.space
    load_config(spec.base)  # the base composes and validates on its own


def test_head_grid_is_the_reference_grid() -> None:
    spec = load_sweep("head_grid")
    grid = {d.key: sorted(d.grid_values()) for d in spec.space}
    assert grid == {
        "head.dense_units": [256, 512],
        "head.dropout": [0.1, 0.3],
        "train.batch_size": [10, 30],
    }
    assert spec.settings.sampler == "grid"
    assert spec.settings.n_trials == 8 == 2 * 2 * 2
    assert spec.settings.group_size == 8
    cfg = load_config(spec.base)
    assert cfg.backbone.name == "resnet50"
    assert cfg.backbone.weights == "imagenet"
    assert cfg.head.pooling == "flatten"
    assert (cfg.data.source, cfg.data.name) == ("keras", "cifar10")
    assert (cfg.data.train_limit, cfg.data.test_limit) == (2000, 2000)
    assert cfg.train.epochs == 5
    assert cfg.optimizer.name == "adam"


def test_quickstart_is_offline_and_pruned() -> None:
    spec = load_sweep("quickstart")
    cfg = load_config(spec.base)
    assert cfg.data.source == "digits"
    assert cfg.backbone.weights is None
    assert spec.settings.n_trials >= 8
    assert spec.settings.pruner != "none"


def test_promote_is_offline_grouped_and_fine_tunes_its_best() -> None:
    spec = load_sweep("promote")
    s = spec.settings
    cfg = load_config(spec.base)
    assert (cfg.data.source, cfg.backbone.weights) == ("digits", None)
    assert cfg.train.fine_tune.epochs == 0
    assert s.group_size > 1 and s.promote is not None
    promoted = load_config([*spec.base, *s.promote.overrides])
    assert promoted.train.fine_tune.epochs > 0
    assert 1 <= s.promote.top_k < s.n_trials


def test_pareto_is_offline_and_multi_objective() -> None:
    spec = load_sweep("pareto")
    s = spec.settings
    cfg = load_config(spec.base)
    assert (cfg.data.source, cfg.backbone.weights, cfg.backbone.input_size) == ("digits", None, 32)
    assert s.objective_pairs == (("val_accuracy", "maximize"), ("latency_ms", "minimize"))
    assert (s.sampler, s.pruner) == ("nsga2", "none")
    backbones = next(d for d in spec.space if d.key == "backbone").choices
    assert len(backbones) >= 2 and not any(
        b.startswith(("mobilenet", "efficientnet")) for b in backbones
    )
    assert 8 <= s.n_trials <= 16


def test_sweeps_dir_from_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    folder = tmp_path / "mine"
    folder.mkdir()
    sweep_file(folder, {"search_space": {"head.dropout": "choice(0.1, 0.2)"}}, "custom")
    monkeypatch.setenv("TLSWEEP_SWEEPS_DIR", str(folder))
    assert available_sweeps() == ["custom"]
    assert load_sweep("custom").settings.study_name == "custom"


def test_objectives_on_the_command_line_replace_the_files_metric_and_pruner() -> None:
    """The README's command: a shipped one-metric sweep turned into a Pareto sweep."""
    spec = load_sweep(
        "quickstart",
        [
            "sweep.objectives={val_accuracy: maximize, params: minimize}",
            "sweep.sampler=nsga2",
            "sweep.study_name=quick_pareto",
        ],
    )
    s = spec.settings
    assert s.multi_objective and s.objective_names == ["val_accuracy", "params"]
    assert (s.metric, s.pruner, s.sampler) == ("val_accuracy", "none", "nsga2")
    with pytest.raises(UserError, match=r"sweep\.pruner"):
        load_sweep(
            "quickstart",
            ["sweep.objectives=[val_accuracy, params]", "sweep.pruner=median"],
        )


# --- enqueued configurations -------------------------------------------------------------------

ENQUEUE_SPACE = {
    "head.dense_units": "choice(64, 128, 256)",
    "head.dropout": "interval(0.0, 0.5)",
    "train.batch_size": "range(16, 65, step=16)",
    "train.epochs": "int(interval(1, 5))",
    "optimizer": "choice(adam, sgd)",
}


@pytest.fixture
def enqueue_file(tmp_path: Path):
    """A sweep file with ``ENQUEUE_SPACE`` and the given ``enqueue`` section."""

    def make(entries: object, settings: dict | None = None) -> Path:
        document = {
            "base": {"data": "digits", "backbone.weights": None},
            "search_space": ENQUEUE_SPACE,
            "enqueue": entries,
            "sweep": dict(settings or {}),
        }
        return sweep_file(tmp_path, document, "enqueuing")

    return make


def test_enqueued_configurations_keep_their_order_and_get_their_dimensions_types(
    enqueue_file,
) -> None:
    path = enqueue_file(
        [
            {"head.dense_units": 256, "head.dropout": 0, "train.batch_size": 32},
            {"optimizer": "sgd", "train.epochs": 3.0, "head.dropout": 0.25},
        ]
    )
    first, second = load_sweep(str(path)).enqueue
    assert first == {"head.dense_units": 256, "head.dropout": 0.0, "train.batch_size": 32}
    assert isinstance(first["head.dropout"], float)  # 0 in a float interval is 0.0
    assert second == {"optimizer": "sgd", "train.epochs": 3, "head.dropout": 0.25}
    assert isinstance(second["train.epochs"], int)


def test_no_enqueue_section_enqueues_nothing(spec_file) -> None:
    assert load_sweep(str(spec_file())).enqueue == ()


def test_a_key_fixed_on_the_command_line_leaves_the_enqueued_entries(enqueue_file) -> None:
    """``KEY=VALUE`` fixes KEY for every trial: that value wins over an enqueued one, and an
    entry left with nothing to set is dropped."""
    path = enqueue_file([{"head.dropout": 0.2, "head.dense_units": 64}, {"head.dropout": 0.4}])
    spec = load_sweep(str(path), ["head.dropout=0.1"])
    assert spec.enqueue == ({"head.dense_units": 64},)
    assert "head.dropout=0.1" in spec.base


@pytest.mark.parametrize(
    ("entries", "settings", "fragments"),
    [
        (
            [{"head.units": 64}],
            {},
            ["enqueue entry 1", "head.units is not a search-space dimension", "head.dense_units"],
        ),
        (
            [{"head.dropout": 0.1}, {"head.dropout": 0.7}],
            {},
            ["enqueue entry 2", "head.dropout=0.7", "float in [0.0, 0.5]"],
        ),
        (
            [{"head.dense_units": 100}],
            {},
            ["head.dense_units=100", "choice(64, 128, 256)"],
        ),
        ([{"head.dense_units": "64"}], {}, ["head.dense_units='64'", "choice(64, 128, 256)"]),
        ([{"train.batch_size": 40}], {}, ["train.batch_size=40", "int in [16, 64] step 16"]),
        ([{"train.epochs": 2.5}], {}, ["train.epochs=2.5", "int in [1, 5]"]),
        ([{"train.epochs": True}], {}, ["train.epochs=true", "int in [1, 5]"]),
        ([{"optimizer": "adagrad"}], {}, ["optimizer=adagrad", "choice(adam, sgd)"]),
        ([{"head.dropout": "high"}], {}, ["head.dropout=high", "float in [0.0, 0.5]"]),
        (
            [{"head.dropout": 0.1}, {"head.dropout": 0.2}],
            {"n_trials": 1},
            ["sweep.n_trials=1 is fewer than the 2 enqueued"],
        ),
    ],
    ids=[
        "unknown-key",
        "out-of-range",
        "not-a-choice",
        "string-for-number",
        "off-step",
        "fraction-for-int",
        "bool-for-int",
        "unknown-group-choice",
        "text-for-float",
        "more-than-n_trials",
    ],
)
def test_bad_enqueued_configurations_are_one_line_errors(
    enqueue_file, entries: list, settings: dict, fragments: list[str]
) -> None:
    with pytest.raises(UserError) as exc:
        load_sweep(str(enqueue_file(entries, settings)))
    assert_one_line(exc, *fragments)


@pytest.mark.parametrize(
    ("section", "fragment"),
    [
        ({"head.dropout": 0.1}, "section enqueue is a dict"),
        ("head.dropout=0.1", "section enqueue is a string"),
        ([{"head.dropout": 0.1}, "head.dropout=0.2"], "section enqueue is a list of other things"),
    ],
    ids=["mapping", "string", "list-of-strings"],
)
def test_an_enqueue_section_that_is_not_a_list_of_mappings_is_refused(
    enqueue_file, section: object, fragment: str
) -> None:
    path = enqueue_file(section)
    with pytest.raises(UserError) as exc:
        load_sweep(str(path))
    assert_one_line(exc, str(path), fragment, "list of configurations")


def test_a_grid_sweep_enqueues_whole_configurations(tmp_path: Path) -> None:
    whole = {
        "head.dense_units": 128,
        "head.dropout": 0.0,
        "train.batch_size": 16,
        "train.epochs": 1,
        "optimizer": "adam",
    }
    space = {**ENQUEUE_SPACE, "head.dropout": "choice(0.0, 0.5)", "train.epochs": "range(1, 3)"}
    document = {"search_space": space, "enqueue": [whole], "sweep": {"sampler": "grid"}}
    assert load_sweep(str(sweep_file(tmp_path, document, "grid_enqueue"))).enqueue == (whole,)
    document["enqueue"] = [whole, {"head.dropout": 0.5, "optimizer": "sgd"}]
    with pytest.raises(UserError) as exc:  # the grid sampler cannot fill in the rest
        load_sweep(str(sweep_file(tmp_path, document, "grid_partial")))
    assert_one_line(
        exc,
        "enqueue entry 2",
        "sweep.sampler=grid",
        "every dimension",
        "missing: head.dense_units, train.batch_size, train.epochs",
    )


def test_the_shipped_backbones_sweep_enqueues_known_configurations() -> None:
    spec = load_sweep("backbones")
    assert len(spec.enqueue) >= 1
    assert spec.enqueue[0]["backbone"] == "resnet50"


# --- describing a sweep (tlsweep sweep --dry-run) ---------------------------------------------


def test_dimensions_are_described_with_their_sizes(enqueue_file) -> None:
    spec = load_sweep(str(enqueue_file([])))
    described = {d.key: (describe_dimension(d), dimension_size(d)) for d in spec.space}
    assert described == {
        "head.dense_units": ("choice(64, 128, 256)", 3),
        "head.dropout": ("float in [0.0, 0.5]", None),
        "train.batch_size": ("int in [16, 64] step 16", 4),
        "train.epochs": ("int in [1, 5]", 5),
        "optimizer": ("choice(adam, sgd)", 2),
    }
    assert grid_size(spec.space) is None  # head.dropout is continuous
    finite = [d for d in spec.space if d.key != "head.dropout"]
    assert grid_size(finite) == 3 * 4 * 5 * 2
    log = parse_dimension("optimizer.learning_rate", "tag(log, interval(1e-4, 1e-2))")
    assert describe_dimension(log) == "float in [0.0001, 0.01] log"
    assert dimension_size(parse_dimension("x", "range(0.0, 1.0, step=0.25)")) == 4


def test_artifacts_live_beside_the_storage_file_unless_set(tmp_path: Path) -> None:
    settings = SweepSettings()
    journal = f"journal://{tmp_path / 'studies' / 'optuna.journal'}"
    assert artifacts_dir(settings, journal) == tmp_path / "studies" / "optuna-artifacts"
    sqlite = f"sqlite:///{tmp_path / 'optuna.db'}"
    assert artifacts_dir(settings, sqlite) == tmp_path / "optuna-artifacts"
    server = "postgresql://user:pw@db/optuna"
    assert artifacts_dir(settings, server) == Path("mlruns").resolve() / "optuna-artifacts"
    chosen = SweepSettings(artifacts=str(tmp_path / "shared"))
    assert artifacts_dir(chosen, server) == tmp_path / "shared"
