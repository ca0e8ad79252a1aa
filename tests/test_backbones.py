"""Backbones: each one's own preprocessing, weights (offline ImageNet, local file), errors."""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import keras
import numpy as np
import pytest
from keras.applications import imagenet_utils

from tlsweep.backbones import (
    BackboneCache,
    build_backbone,
    preprocess_mode,
    preprocessing_layers,
)
from tlsweep.config import BackboneConfig, Config, group_choices, load_config
from tlsweep.errors import UserError
from tlsweep.model import build_classifier, build_trunk

# Each architecture's own preprocess_input, named here independently of tlsweep's lookup.
PREPROCESS_INPUT = {
    "ConvNeXtTiny": keras.applications.convnext.preprocess_input,
    "DenseNet121": keras.applications.densenet.preprocess_input,
    "EfficientNetB0": keras.applications.efficientnet.preprocess_input,
    "EfficientNetV2B0": keras.applications.efficientnet_v2.preprocess_input,
    "InceptionResNetV2": keras.applications.inception_resnet_v2.preprocess_input,
    "InceptionV3": keras.applications.inception_v3.preprocess_input,
    "MobileNetV2": keras.applications.mobilenet_v2.preprocess_input,
    "MobileNetV3Small": keras.applications.mobilenet_v3.preprocess_input,
    "ResNet50": keras.applications.resnet50.preprocess_input,
    "ResNet101": keras.applications.resnet.preprocess_input,
    "ResNet50V2": keras.applications.resnet_v2.preprocess_input,
    "VGG16": keras.applications.vgg16.preprocess_input,
    "VGG19": keras.applications.vgg19.preprocess_input,
    "Xception": keras.applications.xception.preprocess_input,
}


def _pixels(seed: int = 123) -> np.ndarray:
    return np.random.default_rng(seed).uniform(0, 255, (4, 9, 7, 3)).astype("float32")


def _apply(layers: list[keras.layers.Layer], images: np.ndarray) -> np.ndarray:
    x = images
    for layer in layers:
        x = layer(x)
    return np.asarray(keras.ops.convert_to_numpy(x))


def _tiny_mobilenet(alpha: float = 0.35) -> keras.Model:
    return keras.applications.MobileNetV2(
        input_shape=(32, 32, 3), alpha=alpha, include_top=False, weights=None
    )


@pytest.mark.parametrize("name", [n for n in group_choices("backbone") if n != "custom"])
def test_preprocessing_matches_the_backbones_own(name: str) -> None:
    cfg = load_config([f"backbone={name}"]).backbone
    assert cfg.preprocess == "auto"
    own = PREPROCESS_INPUT.get(cfg.architecture)
    assert own is not None, f"add {cfg.architecture}'s preprocess_input to PREPROCESS_INPUT"
    pixels = _pixels()
    expected = np.asarray(own(pixels.copy()))
    got = _apply(preprocessing_layers(preprocess_mode(cfg)), pixels)
    assert got.shape == pixels.shape
    assert np.allclose(got, expected, atol=1e-3), f"{name}: max diff {abs(got - expected).max()}"


@pytest.mark.parametrize("mode", ["caffe", "tf", "torch"])
def test_each_mode_matches_imagenet_utils(mode: str) -> None:
    pixels = _pixels(7)
    expected = imagenet_utils.preprocess_input(pixels.copy(), mode=mode)
    assert np.allclose(_apply(preprocessing_layers(mode), pixels), expected, atol=1e-3)


@pytest.mark.parametrize("mode", ["caffe", "tf", "torch", "none"])
def test_preprocessing_layers_draw_no_seeded_random_numbers(mode: str) -> None:
    """Probing ``auto`` happens once per process (memoized): had it drawn from the seeded
    generator, a run's initial weights would depend on whether an earlier run probed."""
    keras.utils.set_random_seed(0)
    expected = keras.ops.convert_to_numpy(keras.random.uniform((4,)))
    keras.utils.set_random_seed(0)
    _apply(preprocessing_layers(mode), _pixels(3))
    np.testing.assert_array_equal(keras.ops.convert_to_numpy(keras.random.uniform((4,))), expected)


