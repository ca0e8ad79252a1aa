"""Config composition (Hydra), the typed schema, validation, flatten and to_yaml."""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path

import keras
import pytest
import yaml
from omegaconf import DictConfig, OmegaConf

from tlsweep.config import (
    ComposedBase,
    Config,
    compose,
    config_dir,
    flatten,
    group_choices,
    load_config,
    to_config,
    to_dict,
    to_yaml,
)
from tlsweep.errors import UserError

REQUIRED_CHOICES = {
    "data": ("digits", "folder", "cifar10"),
    "backbone": (
        "resnet50",
        "vgg16",
        "mobilenet_v2",
        "efficientnet_b0",
        "inception_v3",
        "xception",
        "densenet121",
    ),
    "optimizer": ("adam", "sgd", "rmsprop", "adamw"),
    "augment": ("none", "light", "strong"),
}
CUSTOM = ("backbone=custom", "backbone.preprocess=tf", "backbone.input_size=32")
REFERENCE_EXPERIMENT = (
    "backbone=resnet50",
    "head.pooling=flatten",
    "head.dense_units=512",
    "head.dropout=0.1",
    "train.batch_size=30",
    "train.epochs=5",
    "optimizer=adam",
    "data=cifar10",
)


@pytest.fixture(scope="module")
def cfg_default() -> DictConfig:
    """The root config composed with no overrides, as Hydra returns it."""
    return compose([])


@pytest.fixture(scope="module")
def cfg_reference() -> Config:
    return load_config(REFERENCE_EXPERIMENT)


def _user_error(overrides: list[str] | tuple[str, ...]) -> str:
    with pytest.raises(UserError) as info:
        load_config(overrides)
    message = str(info.value)
    assert "\n" not in message, "a UserError message must be one line"
    return message


# --- composition ---------------------------------------------------------------------------


def test_default_composition(cfg_default: DictConfig) -> None:
    for key in ("seed", "data", "backbone", "head", "optimizer", "train", "tracking"):
        assert key in cfg_default
    # the defaults list of conf/config.yaml
    assert cfg_default.data.name == "digits"
    assert cfg_default.backbone.name == "resnet50"
    assert cfg_default.optimizer.name == "adam"
    assert cfg_default.head.pooling == "avg"
    cfg = to_config(cfg_default)
    assert isinstance(cfg, Config)
    assert cfg == load_config([])
    assert cfg.backbone.architecture == "ResNet50"
    assert cfg.train.deterministic is True


def test_overrides_compose_into_typed_values(make_config: Callable[..., Config]) -> None:
    cfg = make_config("head.dropout=0.25", "train.epochs=3", "optimizer.learning_rate=3e-4")
    assert cfg.head.dropout == 0.25
    assert cfg.train.epochs == 3
    assert cfg.optimizer.learning_rate == pytest.approx(3e-4)
    assert isinstance(cfg.head.dense_units, int)
    # the tiny test config itself
    assert cfg.backbone.name == "mobilenet_v2"
    assert cfg.backbone.weights is None
    assert cfg.backbone.options == {"alpha": 0.35}


@pytest.mark.parametrize(
    ("group", "choice"),
    [(group, choice) for group, choices in REQUIRED_CHOICES.items() for choice in choices],
)
def test_required_group_choice_exists_and_composes(group: str, choice: str, tmp_path: Path) -> None:
    assert choice in group_choices(group)
    extra = [f"data.path={tmp_path}"] if choice == "folder" else []
    cfg = load_config([f"{group}={choice}", *extra])
    assert getattr(cfg, group).name == choice


@pytest.mark.parametrize("name", [n for n in group_choices("backbone") if n != "custom"])
def test_every_backbone_defaults_to_imagenet(name: str) -> None:
    raw = yaml.safe_load((config_dir() / "backbone" / f"{name}.yaml").read_text())
    assert raw["weights"] == "imagenet"
    cfg = load_config([f"backbone={name}"])
    assert cfg.backbone.name == name
    assert cfg.backbone.weights == "imagenet"
    assert cfg.backbone.input_size >= cfg.backbone.min_input_size
    assert callable(getattr(keras.applications, cfg.backbone.architecture, None))


