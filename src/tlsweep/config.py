"""Compose the Hydra config, check it against a typed schema, and validate its values.

The YAML files under ``conf/`` are the user-facing contract; the dataclasses below are the
schema they are merged into, so a typo in a key or a string where a number belongs fails at
composition, before anything is trained.
"""

from __future__ import annotations

import copy
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException

from tlsweep.errors import UserError

CONFIG_GROUPS = ("data", "backbone", "optimizer", "augment")
POOLINGS = ("avg", "max", "flatten")
PREPROCESS_MODES = ("auto", "caffe", "tf", "torch", "none")
OPTIMIZERS = ("adam", "sgd", "rmsprop", "adamw")
DATA_SOURCES = ("digits", "folder", "keras")
MONITORS = ("val_accuracy", "val_loss", "accuracy", "loss")
CUSTOM_ARCHITECTURE = "custom"  # backbone=custom: a saved .keras model or a Python callable
CUSTOM_PREPROCESS_MODES = ("caffe", "tf", "torch", "none")
CUSTOM_BACKBONE_KEYS = ("backbone.path", "backbone._target_", "backbone.cut_layer")
FLIP_MODES = ("horizontal", "vertical", "horizontal_and_vertical")
DEFAULT_CACHE_DIR = Path("mlruns") / "feature_cache"


@dataclass
class DataConfig:
    source: str = "digits"
    name: str = "digits"
    path: str | None = None
    classes: list[str] | None = None
    test_fraction: float = 0.25
    val_fraction: float = 0.2
    train_limit: int | None = None
    test_limit: int | None = None
    split_seed: int = 0


@dataclass
class BackboneConfig:
    name: str = "resnet50"
    architecture: str = "ResNet50"
    weights: str | None = "imagenet"
    input_size: int = 224
    min_input_size: int = 32
    preprocess: str = "auto"
    options: dict[str, Any] = field(default_factory=dict)
    # backbone=custom only (architecture: custom): exactly one of path and _target_
    path: str | None = None  # a saved Keras model (.keras)
    _target_: str | None = None  # "package.module:function" returning a Keras model
    cut_layer: str | None = None  # null: the last layer with a 4-D output (a feature map)

    @property
    def is_custom(self) -> bool:
        return self.architecture == CUSTOM_ARCHITECTURE


@dataclass
class AugmentConfig:
    """Random augmentation of the training images (inside the training model only)."""

    name: str = "none"
    flip: str | None = None  # horizontal | vertical | horizontal_and_vertical | null
    rotation: float = 0.0  # fraction of a full turn, in [0, 1]; 0 = off
    zoom: float = 0.0  # fraction of the side, in [0, 1); 0 = off
    translation: float = 0.0  # fraction of the side, in [0, 1]; 0 = off
    contrast: float = 0.0  # in [0, 1]; 0 = off

    @property
    def enabled(self) -> bool:
        """Whether any augmentation runs (then the feature cache cannot serve the run)."""
        factors = (self.rotation, self.zoom, self.translation, self.contrast)
        return self.flip is not None or any(factors)


@dataclass
class HeadConfig:
    pooling: str = "avg"
    dense_units: int = 256
    dropout: float = 0.3


@dataclass
class OptimizerConfig:
    name: str = "adam"
    learning_rate: float = 1e-3
    momentum: float = 0.0
    nesterov: bool = False
    weight_decay: float | None = None


@dataclass
class EarlyStoppingConfig:
    monitor: str = "val_accuracy"
    patience: int | None = 3


@dataclass
class FineTuneConfig:
    epochs: int = 0
    unfreeze_layers: int = 20
    learning_rate: float = 1e-5


@dataclass
class TrainConfig:
    batch_size: int = 32
    epochs: int = 5
    deterministic: bool = True
    mixed_precision: bool = False
    early_stopping: EarlyStoppingConfig = field(default_factory=EarlyStoppingConfig)
    fine_tune: FineTuneConfig = field(default_factory=FineTuneConfig)


