"""Backbones: a ``keras.applications`` constructor, its weights and its own preprocessing.

Preprocessing is rebuilt from Keras' built-in layers so that a saved model loads anywhere with
plain Keras (no custom objects to register). ``preprocess: auto`` finds out which of the four
known transforms a backbone's own ``preprocess_input`` performs by calling it on probe pixels.

``backbone=custom`` (architecture ``custom``) takes your own network instead: a saved ``.keras``
model (``path``) or a Python callable (``_target_``) returning one, cut at ``cut_layer`` or by
default at the last layer whose output is 4-D (the last spatial feature map), so that the head's
pooling applies. Its preprocessing must be declared: there is no ``preprocess_input`` to probe.
"""

from __future__ import annotations

import functools
import hashlib
import importlib
import json
import sys
import warnings
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any, TypeVar

import keras
import numpy as np

from tlsweep.config import CUSTOM_PREPROCESS_MODES, BackboneConfig
from tlsweep.errors import UserError

IMAGENET_MEAN_BGR = (103.939, 116.779, 123.68)
TORCH_MEAN = (0.485, 0.456, 0.406)
TORCH_STD = (0.229, 0.224, 0.225)
T = TypeVar("T")


def constructor(architecture: str) -> Callable[..., keras.Model]:
    """The ``keras.applications`` constructor named ``architecture`` (e.g. ``"ResNet50"``)."""
    ctor = getattr(keras.applications, architecture, None)
    if not callable(ctor) or architecture[:1].islower():
        known = ", ".join(n for n in dir(keras.applications) if n[:1].isupper())
        raise UserError(
            f"backbone.architecture={architecture} is not in keras.applications: {known}"
        )
    return ctor


def own_preprocess_input(architecture: str) -> Callable[[np.ndarray], np.ndarray]:
    """The ``preprocess_input`` of the module that defines the constructor."""
    return sys.modules[constructor(architecture).__module__].preprocess_input


def preprocess_mode(cfg: BackboneConfig) -> str:
    """``cfg.preprocess``, with ``auto`` resolved by probing the backbone's own function."""
    if cfg.preprocess != "auto":
        return cfg.preprocess
    if cfg.is_custom:
        raise UserError(
            "backbone.preprocess=auto is not allowed for backbone=custom: declare what the "
            f"model expects on raw 0-255 pixels: {', '.join(CUSTOM_PREPROCESS_MODES)}"
        )
    return _probed_mode(cfg.architecture)


@functools.cache
def _probed_mode(architecture: str) -> str:
    """The built-in mode matching ``architecture``'s ``preprocess_input`` (probed once)."""
    probe = np.random.default_rng(0).uniform(0, 255, (1, 2, 2, 3)).astype("float32")
    expected = np.asarray(own_preprocess_input(architecture)(probe.copy()))
    for mode in ("caffe", "tf", "torch", "none"):
        if np.allclose(_probe(mode, probe), expected, atol=1e-4):
            return mode
    raise UserError(
        f"cannot express {architecture}'s preprocess_input with built-in layers; "
        "set backbone.preprocess to caffe, tf, torch or none"
    )


def _probe(mode: str, probe: np.ndarray) -> np.ndarray:
    """``mode``'s layers applied to ``probe`` in float32, whatever the global dtype policy."""
    policy = keras.mixed_precision.global_policy()
    keras.mixed_precision.set_global_policy("float32")  # float16 would miss the 1e-4 match
    try:
        output = probe
        for layer in preprocessing_layers(mode):  # one by one: an empty Sequential can't be called
            output = layer(output)
        return np.asarray(output)
    finally:
        keras.mixed_precision.set_global_policy(policy)


