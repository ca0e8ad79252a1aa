"""The classifier: raw pixels -> preprocessing -> frozen backbone -> pooling -> head.

Named parts, so that later stages can take them apart: ``preprocess`` (built-in layers doing
the backbone's own ``preprocess_input``), the backbone (called with ``training=False``; as
Keras 3 overrides that flag inside ``fit``, its dropout is zeroed and its BatchNorm layers stay
frozen, so it runs in inference mode in every stage), ``pool`` (avg, max or flatten) and
``head`` (Dense + ReLU, Dropout, softmax: a model of its own on the pooled vector). Everything
up to ``pool`` is the feature extractor whose output the feature cache stores.

Augmentation (random flips, rotations, ...) is never part of the classifier: `training_model`
wraps it as ``image -> augment -> classifier`` for ``fit``, sharing the classifier's weights, so
the model that is evaluated, logged and served sees the images as they are.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence

import keras

from tlsweep.backbones import build_backbone, preprocess_mode, preprocessing_layers
from tlsweep.config import AugmentConfig, BackboneConfig, HeadConfig, OptimizerConfig

POOL_LAYER = "pool"
HEAD = "head"
AUGMENT = "augment"
POOLING_LAYERS = {
    "avg": keras.layers.GlobalAveragePooling2D,
    "max": keras.layers.GlobalMaxPooling2D,
    "flatten": keras.layers.Flatten,
}


Trunk = tuple[keras.KerasTensor, keras.KerasTensor]  # the image input and the pooled output


def build_classifier(
    backbone_cfg: BackboneConfig,
    head_cfg: HeadConfig,
    num_classes: int,
    backbone: keras.Model | None = None,
    trunk: Trunk | None = None,
) -> keras.Model:
    """The full raw-image model, with the backbone frozen (built here unless given). A
    ``trunk`` from `build_trunk` (same backbone and pooling) is reused as it is: only the head
    is new, which spares tracing the backbone's layers again."""
    if trunk is None:
        backbone = backbone if backbone is not None else build_backbone(backbone_cfg)
        trunk = build_trunk(backbone_cfg, head_cfg.pooling, backbone)
    inputs, pooled = trunk
    release_earlier_heads(pooled)
    head = build_head(pooled.shape[1:], head_cfg, num_classes)
    return keras.Model(inputs, head(pooled), name=f"{backbone_cfg.name}_classifier")


def release_earlier_heads(pooled: keras.KerasTensor) -> int:
    """Forget the heads that earlier trials built on a reused trunk; returns how many.

    Calling a layer on a symbolic tensor records the call on the layer that made the tensor
    (its outbound nodes), so a trunk reused across trials would keep every earlier trial's
    head, classifier, optimizer and compiled functions alive through its pooling layer: about
    24 MB per trial. Keras has no public way to drop those records; the attributes used here
    are Keras' own (checked with 3.10 to 3.15), and where they are missing nothing is done
    (tests/test_model.py fails loudly then).
    """
    history = getattr(pooled, "_keras_history", None)
    nodes = getattr(getattr(history, "operation", None), "_outbound_nodes", None)
    if not isinstance(nodes, list):
        return 0
    released = len(nodes)
    nodes.clear()
    return released


def build_trunk(backbone_cfg: BackboneConfig, pooling: str, backbone: keras.Model) -> Trunk:
    """Image input -> preprocessing -> ``backbone(training=False)`` -> pooling, symbolically."""
    size = backbone_cfg.input_size
    inputs = keras.Input((size, size, 3), name="image")
    preprocess = keras.Sequential(
        [keras.Input((size, size, 3)), *preprocessing_layers(preprocess_mode(backbone_cfg))],
        name="preprocess",
    )
    feature_map = backbone(preprocess(inputs), training=False)
    return inputs, POOLING_LAYERS[pooling](name=POOL_LAYER)(feature_map)


def build_head(
    feature_shape: Sequence[int | None], cfg: HeadConfig, num_classes: int
) -> keras.Model:
    """Dense(relu) -> Dropout -> Dense(softmax, float32) on pooled backbone features."""
    features = keras.Input(tuple(feature_shape), name="features")
    x = keras.layers.Dense(cfg.dense_units, activation="relu", name="dense")(features)
    x = keras.layers.Dropout(cfg.dropout, name="dropout")(x)
    outputs = keras.layers.Dense(
        num_classes, activation="softmax", dtype="float32", name="probabilities"
    )(x)
    return keras.Model(features, outputs, name=HEAD)


