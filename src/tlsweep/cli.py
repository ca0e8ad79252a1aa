"""The ``tlsweep`` command line: parses arguments, calls the library, maps errors to exit codes.

Exit codes: 0 success, 2 bad input (one line on stderr), 128 + the signal's number when
interrupted (130 Ctrl-C, 143 SIGTERM, 129 SIGHUP: all three handled alike), 1 anything else.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

os.environ.setdefault("KERAS_BACKEND", "tensorflow")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

from tlsweep import backend, interrupts, logs

backend.prepare_process()

from tlsweep.config import CONFIG_GROUPS, group_choices  # noqa: E402
from tlsweep.errors import OutageError, UserError, full_disk, full_disk_message  # noqa: E402
from tlsweep.redaction import redact, redact_url  # noqa: E402

if TYPE_CHECKING:
    from tlsweep.sweepspec import SweepSpec

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
  augment.flip, .rotation, .zoom, .translation, .contrast
                         random augmentation (or augment=light|strong); trains end to end
  backbone.path, backbone.cut_layer, backbone._target_, backbone.preprocess
                         backbone=custom: a saved .keras model cut at a layer, or a function
                         returning a Keras model; declare its preprocessing

examples:
  tlsweep train backbone=resnet50 head.pooling=flatten head.dense_units=512 \\
                head.dropout=0.1 train.batch_size=30 train.epochs=5 optimizer=adam data=cifar10
  tlsweep train data=folder data.path=~/photos backbone=efficientnet_b0 optimizer=sgd
  tlsweep train --cfg job backbone=vgg16     # print the resolved config and exit
"""


SWEEP_HELP = """\
arguments after NAME:
  sweep.KEY=VALUE          a study setting: study_name, metric, direction, objectives (e.g.
                           {val_accuracy: maximize, latency_ms: minimize}), sampler (tpe
                           random grid cmaes gp qmc nsga2 nsga3), sampler_options, seed, pruner
                           (median hyperband successive_halving none), pruner_options,
                           n_trials, timeout, storage, artifacts (trial artifacts' folder),
                           storage_patience, heartbeat_interval, grace_period, max_retry
  KEY=choice(a,b) | range(a,b,step=s) | interval(a,b) | int(interval(a,b)) | tag(log,interval(a,b))
                           add or replace a search dimension (Hydra's sweep grammar)
  KEY=VALUE                a base override for every trial (fixes KEY if it was searched)

examples:
  tlsweep sweep quickstart                        # offline: digits, ResNet50 with random weights
  tlsweep sweep quickstart sweep.n_trials=20      # resume the same study up to 20 trials
  tlsweep sweep backbones data=folder data.path=~/photos sweep.n_trials=40
  tlsweep sweep pareto                            # accuracy against latency (NSGA-II)
  tlsweep sweep quickstart --dry-run              # print the space and settings, run nothing
"""


# they take --storage or sweep.storage=
STORAGE_READERS = ("runs", "report", "reproduce", "status", "dashboard")
STORAGE_HELP = (
    "Optuna storage (also sweep.storage=URL); default: mlruns/, else where the sweep recorded it"
)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``tlsweep`` console script."""
    parser = build_parser()
    args = parse_arguments(parser, argv)
    if args.quiet or args.verbose:
        logs.set_verbosity(1 if args.verbose else -1)
    try:
        _use_config_location(args)
    except UserError as exc:
        print(f"tlsweep: error: {exc}", file=sys.stderr)
        return exc.exit_code
    logs.apply_verbosity()  # a worker's level comes in its environment
    interrupts.install()
    try:
        code = int(args.handler(args) or 0)
        interrupts.raise_pending()  # a signal held back in database code until its end
        return code
    except (UserError, OutageError) as exc:
        print(f"tlsweep: error: {redact(str(exc))}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt as exc:
        interrupts.handled(exc)
        how = interrupts.description(exc)
        print("tlsweep: interrupted" + ("" if how == "Ctrl-C" else f" ({how})"), file=sys.stderr)
        return interrupts.exit_code(exc)
    except Exception as exc:  # a bug or an outage: the traceback, without any password in it
        if outage := _outage(exc):
            print(f"tlsweep: error: {redact(outage)}", file=sys.stderr)
            return OutageError.exit_code
        return _crashed(exc)


def parse_arguments(
    parser: argparse.ArgumentParser, argv: Sequence[str] | None = None
) -> argparse.Namespace:
    """Options and ``KEY=VALUE`` overrides in any order, as Hydra users type them
    (``sweep quickstart --workers 2 sweep.n_trials=3``): argparse ends a ``nargs="*"``
    positional at the first option, so overrides after one come back unparsed and are added
    here, in the order typed. ``sweep.storage=URL`` also works for the commands that take
    ``--storage`` (runs, report, reproduce)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in STORAGE_READERS:
        argv = [_storage_option(arg) for arg in argv]
    args, extra = parser.parse_known_args(argv)
    overrides = [a for a in extra if "=" in a and not a.startswith("-")]
    unknown = [a for a in extra if a not in overrides]
    if hasattr(args, "overrides"):
        args.overrides = [*args.overrides, *overrides]
    else:
        unknown += overrides
    if unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    return args