def test_none_mode_is_identity_and_explicit_mode_wins() -> None:
    pixels = _pixels(8)
    assert preprocessing_layers("none") == []
    cfg = load_config(["backbone=resnet50", "backbone.preprocess=tf"]).backbone
    assert preprocess_mode(cfg) == "tf"
    assert np.allclose(_apply(preprocessing_layers("tf"), pixels), pixels / 127.5 - 1, atol=1e-5)
    with pytest.raises(UserError, match=r"backbone\.preprocess"):
        preprocessing_layers("zscore")


def test_imagenet_weights_offline_is_a_user_error(
    make_config: Callable[..., Config], offline: Path
) -> None:
    cfg = make_config("backbone.weights=imagenet").backbone
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with pytest.raises(UserError) as info:
            build_backbone(cfg)
    message = str(info.value)
    assert "MobileNetV2" in message
    assert "backbone.weights=null" in message
    assert "backbone.weights=/path/to/" in message  # or a local weights file
    assert "\n" not in message
    assert not [w for w in caught if "input_shape" in str(w.message)]
    assert not [p for p in offline.rglob("*.h5") if p.stat().st_size]


def test_local_weights_file_is_loaded(make_config: Callable[..., Config], tmp_path: Path) -> None:
    reference = _tiny_mobilenet()
    # shifted away from any fresh initialisation, so equality can only come from the file
    reference.set_weights([w + 0.5 for w in reference.get_weights()])
    path = tmp_path / "x.weights.h5"
    reference.save_weights(path)
    backbone = build_backbone(make_config(f"backbone.weights={path}").backbone)
    loaded = backbone.get_weights()
    assert len(loaded) == len(reference.get_weights())
    for got, want in zip(loaded, reference.get_weights(), strict=True):
        np.testing.assert_array_equal(got, want)
    assert backbone.trainable is False
    assert backbone.trainable_weights == []


@pytest.mark.filterwarnings("ignore:Skipping nested container:UserWarning")
def test_weights_file_of_another_network_is_a_user_error(
    make_config: Callable[..., Config], tmp_path: Path
) -> None:
    path = tmp_path / "wider.weights.h5"
    _tiny_mobilenet(alpha=0.5).save_weights(path)
    with pytest.raises(UserError, match="does not fit") as info:
        build_backbone(make_config(f"backbone.weights={path}").backbone)
    assert str(path) in str(info.value)


def test_random_weights_backbone_is_frozen_and_headless(
    make_config: Callable[..., Config],
) -> None:
    backbone = build_backbone(make_config().backbone)
    assert backbone.trainable is False
    assert backbone.trainable_weights == []
    assert backbone.output.shape == (None, 1, 1, 1280)  # no classifier top


@pytest.mark.parametrize("architecture", ["ResNet9000", "resnet50", "preprocess_input"])
def test_unknown_architecture_is_a_user_error(architecture: str) -> None:
    cfg = replace(BackboneConfig(), architecture=architecture, weights=None, input_size=32)
    with pytest.raises(UserError, match=f"backbone.architecture={architecture}") as info:
        build_backbone(cfg)
    assert "ResNet50" in str(info.value)  # the known ones are listed
    with pytest.raises(UserError):
        preprocess_mode(cfg)