@dataclass
class TrackingConfig:
    uri: str | None = None
    experiment: str = "tlsweep"
    run_name: str | None = None
    log_model: bool = True
    system_metrics: bool = True  # CPU, memory, disk, network (GPU with pynvml): system/* metrics


@dataclass
class CacheConfig:
    enabled: bool = True
    dir: str | None = None  # null: mlruns/feature_cache
    max_gb: float = 20.0
    dtype: str = "float32"
    batch_size: int | None = None  # the feature pass's; null: 64 on a CPU, 256 on a GPU

    @property
    def directory(self) -> Path:
        """Where the feature cache (and the folder manifests, in ``manifests/``) live."""
        return Path(self.dir).expanduser() if self.dir else DEFAULT_CACHE_DIR

    @property
    def manifest_dir(self) -> Path:
        return self.directory / "manifests"


@dataclass
class Config:
    seed: int = 42
    data: DataConfig = field(default_factory=DataConfig)
    backbone: BackboneConfig = field(default_factory=BackboneConfig)
    head: HeadConfig = field(default_factory=HeadConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    cache: CacheConfig = field(default_factory=CacheConfig)


def config_dir() -> Path:
    """The directory holding ``config.yaml`` and the groups.

    ``$TLSWEEP_CONFIG_DIR`` wins; then the repository's ``conf/`` (source checkout or editable
    install); then the copy packaged inside the wheel.
    """
    if env := os.environ.get("TLSWEEP_CONFIG_DIR"):
        return Path(env).expanduser().resolve()
    checkout = Path(__file__).resolve().parents[2] / "conf"
    if (checkout / "config.yaml").is_file():
        return checkout
    return Path(str(resources.files("tlsweep") / "_conf"))


def group_choices(group: str) -> list[str]:
    """The options of a config group, e.g. ``group_choices("optimizer")``."""
    return sorted(p.stem for p in (config_dir() / group).glob("*.yaml"))


def config_name() -> str:
    """The root config's name (``config``; ``-cn NAME`` sets ``$TLSWEEP_CONFIG_NAME``)."""
    return os.environ.get("TLSWEEP_CONFIG_NAME", "config")


def compose(overrides: Sequence[str] = (), with_hydra: bool = False) -> DictConfig:
    """Compose ``conf/config.yaml`` with Hydra overrides; bad overrides raise `UserError`.
    ``with_hydra`` adds Hydra's own config under ``hydra`` (for ``--cfg hydra``, ``--info``)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.errors import HydraException

    _check_group_choices(overrides)
    try:
        with initialize_config_dir(str(config_dir()), version_base=None, job_name="tlsweep"):
            return hydra_compose(
                config_name=config_name(),
                overrides=list(overrides),
                return_hydra_config=with_hydra,
            )
    except (HydraException, OmegaConfBaseException) as exc:
        unknown = re.search(r"Could not override '([^']+)'", str(exc))
        if unknown:  # Hydra's advice (append with +KEY) would only fail the schema check
            raise UserError(_unknown_key_message(unknown.group(1))) from None
        raise UserError(f"bad override: {_first_line(exc)}") from None


def hydra_yaml(overrides: Sequence[str] = (), resolve: bool = False) -> str:
    """Hydra's own config for these overrides, as ``--cfg hydra`` prints it. Interpolations
    that only a running Hydra app can fill (``hydra.job.num``) stay as they are."""
    hydra = compose(overrides, with_hydra=True).hydra
    try:
        content = OmegaConf.to_container(hydra, resolve=resolve)
    except OmegaConfBaseException:
        content = OmegaConf.to_container(hydra, resolve=False)
    return OmegaConf.to_yaml({"hydra": content})


def config_info(overrides: Sequence[str] = ()) -> str:
    """What ``--info`` prints: the config search path and the defaults chosen per group."""
    runtime = compose(overrides, with_hydra=True).hydra.runtime
    lines = [f"config name: {config_name()}", "search path:"]
    lines += [f"  {s.provider:<8} {s.schema}://{s.path}" for s in runtime.config_sources]
    lines.append("defaults (group: choice):")
    choices = {k: v for k, v in runtime.choices.items() if not k.startswith("hydra/")}
    lines += [f"  {group}: {choice}" for group, choice in sorted(choices.items())]
    lines.append("choices:")
    lines += [f"  {group}: {', '.join(group_choices(group))}" for group in CONFIG_GROUPS]
    return "\n".join(lines) + "\n"


def load_config(overrides: Sequence[str] = ()) -> Config:
    """Compose, type-check and validate: the one way a `Config` is made from user input."""
    return to_config(compose(overrides))


class ComposedBase:
    """A config composed once, from which configs that add value overrides are made cheaply.

    ``base.load(more)`` equals ``load_config([*base.overrides, *more])``. Hydra applies value
    overrides (``key=value``) to the composed config after its defaults, with
    ``OmegaConf.update(cfg, key, value, merge=True)``; this does the same on a copy of the
    composed base, which spares a sweep trial the full composition (~0.2 s against ~10 ms).
    Anything else (a config group such as ``backbone=vgg16``, ``+key``, ``~key``, a value
    Hydra would refuse) goes through Hydra's full composition and its errors.
    """

    def __init__(self, overrides: Sequence[str] = ()) -> None:
        self.overrides = tuple(overrides)
        self._raw = compose(self.overrides)

    def load(self, overrides: Sequence[str] = ()) -> Config:
        raw = self._with_values(overrides)
        if raw is None:
            return load_config([*self.overrides, *overrides])
        return to_config(raw)

    def _with_values(self, overrides: Sequence[str]) -> DictConfig | None:
        """The base with ``overrides`` applied, or None if one of them is not a plain value
        override of an existing key."""
        from hydra.core.override_parser.overrides_parser import OverridesParser

        raw = copy.deepcopy(self._raw)
        try:
            parsed = OverridesParser.create().parse_overrides(list(overrides))
            for override in parsed:
                key = override.key_or_group
                changes = not (override.is_add() or override.is_force_add() or override.is_delete())
                plain = changes and override.package is None
                group = key in CONFIG_GROUPS or key.split(".")[0] == "hydra"
                if not plain or group or override.is_sweep_override():
                    return None
                OmegaConf.update(raw, key, override.value(), merge=True)
        except Exception:  # Hydra's own composition reports it properly
            return None
        return raw


def to_config(raw: DictConfig | Mapping[str, Any]) -> Config:
    """Merge a composed config into the schema and validate its values."""
    raw = raw if isinstance(raw, DictConfig) else OmegaConf.create(dict(raw))
    missing = sorted(OmegaConf.missing_keys(raw))
    if missing:
        raise UserError(_missing_message(missing[0]))
    try:
        merged = OmegaConf.merge(OmegaConf.structured(Config), raw)
        config = OmegaConf.to_object(merged)
    except ConfigKeyError as exc:
        raise UserError(_unknown_key_message(str(exc.full_key))) from None
    except OmegaConfBaseException as exc:
        key = getattr(exc, "full_key", None)
        raise UserError(
            f"bad config value{f' for {key}' if key else ''}: {_first_line(exc)}"
        ) from None
    assert isinstance(config, Config)
    validate(config)
    return config


def validate(cfg: Config) -> None:
    """Refuse out-of-range values before any data is loaded or any model is built."""
    _require_choice("head.pooling", cfg.head.pooling, POOLINGS)
    _require_choice("backbone.preprocess", cfg.backbone.preprocess, PREPROCESS_MODES)
    _require_choice("optimizer.name", cfg.optimizer.name, OPTIMIZERS)
    _require_choice("data.source", cfg.data.source, DATA_SOURCES)
    _require_choice("train.early_stopping.monitor", cfg.train.early_stopping.monitor, MONITORS)
    _require(0 <= cfg.head.dropout < 1, "head.dropout", cfg.head.dropout, "must be in [0, 1)")
    _require(cfg.head.dense_units >= 1, "head.dense_units", cfg.head.dense_units, "must be >= 1")
    _require(cfg.train.batch_size >= 1, "train.batch_size", cfg.train.batch_size, "must be >= 1")
    _require(cfg.train.epochs >= 1, "train.epochs", cfg.train.epochs, "must be >= 1")
    _require(
        cfg.optimizer.learning_rate > 0,
        "optimizer.learning_rate",
        cfg.optimizer.learning_rate,
        "must be > 0",
    )
    _validate_fine_tune(cfg.train.fine_tune)
    _validate_backbone(cfg.backbone)
    _validate_augment(cfg.augment)
    _validate_data(cfg.data)
    _require_choice("cache.dtype", cfg.cache.dtype, ("float32", "float16"))
    _require(cfg.cache.max_gb > 0, "cache.max_gb", cfg.cache.max_gb, "must be > 0")
    batch = cfg.cache.batch_size
    _require(batch is None or batch >= 1, "cache.batch_size", batch, "must be >= 1 or null")
    patience = cfg.train.early_stopping.patience
    _require(
        patience is None or patience >= 1,
        "train.early_stopping.patience",
        patience,
        "must be >= 1, or null to turn early stopping off",
    )


def to_yaml(cfg: Config) -> str:
    """The resolved config as YAML, as logged with every run."""
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


def to_dict(cfg: Config) -> dict[str, Any]:
    """The resolved config as plain nested dicts."""
    result = OmegaConf.to_container(OmegaConf.structured(cfg))
    assert isinstance(result, dict)
    return result


def flatten(cfg: Config | Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Dotted keys to leaf values: ``{"head.dense_units": 256, ...}``."""
    tree = to_dict(cfg) if isinstance(cfg, Config) else cfg
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            flat.update(flatten(value, f"{dotted}."))
        else:
            flat[dotted] = value
    return flat


def _validate_fine_tune(ft: FineTuneConfig) -> None:
    _require(ft.epochs >= 0, "train.fine_tune.epochs", ft.epochs, "must be >= 0 (0 turns it off)")
    if ft.epochs:
        _require(
            ft.unfreeze_layers >= 1,
            "train.fine_tune.unfreeze_layers",
            ft.unfreeze_layers,
            "must be >= 1",
        )
        _require(
            ft.learning_rate > 0, "train.fine_tune.learning_rate", ft.learning_rate, "must be > 0"
        )


def _validate_backbone(bb: BackboneConfig) -> None:
    _validate_custom_backbone(bb)
    _require(
        bb.input_size >= bb.min_input_size,
        "backbone.input_size",
        bb.input_size,
        f"{bb.architecture} needs at least {bb.min_input_size}",
    )
    if bb.weights not in (None, "imagenet"):
        path = Path(bb.weights).expanduser()
        if not path.is_file():
            raise UserError(
                f"backbone.weights={bb.weights}: no such file; "
                "use imagenet, null, or the path of a weights file"
            )


def _validate_custom_backbone(bb: BackboneConfig) -> None:
    """backbone=custom: one source, declared preprocessing; other backbones take neither key."""
    sources = {"backbone.path": bb.path, "backbone._target_": bb._target_}
    given = [key for key, value in sources.items() if value]
    if not bb.is_custom:
        if given:
            raise UserError(
                f"{given[0]} is only for backbone=custom (backbone={bb.name} is "
                f"keras.applications.{bb.architecture})"
            )
        if bb.cut_layer:
            raise UserError(f"backbone.cut_layer is only for backbone=custom, not {bb.name}")
        return
    if len(given) != 1:
        raise UserError(
            "backbone=custom needs exactly one of backbone.path=/path/to/model.keras and "
            f"backbone._target_=package.module:function (got {' and '.join(given) or 'neither'})"
        )
    _require(
        bb.preprocess in CUSTOM_PREPROCESS_MODES,
        "backbone.preprocess",
        bb.preprocess,
        "backbone=custom must declare what its model expects on raw 0-255 pixels: "
        f"{', '.join(CUSTOM_PREPROCESS_MODES)}",
    )
    if bb.path:
        path = Path(bb.path).expanduser()
        if not path.is_file():
            raise UserError(f"backbone.path={bb.path}: no such file; give a saved .keras model")
        if path.suffix != ".keras":
            raise UserError(
                f"backbone.path={bb.path} is not a .keras file; save the model with "
                "model.save('name.keras')"
            )
        if bb.weights is not None:
            raise UserError(
                f"backbone.weights={bb.weights} is not allowed with backbone.path: "
                "the .keras file holds the weights; set backbone.weights=null"
            )
    elif bb.weights == "imagenet":
        raise UserError(
            "backbone.weights=imagenet is not allowed for backbone._target_: "
            "use null (seeded random init) or a weights file for the model it returns"
        )


def _validate_augment(aug: AugmentConfig) -> None:
    _require(
        aug.flip is None or aug.flip in FLIP_MODES,
        "augment.flip",
        aug.flip,
        f"choose from {', '.join(FLIP_MODES)} or null",
    )
    for key in ("rotation", "translation", "contrast"):
        value = getattr(aug, key)
        _require(0 <= value <= 1, f"augment.{key}", value, "must be in [0, 1] (0 turns it off)")
    _require(0 <= aug.zoom < 1, "augment.zoom", aug.zoom, "must be in [0, 1) (0 turns it off)")


def _validate_data(data: DataConfig) -> None:
    _require(0 < data.val_fraction < 1, "data.val_fraction", data.val_fraction, "must be in (0, 1)")
    _require(
        0 <= data.test_fraction < 1, "data.test_fraction", data.test_fraction, "must be in [0, 1)"
    )
    for key in ("train_limit", "test_limit"):
        limit = getattr(data, key)
        _require(limit is None or limit >= 1, f"data.{key}", limit, "must be >= 1 or null")
    if data.source == "folder" and not data.path:
        raise UserError(_missing_message("data.path"))


def _check_group_choices(overrides: Sequence[str]) -> None:
    """Unknown group options get a one-line error listing the valid ones."""
    for override in overrides:
        key, sep, value = override.lstrip("+~").partition("=")
        if sep and key in CONFIG_GROUPS and value not in group_choices(key):
            choices = ", ".join(group_choices(key))
            raise UserError(f"unknown {key} '{value}'; choose from: {choices}")


def _require(ok: bool, key: str, value: object, allowed: str) -> None:
    if not ok:
        raise UserError(f"{key}={value} is not allowed: {allowed}")


def _require_choice(key: str, value: str, choices: Sequence[str]) -> None:
    _require(value in choices, key, value, f"choose from {', '.join(choices)}")


def _missing_message(key: str) -> str:
    if key == "data.path":
        return "data.path is required for data=folder, e.g. data.path=~/photos"
    if key == "backbone.preprocess":
        return (
            "backbone.preprocess is required for backbone=custom: what its model expects on "
            f"raw 0-255 pixels, one of {', '.join(CUSTOM_PREPROCESS_MODES)}"
        )
    return f"{key} is required: set it on the command line, e.g. {key}=..."


def _unknown_key_message(key: str) -> str:
    """Name the unknown key and list the keys its deepest existing section does have."""
    if key in CUSTOM_BACKBONE_KEYS:  # in the schema, but only custom.yaml declares them
        return f"{key} is only for backbone=custom, e.g. backbone=custom {key}=..."
    schema = OmegaConf.structured(Config)
    parts = key.split(".")
    parent = next(
        (
            ".".join(parts[:i])
            for i in range(len(parts) - 1, 0, -1)
            if isinstance(OmegaConf.select(schema, ".".join(parts[:i])), DictConfig)
        ),
        "",
    )
    section = OmegaConf.select(schema, parent) if parent else schema
    keys = ", ".join(str(k) for k in section)
    return f"unknown key {key}; {parent or 'the config'} has: {keys}"


def _first_line(exc: BaseException) -> str:
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return "; ".join(lines[:2]) if lines else type(exc).__name__