def _storage_option(arg: str) -> str:
    """``sweep.storage=URL`` as ``--storage=URL``; any other argument as it is."""
    key, _, value = arg.lstrip("+").partition("=")
    return f"--storage={value}" if key == "sweep.storage" else arg


def _outage(exc: BaseException) -> str | None:
    """One line for an exception that is a full disk or the tracking server's outage."""
    if full := full_disk(exc):
        return full_disk_message(full)
    if "tlsweep.tracking" not in sys.modules:  # MLflow not even loaded: not its outage
        return None
    from tlsweep import tracking

    return tracking.unreachable_message(exc) if tracking.is_unreachable(exc) else None


def _crashed(exc: BaseException) -> int:
    text = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
    print(redact(text), end="", file=sys.stderr)
    return 1


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tlsweep",
        description="Hyperparameter sweeps of transfer-learning image classifiers.",
    )
    parser.add_argument("--version", action="version", version=f"tlsweep {_version()}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    train = _command(commands, "train", cmd_train, "train one model, tracked in MLflow")
    train.formatter_class = argparse.RawDescriptionHelpFormatter
    train.epilog = groups_help() + "\n" + KEY_REFERENCE
    _hydra_flags(train)
    train.add_argument(
        "-m",
        "--multirun",
        action="store_true",
        help="run every combination of KEY=A,B values as a tracked grid sweep",
    )
    train.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="Hydra overrides")

    sweep = _command(commands, "sweep", cmd_sweep, "run or resume a sweep from sweeps/NAME.yaml")
    sweep.formatter_class = argparse.RawDescriptionHelpFormatter
    sweep.epilog = SWEEP_HELP
    sweep.add_argument("name", metavar="NAME", help="a sweep in sweeps/ (or a path to a YAML file)")
    sweep.add_argument(
        "overrides",
        nargs="*",
        metavar="KEY=VALUE",
        help="sweep.KEY=VALUE settings, KEY=choice(...) dimensions, base overrides",
    )
    sweep.add_argument(
        "--workers",
        type=int,
        default=1,
        metavar="N",
        help="worker processes on this machine, on the same study (default 1)",
    )
    sweep.add_argument(
        "--gpus",
        metavar="LIST",
        help="one worker per listed GPU, e.g. 0,1,3; list a GPU twice for two workers on it "
        "(0,0,1,1); sets CUDA_VISIBLE_DEVICES and each worker's share of GPU memory",
    )
    sweep.add_argument(
        "--launcher",
        choices=["local", "slurm"],
        default="local",
        help="local: worker processes here (default); slurm: --workers N jobs on a Slurm "
        "cluster (one job array, resources from launcher.KEY=VALUE, see conf/launcher/)",
    )
    sweep.add_argument(
        "--dry-run",
        action="store_true",
        help="print the search space, settings and enqueued configurations, and exit "
        "(no study, storage or run is created)",
    )
    _hydra_flags(sweep)
    sweep.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    sweep.add_argument("--summarize", action="store_true", help=argparse.SUPPRESS)

    status = _command(commands, "status", cmd_status, "a sweep's progress, from any machine")
    status.add_argument("name", metavar="NAME", help="a sweep (study) name, as in tlsweep runs")
    status.add_argument(
        "--follow", action="store_true", help="print a line at each change until the sweep ends"
    )
    status.add_argument("--every", type=float, default=10.0, metavar="S", help=argparse.SUPPRESS)
    status.add_argument("--storage", metavar="URL", help=STORAGE_HELP)

    runs = _command(commands, "runs", cmd_runs, "the leaderboard of a sweep, best first")
    runs.add_argument("name", nargs="?", metavar="NAME", help="a sweep (study) name; none: list")
    runs.add_argument("--csv", metavar="PATH", help="also write the table as CSV")
    runs.add_argument("--storage", metavar="URL", help=STORAGE_HELP)

    rep = _command(commands, "reproduce", cmd_reproduce, "retrain a logged run and compare")
    which = rep.add_mutually_exclusive_group(required=True)
    which.add_argument("run_id", nargs="?", metavar="RUN_ID", help="the MLflow run to reproduce")
    which.add_argument("--best", metavar="NAME", help="the best trial of sweep NAME")
    rep.add_argument(
        "--tolerance",
        type=float,
        default=0.0,
        help="largest allowed absolute metric difference (default 0: exact)",
    )
    rep.add_argument("--storage", metavar="URL", help="Optuna storage, with --best")

    rpt = _command(
        commands, "report", cmd_report, "one HTML page about a sweep, also logged on its parent run"
    )
    rpt.add_argument("name", metavar="NAME", help="a sweep (study) name, as in tlsweep runs")
    rpt.add_argument(
        "--output", metavar="FILE", help="where to write it (default NAME_report.html)"
    )
    rpt.add_argument("--top", type=int, default=5, metavar="K", help="trials in the curves plot")
    rpt.add_argument("--storage", metavar="URL", help=STORAGE_HELP)

    cmp = _command(commands, "compare", cmd_compare, "two runs side by side (terminal and HTML)")
    cmp.add_argument("run_a", metavar="RUN_A", help="an MLflow run id")
    cmp.add_argument("run_b", metavar="RUN_B", help="another MLflow run id")
    cmp.add_argument(
        "--output", metavar="FILE", help="the HTML file (default compare_A_B.html, short ids)"
    )

    board = _command(
        commands, "dashboard", cmd_dashboard, "optuna-dashboard on a sweep's study and artifacts"
    )
    board.add_argument("name", metavar="NAME", help="a sweep (study) name, as in tlsweep runs")
    board.add_argument("--host", default="127.0.0.1", help="address to listen on (127.0.0.1)")
    board.add_argument("--port", type=int, default=8080, help="port (8080; 0: any free port)")
    board.add_argument("--storage", metavar="URL", help=STORAGE_HELP)
    board.add_argument(
        "--artifacts", metavar="DIR", help="the artifact folder (default: the one the sweep used)"
    )

    ui = _command(commands, "ui", cmd_ui, "the MLflow UI on this project's store")
    ui.add_argument("--host", default="127.0.0.1")
    ui.add_argument("--port", type=int, default=5000)

    cache = _command(commands, "cache", cmd_cache, "list or clear the feature cache")
    cache.add_argument("action", choices=["ls", "clear"])
    cache.add_argument(
        "overrides",
        nargs="*",
        metavar="KEY=VALUE",
        help="config overrides, e.g. cache.dir=/data/features",
    )

    predict = _command(commands, "predict", cmd_predict, "classify images with a logged model")
    predict.add_argument(
        "model_uri",
        metavar="MODEL_URI",
        help="e.g. models:/quickstart@champion or runs:/RUN_ID/model",
    )
    predict.add_argument("images", nargs="+", metavar="IMAGE")
    predict.add_argument("--top-k", type=int, default=3)

    shell = _command(
        commands, "completion", cmd_completion, 'shell completion: eval "$(tlsweep completion)"'
    )
    shell.add_argument("shell", nargs="?", choices=["bash", "zsh"], default="bash")
    return parser