def preprocessing_layers(mode: str) -> list[keras.layers.Layer]:
    """Built-in layers that map raw RGB pixels in [0, 255] as ``preprocess_input`` does."""
    if mode == "caffe":  # RGB -> BGR, minus the ImageNet mean (ResNet, VGG)
        flip = keras.layers.Dense(  # zeros: set below, and no draw from the seeded generator
            3,
            trainable=False,
            kernel_initializer="zeros",
            bias_initializer="zeros",
            name="rgb_to_bgr_minus_mean",
        )
        flip.build((None, 3))
        flip.set_weights(
            [np.eye(3, dtype="float32")[::-1], -np.array(IMAGENET_MEAN_BGR, "float32")]
        )
        return [flip]
    if mode == "tf":  # scale to [-1, 1] (MobileNet, Inception, Xception, ResNetV2)
        return [keras.layers.Rescaling(1 / 127.5, offset=-1.0, name="scale_to_pm1")]
    if mode == "torch":  # [0, 1], then ImageNet mean and std (DenseNet)
        return [
            keras.layers.Rescaling(1 / 255.0, name="scale_to_unit"),
            keras.layers.Normalization(
                mean=TORCH_MEAN, variance=np.square(TORCH_STD), name="imagenet_normalize"
            ),
        ]
    if mode == "none":  # the network rescales itself (EfficientNet, ConvNeXt)
        return []
    raise UserError(f"backbone.preprocess={mode} is not allowed: choose caffe, tf, torch or none")


def build_backbone(cfg: BackboneConfig) -> keras.Model:
    """The network without its top, with the configured weights, frozen."""
    if cfg.is_custom:
        base = build_custom_backbone(cfg)
        base.trainable = False
        disable_stochastic_layers(base)
        return base
    ctor = constructor(cfg.architecture)
    shape = (cfg.input_size, cfg.input_size, 3)
    weights = _weights_argument(cfg.weights)
    try:
        with warnings.catch_warnings():
            # Without the top, ImageNet weights fit any input size: the 224 warning is noise.
            warnings.filterwarnings("ignore", message="`input_shape` is undefined or non-square")
            base = ctor(include_top=False, weights=weights, input_shape=shape, **cfg.options)
    except UserError:
        raise
    except Exception as exc:
        if weights == "imagenet" and _looks_like_download_failure(exc):
            raise UserError(
                f"could not download ImageNet weights for {cfg.architecture} ({_short(exc)}); "
                "without internet use backbone.weights=null or backbone.weights=/path/to/file.h5"
            ) from None
        if weights not in (None, "imagenet"):
            raise UserError(
                f"backbone.weights={cfg.weights} does not fit {cfg.architecture} "
                f"without its top at {cfg.input_size}x{cfg.input_size}: {_short(exc)}"
            ) from None
        raise UserError(f"cannot build {cfg.architecture}: {_short(exc)}") from None
    base.trainable = False
    disable_stochastic_layers(base)
    return base


def build_custom_backbone(cfg: BackboneConfig) -> keras.Model:
    """``backbone=custom``: the saved model or the callable's model, cut at its feature map.

    The result is a functional model named ``<name>_backbone`` with the loaded model's input
    (sides of ``input_size`` or None) and a 4-D feature map as output; it shares its layers
    (and weights) with the loaded model.
    """
    if cfg.path:
        model, source = load_keras_model(cfg.path), f"backbone.path={cfg.path}"
    elif cfg._target_:
        model, source = call_target(cfg), f"backbone._target_={cfg._target_}"
    else:
        raise UserError(
            "backbone=custom needs backbone.path=/path/to/model.keras or "
            "backbone._target_=package.module:function"
        )
    model = _as_functional(model, cfg.input_size, source)
    layer = model.get_layer(cut_layer_name(model, cfg.cut_layer, source))
    # A nested model's ``output`` is its own inner tensor; as the last layer, its output in
    # this graph is the model's output.
    output = model.outputs[0] if layer is model.layers[-1] else layer.output
    try:
        return keras.Model(model.inputs[0], output, name=f"{cfg.name}_backbone")
    except ValueError:  # a nested model in the middle: its output here is not reachable
        raise UserError(
            f"{source}: cannot cut at '{layer.name}', a nested model inside the network; "
            "set backbone.cut_layer to a layer after it (e.g. its activation) or to the last"
        ) from None


def load_keras_model(path: str) -> keras.Model:
    """A saved ``.keras`` model, uncompiled (plain Keras: no custom objects)."""
    file = Path(path).expanduser()
    if not file.is_file():
        raise UserError(f"backbone.path={path}: no such file; give a saved .keras model")
    try:
        model = keras.saving.load_model(file, compile=False)
    except Exception as exc:
        raise UserError(f"backbone.path={path}: cannot load it with Keras: {_short(exc)}") from None
    if not isinstance(model, keras.Model):
        raise UserError(f"backbone.path={path} holds a {type(model).__name__}, not a Keras model")
    return model


