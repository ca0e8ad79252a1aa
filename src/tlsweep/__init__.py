"""tlsweep: hyperparameter sweeps of transfer-learning image classifiers.

Hydra composes the config, Keras trains, MLflow records, Optuna searches.
"""

from __future__ import annotations

__version__ = "0.1.0"
