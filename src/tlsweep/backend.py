"""Everything that differs between Keras backends and devices, in one place.

The model, training and data code is plain Keras 3 and NumPy; what it cannot say portably
lives here: seeding and deterministic ops, GPU memory (TensorFlow's memory growth, JAX's
preallocation, shared by several processes on one GPU), mixed precision, which packages a
logged model needs, and peak device memory. Keras is imported inside the functions, so
that reading this module loads no backend.

Environment variables must be set before the backend initialises its devices:
`prepare_process` does it for this process (the CLI calls it first), `worker_environment`
for worker processes sharing a GPU.
"""

from __future__ import annotations

import contextlib
import os
import random
from collections.abc import Mapping
from typing import Any

import numpy as np

BACKENDS = ("tensorflow", "jax", "torch")
PACKAGES = {"tensorflow": ("tensorflow",), "jax": ("jax", "jaxlib"), "torch": ("torch",)}
# JAX takes 75 % of a GPU's memory up front; processes sharing one split what they may take.
SHARED_GPU_MEMORY = 0.9


def name() -> str:
    """The Keras backend in use: ``tensorflow``, ``jax`` or ``torch``."""
    import keras

    return keras.backend.backend()


def prepare_process(environ: os._Environ[str] | dict[str, str] = os.environ) -> None:
    """Defaults for this process, set before any backend starts: quiet TensorFlow start-up
    logs, deterministic GPU kernels for XLA (JAX) and cuBLAS (PyTorch). Values already in the
    environment win."""
    environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # deterministic cuBLAS (torch)
    flags = environ.get("XLA_FLAGS", "")
    if "xla_gpu_deterministic_ops" not in flags:
        environ["XLA_FLAGS"] = f"{flags} --xla_gpu_deterministic_ops=true".strip()


def worker_environment(gpu: str | None, processes_on_gpu: int = 1) -> dict[str, str]:
    """Environment of a worker process pinned to ``gpu`` and sharing it with others.

    Several processes per GPU keep a small head's trials from leaving the GPU idle; each
    then takes only its share of memory: JAX preallocates ``0.9 / processes`` of the GPU
    instead of 75 %, TensorFlow grows its memory on demand (PyTorch always does).
    """
    env: dict[str, str] = {}
    if gpu is not None:
        env["CUDA_VISIBLE_DEVICES"] = gpu
    if processes_on_gpu > 1:
        env["XLA_PYTHON_CLIENT_MEM_FRACTION"] = f"{SHARED_GPU_MEMORY / processes_on_gpu:.3f}"
        env["TF_FORCE_GPU_ALLOW_GROWTH"] = "true"
    return env


def import_quietly() -> None:
    """Import the backend's package now, with file descriptor 2 closed: TensorFlow's C++
    start-up lines (CUDA probing, absl) bypass TF_CPP_MIN_LOG_LEVEL and would break one-line
    error messages. Other backends, or TensorFlow not installed, import nothing here."""
    if os.environ.get("KERAS_BACKEND", "tensorflow") != "tensorflow":
        return
    saved, null = os.dup(2), os.open(os.devnull, os.O_WRONLY)
    os.dup2(null, 2)
    try:
        import tensorflow  # noqa: F401
    except ImportError:
        pass
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(null)


def seed_everything(seed: int, deterministic: bool) -> None:
    """Seed Python, NumPy and the backend (through Keras); with ``deterministic``, also ask
    the backend for deterministic kernels, so that a config repeats its metrics exactly."""
    import keras

    os.environ["PYTHONHASHSEED"] = str(seed)
    backend = name()
    if backend == "tensorflow" or not _seed_without_tensorflow(seed):
        keras.utils.set_random_seed(seed)
    if not deterministic:
        return
    if backend == "tensorflow":
        import tensorflow as tf

        tf.config.experimental.enable_op_determinism()
    elif backend == "torch":
        import torch

        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False
    # JAX: XLA's CPU kernels are deterministic; GPU kernels through XLA_FLAGS (prepare_process)