def test_sgd_uses_momentum() -> None:
    cfg = load_config(["optimizer=sgd"])
    assert cfg.optimizer.name == "sgd"
    assert cfg.optimizer.momentum > 0


def test_reference_experiment_is_expressible(cfg_reference: Config) -> None:
    cfg = cfg_reference
    assert cfg.backbone.name == "resnet50"
    assert cfg.backbone.architecture == "ResNet50"
    assert cfg.backbone.weights == "imagenet"
    assert (cfg.head.pooling, cfg.head.dense_units, cfg.head.dropout) == ("flatten", 512, 0.1)
    assert (cfg.train.batch_size, cfg.train.epochs) == (30, 5)
    assert cfg.optimizer.name == "adam"
    assert (cfg.data.source, cfg.data.name) == ("keras", "cifar10")
    assert cfg.data.train_limit == 2000
    assert cfg.data.test_limit == 2000
    assert cfg.data.val_fraction == 0.2


def test_config_dir_can_be_replaced(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    conf = tmp_path / "conf"
    shutil.copytree(config_dir(), conf)
    text = (conf / "backbone" / "mobilenet_v2.yaml").read_text()
    (conf / "backbone" / "my_net.yaml").write_text(text.replace("mobilenet_v2", "my_net"))
    monkeypatch.setenv("TLSWEEP_CONFIG_DIR", str(conf))
    assert config_dir() == conf.resolve()
    assert "my_net" in group_choices("backbone")
    assert load_config(["backbone=my_net"]).backbone.architecture == "MobileNetV2"


# --- bad input -----------------------------------------------------------------------------


@pytest.mark.parametrize("group", sorted(REQUIRED_CHOICES))
def test_unknown_group_choice_lists_the_valid_ones(group: str) -> None:
    message = _user_error([f"{group}=no_such_choice"])
    assert "no_such_choice" in message
    for choice in group_choices(group):
        assert choice in message


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        (["head.dropout=1.0"], ["head.dropout=1.0", "[0, 1)"]),
        (["head.dropout=-0.1"], ["head.dropout=-0.1", "[0, 1)"]),
        (["head.dense_units=0"], ["head.dense_units=0", ">= 1"]),
        (["train.batch_size=0"], ["train.batch_size=0", ">= 1"]),
        (["cache.batch_size=0"], ["cache.batch_size=0", ">= 1 or null"]),
        (["train.epochs=0"], ["train.epochs=0", ">= 1"]),
        (["optimizer.learning_rate=0"], ["optimizer.learning_rate=0", "> 0"]),
        (["optimizer.learning_rate=-0.001"], ["optimizer.learning_rate=-0.001", "> 0"]),
        (["head.pooling=median"], ["head.pooling=median", "avg", "max", "flatten"]),
        (
            ["backbone=inception_v3", "backbone.input_size=50"],
            ["backbone.input_size=50", "InceptionV3", "75"],
        ),
        (["data=folder"], ["data.path", "data=folder"]),
        (
            ["backbone.weights=/no/such/dir/x.weights.h5"],
            ["/no/such/dir/x.weights.h5", "imagenet", "null"],
        ),
        (["head.units=3"], ["head.units", "dense_units", "dropout", "pooling"]),
        (["+head.units=3"], ["head.units", "dense_units", "dropout", "pooling"]),
        (["no_such_key=1"], ["no_such_key", "head", "train"]),
        (["head.dense_units=abc"], ["head.dense_units", "abc", "Integer"]),
        (["head.dropout=high"], ["head.dropout", "high", "Float"]),
        (["augment.rotation=-0.1"], ["augment.rotation=-0.1", "[0, 1]"]),
        (["augment.contrast=1.5"], ["augment.contrast=1.5", "[0, 1]"]),
        (["augment.zoom=1.0"], ["augment.zoom=1.0", "[0, 1)"]),
        (["augment.flip=diagonal"], ["augment.flip=diagonal", "horizontal_and_vertical", "null"]),
        (["augment=wild"], ["augment 'wild'", "none", "light", "strong"]),
        (["backbone=custom"], ["backbone.preprocess is required", "caffe", "none"]),
        ([*CUSTOM], ["backbone=custom", "neither"]),
        (
            [*CUSTOM, "backbone.preprocess=auto", "backbone._target_=m:f"],
            ["backbone.preprocess=auto", "caffe, tf, torch, none"],
        ),
        (
            [*CUSTOM, "backbone.path=/no/such/net.keras"],
            ["backbone.path=/no/such/net.keras", "no such file"],
        ),
        (
            [*CUSTOM, "backbone._target_=m:f", "backbone.path=/x.keras"],
            ["exactly one", "backbone.path and backbone._target_"],
        ),
        (
            [*CUSTOM, "backbone._target_=m:f", "backbone.weights=imagenet"],
            ["backbone.weights=imagenet", "null"],
        ),
        (["backbone.path=/x.keras"], ["backbone.path", "only for backbone=custom"]),
        (["backbone.cut_layer=conv"], ["backbone.cut_layer", "only for backbone=custom"]),
    ],
)
def test_bad_input_is_a_one_line_user_error(overrides: list[str], expected: list[str]) -> None:
    message = _user_error(overrides)
    for fragment in expected:
        assert fragment in message, f"{fragment!r} not in {message!r}"


