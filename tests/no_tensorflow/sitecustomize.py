"""Put this folder on PYTHONPATH and TensorFlow is absent from the interpreter: ``import
tensorflow`` raises ModuleNotFoundError and ``importlib.util.find_spec`` finds nothing, as if
it were not installed. Proves that the JAX path needs no TensorFlow (tests/test_no_tensorflow.py).
"""

import importlib.machinery
import sys


class _PathFinderWithoutTensorFlow(importlib.machinery.PathFinder):
    @classmethod
    def find_spec(cls, name, path=None, target=None):
        if name.split(".")[0].startswith("tensorflow"):
            return None
        return super().find_spec(name, path, target)


sys.meta_path[:] = [
    _PathFinderWithoutTensorFlow if finder is importlib.machinery.PathFinder else finder
    for finder in sys.meta_path
]