def resolve_target(target: str) -> Callable[..., object]:
    """The callable named ``package.module:function`` (or ``package.module.function``).

    Not Hydra's ``get_method``: that takes dotted paths only and fails with a multi-line
    ImportError; this one also takes the ``module:function`` form entry points use, and each
    failure is one line naming what is missing and what the module has."""
    module_name, sep, attribute = target.partition(":")
    if not sep:
        module_name, _, attribute = target.rpartition(".")
    if not module_name or not attribute:
        raise UserError(
            f"backbone._target_={target} is not a callable's name: "
            "write package.module:function (or package.module.function)"
        )
    try:
        module = importlib.import_module(module_name)
    except Exception as exc:  # not found, or the module itself fails (a syntax error...)
        raise UserError(
            f"backbone._target_={target}: cannot import {module_name} ({_short(exc)}); "
            "install it or put its folder on PYTHONPATH"
        ) from None
    found: object = module
    for part in attribute.split("."):
        found = getattr(found, part, None)
        if found is None:
            public = ", ".join(n for n in sorted(vars(module)) if not n.startswith("_"))[:200]
            raise UserError(
                f"backbone._target_={target}: {module_name} has no {attribute}; it has: {public}"
            )
    if not callable(found):
        raise UserError(f"backbone._target_={target} is a {type(found).__name__}, not callable")
    return found


def call_target(cfg: BackboneConfig) -> keras.Model:
    """``target(input_shape=(size, size, 3), **options)``, with a weights file if configured."""
    function = resolve_target(str(cfg._target_))
    shape = (cfg.input_size, cfg.input_size, 3)
    try:
        model = function(input_shape=shape, **cfg.options)
    except UserError:
        raise
    except Exception as exc:
        arguments = ", ".join(
            [f"input_shape={shape}", *(f"{k}={v!r}" for k, v in cfg.options.items())]
        )
        raise UserError(
            f"backbone._target_={cfg._target_}({arguments}) failed: {_short(exc)}"
        ) from None
    if not isinstance(model, keras.Model):
        raise UserError(
            f"backbone._target_={cfg._target_} returned a {type(model).__name__}, not a keras.Model"
        )
    if cfg.weights is not None:
        try:
            model.load_weights(_weights_argument(cfg.weights))
        except UserError:
            raise
        except Exception as exc:
            raise UserError(
                f"backbone.weights={cfg.weights} does not fit the model of "
                f"backbone._target_={cfg._target_}: {_short(exc)}"
            ) from None
    return model


def cut_layer_name(model: keras.Model, cut_layer: str | None, source: str = "the model") -> str:
    """``cut_layer`` if ``model`` has it with a 4-D output; None: the last 4-D layer's name.

    4-D (batch, height, width, channels) is a spatial feature map: where a network's
    convolutional part ends, before its own global pooling or classifier, so that the head's
    pooling (avg, max, flatten) applies.
    """
    layers = [layer for layer in model.layers if not isinstance(layer, keras.layers.InputLayer)]
    maps = [layer.name for layer in layers if _output_rank(layer) == 4]
    if cut_layer is None:
        if not maps:
            raise UserError(
                f"{source}: no layer outputs a 4-D feature map (batch, height, width, "
                "channels) to cut at"
            )
        return maps[-1]
    names = [layer.name for layer in model.layers]
    if cut_layer not in names:
        raise UserError(
            f"backbone.cut_layer={cut_layer}: {source} has no such layer; "
            f"layers with a 4-D output: {_some(maps)}"
        )
    if cut_layer not in maps:
        raise UserError(
            f"backbone.cut_layer={cut_layer}: its output is not a 4-D feature map "
            f"(batch, height, width, channels) that the head can pool; choose one of: "
            f"{_some(maps)}"
        )
    return cut_layer