def test_backbone_runs_in_inference_mode_even_when_keras_passes_training_true(
    make_config: Callable[..., Config],
) -> None:
    """Keras 3 overrides a nested ``training=False`` inside fit; EfficientNet's drop-connect
    must still be inactive, or the cached and end-to-end paths would train differently."""
    import keras

    from tlsweep.backbones import STOCHASTIC_LAYERS, _all_layers
    from tlsweep.model import build_classifier

    cfg = make_config("backbone=efficientnet_b0", "~backbone.options.alpha")
    stock = keras.applications.EfficientNetB0(
        include_top=False, weights=None, input_shape=(32, 32, 3)
    )
    assert any(isinstance(layer, STOCHASTIC_LAYERS) and layer.rate for layer in _all_layers(stock))
    model = build_classifier(cfg.backbone, cfg.head, num_classes=3)
    stochastic = [layer for layer in _all_layers(model) if isinstance(layer, STOCHASTIC_LAYERS)]
    assert all(layer.rate == 0 for layer in stochastic if layer.name != "dropout")
    images = np.random.default_rng(0).uniform(0, 255, (4, 32, 32, 3)).astype("float32")
    backbone_only = keras.Model(model.inputs, model.get_layer("pool").output)
    np.testing.assert_array_equal(
        np.asarray(backbone_only(images, training=True)),
        np.asarray(backbone_only(images, training=False)),
    )


# --- backbone=custom -------------------------------------------------------------------------

CUSTOM = ("backbone=custom", "backbone.preprocess=tf", "backbone.input_size=32")


def _custom(*overrides: str) -> BackboneConfig:
    return load_config([*CUSTOM, *overrides]).backbone


@pytest.fixture
def saved_convnet(tmp_path: Path) -> Path:
    from custom_backbones import save_tiny_convnet

    return save_tiny_convnet(tmp_path / "convnet.keras")


def test_saved_model_is_cut_at_its_last_feature_map(saved_convnet: Path) -> None:
    backbone = build_backbone(_custom(f"backbone.path={saved_convnet}"))
    assert backbone.name == "custom_backbone"
    assert backbone.layers[-1].name == "conv_b"  # not gap, not top: their outputs are 2-D
    assert backbone.output.shape == (None, None, None, 8)  # the saved model's input: any size
    assert backbone(np.zeros((1, 32, 32, 3), "float32")).shape == (1, 7, 7, 8)
    assert backbone.trainable is False
    assert backbone.trainable_weights == []
    saved = keras.saving.load_model(saved_convnet)
    for name in ("conv_a", "conv_b"):
        for got, want in zip(
            backbone.get_layer(name).get_weights(), saved.get_layer(name).get_weights(), strict=True
        ):
            np.testing.assert_array_equal(got, want)


def test_saved_model_is_cut_at_a_named_layer(saved_convnet: Path) -> None:
    cfg = _custom(f"backbone.path={saved_convnet}", "backbone.cut_layer=conv_a")
    backbone = build_backbone(cfg)
    assert [layer.name for layer in backbone.layers[1:]] == ["conv_a"]
    assert backbone(np.zeros((1, 32, 32, 3), "float32")).shape == (1, 15, 15, 4)


def test_unknown_cut_layer_lists_the_feature_maps(saved_convnet: Path) -> None:
    cfg = _custom(f"backbone.path={saved_convnet}", "backbone.cut_layer=conv_z")
    with pytest.raises(UserError, match=r"backbone\.cut_layer=conv_z") as info:
        build_backbone(cfg)
    assert "conv_a, conv_b" in str(info.value)
    with pytest.raises(UserError, match="not a 4-D feature map") as info:
        build_backbone(replace(cfg, cut_layer="gap"))
    assert "conv_a, conv_b" in str(info.value)


def test_saved_model_of_another_input_size_is_a_user_error(tmp_path: Path) -> None:
    from custom_backbones import save_tiny_convnet

    path = save_tiny_convnet(tmp_path / "fixed.keras", input_shape=(48, 48, 3))
    with pytest.raises(UserError, match=r"\(48, 48, 3\).*backbone.input_size"):
        build_backbone(_custom(f"backbone.path={path}"))
    assert build_backbone(_custom(f"backbone.path={path}", "backbone.input_size=48")).built