def test_user_error_exit_code_is_2() -> None:
    assert UserError.exit_code == 2
    assert str(UserError("two\n  lines")) == "two lines"


# --- a composed base plus value overrides (sweep trials) -----------------------------------

BASE = ("backbone=vgg16", "backbone.weights=null", "train.early_stopping.monitor=val_loss")


def _outcome(make: Callable[[], Config]) -> Config | str:
    try:
        return make()
    except UserError as exc:
        return f"UserError: {exc}"


@pytest.mark.parametrize(
    "overrides",
    [
        [],
        ["head.dense_units=512", "head.dropout=0.30000000000000004", "train.batch_size=10"],
        ["optimizer.learning_rate=1e-4", "head.pooling=max", "train.early_stopping.patience=null"],
        ["data.classes=[a,b]", "tracking.run_name='a b'", "backbone.weights=null"],
        ["augment=light", "head.dropout=0.2"],  # a group: Hydra's composition
        ["optimizer=sgd", "optimizer.momentum=0.9"],
        ["+backbone.options.alpha=0.5"],
        ["head.dense_units=abc"],
        ["head.units=3"],
        ["backbone=nope"],
        ["head.dropout=1.0"],
    ],
)
def test_composed_base_loads_what_full_composition_loads(overrides: list[str]) -> None:
    fast = _outcome(lambda: ComposedBase(BASE).load(overrides))
    assert fast == _outcome(lambda: load_config([*BASE, *overrides]))


def test_composed_base_applies_values_without_recomposing(monkeypatch: pytest.MonkeyPatch) -> None:
    base = ComposedBase(BASE)

    def no_hydra(overrides: object) -> None:
        raise AssertionError(f"composed again for {overrides}")

    monkeypatch.setattr("tlsweep.config.compose", no_hydra)
    cfg = base.load(["head.dense_units=7", "optimizer.learning_rate=0.01"])
    assert (cfg.head.dense_units, cfg.optimizer.learning_rate) == (7, 0.01)
    assert (cfg.backbone.name, cfg.train.early_stopping.monitor) == ("vgg16", "val_loss")
    assert base.load().head.dense_units != 7, "the base itself must not change"
    with pytest.raises(AssertionError, match="composed again"):
        base.load(["optimizer=sgd"])  # a config group needs Hydra


# --- flatten and to_yaml -------------------------------------------------------------------


def test_flatten_gives_dotted_leaf_keys(cfg_reference: Config) -> None:
    flat = flatten(cfg_reference)
    assert flat["head.dense_units"] == 512
    assert flat["head.pooling"] == "flatten"
    assert flat["train.early_stopping.monitor"] == "val_accuracy"
    assert flat["data.train_limit"] == 2000
    assert flat["backbone.options"] == {}  # an empty mapping is a leaf
    assert not any(isinstance(v, dict) and v for v in flat.values())
    structured = OmegaConf.structured(cfg_reference)
    for key, value in flat.items():
        assert OmegaConf.select(structured, key) == value, key