def custom_source_identity(cfg: BackboneConfig, seed: int) -> dict[str, object]:
    """What a custom backbone's features depend on beyond its weights, for the cache key:
    the ``.keras`` file's SHA-256, or the callable's name (and the seed of a random init)."""
    identity: dict[str, object] = {"cut_layer": cfg.cut_layer}
    if cfg.path:
        identity["keras_sha256"] = file_sha256(Path(cfg.path).expanduser())
    else:
        identity["target"] = cfg._target_
        identity["seed"] = seed if cfg.weights is None else None
    return identity


_FILE_DIGESTS: dict[tuple[str, int, int], str] = {}


def file_sha256(path: Path) -> str:
    """SHA-256 of a file's bytes, remembered per (path, size, mtime) for this process."""
    stat = path.stat()
    key = (str(path.resolve()), stat.st_size, stat.st_mtime_ns)
    if key not in _FILE_DIGESTS:
        digest = hashlib.sha256()
        with path.open("rb") as handle:
            for block in iter(lambda: handle.read(1 << 22), b""):
                digest.update(block)
        _FILE_DIGESTS[key] = digest.hexdigest()
    return _FILE_DIGESTS[key]


def small_cnn(
    input_shape: tuple[int, int, int], filters: tuple[int, ...] = (32, 64), name: str = "small_cnn"
) -> keras.Model:
    """An example ``backbone._target_`` (``tlsweep.backbones:small_cnn``): conv blocks, no top.

    Expects pixels scaled to [-1, 1] (``backbone.preprocess=tf``); its random init is seeded.
    """
    inputs = keras.Input(input_shape)
    x = inputs
    for i, width in enumerate(filters):
        x = keras.layers.Conv2D(width, 3, padding="same", activation="relu", name=f"conv{i}")(x)
        x = keras.layers.MaxPooling2D(name=f"pool{i}")(x)
    return keras.Model(inputs, x, name=name)


def _as_functional(model: keras.Model, size: int, source: str) -> keras.Model:
    """``model`` with symbolic inputs and outputs (a subclassed model becomes one layer)."""
    try:
        inputs = model.inputs
    except (AttributeError, ValueError):
        inputs = None
    if not inputs:
        image = keras.Input((size, size, 3), name="image")
        try:
            return keras.Model(image, model(image), name=model.name)
        except Exception as exc:
            raise UserError(
                f"{source}: cannot call it on {size}x{size} images: {_short(exc)}"
            ) from None
    if len(inputs) != 1:
        raise UserError(f"{source} takes {len(inputs)} inputs; a backbone takes one image")
    shape = tuple(inputs[0].shape)
    if len(shape) != 4 or shape[3] != 3 or any(s not in (None, size) for s in shape[1:3]):
        raise UserError(
            f"{source} takes inputs of shape {shape[1:]}, not ({size}, {size}, 3) images; "
            "set backbone.input_size to its side"
        )
    return model


def _output_rank(layer: keras.layers.Layer) -> int | None:
    try:
        return len(layer.output.shape)
    except (AttributeError, ValueError):  # never called, or called more than once
        return None


def _some(names: list[str], n: int = 8) -> str:
    if not names:
        return "none"
    shown = names[-n:]
    more = f" (and {len(names) - n} earlier)" if len(names) > n else ""
    return ", ".join(shown) + more


STOCHASTIC_LAYERS = (
    keras.layers.Dropout,
    keras.layers.SpatialDropout1D,
    keras.layers.SpatialDropout2D,
    keras.layers.SpatialDropout3D,
    keras.layers.GaussianDropout,
    keras.layers.AlphaDropout,
)


def disable_stochastic_layers(model: keras.Model) -> int:
    """Zero the rate of every dropout layer inside ``model``; returns how many were changed.

    The transfer-learning recipe calls the base with ``training=False`` so that it always runs
    in inference mode. Keras 3 passes the outer call's ``training`` flag into nested models
    instead, so a backbone's own dropout (EfficientNet's drop-connect) would be active while
    the head trains. A zero rate is inference behaviour whatever the flag; frozen BatchNorm
    layers already run in inference mode.
    """
    changed = 0
    for layer in _all_layers(model):
        if isinstance(layer, STOCHASTIC_LAYERS) and layer.rate:
            layer.rate = 0.0
            changed += 1
        elif isinstance(layer, keras.layers.GaussianNoise) and layer.stddev:
            layer.stddev = 0.0
            changed += 1
    return changed


