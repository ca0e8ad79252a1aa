"""Many heads trained in one step: a group of head-only trials on the same cached features.

Sequentially, each trial of a frozen-backbone sweep compiles its own small head (Dense(units,
relu) -> Dropout -> Dense(classes, softmax)) and runs its own short fit: tracing and compiling
a train step, and a fit's fixed costs, once per head. Here the heads of a group are the
outputs of ONE model over the shared feature input (`GroupedHeads`), compiled once, whose
single train step covers every head over the same batches. The heads are called as they are,
so their variables are trained in place; the loss is the sum of the heads' losses (they share
no weight, so a head's gradient is its own), and each head's loss and metrics are computed by
the model itself rather than compiled per output (which traced as slowly as the heads apart).

Each head keeps what it would have alone: its units and dropout (its own layers), its learning
rate (`PerHeadRates`: one optimizer whose ``update_step`` reads each variable's rate from its
head), its per-epoch metrics, validation, NaN failure, best-epoch weights and early stopping:
its callbacks are those `tlsweep.train.train` gives a lone head, then the caller's, and see
its own logs. A head that stops (patience exhausted, ``model.stop_training`` set by one of its
callbacks, or the ``should_stop`` hook) gets rate 0 from then on, so its weights stay as they
were while the others train on; the fit ends when every head has stopped or the epochs run
out. Same initial weights and batches give what `tlsweep.train.train` gives that head alone
(bit for bit on TensorFlow; on JAX, which pads a short last batch so as to compile one step
shape, to float rounding, and dropout may draw other masks for that batch): tests/test_grouped.py
checks it on both.

What grouping cannot share is each step's per-weight work (gradients, the optimizer's update):
see bench/RESULTS.md. Heads can share a group only when they agree on everything but the head
itself: see `group_key`. Plain Keras 3: no MLflow, no Optuna (callbacks and hooks are passed in).
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import keras
import numpy as np
import pandas as pd

from tlsweep import backend
from tlsweep.config import Config, flatten
from tlsweep.data import ImageData
from tlsweep.features import Features
from tlsweep.model import head_of, make_optimizer, parameter_counts
from tlsweep.pipeline import FeatureBatches, Reshuffle
from tlsweep.train import (
    HEAD_STEPS_PER_EXECUTION,
    FailOnNaN,
    Interruptible,
    KeepBestWeights,
    TrainResult,
    ValidationOnFeatures,
    early_stopping,
    evaluate,
    predict_small,
    uses_feature_cache,
)

# Config fields that heads of one group must share: the features (data, backbone, pooling,
# cache), the batches (seed, batch size, epochs) and the optimizer but for its learning rate.
GROUP_FIELDS = (
    "seed",
    "data",
    "backbone",
    "head.pooling",
    "cache.enabled",
    "cache.dtype",
    "cache.batch_size",
    "augment",
    "optimizer",
    "train.batch_size",
    "train.epochs",
    "train.deterministic",
    "train.mixed_precision",
    "train.fine_tune.epochs",
)
PER_HEAD_FIELDS = ("optimizer.learning_rate",)  # under a group field, yet free per head
METRIC = "head_{}_{}"  # head i's metric in the group's logs: head_3_loss, head_3_accuracy

StopHook = Callable[[int, int, Mapping[str, float]], bool]  # (head, epoch, metrics) -> stop?
Outcome = TrainResult | Exception


class GroupMismatchError(ValueError):
    """Configs that cannot train as one group."""


def group_key(cfg: Config) -> tuple[tuple[str, Hashable], ...]:
    """What configs must share to train in one group: sorted (field, value) pairs. Configs with
    equal keys can; units, dropout, learning rate and early stopping may differ."""
    return tuple(
        (name, _hashable(value))
        for name, value in sorted(flatten(cfg).items())
        if _in_group_key(name)
    )


def groupable(cfg: Config) -> bool:
    """Whether ``cfg``'s head can train in a group: a head-only run on cached features (no
    augmentation, no fine-tuning stage)."""
    return uses_feature_cache(cfg) and not cfg.train.fine_tune.epochs


def check_group(cfgs: Sequence[Config]) -> None:
    """Refuse an empty group, a config the feature cache cannot serve, and configs whose
    `group_key` differ (a one-line error naming the first differing field)."""
    if not cfgs:
        raise GroupMismatchError("a group needs at least one config")
    for index, cfg in enumerate(cfgs):
        if not uses_feature_cache(cfg):
            raise GroupMismatchError(
                f"head {index} cannot train on cached features (cache off or augmenting)"
            )
        if cfg.train.fine_tune.epochs:
            raise GroupMismatchError(
                f"head {index} fine-tunes its backbone (train.fine_tune.epochs="
                f"{cfg.train.fine_tune.epochs}): only head-only trials train in groups"
            )
    first = dict(group_key(cfgs[0]))
    for index, cfg in enumerate(cfgs[1:], start=1):
        for name, value in group_key(cfg):
            if first.get(name) != value:
                raise GroupMismatchError(
                    f"heads cannot share a group: {name} differs "
                    f"({first.get(name)!r} in head 0, {value!r} in head {index})"
                )


def train_group(
    cfgs: Sequence[Config],
    data: ImageData,
    models: Sequence[keras.Model],
    features: Features,
    callbacks: Sequence[Sequence[keras.callbacks.Callback]] | None = None,
    should_stop: StopHook | None = None,
) -> list[Outcome]:
    """Train the heads of ``models`` (classifiers from `build_classifier`, one per config) on
    ``features`` as one model; one outcome per head, in order: a `TrainResult` as
    `tlsweep.train.train` returns for a cached head-only trial, or the exception that failed
    that head (a NaN loss, an error in one of its callbacks) while the others went on.

    ``callbacks[i]``: head i's own Keras callbacks (a tracker, a pruner). They see epoch events
    only, with head i's logs (``accuracy``, ``loss``, ``val_accuracy``, ``val_loss``,
    ``learning_rate``), and ``self.model`` is head i's head model, holding its current
    weights: setting its ``stop_training`` stops head i alone. ``should_stop(i, epoch,
    metrics)``: asked after each epoch of each head still training; True stops it (pruning
    from outside).
    """
    check_group(cfgs)
    own = callbacks if callbacks is not None else [()] * len(cfgs)
    if not len(models) == len(own) == len(cfgs):
        raise ValueError(f"{len(cfgs)} configs, {len(models)} models, {len(own)} callback lists")
    heads = [
        _Head(i, cfg, model, features, data, own[i])
        for i, (cfg, model) in enumerate(zip(cfgs, models, strict=True))
    ]
    grouped = GroupedHeads([head.head for head in heads])
    optimizer = grouped_optimizer(cfgs[0], grouped, [h.learning_rate for h in heads])
    grouped.compile(
        optimizer=optimizer,
        steps_per_execution=backend.steps_per_execution(HEAD_STEPS_PER_EXECUTION),
    )
    tc = cfgs[0].train
    batches = _WeightedBatches(
        features.train,
        data.train.labels,
        tc.batch_size,
        shuffle=True,
        seed=cfgs[0].seed,
        pad=backend.name() == "jax",
    )
    dispatch = _Dispatch(heads, optimizer, should_stop, len(batches))
    grouped.fit(
        batches,
        epochs=tc.epochs,
        verbose=0,
        shuffle=False,
        callbacks=[Reshuffle(batches), Interruptible(), dispatch],
    )
    return [head.outcome() for head in heads]


# --- the grouped model -------------------------------------------------------------------------


class GroupedHeads(keras.Model):
    """Features -> each head's probabilities: the heads themselves, side by side (their
    variables are the heads', trained in place as `tlsweep.train.train` trains a lone one).

    Loss and metrics are this model's own (`compute_loss`, `compute_metrics`), not compiled
    per output: Keras' per-output losses and metrics made tracing the step cost as much as
    the heads apart. Each head's loss is computed on its own softmax output, as a lone
    head's is (on TensorFlow, from the logits behind it).
    """

    def __init__(self, heads: Sequence[keras.Model]) -> None:
        super().__init__(name="grouped_heads")
        self.heads = list(heads)
        self.head_metrics = _HeadMetrics(len(self.heads))
        self.built = True  # the heads are

    def call(self, features: Any, training: bool | None = None) -> list[Any]:
        return [head(features, training=training) for head in self.heads]

    def compute_loss(
        self,
        x: Any = None,
        y: Any = None,
        y_pred: Any = None,
        sample_weight: Any = None,
        training: bool = True,
    ) -> Any:
        """The sum of the heads' losses, each the mean over the batch's real examples, as
        Keras reduces a lone head's (each head's gradient is its own)."""
        return keras.ops.sum(keras.ops.stack(_mean_losses(y, y_pred, _real(y, sample_weight))))

    def compute_metrics(self, x: Any, y: Any, y_pred: Any, sample_weight: Any = None) -> Any:
        self.head_metrics.update_state(y, y_pred, sample_weight)
        return self.get_metrics_result()

    def variable_heads(self) -> dict[int, int]:
        """The head of each trainable variable, by id."""
        return {id(v): i for i, head in enumerate(self.heads) for v in head.trainable_variables}


class _HeadMetrics(keras.metrics.Metric):
    """Each head's epoch ``loss`` and ``accuracy``, as ``fit`` reports a lone head's: the
    loss a mean of batch means weighted by batch size, the accuracy a mean over examples."""

    def __init__(self, heads: int) -> None:
        super().__init__(name="head_metrics")
        self.heads = heads
        self.loss_total = self.add_variable((heads,), "zeros", name="loss_total")
        self.correct = self.add_variable((heads,), "zeros", name="correct")
        self.count = self.add_variable((), "zeros", name="count")

    def update_state(self, y_true: Any, y_pred: Sequence[Any], sample_weight: Any = None) -> None:
        ops = keras.ops
        real = _real(y_true, sample_weight)
        batch = ops.sum(real)
        self.loss_total.assign_add(ops.stack(_mean_losses(y_true, y_pred, real)) * batch)
        labels = ops.cast(y_true, "int32")
        hits = [
            ops.sum(
                real * ops.cast(ops.equal(ops.cast(ops.argmax(p, -1), "int32"), labels), "float32")
            )
            for p in y_pred
        ]
        self.correct.assign_add(ops.stack(hits))
        self.count.assign_add(batch)

    def result(self) -> dict[str, Any]:
        ops = keras.ops
        loss = ops.divide_no_nan(self.loss_total, self.count)
        accuracy = ops.divide_no_nan(self.correct, self.count)
        out = {}
        for i in range(self.heads):
            out[METRIC.format(i, "accuracy")] = accuracy[i]
            out[METRIC.format(i, "loss")] = loss[i]
        return out


def _mean_losses(y_true: Any, y_pred: Sequence[Any], real: Any) -> list[Any]:
    """Each head's batch loss over the real examples (``real``: 1, padding: 0): the sum of
    their losses over their count, which is what ``sum_over_batch_size`` gives a lone head's
    batch, and the same gradient."""
    loss = keras.losses.SparseCategoricalCrossentropy(reduction="mean_with_sample_weight")
    return [loss(y_true, probabilities, sample_weight=real) for probabilities in y_pred]


def _real(y_true: Any, sample_weight: Any) -> Any:
    """1 for an example, 0 for padding (`_WeightedBatches`); all 1 without weights."""
    if sample_weight is None:
        return keras.ops.ones(keras.ops.shape(y_true)[:1], "float32")
    return keras.ops.cast(sample_weight, "float32")


class _WeightedBatches(FeatureBatches):
    """`FeatureBatches` in the same order, each with its weights (1: an example). With
    ``pad``, a short last batch is padded to the full size with weight-0 rows, so that a
    backend that compiles per input shape (JAX) compiles the step once, not twice; the
    weights keep the padding out of the loss, its gradient and the metrics."""

    def __init__(self, *args: Any, pad: bool, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.pad = pad

    def _load(self, indices: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        inputs, labels = super()._load(indices)
        n = len(indices)
        missing = self.batch_size - n if self.pad else 0
        real = np.concatenate([np.ones(n, "float32"), np.zeros(missing, "float32")])
        if missing:
            inputs = np.concatenate([inputs, np.zeros((missing, *inputs.shape[1:]), inputs.dtype)])
            labels = np.concatenate([labels, np.zeros(missing, labels.dtype)])
        return inputs, labels, real


# --- one optimizer, a learning rate per head --------------------------------------------------


class PerHeadRates:
    """Mixin for a Keras optimizer class: each variable is updated at its head's learning
    rate, read from ``rates`` (an optimizer variable, so a part of the state that each
    backend's compiled step reads, JAX included), exactly as that optimizer of its own would
    update it at that rate. The optimizer's own rate (1.0) is never read.

    `freeze` sets a head's rate to 0: its variables stay as they are. Where the optimizer
    carries momentum (SGD, RMSprop), a zero rate would still move them, so their old values
    are kept explicitly. Weight decay (AdamW) is applied per variable here, at its head's
    rate, rather than to all variables at the optimizer's own before the updates.
    """

    _variable_heads: list[int]
    _initial_rates: np.ndarray
    rates: keras.Variable

    def set_heads(self, variable_heads: Sequence[int], rates: Sequence[float]) -> None:
        """Before `build`: the head of each variable (in build order), each head's rate."""
        self._variable_heads = [int(head) for head in variable_heads]
        self._initial_rates = np.asarray(rates, "float32")

    def build(self, variables: list[keras.Variable]) -> None:
        if self.built:
            return
        super().build(variables)
        self.rates = self.add_variable(self._initial_rates.shape, name="head_rates")
        self.rates.assign(self._initial_rates)

    def freeze(self, head: int) -> None:
        """No more updates to ``head``'s variables (from the next step on)."""
        rates = np.array(self.rates.numpy())
        rates[head] = 0.0
        self.rates.assign(rates)

    def _apply_weight_decay(self, variables: list[keras.Variable]) -> None:
        """Done per variable in `update_step`, at its head's rate."""

    def update_step(self, gradient: Any, variable: Any, learning_rate: Any) -> None:
        ops = keras.ops
        head = self._variable_heads[self._get_variable_index(variable)]
        rate = ops.take(self.rates, head)
        keep = ops.convert_to_tensor(variable) if getattr(self, "momentum", 0) else None
        if self.weight_decay is not None and self._use_weight_decay(variable):
            lr, decay = (ops.cast(v, variable.dtype) for v in (rate, self.weight_decay))
            self.assign(variable, variable - variable * decay * lr)
        super().update_step(gradient, variable, rate)
        if keep is not None:  # momentum would move a frozen head's variables on
            moved = ops.convert_to_tensor(variable)
            self.assign(variable, ops.where(ops.greater(rate, 0), moved, keep))


_PER_HEAD_CLASSES: dict[type, type] = {}


def grouped_optimizer(
    cfg: Config, model: GroupedHeads, rates: Sequence[float]
) -> keras.optimizers.Optimizer:
    """``cfg``'s optimizer (its kind and options, not its rate), built on ``model``'s
    variables, head i at learning rate ``rates[i]``."""
    template = make_optimizer(cfg.optimizer, learning_rate=1.0)
    base = type(template)
    name = f"PerHead{base.__name__}"
    cls = _PER_HEAD_CLASSES.setdefault(base, type(name, (PerHeadRates, base), {}))
    optimizer = cls.from_config(template.get_config())
    owner = model.variable_heads()
    variables = list(model.trainable_variables)
    optimizer.set_heads([owner[id(v)] for v in variables], rates)
    optimizer.build(variables)
    return optimizer


# --- per-head bookkeeping ----------------------------------------------------------------------


class _LearningRate(keras.callbacks.Callback):
    """``learning_rate`` in a head's logs, as `tlsweep.train.LearningRateLogger` logs it."""

    def __init__(self, value: float) -> None:
        super().__init__()
        self.value = float(np.float32(value))

    def on_epoch_end(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
        if logs is not None:
            logs["learning_rate"] = self.value


@dataclass(eq=False)
class _Head:
    """One head of the group: its callbacks in the order a lone head's fit has them, its
    history, and whether it still trains."""

    index: int
    cfg: Config
    model: keras.Model  # the classifier (what the result returns)
    features: Features
    data: ImageData
    own: Sequence[keras.callbacks.Callback]
    rows: list[dict[str, Any]] = field(default_factory=list)
    running: bool = True
    error: Exception | None = None

    def __post_init__(self) -> None:
        self.head = head_of(self.model)
        self.learning_rate = self.cfg.optimizer.learning_rate
        self.keeper = KeepBestWeights(self.cfg.train.early_stopping.monitor, self.model)
        self.callbacks = [
            ValidationOnFeatures(self.features.val, self.data.val.labels),
            _LearningRate(self.learning_rate),
            FailOnNaN(),
            self.keeper,
            *self.own,
            early_stopping(self.cfg.train),  # the same EarlyStopping a lone head gets
        ]
        self.last_logs: dict[str, Any] = {}

    def start(self, params: Mapping[str, Any]) -> None:
        self.head.stop_training = False
        for callback in self.callbacks:
            callback.set_model(self.head)
            callback.set_params(dict(params))
        self._guarded(lambda c: c.on_train_begin())

    def begin_epoch(self, epoch: int) -> None:
        self._guarded(lambda c: c.on_epoch_begin(epoch))

    def end_epoch(self, epoch: int, group: Mapping[str, Any]) -> bool:
        """Run the head's callbacks on its logs; whether it wants to stop (or failed)."""
        logs = {name: group[METRIC.format(self.index, name)] for name in ("accuracy", "loss")}
        self._guarded(lambda c: c.on_epoch_end(epoch, logs))
        if self.error is None:
            self.rows.append({"epoch": epoch + 1, "stage": "head", **logs})
            self.last_logs = logs
        return self.error is not None or bool(self.head.stop_training)

    def finish(self) -> None:
        """Training ended for this head (stopped, or the epochs ran out)."""
        self.running = False
        if self.error is None:
            self._guarded(lambda c: c.on_train_end(self.last_logs))

    def _guarded(self, event: Callable[[keras.callbacks.Callback], None]) -> None:
        """Dispatch ``event`` to the callbacks; an error fails this head only."""
        if self.error is not None:
            return
        try:
            for callback in self.callbacks:
                event(callback)
        except Exception as exc:  # one head's failure is its own outcome
            self.error = exc
            self.running = False

    def outcome(self) -> Outcome:
        """The head's result (best weights restored, then evaluated) or its error."""
        if self.error is not None:
            return self.error
        self.keeper.restore()
        data = self.data
        stacked = np.concatenate([self.features.val, self.features.test])
        probabilities = predict_small(self.head, stacked)
        parts = dict(zip(("val", "test"), np.split(probabilities, [len(data.val)]), strict=True))
        evaluations = {
            name: evaluate(parts[name], getattr(data, name).labels, data.class_names)
            for name in ("val", "test")
        }
        return TrainResult(
            model=self.model,
            history=pd.DataFrame(self.rows),
            evaluations=evaluations,
            best_epoch=self.keeper.best_epoch + 1,
            best_value=self.keeper.best,
            parameter_counts=parameter_counts(self.model),
            backbone_changed=False,
        )


class _Dispatch(keras.callbacks.Callback):
    """The group's fit, seen by each head: epoch events with its own logs, a head frozen when
    it stops, the fit stopped when no head trains any more."""

    def __init__(
        self,
        heads: Sequence[_Head],
        optimizer: PerHeadRates,
        should_stop: StopHook | None,
        steps: int,
    ) -> None:
        super().__init__()
        self.heads = list(heads)
        self.optimizer = optimizer
        self.should_stop = should_stop
        self.steps = steps

    def on_train_begin(self, logs: dict[str, Any] | None = None) -> None:
        params = {"epochs": self.params.get("epochs"), "steps": self.steps, "verbose": 0}
        for head in self.heads:
            head.start(params)
            self._freeze_if_stopped(head)
        self._stop_when_all_stopped()

    def on_epoch_begin(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
        for head in self._running():
            head.begin_epoch(epoch)
            self._freeze_if_stopped(head)

    def on_epoch_end(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
        for head in self._running():
            stop = head.end_epoch(epoch, logs or {})
            if not stop and self.should_stop is not None:
                stop = bool(self.should_stop(head.index, epoch, dict(head.last_logs)))
            if stop:
                head.finish()
            self._freeze_if_stopped(head)
        self._stop_when_all_stopped()

    def on_train_end(self, logs: dict[str, Any] | None = None) -> None:
        for head in self._running():
            head.finish()

    def _running(self) -> list[_Head]:
        return [head for head in self.heads if head.running]

    def _freeze_if_stopped(self, head: _Head) -> None:
        if not head.running:
            self.optimizer.freeze(head.index)

    def _stop_when_all_stopped(self) -> None:
        if not self._running():
            self.model.stop_training = True


def _in_group_key(name: str) -> bool:
    if name in PER_HEAD_FIELDS:
        return False
    return any(name == f or name.startswith(f"{f}.") for f in GROUP_FIELDS)


def _hashable(value: Any) -> Hashable:
    if isinstance(value, Mapping):
        return tuple(sorted((str(k), _hashable(v)) for k, v in value.items()))
    if isinstance(value, list | tuple):
        return tuple(_hashable(v) for v in value)
    return value
