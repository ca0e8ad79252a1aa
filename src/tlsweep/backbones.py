"""Backbones: a ``keras.applications`` constructor, its weights and its own preprocessing.

Preprocessing is rebuilt from Keras' built-in layers so that a saved model loads anywhere with
plain Keras (no custom objects to register). ``preprocess: auto`` finds out which of the four
known transforms a backbone's own ``preprocess_input`` performs by calling it on probe pixels.
"""

from __future__ import annotations

import hashlib
import json
import sys
import warnings
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

import keras
import numpy as np

from tlsweep.config import BackboneConfig
from tlsweep.errors import UserError

IMAGENET_MEAN_BGR = (103.939, 116.779, 123.68)
TORCH_MEAN = (0.485, 0.456, 0.406)
TORCH_STD = (0.229, 0.224, 0.225)


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
    probe = np.random.default_rng(0).uniform(0, 255, (1, 2, 2, 3)).astype("float32")
    expected = np.asarray(own_preprocess_input(cfg.architecture)(probe.copy()))
    for mode in ("caffe", "tf", "torch", "none"):
        if np.allclose(_probe(mode, probe), expected, atol=1e-4):
            return mode
    raise UserError(
        f"cannot express {cfg.architecture}'s preprocess_input with built-in layers; "
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
        flip = keras.layers.Dense(3, trainable=False, name="rgb_to_bgr_minus_mean")
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
                self._entries.popitem(last=False)
        return backbone, digest

    @staticmethod
    def _key(cfg: BackboneConfig, seed: int) -> str:
        weights = cfg.weights
        if weights not in (None, "imagenet"):
            stat = Path(weights).expanduser().stat()
            weights = f"{weights}:{stat.st_size}:{stat.st_mtime_ns}"
        policy = keras.mixed_precision.global_policy().name
        return json.dumps(
            [asdict(cfg), weights, seed if cfg.weights is None else None, policy],
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