def augmentation_layers(cfg: AugmentConfig, seed: int) -> list[keras.layers.Layer]:
    """Keras' random preprocessing layers for ``cfg`` (none when it is off), each seeded from
    ``seed``. They work on raw 0-255 pixels, before the backbone's preprocessing."""
    layers: list[keras.layers.Layer] = []
    if cfg.flip:
        layers.append(keras.layers.RandomFlip(cfg.flip, seed=seed, name="random_flip"))
    if cfg.rotation:
        layers.append(
            keras.layers.RandomRotation(cfg.rotation, seed=seed + 1, name="random_rotation")
        )
    if cfg.zoom:
        layers.append(keras.layers.RandomZoom(cfg.zoom, seed=seed + 2, name="random_zoom"))
    if cfg.translation:
        layers.append(
            keras.layers.RandomTranslation(
                cfg.translation, cfg.translation, seed=seed + 3, name="random_translation"
            )
        )
    if cfg.contrast:
        layers.append(
            keras.layers.RandomContrast(
                cfg.contrast, value_range=(0, 255), seed=seed + 4, name="random_contrast"
            )
        )
    return layers


def training_model(classifier: keras.Model, cfg: AugmentConfig, seed: int) -> keras.Model:
    """What ``fit`` trains: ``classifier`` itself, or ``image -> augment -> classifier`` when
    ``cfg`` augments (the wrapper shares every weight with ``classifier``; the augmentation
    layers are active only while training)."""
    layers = augmentation_layers(cfg, seed)
    if not layers:
        return classifier
    shape = classifier.input_shape[1:]
    augment = keras.Sequential([keras.Input(shape), *layers], name=AUGMENT)
    inputs = keras.Input(shape, name="image")
    return keras.Model(inputs, classifier(augment(inputs)), name=f"{classifier.name}_augmented")


def head_of(model: keras.Model) -> keras.Model:
    """The trainable head sub-model (shares its weights with the classifier)."""
    return model.get_layer(HEAD)


def feature_extractor(model: keras.Model) -> keras.Model:
    """Raw pixels -> pooled features: the classifier's frozen part (shares its weights)."""
    return keras.Model(model.input, model.get_layer(POOL_LAYER).output, name="features")


def backbone_of(model: keras.Model) -> keras.Model:
    """The backbone sub-model of a classifier built by `build_classifier`."""
    return next(
        layer
        for layer in model.layers
        if isinstance(layer, keras.Model) and layer.name not in ("preprocess", HEAD, AUGMENT)
    )


def unfreeze_top(model: keras.Model, n_layers: int) -> int:
    """Make the top ``n_layers`` of the backbone trainable, BatchNorm excluded.

    Layers are counted inside nested models too (a custom backbone built from blocks), so
    that a BatchNorm within a block stays frozen. Returns how many layers were unfrozen. The
    caller must recompile the model.
    """
    backbone = backbone_of(model)
    backbone.trainable = True  # nested models included: their own flags are then set below
    layers = list(leaf_layers(backbone))
    candidates = [layer for layer in layers if layer.weights]
    top = candidates[-n_layers:] if n_layers else []
    for layer in layers:
        layer.trainable = layer in top and not isinstance(layer, keras.layers.BatchNormalization)
    return sum(layer.trainable for layer in top)


def leaf_layers(model: keras.Model) -> Iterator[keras.layers.Layer]:
    """The layers of ``model`` in order, with nested models replaced by their own layers."""
    for layer in model.layers:
        if isinstance(layer, keras.Model):
            yield from leaf_layers(layer)
        else:
            yield layer


def make_optimizer(cfg: OptimizerConfig, learning_rate: float | None = None) -> keras.Optimizer:
    """A fresh Keras optimizer from its config; ``learning_rate`` overrides the configured one."""
    lr = cfg.learning_rate if learning_rate is None else learning_rate
    if cfg.name == "sgd":
        return keras.optimizers.SGD(lr, momentum=cfg.momentum, nesterov=cfg.nesterov)
    if cfg.name == "rmsprop":
        return keras.optimizers.RMSprop(lr, momentum=cfg.momentum)
    if cfg.name == "adamw":
        return keras.optimizers.AdamW(lr, weight_decay=cfg.weight_decay or 0.004)
    return keras.optimizers.Adam(lr)


def compile_classifier(
    model: keras.Model, optimizer: keras.Optimizer, steps_per_execution: int = 1
) -> None:
    """Sparse categorical cross-entropy and accuracy, on integer labels.

    ``steps_per_execution`` > 1 runs several steps per call: the same updates with less
    per-step overhead, which dominates when a small head trains on in-memory features.
    """
    model.compile(
        optimizer=optimizer,
        loss="sparse_categorical_crossentropy",
        metrics=["accuracy"],
        steps_per_execution=steps_per_execution,
    )


def parameter_counts(model: keras.Model) -> dict[str, int]:
    """Trainable and total parameter counts."""
    trainable = sum(math.prod(w.shape) for w in model.trainable_weights)
    total = sum(math.prod(w.shape) for w in model.weights)
    return {"trainable_params": trainable, "total_params": total}