def _seed_without_tensorflow(seed: int) -> bool:
    """What ``keras.utils.set_random_seed`` does, less seeding TensorFlow: Keras seeds it
    whenever it is installed, which imports it (seconds, and a GPU context) into JAX and
    PyTorch processes whose input pipeline never uses it. Keras' private names are checked
    against 3.10-3.15; False (the caller then uses Keras' own) if they moved."""
    try:
        from keras.src.backend.common import global_state
        from keras.src.random import seed_generator
        from keras.src.utils import rng_utils

        global_state.set_global_attribute(rng_utils.GLOBAL_RANDOM_SEED, seed)
        global_state.set_global_attribute(seed_generator.GLOBAL_SEED_GENERATOR, None)
    except (ImportError, AttributeError):
        return False
    random.seed(seed)
    np.random.seed(seed)
    if name() == "torch":
        import torch

        torch.manual_seed(seed)
    return True


def steps_per_execution(wanted: int) -> int:
    """``wanted``, or 1 where the backend runs one step per call (PyTorch)."""
    return 1 if name() == "torch" else wanted


def clear_state(free_memory: bool = True) -> None:
    """Start a run (a sweep's trial) afresh: ``keras.backend.clear_session``, and on
    TensorFlow, the gradient functions that earlier runs' training registered for good.

    Keras' TensorFlow optimizer sums gradients through ``tf.distribute``'s all-reduce, a
    ``tf.custom_gradient`` that, traced in graph mode, registers a new gradient function in
    TensorFlow's global registry; that function holds the whole traced training step (about
    8 MB), so every model ever trained stayed in memory (17 MB a trial in a long sweep).
    Nothing traced by an earlier run is differentiated again, so its entries can go. The
    registry is private to TensorFlow (checked with 2.16 to 2.21); if it moves, nothing is
    removed (``python -m bench.memory`` shows the growth then).
    """
    import keras

    keras.backend.clear_session(free_memory=free_memory)
    if name() == "tensorflow":
        _forget_custom_gradients()


def _forget_custom_gradients() -> int:
    try:
        from tensorflow.python.framework import ops

        registry = ops._gradient_registry._registry
    except (ImportError, AttributeError):
        return 0
    stale = [key for key in registry if str(key).startswith("CustomGradient-")]
    for key in stale:
        del registry[key]
    return len(stale)


def configure_devices(mixed_precision: bool) -> str:
    """Memory growth on TensorFlow's GPUs; mixed precision where a GPU exists (float16
    compute, float32 variables). Returns the device kind, ``gpu`` or ``cpu``."""
    import keras

    kind = device_kind()
    if name() == "tensorflow":
        import tensorflow as tf

        for gpu in tf.config.list_physical_devices("GPU"):
            with contextlib.suppress(RuntimeError):  # already set up by an earlier run
                tf.config.experimental.set_memory_growth(gpu, True)
    policy = "mixed_float16" if mixed_precision and kind == "gpu" else "float32"
    keras.mixed_precision.set_global_policy(policy)
    return kind


def device_kind() -> str:
    """``gpu`` when the backend sees an accelerator, else ``cpu``."""
    import keras

    try:
        devices = [str(d).lower() for d in keras.distribution.list_devices()]
    except Exception:  # a backend without a device listing
        return "cpu"
    return "gpu" if any("gpu" in d or "cuda" in d for d in devices) else "cpu"


def model_requirements(versions: Mapping[str, str]) -> list[str]:
    """Pinned pip requirements of a model saved on this backend: keras, the backend's
    packages and numpy, at the ``versions`` given (package -> version)."""
    packages = ("keras", *PACKAGES[name()], "numpy")
    return [f"{package}=={versions[package]}" for package in packages if package in versions]


def peak_device_memory() -> int | None:
    """Peak bytes the backend has allocated on its first GPU so far; None on a CPU."""
    if device_kind() != "gpu":
        return None
    backend = name()
    stats: dict[str, Any] = {}
    if backend == "jax":
        import jax

        stats = jax.local_devices()[0].memory_stats() or {}
        return stats.get("peak_bytes_in_use")
    if backend == "torch":
        import torch

        return int(torch.cuda.max_memory_allocated())
    import tensorflow as tf

    return int(tf.config.experimental.get_memory_info("GPU:0")["peak"])