def cmd_completion(args: argparse.Namespace) -> int:
    from tlsweep.completion import bash_script

    if args.shell == "zsh":
        print("autoload -U +X bashcompinit && bashcompinit")
    print(bash_script(build_parser()), end="")
    return 0


def groups_help() -> str:
    """The config groups and their choices, as listed by ``tlsweep train --help``."""
    lines = ["config groups (choose with group=choice):"]
    lines += [f"  {group:<10} {', '.join(group_choices(group))}" for group in CONFIG_GROUPS]
    return "\n".join(lines) + "\n"


def cmd_train(args: argparse.Namespace) -> int:
    from tlsweep.config import config_info, load_config

    if args.info:
        print(config_info(args.overrides), end="")
        return 0
    if args.multirun:
        return _multirun(args.overrides)
    cfg = load_config(args.overrides)
    if args.cfg:
        _print_config(args.cfg, args.overrides, args.resolve)
        return 0
    backend.import_quietly()
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


def cmd_sweep(args: argparse.Namespace) -> int:
    from tlsweep.sweepspec import load_sweep, worker_overrides

    gpus = _gpu_list(args.gpus)
    if args.workers < 1:
        raise UserError(f"--workers={args.workers} is not allowed: must be >= 1")
    launcher = [o for o in args.overrides if o.lstrip("+").split("=")[0].startswith("launcher.")]
    if launcher and args.launcher != "slurm":
        raise UserError(f"{launcher[0]} is not allowed without --launcher slurm")
    if gpus and args.launcher == "slurm":
        raise UserError(
            f"--gpus={args.gpus} is for local workers: with --launcher slurm, "
            "set launcher.gpus_per_node=N"
        )
    sweep_args = [args.name, *(o for o in args.overrides if o not in launcher)]
    overrides = [*sweep_args[1:], *(worker_overrides() if args.worker else [])]
    spec = load_sweep(args.name, overrides)  # bad input is refused before TF loads
    if args.info or args.cfg:  # the base config every trial starts from
        from tlsweep.config import config_info

        if args.info:
            print(config_info(spec.base), end="")
        else:
            _print_config(args.cfg, spec.base, args.resolve)
        return 0
    if args.dry_run:
        print(_plan(spec, max(args.workers, len(gpus), 1)), end="")
        return 0
    if args.launcher == "slurm":
        return _submit_to_slurm(spec, sweep_args, args.workers, launcher)
    backend.import_quietly()
    from tlsweep.sweep import run_sweep, run_worker, run_workers

    if args.worker:
        summary = run_worker(spec, summarize=args.summarize)
        return 0 if summary is None or not summary.shortfall else 1
    if gpus or args.workers > 1:
        summary = run_workers(spec, [args.name, *args.overrides], args.workers, gpus)
    else:
        summary = run_sweep(spec)
    return 0 if summary.best_value is not None and not summary.shortfall else 1


