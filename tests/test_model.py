"""The classifier: raw pixels -> preprocess -> frozen backbone -> pooling -> head; optimizers."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import keras
import numpy as np
import pytest

from tlsweep.config import Config, load_config
from tlsweep.errors import UserError
from tlsweep.model import (
    augmentation_layers,
    backbone_of,
    build_classifier,
    build_trunk,
    head_of,
    make_optimizer,
    parameter_counts,
    training_model,
    unfreeze_top,
)

pytestmark = pytest.mark.backend  # runs on every Keras backend in CI

NUM_CLASSES = 10
FEATURES = 1280  # MobileNetV2's last feature map has 1280 channels at any alpha < 1


def _build(cfg: Config, num_classes: int = NUM_CLASSES) -> keras.Model:
    return build_classifier(cfg.backbone, cfg.head, num_classes)


def _walk(model: keras.Model) -> Iterator[keras.layers.Layer]:
    """Every layer, descending into nested models."""
    for layer in model.layers:
        yield layer
        if isinstance(layer, keras.Model):
            yield from _walk(layer)


def _head_layers(model: keras.Model) -> list[keras.layers.Layer]:
    """The layers outside the backbone (and its preprocessing)."""
    backbone = backbone_of(model)
    inside = {id(layer) for layer in _walk(backbone)}
    return [layer for layer in _walk(model) if id(layer) not in inside and layer is not backbone]


def _images(n: int = 6, size: int = 32) -> np.ndarray:
    return np.random.default_rng(0).uniform(0, 255, (n, size, size, 3)).astype("float32")


@pytest.fixture(scope="module")
def classifier(make_shared_config: Callable[..., Config]) -> keras.Model:
    return _build(make_shared_config("head.dropout=0.25"))


def test_raw_pixels_in_probabilities_out(classifier: keras.Model) -> None:
    assert classifier.input_shape == (None, 32, 32, 3)
    assert classifier.output_shape == (None, NUM_CLASSES)
    probabilities = np.asarray(classifier.predict(_images(), verbose=0))
    assert probabilities.dtype == np.float32
    assert np.allclose(probabilities.sum(axis=1), 1.0, atol=1e-5)
    assert (probabilities >= 0).all()


def test_preprocessing_is_part_of_the_model(classifier: keras.Model) -> None:
    preprocess = classifier.get_layer("preprocess")
    rescaling = [layer for layer in _walk(preprocess) if isinstance(layer, keras.layers.Rescaling)]
    assert len(rescaling) == 1  # MobileNetV2's own preprocess_input: x / 127.5 - 1
    pixels = _images(2)
    out = np.asarray(preprocess(pixels))
    np.testing.assert_allclose(out, pixels / 127.5 - 1.0, atol=1e-5)


def test_backbone_is_frozen(classifier: keras.Model) -> None:
    backbone = backbone_of(classifier)
    assert backbone.trainable is False
    assert backbone.weights
    assert backbone.trainable_weights == []
    assert not any(layer.trainable for layer in backbone.layers if layer.weights)
    head_weights = {id(w) for layer in _head_layers(classifier) for w in layer.weights}
    assert {id(w) for w in classifier.trainable_weights} == head_weights
    counts = parameter_counts(classifier)
    units = 16
    assert counts["trainable_params"] == FEATURES * units + units + units * NUM_CLASSES + 10
    assert counts["total_params"] == classifier.count_params()


def test_backbone_is_called_with_training_false(classifier: keras.Model) -> None:
    backbone = backbone_of(classifier)
    (entry,) = [e for e in classifier.get_config()["layers"] if e["name"] == backbone.name]
    calls = entry["inbound_nodes"]
    assert calls
    assert all(call["kwargs"].get("training") is False for call in calls)


def test_frozen_backbone_is_in_inference_mode_while_training(
    make_config: Callable[..., Config],
) -> None:
    model = _build(make_config("head.dropout=0.0"))
    images = _images(8)
    in_training = np.asarray(model(images, training=True))
    in_inference = np.asarray(model(images, training=False))
    np.testing.assert_allclose(in_training, in_inference, rtol=1e-5, atol=1e-7)


def test_head_layers(classifier: keras.Model) -> None:
    head = _head_layers(classifier)
    dense = [layer for layer in head if isinstance(layer, keras.layers.Dense)]
    assert len(dense) == 2
    hidden, output = dense
    assert hidden.units == 16
    assert hidden.activation is keras.activations.relu
    dropout = [layer for layer in head if isinstance(layer, keras.layers.Dropout)]
    assert [layer.rate for layer in dropout] == [0.25]
    assert output.units == NUM_CLASSES
    assert output.activation is keras.activations.softmax


@pytest.mark.parametrize(
    ("pooling", "layer_type", "features"),
    [
        ("avg", keras.layers.GlobalAveragePooling2D, FEATURES),
        ("max", keras.layers.GlobalMaxPooling2D, FEATURES),
        ("flatten", keras.layers.Flatten, 2 * 2 * FEATURES),
    ],
)
def test_pooling(
    make_config: Callable[..., Config], pooling: str, layer_type: type, features: int
) -> None:
    # 64x64 input: a 2x2 feature map, so that flatten differs from global pooling
    model = _build(make_config(f"head.pooling={pooling}", "backbone.input_size=64"), 3)
    head = _head_layers(model)
    pools = [layer for layer in head if isinstance(layer, (keras.layers.Flatten, layer_type))]
    assert [type(layer) for layer in pools] == [layer_type]
    hidden = next(layer for layer in head if isinstance(layer, keras.layers.Dense))
    assert hidden.kernel.shape == (features, 16)
    assert model.output_shape == (None, 3)


def test_output_is_float32_under_mixed_precision(make_config: Callable[..., Config]) -> None:
    cfg = make_config()
    previous = keras.mixed_precision.global_policy().name
    keras.mixed_precision.set_global_policy("mixed_float16")
    try:
        model = _build(cfg)
        hidden = next(x for x in _head_layers(model) if isinstance(x, keras.layers.Dense))
        assert hidden.compute_dtype == "float16"  # the policy did apply
        assert model.output.dtype == "float32"
        probabilities = np.asarray(model.predict(_images(4), verbose=0))
        assert probabilities.dtype == np.float32
        assert np.allclose(probabilities.sum(axis=1), 1.0, atol=1e-3)
    finally:
        keras.mixed_precision.set_global_policy(previous)
    assert keras.mixed_precision.global_policy().name == "float32"


def test_unfreeze_top_keeps_batchnorm_frozen(make_config: Callable[..., Config]) -> None:
    model = _build(make_config())
    before = parameter_counts(model)["trainable_params"]
    unfrozen = unfreeze_top(model, 12)
    backbone = backbone_of(model)
    weighted = [layer for layer in backbone.layers if layer.weights]
    top = weighted[-12:]
    batchnorm = [
        layer for layer in backbone.layers if isinstance(layer, keras.layers.BatchNormalization)
    ]
    assert batchnorm and any(layer in top for layer in batchnorm)
    assert not any(layer.trainable for layer in batchnorm)
    assert not any(layer.trainable for layer in weighted[:-12])
    expected = [layer for layer in top if not isinstance(layer, keras.layers.BatchNormalization)]
    assert [layer for layer in weighted if layer.trainable] == expected
    assert unfrozen == len(expected) > 0
    gained = sum(int(np.prod(w.shape)) for layer in expected for w in layer.trainable_weights)
    assert parameter_counts(model)["trainable_params"] == before + gained
    # BatchNorm contributes no trainable weight (gamma/beta stay fixed)
    bn_weights = {id(w) for layer in batchnorm for w in layer.weights}
    assert not bn_weights & {id(w) for w in model.trainable_weights}


def test_unfreeze_top_reaches_into_nested_blocks_and_skips_their_batchnorm(
    make_config: Callable[..., Config],
) -> None:
    cfg = make_config(
        "backbone=custom",
        "backbone._target_=custom_backbones:blocks_convnet",
        "backbone.preprocess=tf",
        "~backbone.options.alpha",
    )
    model = _build(cfg)
    block = backbone_of(model).get_layer("block")
    conv, bn = block.get_layer("block_conv"), block.get_layer("block_bn")
    assert unfreeze_top(model, 2) == 1  # the block's two weighted layers: conv, BatchNorm
    assert conv.trainable and not bn.trainable
    trainable = {id(w) for w in model.trainable_weights}
    assert {id(w) for w in conv.weights} <= trainable
    assert not {id(w) for w in bn.weights} & trainable
    assert not backbone_of(model).get_layer("stem").trainable


def test_a_cut_at_a_nested_model_inside_the_network_is_a_user_error(
    make_config: Callable[..., Config],
) -> None:
    custom = (
        "backbone=custom",
        "backbone._target_=custom_backbones:blocks_convnet",
        "backbone.preprocess=tf",
        "~backbone.options.alpha",
        "+backbone.options.tail=true",
    )
    with pytest.raises(UserError, match="cannot cut at 'block', a nested model"):
        _build(make_config(*custom, "backbone.cut_layer=block"))
    backbone = backbone_of(_build(make_config(*custom)))  # by default: at the tail
    assert backbone.layers[-1].name == "tail" and backbone.get_layer("block")


def test_unfreeze_nothing(make_config: Callable[..., Config]) -> None:
    model = _build(make_config())
    before = parameter_counts(model)["trainable_params"]
    assert unfreeze_top(model, 0) == 0
    assert parameter_counts(model)["trainable_params"] == before


def _lr(optimizer: keras.Optimizer) -> float:
    return float(keras.ops.convert_to_numpy(optimizer.learning_rate))


@pytest.mark.parametrize(
    ("name", "kind"),
    [
        ("adam", keras.optimizers.Adam),
        ("sgd", keras.optimizers.SGD),
        ("rmsprop", keras.optimizers.RMSprop),
        ("adamw", keras.optimizers.AdamW),
    ],
)
def test_make_optimizer(name: str, kind: type) -> None:
    cfg = load_config([f"optimizer={name}", "optimizer.learning_rate=0.02"]).optimizer
    optimizer = make_optimizer(cfg)
    assert type(optimizer) is kind
    assert _lr(optimizer) == pytest.approx(0.02)
    assert _lr(make_optimizer(cfg, learning_rate=1e-5)) == pytest.approx(1e-5)


def test_sgd_momentum_and_nesterov() -> None:
    cfg = load_config(["optimizer=sgd"]).optimizer
    optimizer = make_optimizer(cfg)
    assert optimizer.momentum == pytest.approx(0.9)
    assert optimizer.nesterov is False
    nesterov = make_optimizer(
        load_config(
            ["optimizer=sgd", "optimizer.momentum=0.5", "optimizer.nesterov=true"]
        ).optimizer
    )
    assert nesterov.momentum == pytest.approx(0.5)
    assert nesterov.nesterov is True


def test_adamw_weight_decay_and_rmsprop_momentum() -> None:
    adamw = make_optimizer(load_config(["optimizer=adamw"]).optimizer)
    assert adamw.weight_decay == pytest.approx(1e-4)
    rmsprop = make_optimizer(load_config(["optimizer=rmsprop", "optimizer.momentum=0.3"]).optimizer)
    assert rmsprop.momentum == pytest.approx(0.3)


# --- custom backbones and augmentation -------------------------------------------------------


@pytest.mark.parametrize("pooling", ["avg", "flatten"])
def test_custom_backbone_classifier_saves_and_reloads(
    make_config: Callable[..., Config], tmp_path, pooling: str
) -> None:
    from custom_backbones import save_tiny_convnet

    path = save_tiny_convnet(tmp_path / "convnet.keras")
    cfg = make_config(
        "backbone=custom",
        f"backbone.path={path}",
        "backbone.preprocess=tf",
        "~backbone.options.alpha",
        f"head.pooling={pooling}",
    )
    model = _build(cfg)
    assert backbone_of(model).name == "custom_backbone"
    assert model.get_layer("pool").output.shape == (None, 8 if pooling == "avg" else 7 * 7 * 8)
    images = _images()
    expected = np.asarray(model.predict(images, verbose=0))
    model.save(tmp_path / "classifier.keras")
    path.unlink()  # the saved classifier holds the backbone: no need for its file
    reloaded = keras.saving.load_model(tmp_path / "classifier.keras")
    np.testing.assert_allclose(reloaded.predict(images, verbose=0), expected, rtol=1e-5)


def _augmenting(make_config: Callable[..., Config], *overrides: str) -> Config:
    return make_config(
        "backbone=custom",
        "backbone._target_=custom_backbones:tiny_convnet",
        "backbone.preprocess=tf",
        "~backbone.options.alpha",
        *overrides,
    )


def test_augmentation_is_in_the_training_model_only(make_config: Callable[..., Config]) -> None:
    cfg = _augmenting(make_config, "augment=strong")
    classifier = _build(cfg)
    trained = training_model(classifier, cfg.augment, cfg.seed)
    augment = trained.get_layer("augment")
    kinds = [type(layer) for layer in augment.layers]
    assert kinds == [
        keras.layers.RandomFlip,
        keras.layers.RandomRotation,
        keras.layers.RandomZoom,
        keras.layers.RandomTranslation,
        keras.layers.RandomContrast,
    ]
    assert trained.get_layer(classifier.name) is classifier  # shared weights
    assert [id(w) for w in trained.trainable_weights] == [
        id(w) for w in classifier.trainable_weights
    ]
    random_layers = tuple(kinds)
    assert not any(isinstance(layer, random_layers) for layer in _walk(classifier))
    images = _images()
    # inactive outside training: the same predictions as the classifier's
    np.testing.assert_allclose(
        trained.predict(images, verbose=0), classifier.predict(images, verbose=0), rtol=1e-5
    )
    changed = np.asarray(augment(images, training=True))
    assert changed.shape == images.shape
    assert not np.allclose(changed, images)


def test_augmentation_layers_follow_the_config(make_config: Callable[..., Config]) -> None:
    cfg = _augmenting(make_config, "augment.flip=vertical", "augment.contrast=0.2").augment
    layers = augmentation_layers(cfg, seed=5)
    assert [type(layer) for layer in layers] == [
        keras.layers.RandomFlip,
        keras.layers.RandomContrast,
    ]
    assert layers[0].mode == "vertical"
    assert [layer.seed for layer in layers] == [5, 9]  # seeded from cfg.seed
    assert augmentation_layers(_augmenting(make_config).augment, seed=5) == []


def test_no_augmentation_trains_the_classifier_itself(make_config: Callable[..., Config]) -> None:
    cfg = _augmenting(make_config)
    classifier = _build(cfg)
    assert training_model(classifier, cfg.augment, cfg.seed) is classifier


def test_classifiers_on_a_reused_trunk_let_earlier_ones_go(
    make_config: Callable[..., Config],
) -> None:
    """A sweep builds every trial's head on one symbolic trunk; an earlier trial's head (and
    the training functions compiled on it) must not stay reachable through the trunk."""
    import gc
    import weakref

    cfg = make_config()
    trunk = build_trunk(
        cfg.backbone, cfg.head.pooling, backbone_of(build_classifier(cfg.backbone, cfg.head, 3))
    )
    earlier = build_classifier(cfg.backbone, cfg.head, 3, trunk=trunk)
    earlier_head = weakref.ref(head_of(earlier))  # what a cached trial compiles and fits
    del earlier
    latest = build_classifier(cfg.backbone, cfg.head, 3, trunk=trunk)
    gc.collect()
    assert earlier_head() is None
    assert latest.predict(np.zeros((1, 32, 32, 3), "float32"), verbose=0).shape == (1, 3)
