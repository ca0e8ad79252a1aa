"""Backbones for ``backbone=custom`` tests: small models a test saves or names as ``_target_``.

Importable by tests as ``custom_backbones`` (pytest puts ``tests/`` on ``sys.path``).
"""

from __future__ import annotations

from pathlib import Path

import keras


def tiny_convnet(
    input_shape: tuple[int, int, int] = (None, None, 3), width: int = 4, classes: int = 3
) -> keras.Model:
    """Conv2D -> Conv2D -> GlobalAveragePooling -> Dense: a "pretrained" model with a top."""
    inputs = keras.Input(input_shape)
    x = keras.layers.Conv2D(width, 3, strides=2, activation="relu", name="conv_a")(inputs)
    x = keras.layers.Conv2D(2 * width, 3, strides=2, activation="relu", name="conv_b")(x)
    x = keras.layers.GlobalAveragePooling2D(name="gap")(x)
    outputs = keras.layers.Dense(classes, activation="softmax", name="top")(x)
    return keras.Model(inputs, outputs, name="tiny_convnet")


def save_tiny_convnet(path: Path, **kwargs: object) -> Path:
    """``tiny_convnet`` with shifted (recognisable) weights, saved as ``path`` (.keras)."""
    model = tiny_convnet(**kwargs)
    model.set_weights([w + 0.05 for w in model.get_weights()])
    model.save(path)
    return path


def not_a_model(input_shape: tuple[int, int, int]) -> str:
    return f"not a model {input_shape}"


def blocks_convnet(
    input_shape: tuple[int, int, int] = (None, None, 3), tail: bool = False
) -> keras.Model:
    """A stem, then a nested block model (Conv2D -> BatchNormalization), then with ``tail`` a
    ReLU: fine-tuning its top layers must reach inside the block and still leave the
    BatchNorm frozen."""
    block_in = keras.Input((None, None, 4))
    y = keras.layers.Conv2D(4, 3, padding="same", name="block_conv")(block_in)
    y = keras.layers.BatchNormalization(name="block_bn")(y)
    block = keras.Model(block_in, y, name="block")
    inputs = keras.Input(input_shape)
    x = keras.layers.Conv2D(4, 3, strides=2, name="stem")(inputs)
    x = block(x)
    if tail:
        x = keras.layers.ReLU(name="tail")(x)
    return keras.Model(inputs, x, name="blocks_convnet")


LEAKED_URL = "postgresql://tlsweep:s3cret-pw@db.example:5432/optuna"


def leaks_a_password(input_shape: tuple[int, int, int], **options: object) -> keras.Model:
    """Fails the way a database client does: quoting a URL with its password."""
    raise ConnectionError(f"could not connect to {LEAKED_URL}: timeout")