def _plan(spec: SweepSpec, workers: int) -> str:
    """``sweep --dry-run``: the resolved space, settings and enqueued configurations."""
    s = spec.settings
    lines = [f"sweep {spec.name}: study {s.study_name}, nothing run (--dry-run)"]
    lines += [*_space_lines(spec), *_settings_lines(spec, workers)]
    lines.append(f"enqueued ({len(spec.enqueue)}):" if spec.enqueue else "enqueued: none")
    lines += [
        f"  {i}. " + " ".join(f"{k}={v}" for k, v in params.items())
        for i, params in enumerate(spec.enqueue, start=1)
    ]
    if spec.base:
        lines.append(f"base: {' '.join(spec.base)}")
    return "\n".join(lines) + "\n"


def _space_lines(spec: SweepSpec) -> list[str]:
    """Each dimension with its distribution and size, then the grid size."""
    from tlsweep.sweepspec import describe_dimension, dimension_size, grid_size

    width = max(len(dim.key) for dim in spec.space)
    lines = ["search space:"]
    for dim in spec.space:
        size = dimension_size(dim)
        count = f"{size} values" if size is not None else "continuous"
        lines.append(f"  {dim.key:<{width}}  {describe_dimension(dim)}  ({count})")
    grid = grid_size(spec.space)
    continuous = ", ".join(dim.key for dim in spec.space if dimension_size(dim) is None)
    lines.append(f"grid size: {grid}" if grid else f"grid size: infinite ({continuous})")
    return lines