def test_flatten_nested_options(make_config: Callable[..., Config]) -> None:
    flat = flatten(make_config())
    assert flat["backbone.options.alpha"] == 0.35
    assert "backbone.options" not in flat
    assert flatten({"a": {"b": {"c": 1}, "d": 2}, "e": 3}) == {"a.b.c": 1, "a.d": 2, "e": 3}


def test_to_yaml_round_trips(make_config: Callable[..., Config]) -> None:
    cfg = make_config("head.dropout=0.1", "optimizer=sgd", "train.fine_tune.epochs=2")
    text = to_yaml(cfg)
    assert yaml.safe_load(text) == to_dict(cfg)
    assert "dropout: 0.1" in text
    assert to_config(OmegaConf.create(text)) == cfg


def test_to_yaml_of_reference_experiment(cfg_reference: Config) -> None:
    parsed = yaml.safe_load(to_yaml(cfg_reference))
    assert parsed["backbone"]["name"] == "resnet50"
    assert parsed["head"] == {"pooling": "flatten", "dense_units": 512, "dropout": 0.1}
    assert parsed["data"]["train_limit"] == 2000


# --- augmentation and custom backbones -------------------------------------------------------


@pytest.mark.parametrize(
    ("choice", "enabled"), [("none", False), ("light", True), ("strong", True)]
)
def test_augment_presets(choice: str, enabled: bool) -> None:
    cfg = load_config([f"augment={choice}"])
    assert cfg.augment.name == choice
    assert cfg.augment.enabled is enabled


def test_augment_defaults_to_none(cfg_default: DictConfig) -> None:
    assert cfg_default.augment.name == "none"
    assert to_config(cfg_default).augment.enabled is False


def test_augment_explicit_keys(make_config: Callable[..., Config]) -> None:
    cfg = make_config("augment.flip=vertical", "augment.rotation=0.2")
    assert cfg.augment.name == "none"  # the preset, changed key by key
    assert cfg.augment.flip == "vertical"
    assert cfg.augment.rotation == pytest.approx(0.2)
    assert cfg.augment.enabled
    off = ("augment.flip=null", "augment.rotation=0", "augment.zoom=0", "augment.translation=0")
    assert not make_config("augment=light", *off).augment.enabled
    assert make_config("augment=light", *off[:-1]).augment.enabled  # translation still on


def test_augment_is_searchable(write_sweep: Callable[..., Path], tmp_path: Path) -> None:
    from tlsweep.sweepspec import load_sweep

    spec = load_sweep(str(write_sweep(tmp_path, {"augment": "choice(none, light)"})))
    (dim,) = [d for d in spec.space if d.key == "augment"]
    assert list(dim.choices) == ["none", "light"]
    cfg = load_config(spec.trial_overrides({"augment": "light"}))
    assert cfg.augment.name == "light"
    assert cfg.augment.enabled
    with pytest.raises(UserError, match="wild"):
        load_sweep(str(write_sweep(tmp_path, {"augment": "choice(none, wild)"}, name="bad")))


def test_custom_backbone_composes(tmp_path: Path) -> None:
    path = tmp_path / "net.keras"
    path.write_bytes(b"the file is read when the backbone is built, not here")
    cfg = load_config([*CUSTOM, f"backbone.path={path}", "backbone.cut_layer=conv_b"])
    bb = cfg.backbone
    assert bb.is_custom
    assert (bb.path, bb.cut_layer, bb.preprocess, bb.weights) == (str(path), "conv_b", "tf", None)
    assert flatten(cfg)["backbone.path"] == str(path)
    target = "custom_backbones:tiny_convnet"
    cfg = load_config([*CUSTOM, f"backbone._target_={target}", "+backbone.options.width=2"])
    assert cfg.backbone._target_ == target
    assert cfg.backbone.options == {"width": 2}
    assert f"_target_: {target}" in to_yaml(cfg)
    assert to_config(yaml.safe_load(to_yaml(cfg))) == cfg  # as reproduce reads it back
    assert not load_config([]).backbone.is_custom


def test_custom_path_must_be_a_keras_file(tmp_path: Path) -> None:
    path = tmp_path / "net.h5"
    path.write_bytes(b"")
    message = _user_error([*CUSTOM, f"backbone.path={path}"])
    assert ".keras" in message