def _all_layers(model: keras.Model) -> list[keras.layers.Layer]:
    found = []
    for layer in model.layers:
        found.append(layer)
        if isinstance(layer, keras.Model):
            found += _all_layers(layer)
    return found


class BackboneCache:
    """Backbones already built in this process, reused by later trials of a sweep.

    Building ResNet50 costs seconds; a trial that reuses it gets the backbone with its initial
    weights restored (a fine-tuning trial may have changed them) and frozen again. The key is
    everything the construction depends on: the config, the seed (random weights), a weights
    file's size and modification time, and the precision policy.
    """

    def __init__(self, capacity: int = 2) -> None:
        self.capacity = capacity
        self._entries: OrderedDict[str, tuple[keras.Model, list[np.ndarray], str]] = OrderedDict()
        self._derived: dict[tuple[str, str], Any] = {}

    def holds(self, cfg: BackboneConfig, seed: int) -> bool:
        """Whether `get` would reuse a backbone instead of building one."""
        return self._key(cfg, seed) in self._entries

    def derived(self, cfg: BackboneConfig, seed: int, name: str, build: Callable[[], T]) -> T:
        """``build()``'s result, kept with the backbone for ``cfg`` (built once while that
        backbone stays cached): e.g. the symbolic graph up to pooling, so that a trial only
        adds its head instead of tracing the backbone's layers again."""
        key = (self._key(cfg, seed), name)
        if key[0] not in self._entries:
            return build()
        if key not in self._derived:
            self._derived[key] = build()
        return self._derived[key]

    def get(self, cfg: BackboneConfig, seed: int) -> tuple[keras.Model, str]:
        """The frozen backbone for ``cfg`` and the content hash of its weights."""
        key = self._key(cfg, seed)
        if key in self._entries:
            self._entries.move_to_end(key)
            backbone, weights, digest = self._entries[key]
            if backbone.trainable:  # a fine-tuning stage unfroze (and changed) it
                backbone.set_weights(weights)
                backbone.trainable = False
            return backbone, digest
        backbone = build_backbone(cfg)
        digest = weights_digest(backbone)
        if self.capacity > 0:
            self._entries[key] = (backbone, backbone.get_weights(), digest)
            while len(self._entries) > self.capacity:
                evicted, _ = self._entries.popitem(last=False)
                self._derived = {k: v for k, v in self._derived.items() if k[0] != evicted}
        return backbone, digest

    @staticmethod
    def _key(cfg: BackboneConfig, seed: int) -> str:
        weights, source = cfg.weights, None
        if weights not in (None, "imagenet"):
            stat = Path(weights).expanduser().stat()
            weights = f"{weights}:{stat.st_size}:{stat.st_mtime_ns}"
        if cfg.path:  # a saved model: the file as it is now
            stat = Path(cfg.path).expanduser().stat()
            source = f"{cfg.path}:{stat.st_size}:{stat.st_mtime_ns}"
        policy = keras.mixed_precision.global_policy().name
        return json.dumps(
            [asdict(cfg), weights, source, seed if cfg.weights is None else None, policy],
            sort_keys=True,
            default=str,
        )


def weights_digest(model: keras.Model) -> str:
    """Content hash of a model's weights, in order."""
    digest = hashlib.sha256()
    for weight in model.weights:
        value = np.ascontiguousarray(keras.ops.convert_to_numpy(weight))
        digest.update(str(value.shape).encode())
        digest.update(value.tobytes())
    return digest.hexdigest()


def _weights_argument(weights: str | None) -> str | None:
    if weights in (None, "imagenet"):
        return weights
    path = Path(weights).expanduser()
    if not path.is_file():
        raise UserError(
            f"backbone.weights={weights}: no such file; use imagenet, null, or a weights file path"
        )
    return str(path)


def _looks_like_download_failure(exc: Exception) -> bool:
    text = f"{type(exc).__name__} {exc}".lower()
    return any(
        word in text for word in ("url fetch failure", "urlopen", "connection", "resolution")
    )


def _short(exc: Exception) -> str:
    text = " ".join(str(exc).split())
    return text if len(text) <= 200 else text[:197] + "..."