def _settings_lines(spec: SweepSpec, workers: int) -> list[str]:
    """The study settings; the storage without its password."""
    from tlsweep.sweepspec import artifacts_dir

    s = spec.settings
    objective = ", ".join(f"{name} ({direction})" for name, direction in s.objective_pairs)
    url = s.storage or _default_storage(workers)
    grouping = f"up to {s.group_size} trials at a time" if s.group_size > 1 else "off"
    lines = [
        "settings:",
        f"  objective  {objective}",
        f"  sampler    {s.sampler}{_options(s.sampler_options)}, seed {s.seed}",
        f"  pruner     {s.pruner}{_options(s.pruner_options)}",
        f"  n_trials   {s.n_trials}" + (f", timeout {s.timeout:g} s" if s.timeout else ""),
        f"  groups     {grouping}",
        f"  storage    {redact_url(url)}" + ("" if s.storage else " (default)"),
        f"  artifacts  {artifacts_dir(s, url)}",
    ]
    if s.promote is not None:
        then = " ".join(s.promote.overrides) or "(no overrides)"
        lines.append(f"  promote    the best {s.promote.top_k}, continued with {then}")
    return lines


def _default_storage(workers: int) -> str:
    """The storage a new study gets (`sweep.storage_url` without opening anything: a study
    already in the journal file stays there)."""
    if workers > 1:
        return f"journal://{Path('mlruns/optuna.journal').resolve()}"
    return f"sqlite:///{Path('mlruns/optuna.db').resolve()}"


def _options(options: dict[str, Any]) -> str:
    return f" {options}" if options else ""


def _multirun(overrides: Sequence[str]) -> int:
    """``train -m a=1,2 b=3,4``: the grid as a tracked sweep (parent run, a child per point)."""
    from tlsweep.sweepspec import multirun_spec

    spec = multirun_spec(overrides)
    backend.import_quietly()
    from tlsweep.sweep import run_sweep

    summary = run_sweep(spec)
    return 0 if summary.best_value is not None and not summary.shortfall else 1


def _submit_to_slurm(spec: Any, sweep_args: list[str], workers: int, launcher: list[str]) -> int:
    from tlsweep.sweep._slurm import launcher_settings

    settings = launcher_settings(launcher)  # bad settings refused before TF loads
    backend.import_quietly()
    from tlsweep.sweep import submit_workers

    submitted = submit_workers(spec, sweep_args, workers, settings)
    name = spec.settings.study_name
    print(f"submitted {workers} worker job(s) for sweep {name}: {' '.join(submitted.job_ids)}")
    print(f"logs: {submitted.logs}/JOB_ID/")
    print(f"next:\n  tlsweep status {name} --follow   # progress, from any machine")
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    backend.import_quietly()
    from tlsweep import sweep, tracking

    tracking.connect()
    study = sweep.load_study(args.name, args.storage)
    return sweep.show_status(study, follow=args.follow, every=args.every)


def _gpu_list(text: str | None) -> list[str]:
    if not text:
        return []
    gpus = [part.strip() for part in text.split(",")]
    if not all(g.isdigit() for g in gpus):
        raise UserError(
            f"--gpus={text} is not allowed: GPU indices like 0,1,3 (0,0,1,1: two workers each)"
        )
    return gpus


def cmd_runs(args: argparse.Namespace) -> int:
    backend.import_quietly()
    from tlsweep import report, sweep, tracking

    tracking.connect()
    if not args.name:
        names = sweep.study_names(args.storage)
        print("\n".join(names) if names else "no sweeps yet: tlsweep sweep quickstart")
        return 0
    study = sweep.load_study(args.name, args.storage)
    board = sweep.leaderboard(study, sweep.parent_run_id(study))
    print(report.to_text(board) if len(board) else f"sweep {args.name} has no trials yet")
    if args.csv:
        board.to_csv(args.csv, index=False)
        print(f"wrote {args.csv}")
    return 0


def cmd_reproduce(args: argparse.Namespace) -> int:
    backend.import_quietly()
    from tlsweep.reproduce import reproduce

    run_id = args.run_id
    if args.best:
        from tlsweep import sweep, tracking

        tracking.connect()
        run_id = sweep.best_run_id(args.best, args.storage)
    result = reproduce(run_id, tolerance=args.tolerance)
    for note in result.warnings:
        print(f"warning: {note}", file=sys.stderr)
    print(f"original {result.original_run_id}  reproduced {result.run_id}")
    print(result.table.to_string(index=False, float_format=lambda v: f"{v:.6g}"))
    if result.matches:
        print(f"reproduced: every metric within {result.tolerance:g}")
        return 0
    print(f"NOT reproduced: metrics differ by more than {result.tolerance:g}", file=sys.stderr)
    return 1