def test_unloadable_file_is_a_user_error(tmp_path: Path) -> None:
    path = tmp_path / "broken.keras"
    path.write_bytes(b"not a zip")
    with pytest.raises(UserError, match="cannot load it with Keras"):
        build_backbone(_custom(f"backbone.path={path}"))


@pytest.mark.parametrize(
    "target", ["custom_backbones:tiny_convnet", "custom_backbones.tiny_convnet"]
)
def test_target_callable_builds_a_seeded_backbone(target: str) -> None:
    cfg = _custom(f"backbone._target_={target}", "+backbone.options.width=2")
    keras.utils.set_random_seed(3)
    first = build_backbone(cfg)
    keras.utils.set_random_seed(3)
    again = build_backbone(cfg)
    assert first.output.shape == (None, 7, 7, 4)  # width 2: conv_b has 4 channels
    assert first.trainable_weights == []
    for a, b in zip(first.get_weights(), again.get_weights(), strict=True):
        np.testing.assert_array_equal(a, b)


def test_shipped_example_target() -> None:
    backbone = build_backbone(_custom("backbone._target_=tlsweep.backbones:small_cnn"))
    assert backbone.output.shape == (None, 8, 8, 64)


@pytest.mark.parametrize(
    ("target", "fragments"),
    [
        ("no_such_module_xyz:net", ["cannot import no_such_module_xyz", "PYTHONPATH"]),
        ("custom_backbones:missing", ["custom_backbones has no missing", "tiny_convnet"]),
        ("custom_backbones:not_a_model", ["returned a str", "keras.Model"]),
        ("justaname", ["package.module:function"]),
    ],
)
def test_bad_target_is_a_user_error(target: str, fragments: list[str]) -> None:
    with pytest.raises(UserError) as info:
        build_backbone(_custom(f"backbone._target_={target}"))
    message = str(info.value)
    assert f"backbone._target_={target}" in message
    for fragment in fragments:
        assert fragment in message, message


def test_target_options_that_do_not_fit_are_a_user_error() -> None:
    cfg = _custom("backbone._target_=custom_backbones:tiny_convnet", "+backbone.options.depth=3")
    with pytest.raises(UserError, match=r"depth=3.*failed"):
        build_backbone(cfg)


def test_custom_preprocessing_must_be_declared(saved_convnet: Path) -> None:
    cfg = replace(_custom(f"backbone.path={saved_convnet}"), preprocess="auto")
    with pytest.raises(UserError, match="auto is not allowed for backbone=custom"):
        preprocess_mode(cfg)
    assert preprocess_mode(replace(cfg, preprocess="torch")) == "torch"


def test_custom_source_identity(saved_convnet: Path) -> None:
    import hashlib

    from tlsweep.backbones import custom_source_identity

    cfg = _custom(f"backbone.path={saved_convnet}")
    identity = custom_source_identity(cfg, seed=1)
    assert identity["keras_sha256"] == hashlib.sha256(saved_convnet.read_bytes()).hexdigest()
    assert custom_source_identity(cfg, seed=2) == identity  # the file holds the weights
    target = _custom("backbone._target_=custom_backbones:tiny_convnet")
    assert custom_source_identity(target, seed=1) == {
        "cut_layer": None,
        "target": "custom_backbones:tiny_convnet",
        "seed": 1,
    }
    assert custom_source_identity(target, seed=2)["seed"] == 2


def test_custom_backbone_feature_cache_key(saved_convnet: Path, tmp_path: Path) -> None:
    from custom_backbones import save_tiny_convnet
    from tlsweep.features import extractor_identity

    def identity(*overrides: str, seed: int = 42) -> dict:
        cfg = load_config([*CUSTOM, *overrides, f"seed={seed}"])
        return extractor_identity(cfg, None, np.dtype("float32"), weights_sha256="same")

    by_path = identity(f"backbone.path={saved_convnet}")
    assert by_path == identity(f"backbone.path={saved_convnet}", seed=7)
    other = save_tiny_convnet(tmp_path / "other.keras", width=3)
    assert identity(f"backbone.path={other}") != by_path  # another file's content
    assert identity(f"backbone.path={saved_convnet}", "backbone.cut_layer=conv_a") != by_path
    target = "backbone._target_=custom_backbones:tiny_convnet"
    assert identity(target) != identity(target, seed=7)  # a random init: the seed counts
    resnet = extractor_identity(
        load_config(["backbone.weights=null"]), None, np.dtype("float32"), weights_sha256="same"
    )
    assert "custom" not in resnet  # the other backbones' keys are unchanged


