"""The ``tlsweep`` command line: parses arguments, calls the library, maps errors to exit codes.

Exit codes: 0 success, 2 bad input (one line on stderr), 130 interrupted, 1 anything else.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Sequence
from typing import Any

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("KERAS_BACKEND", "tensorflow")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

from tlsweep.config import CONFIG_GROUPS, group_choices
from tlsweep.errors import UserError

KEY_REFERENCE = """\
keys (override any with key=value):
  backbone.weights       imagenet | null | /path/to/weights.h5
  backbone.input_size    image side in pixels (at least the backbone's min_input_size)
  head.pooling           avg | max | flatten
  head.dense_units       units of the hidden Dense layer (>= 1)
  head.dropout           dropout rate in [0, 1)
  train.batch_size       >= 1
  train.epochs           >= 1
  train.fine_tune.epochs 0 (off) or the epochs of the fine-tuning stage
  optimizer.learning_rate  > 0
  seed                   seeds Python, NumPy and Keras
  data.path              the image folder, for data=folder

examples:
  tlsweep train backbone=resnet50 head.pooling=flatten head.dense_units=512 \\
                head.dropout=0.1 train.batch_size=30 train.epochs=5 optimizer=adam data=cifar10
  tlsweep train data=folder data.path=~/photos backbone=efficientnet_b0 optimizer=sgd
  tlsweep train --cfg job backbone=vgg16     # print the resolved config and exit
"""


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``tlsweep`` console script."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.handler(args) or 0)
    except UserError as exc:
        print(f"tlsweep: error: {exc}", file=sys.stderr)
        return UserError.exit_code
    except KeyboardInterrupt:
        print("tlsweep: interrupted", file=sys.stderr)
        return 130


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tlsweep",
        description="Hyperparameter sweeps of transfer-learning image classifiers.",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    train = _command(commands, "train", cmd_train, "train one model, tracked in MLflow")
    train.formatter_class = argparse.RawDescriptionHelpFormatter
    train.epilog = groups_help() + "\n" + KEY_REFERENCE
    train.add_argument("--cfg", choices=["job"], help="print the resolved config and exit")
    train.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="Hydra overrides")
    return parser


def groups_help() -> str:
    """The config groups and their choices, as listed by ``tlsweep train --help``."""
    lines = ["config groups (choose with group=choice):"]
    lines += [f"  {group:<10} {', '.join(group_choices(group))}" for group in CONFIG_GROUPS]
    return "\n".join(lines) + "\n"


def cmd_train(args: argparse.Namespace) -> int:
    from tlsweep.config import load_config, to_yaml

    cfg = load_config(args.overrides)
    if args.cfg:
        print(to_yaml(cfg), end="")
        return 0
    from tlsweep.experiment import run
    from tlsweep.progress import EpochPrinter
    from tlsweep.tracking import tracking_uri

    total = cfg.train.epochs + cfg.train.fine_tune.epochs
    result = run(cfg, callbacks=[EpochPrinter(total)])
    trained = result.train_result
    print(f"run {result.run_id} FINISHED in {tracking_uri(cfg.tracking)}")
    print(
        f"  best epoch {trained.best_epoch}: {cfg.train.early_stopping.monitor}="
        f"{trained.best_value:.4f}; test_accuracy={result.metrics['test_accuracy']:.4f}"
    )
    return 0


def _command(
    commands: Any, name: str, handler: Callable[[argparse.Namespace], int], help_text: str
) -> argparse.ArgumentParser:
    sub = commands.add_parser(name, help=help_text, description=help_text)
    sub.set_defaults(handler=handler)
    return sub


if __name__ == "__main__":
    sys.exit(main())