def cmd_report(args: argparse.Namespace) -> int:
    if args.top < 1:
        raise UserError(f"--top={args.top} is not allowed: must be >= 1")
    backend.import_quietly()
    from tlsweep import pages, report, tracking

    tracking.connect()
    content = pages.sweep_report(args.name, args.top, args.storage)
    page = report.sweep_report_html(content)
    output = Path(args.output or f"{args.name}_report.html")
    _write_page(output, page)
    uri = tracking.log_report(content.parent_run_id, page)
    print(f"wrote {output}")
    print(f"logged {uri} on the parent run {content.parent_run_id}")
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    from rich.console import Console

    from tlsweep import pages, report, tracking

    tracking.connect()
    comparison = pages.run_comparison(args.run_a, args.run_b)
    a, b = (run["run_id"][:8] for run in comparison.runs)
    output = Path(args.output or f"compare_{a}_{b}.html")
    _write_page(output, report.comparison_html(comparison))
    console = Console(highlight=False)
    for run, label in zip(comparison.runs, comparison.labels, strict=True):
        console.print(f"{label}  run {run['run_id']}  {run['status']}  ({run['experiment']})")
    same = comparison.same_params
    if len(comparison.params):
        console.print(
            report.rich_table(comparison.params, f"config values that differ ({same} identical)")
        )
    else:
        console.print(f"no config value differs ({same} identical)")
    console.print(report.rich_table(comparison.metrics, "metrics"))
    if comparison.per_class is not None:
        console.print(report.rich_table(comparison.per_class, "per-class accuracy"))
    print(f"wrote {output}")
    return 0


def _write_page(path: Path, page: str) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(page, encoding="utf-8")
    except OSError as exc:
        raise UserError(f"cannot write {path}: {exc.strerror or exc}") from None


def cmd_dashboard(args: argparse.Namespace) -> int:
    """optuna-dashboard on the sweep's storage (the journal too) and artifact folder."""
    if not 0 <= args.port <= 65535:
        raise UserError(f"--port={args.port} is not allowed: 0-65535 (0: any free port)")
    _require_dashboard()  # before TensorFlow loads
    backend.import_quietly()
    from tlsweep import sweep, tracking

    tracking.connect()
    board = sweep.open_dashboard(args.name, args.storage, args.artifacts)

    def ready(url: str) -> None:
        print(f"optuna-dashboard for sweep {args.name} ({board.describe()})", flush=True)
        print(f"  {url}  (Ctrl-C stops)", flush=True)

    sweep.serve_dashboard(board, args.host, args.port, ready)
    return 0


def _require_dashboard() -> None:
    """A one-line `UserError` when optuna-dashboard is not installed (nothing imported)."""
    from importlib.util import find_spec

    try:
        found = find_spec("optuna_dashboard") is not None
    except (ImportError, ValueError):  # ValueError: a module set to None (blocked)
        found = False
    if not found:
        raise UserError(
            "tlsweep dashboard needs optuna-dashboard: pip install 'tlsweep[dashboard]'"
        )


def cmd_ui(args: argparse.Namespace) -> int:
    import subprocess  # no TensorFlow here: tracking loads Keras only when a model is touched

    from tlsweep import tracking

    uri = tracking.connect()
    command = [
        sys.executable,
        "-m",
        "mlflow",
        "ui",
        "--backend-store-uri",
        uri,
        "--host",
        args.host,
        "--port",
        str(args.port),
        "--workers",
        "1",
    ]
    print(
        f"MLflow UI for {redact_url(uri)}: http://{args.host}:{args.port}  (Ctrl-C stops)",
        flush=True,
    )
    return subprocess.call(command)