# --- BackboneCache: reuse across trials ----------------------------------------------------------


def test_backbone_cache_reuses_and_restores_a_fine_tuned_backbone(
    make_config: Callable[..., Config],
) -> None:
    cfg = make_config()
    cache = BackboneCache(capacity=1)
    assert not cache.holds(cfg.backbone, cfg.seed)
    backbone, digest = cache.get(cfg.backbone, cfg.seed)
    assert cache.holds(cfg.backbone, cfg.seed)
    first = keras.ops.convert_to_numpy(backbone.weights[0]).copy()
    backbone.trainable = True  # as a fine-tuning stage leaves it
    backbone.weights[0].assign(first + 1.0)

    again, again_digest = cache.get(cfg.backbone, cfg.seed)

    assert again is backbone and again_digest == digest
    assert not again.trainable
    np.testing.assert_array_equal(keras.ops.convert_to_numpy(again.weights[0]), first)
    other, _ = cache.get(cfg.backbone, cfg.seed + 1)  # another random init: built anew
    assert other is not backbone
    assert not cache.holds(cfg.backbone, cfg.seed)  # evicted (capacity 1)


def test_backbone_cache_keeps_derived_graphs_while_the_backbone_is_cached(
    make_config: Callable[..., Config],
) -> None:
    cfg = make_config()
    cache = BackboneCache(capacity=1)
    cache.get(cfg.backbone, cfg.seed)
    builds: list[int] = []

    def build() -> int:
        builds.append(1)
        return len(builds)

    assert cache.derived(cfg.backbone, cfg.seed, "trunk:avg", build) == 1
    assert cache.derived(cfg.backbone, cfg.seed, "trunk:avg", build) == 1  # kept
    assert cache.derived(cfg.backbone, cfg.seed, "trunk:max", build) == 2  # another name
    cache.get(cfg.backbone, cfg.seed + 1)  # evicts the first backbone, and what it derived
    cache.get(cfg.backbone, cfg.seed)
    assert cache.derived(cfg.backbone, cfg.seed, "trunk:avg", build) == 3
    uncached = BackboneCache(capacity=0)
    assert uncached.derived(cfg.backbone, cfg.seed, "trunk:avg", build) == 4  # nothing kept
    assert uncached.derived(cfg.backbone, cfg.seed, "trunk:avg", build) == 5


def test_classifiers_sharing_a_trunk_match_one_built_alone(
    make_config: Callable[..., Config],
) -> None:
    """A trial's classifier on the cached trunk computes what a freshly built one does."""
    cfg = make_config()
    backbone = build_backbone(cfg.backbone)
    trunk = build_trunk(cfg.backbone, cfg.head.pooling, backbone)
    first = build_classifier(cfg.backbone, cfg.head, 3, trunk=trunk)
    second = build_classifier(cfg.backbone, cfg.head, 3, trunk=trunk)
    alone = build_classifier(cfg.backbone, cfg.head, 3, backbone=backbone)
    alone.get_layer("head").set_weights(second.get_layer("head").get_weights())
    images = np.random.default_rng(0).uniform(0, 255, (4, 32, 32, 3)).astype("float32")
    np.testing.assert_allclose(second.predict(images, verbose=0), alone.predict(images, verbose=0))
    assert [layer.name for layer in second.layers] == [layer.name for layer in alone.layers]
    assert first.get_layer("head") is not second.get_layer("head")