def cmd_cache(args: argparse.Namespace) -> int:
    from tlsweep.config import load_config

    cfg = load_config(args.overrides)
    backend.import_quietly()
    from tlsweep.features import FeatureStore

    store = FeatureStore.from_config(cfg.cache)
    if args.action == "clear":
        removed = store.clear()
        shutil.rmtree(cfg.cache.manifest_dir, ignore_errors=True)  # folder scans start afresh
        print(f"removed {removed} entries from {store.directory}")
        return 0
    entries = store.entries() if store.directory.is_dir() else []
    total = sum(e.bytes for e in entries)
    print(
        f"{store.directory}: {len(entries)} entries, {total / 1e6:.1f} MB "
        f"(budget {store.max_bytes / 1e9:g} GB)"
    )
    for e in entries:
        d = e.description
        print(
            f"  {e.key[:12]}  {e.bytes / 1e6:8.1f} MB  {d.get('backbone', '?'):<16} "
            f"{d.get('input_size', '?')}px {d.get('pooling', '?'):<7} {d.get('split', '?'):<5} "
            f"n={d.get('n', '?')}"
        )
    return 0


def cmd_predict(args: argparse.Namespace) -> int:
    import numpy as np

    from tlsweep.data import read_images
    from tlsweep.tracking import load_model

    if args.top_k < 1:
        raise UserError(f"--top-k={args.top_k} is not allowed: must be >= 1")
    backend.import_quietly()
    model = load_model(args.model_uri)
    size = model.metadata.get_input_schema().inputs[0].shape[1]
    names = (model.metadata.metadata or {}).get("class_names")
    images = read_images(args.images, size).astype("float32")
    # The Keras model inside the pyfunc, asked for no progress bar (Keras' switch for it is
    # per thread, and the JAX backend reports progress from another thread).
    probabilities = np.asarray(model.get_raw_model().predict(images, verbose=0))
    for path, row in zip(args.images, probabilities, strict=True):
        top = np.argsort(row)[::-1][: args.top_k]
        shown = "  ".join(f"{names[i] if names else i} {row[i]:.3f}" for i in top)
        print(f"{path}: {shown}")
    return 0


def _hydra_flags(sub: argparse.ArgumentParser) -> None:
    """The flags a Hydra user types: --cfg, --resolve, --info, -cd, -cn."""
    sub.add_argument(
        "--cfg",
        choices=["job", "hydra", "all"],
        help="print the config (job: the model's, resolved; hydra: Hydra's own; all) and exit",
    )
    sub.add_argument("--resolve", action="store_true", help="with --cfg hydra|all: resolve it")
    sub.add_argument(
        "--info", action="store_true", help="print the config search path and defaults, and exit"
    )
    sub.add_argument("-cd", "--config-dir", metavar="DIR", help="the config folder (conf/)")
    sub.add_argument("-cn", "--config-name", metavar="NAME", help="the root config in it (config)")


def _use_config_location(args: argparse.Namespace) -> None:
    """-cd/-cn, through the environment: worker processes compose the same configs."""
    if getattr(args, "config_dir", None):
        folder = Path(args.config_dir).expanduser().resolve()
        if not folder.is_dir():
            raise UserError(f"--config-dir={args.config_dir} is not a folder")
        os.environ["TLSWEEP_CONFIG_DIR"] = str(folder)
    if getattr(args, "config_name", None):
        os.environ["TLSWEEP_CONFIG_NAME"] = args.config_name.removesuffix(".yaml")


def _print_config(what: str, overrides: Sequence[str], resolve: bool) -> None:
    """``--cfg job|hydra|all``: the model's config (typed and resolved), Hydra's, or both."""
    from tlsweep.config import hydra_yaml, load_config, to_yaml

    if what in ("job", "all"):
        print(to_yaml(load_config(overrides)), end="")
    if what in ("hydra", "all"):
        print(hydra_yaml(overrides, resolve), end="")


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("tlsweep")
    except PackageNotFoundError:
        return "unknown"


def _command(
    commands: Any, name: str, handler: Callable[[argparse.Namespace], int], help_text: str
) -> argparse.ArgumentParser:
    sub = commands.add_parser(name, help=help_text, description=help_text)
    sub.set_defaults(handler=handler)
    talk = sub.add_mutually_exclusive_group()
    talk.add_argument("-q", "--quiet", action="store_true", help="summaries and errors only")
    talk.add_argument(
        "-v", "--verbose", action="store_true", help="also third-party INFO logging (MLflow)"
    )
    return sub


if __name__ == "__main__":
    sys.exit(main())
