"""The ``advtrain`` command line (also ``python -m advtrain``).

Subcommands:

* ``train`` — adversarially train a model (flags or a ``--config`` file);
* ``eval``  — evaluate a checkpoint with an attack suite, write a JSON report;
* ``plot``  — overlay the accuracy curves of one or more runs;
* ``bench`` — run the benchmark suite in the repository's ``benchmarks/``.

Errors the user can fix (a missing data directory, an unknown method, a bad
ε, a ``--device`` this machine lacks, a checkpoint from another model, an
unknown config key, running out of memory or disk) are reported as one line
``advtrain: error: ...`` that says what to do, with exit status 2; set
``ADVTRAIN_TRACEBACK=1`` to see the traceback instead.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import re
import subprocess
import sys
import warnings
from fractions import Fraction
from pathlib import Path
from typing import Any, Dict, List, NoReturn, Optional, Sequence, Tuple

from .cli_errors import device_problem, os_error_line, runtime_error_line
from .cli_methods import add_method_arguments, method_kwargs
from .config import RESERVED, load_config, resolve_config
from .distributed import init_distributed, rank as process_rank, shutdown_distributed
from .methods import METHODS, get_method
from .training.atomic import atomic_write_text
from .training.callbacks import Callback
from .training.run_lock import lock_run_dir

MODELS = ("preactresnet18", "wideresnet", "smallcnn")
SUITES = ("pgd20", "cw", "autoattack", "full")
PRECISIONS = ("auto", "fp32", "bf16")
CONFIG_NAME = "config.json"
CHECKPOINT_NAME = "checkpoint.pt"
METRICS_NAME = "metrics.jsonl"
#: Model class names recorded in checkpoints, mapped to :func:`advtrain.models.build_model` names.
MODEL_CLASSES = {"PreActResNet18": "preactresnet18", "WideResNet": "wideresnet", "SmallCNN": "smallcnn"}


class CLIError(Exception):
    """An error reported to the user as one line."""


class _Parser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are one line ``advtrain: error: ...``
    (exit 2) pointing at the command's ``--help``, rather than a usage block."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"advtrain: error: {message} (see `{self.prog} --help`)\n")


# ------------------------------------------------------------ value parsers
def parse_eps(text: str) -> float:
    """Parse a radius in pixel units: ``0.031``, ``8/255``. Must lie in [0, 1]
    (images are pixels in [0, 1]; ``8`` is refused with a hint to write ``8/255``)."""
    try:
        value = float(Fraction(text)) if "/" in text else float(text)
    except (ValueError, ZeroDivisionError):
        raise argparse.ArgumentTypeError(f"not a number or fraction: {text!r}") from None
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {text}")
    if value > 1:
        raise argparse.ArgumentTypeError(
            f"is in pixel units (images are in [0, 1]), so it must be <= 1; got {text} (did you mean {text}/255?)")
    return value


def positive_int(text: str) -> int:
    """Parse an integer >= 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {text}")
    return value


def non_negative_int(text: str) -> int:
    """Parse an integer >= 0."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {text}")
    return value


# ------------------------------------------------------------------- train
def _train_parser(sub: Any) -> argparse.ArgumentParser:
    p = sub.add_parser(
        "train", help="adversarially train a model and report clean and robust accuracy",
        description="Adversarially train a model on CIFAR and report clean and PGD-20 accuracy. The defaults "
                    "reproduce the APART paper's setting: APART, PreActResNet18, CIFAR-10, 30 epochs, batch 128.",
        epilog="Options may also come from --config FILE (TOML or JSON, keys named like the flags); flags given "
               "on the command line override the file. With --resume and no --config, OUT/config.json is used.")
    p.add_argument("--config", default=None, metavar="FILE",
                   help="TOML or JSON file of options (keys = flag names, with _ or -)")
    # --method and one flag per option of the registered methods (--eps, --steps, ...)
    add_method_arguments(p, default="apart", parsers={"eps": parse_eps, "steps": positive_int})
    p.add_argument("--model", choices=MODELS, default="preactresnet18", help="model (default: preactresnet18)")
    p.add_argument("--dataset", choices=("cifar10", "cifar100"), default="cifar10", help="default: cifar10")
    p.add_argument("--data", default=None, metavar="DIR",
                   help="directory holding the official CIFAR python-format folder (required)")
    p.add_argument("--download", action="store_true", help="download the dataset (MD5-verified) if missing")
    p.add_argument("--epochs", type=positive_int, default=None, metavar="N",
                   help="epochs (default: the method's preset, 30; 15 for fgsm-rs)")
    p.add_argument("--batch-size", type=positive_int, default=128, metavar="N", help="default: 128")
    p.add_argument("--lr", type=float, default=None, help="peak learning rate (default: the method's, 0.2)")
    p.add_argument("--schedule", choices=("cyclic", "piecewise", "constant"), default=None,
                   help="learning-rate schedule (default: cyclic)")
    p.add_argument("--precision", choices=PRECISIONS, default="auto",
                   help="auto (default): bf16 autocast on CUDA, fp32 on CPU")
    p.add_argument("--compile", action="store_true", help="torch.compile the model")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    p.add_argument("--seed", type=int, default=0, metavar="N", help="seed of weights, shuffling, attacks (default 0)")
    p.add_argument("--out", default=None, metavar="DIR",
                   help="run directory: checkpoint.pt, metrics.jsonl, config.json")
    p.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint.pt")
    p.add_argument("--init-weights", default=None, metavar="CKPT",
                   help="start a fresh run from the model weights of CKPT (a checkpoint file or run directory of "
                        "any method); nothing else is taken from it")
    p.add_argument("--eval-every", type=non_negative_int, default=1, metavar="N",
                   help="evaluate every N epochs (0: only at the end; default 1)")
    p.add_argument("--eval-examples", type=positive_int, default=1000, metavar="N",
                   help="test images used for evaluation (default 1000)")
    p.add_argument("--train-examples", type=positive_int, default=None, metavar="N",
                   help="use only the first N training images")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=run_train)
    return p


def build_trainer(args: argparse.Namespace, num_classes: int) -> Any:
    """The registered preset of ``args.method`` (see :data:`advtrain.methods.METHODS`)
    with the command's overrides."""
    import torch

    from .models import build_model

    options = method_kwargs(args)  # an option the method does not take is refused before any work
    torch.manual_seed(args.seed)  # the same --seed gives the same initial weights
    model = build_model(args.model, num_classes=num_classes)
    kwargs: Dict[str, Any] = dict(batch_size=args.batch_size, precision=args.precision, compile=args.compile,
                                  device=args.device, seed=args.seed, run_dir=args.out,
                                  eval_every=max(args.eval_every, 0) or 10**9, eval_examples=args.eval_examples,
                                  progress=not args.no_progress)
    for key in ("epochs", "lr", "schedule"):
        if getattr(args, key) is not None:
            kwargs[key] = getattr(args, key)
    return get_method(args.method).build(model, **kwargs, **options)


def _read_splits(args: argparse.Namespace) -> Tuple[Any, Any]:
    """The training and test splits named by ``--dataset`` / ``--data``."""
    from .data import cifar10, cifar100

    if not args.download and not Path(args.data).is_dir():
        raise CLIError(f"data directory {args.data} does not exist "
                       f"(pass --download to fetch {args.dataset} into it)")
    reader = cifar10 if args.dataset == "cifar10" else cifar100
    train = reader(args.data, train=True, download=args.download)
    test = reader(args.data, train=False, download=False)
    if args.train_examples is not None:
        train = train.subset(args.train_examples)
    return train, test


def recorded_options(args: argparse.Namespace) -> Dict[str, Any]:
    """The resolved options of a command, as written to ``config.json`` (and
    loadable again with ``--config``)."""
    return {k: v for k, v in vars(args).items() if k not in RESERVED}


class _RecordConfig(Callback):
    """Writes the resolved options to ``config.json`` when training starts,
    after a resumed checkpoint has loaded (so a failed resume leaves the run's
    record as it was)."""

    @property
    def name(self) -> str:
        return "advtrain.cli.config"

    def __init__(self, path: Path, options: Dict[str, Any]) -> None:
        self.path, self.options = path, options

    def on_fit_start(self, trainer: Any) -> None:
        atomic_write_text(self.path, json.dumps(self.options, indent=2) + "\n", what="run configuration")


def _initial_weights(args: argparse.Namespace) -> Optional[Path]:
    """The checkpoint file of ``--init-weights`` (a file, or a run directory's
    ``checkpoint.pt``), or None. A resumed run takes its weights from its own
    checkpoint: there ``--init-weights`` may only repeat the value recorded
    in ``OUT/config.json`` when the run started, and is then not applied."""
    if not args.init_weights:
        return None
    if args.resume:
        recorded: Any = None
        config = Path(args.out) / CONFIG_NAME
        if config.is_file():
            try:
                recorded = json.loads(config.read_text()).get("init_weights")
            except (OSError, ValueError, AttributeError):
                recorded = None
        if recorded != args.init_weights:
            raise CLIError("--init-weights starts a fresh run from a checkpoint's model weights, so it cannot be "
                           "combined with --resume (the run's own checkpoint holds its weights); drop one of them")
        return None
    return _locate_checkpoint(args.init_weights)[0]


def run_train(args: argparse.Namespace) -> int:
    if args.resume and not args.out:
        raise CLIError("--resume needs --out (the run directory to continue)")
    init_weights = _initial_weights(args)
    init_distributed()  # a multi-process run under torchrun: data-parallel training
    if args.out and process_rank() == 0:
        # Locked before the data are read, so that a second run into OUT stops at once.
        with lock_run_dir(args.out):
            return _train(args, init_weights)
    return _train(args, init_weights)


def _train(args: argparse.Namespace, init_weights: Optional[Path]) -> int:
    train, test = _read_splits(args)
    trainer = build_trainer(args, num_classes=len(train.classes))
    if args.out and trainer.is_main:
        trainer.callbacks.append(_RecordConfig(Path(args.out) / CONFIG_NAME, recorded_options(args)))
    try:
        history = trainer.fit(train, eval_data=test, resume=bool(args.resume), init_weights=init_weights)
    finally:
        shutdown_distributed()
    if not trainer.is_main:
        return 0
    last = history[-1]
    total = sum(r.get("time", 0.0) for r in history)
    print(f"done: {args.method} {args.model} {len(history)} epochs, {total:.1f} s training; "
          f"clean accuracy {last.get('clean_acc', float('nan')):.4f}, "
          f"PGD-20 robust accuracy {last.get('robust_acc', float('nan')):.4f} "
          f"on {min(args.eval_examples, len(test))} test images")
    return 0


def _apply_config(parser: argparse.ArgumentParser, sub: argparse.ArgumentParser, argv: Sequence[str],
                  args: argparse.Namespace) -> argparse.Namespace:
    """Re-parse ``argv`` with the options of ``--config`` (or, on ``--resume``,
    of ``OUT/config.json``) as defaults, so that flags on the command line win."""
    path: Optional[Path] = Path(args.config) if args.config else None
    if path is None and args.resume and args.out and (Path(args.out) / CONFIG_NAME).is_file():
        path = Path(args.out) / CONFIG_NAME
    if path is not None:
        sub.set_defaults(**resolve_config(sub, load_config(path), source=path))
        args = parser.parse_args(argv)
    if not args.data:
        raise CLIError("train needs --data DIR (a directory holding cifar-10-batches-py/), "
                       "on the command line or as `data` in the --config file")
    return args


# -------------------------------------------------------------------- eval
def _eval_parser(sub: Any) -> argparse.ArgumentParser:
    p = sub.add_parser(
        "eval", help="evaluate a checkpoint against an attack suite and write a JSON report",
        description="Load a model from an advtrain checkpoint (a checkpoint.pt file, or a run directory written "
                    "by `advtrain train`) and report its clean and robust accuracy on the test split.")
    p.add_argument("checkpoint", metavar="CHECKPOINT", help="checkpoint file, or a run directory holding one")
    p.add_argument("--data", required=True, metavar="DIR",
                   help="directory holding the official CIFAR python-format folder")
    p.add_argument("--model", choices=MODELS, default=None,
                   help="model name (default: the one recorded in the checkpoint)")
    p.add_argument("--dataset", choices=("cifar10", "cifar100"), default=None,
                   help="default: the run's, else cifar100 for 100 classes and cifar10 otherwise")
    p.add_argument("--suite", choices=SUITES, default="pgd20",
                   help="pgd20 (default), cw, autoattack (APGD-CE + APGD-T) or full (all four)")
    p.add_argument("--eps", type=parse_eps, default=8 / 255, help="L∞ radius, pixel units (default 8/255)")
    p.add_argument("--n-examples", type=positive_int, default=None, metavar="N",
                   help="evaluate the first N test images (default: all)")
    p.add_argument("--batch-size", type=positive_int, default=256, metavar="N", help="default: 256")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    p.add_argument("--precision", choices=PRECISIONS, default="auto",
                   help="auto: bf16 autocast on CUDA, fp32 on CPU")
    p.add_argument("--out", default=None, metavar="FILE", help="write the report as JSON here")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--no-masking-checks", action="store_true",
                   help="skip the cheap gradient-masking checks (probability outputs, zero input gradients, "
                        "randomized outputs) that run on the first 200 test images before the attacks")
    p.set_defaults(func=run_eval)
    return p


def _locate_checkpoint(target: str) -> Tuple[Path, Dict[str, Any]]:
    """The checkpoint file for ``target`` (a file or a run directory) and the
    run's recorded ``config.json`` options (empty when there is none)."""
    path = Path(target)
    if path.is_dir():
        run_dir, path = path, path / CHECKPOINT_NAME
        if not path.is_file():
            raise CLIError(f"run directory {run_dir} holds no {CHECKPOINT_NAME}: pass a checkpoint file, or a run "
                           "directory written by `advtrain train`")
    elif not path.exists():
        raise CLIError(f"checkpoint {path} does not exist: pass a checkpoint file, or a run directory written by "
                       "`advtrain train`")
    else:
        run_dir = path.parent
    config: Dict[str, Any] = {}
    if (run_dir / CONFIG_NAME).is_file():
        try:
            config = json.loads((run_dir / CONFIG_NAME).read_text())
        except (OSError, ValueError) as exc:
            raise CLIError(f"cannot read {run_dir / CONFIG_NAME}: {exc}; fix or remove that file") from None
        if not isinstance(config, dict):
            config = {}
    return path, config


def _strip_prefixes(weights: Dict[str, Any]) -> Dict[str, Any]:
    """Drop the ``module.`` (DistributedDataParallel) and ``_orig_mod.``
    (torch.compile) prefixes when every key carries them."""
    for prefix in ("module.", "_orig_mod."):
        if weights and all(k.startswith(prefix) for k in weights):
            weights = {k[len(prefix):]: v for k, v in weights.items()}
    return weights


def _model_kwargs(name: str, weights: Dict[str, Any]) -> Dict[str, Any]:
    """Constructor arguments of model ``name`` that reproduce ``weights``'
    shapes (number of classes, width, depth, whether it normalizes)."""
    kwargs: Dict[str, Any] = {"normalize": "normalize.mean" in weights}
    if name == "preactresnet18":
        kwargs.update(num_classes=weights["linear.weight"].shape[0], width=weights["conv1.weight"].shape[0])
    elif name == "smallcnn":
        kwargs.update(num_classes=weights["linear.weight"].shape[0], width=weights["stage1.0.weight"].shape[0])
    elif name == "wideresnet":
        blocks = {int(m.group(1)) for k in weights for m in [re.match(r"block1\.(\d+)\.", k)] if m}
        kwargs.update(num_classes=weights["fc.weight"].shape[0], depth=6 * len(blocks) + 4,
                      widen=max(1, weights["block1.0.conv1.weight"].shape[0] // 16))
    return kwargs


def load_model(checkpoint: str, model: Optional[str] = None) -> Tuple[Any, str, Dict[str, Any], Dict[str, Any]]:
    """Rebuild the model saved in an advtrain checkpoint (file or run
    directory). Returns ``(model, model name, checkpoint state, run config)``.
    The model class is the one recorded in the checkpoint; ``model`` (a
    :func:`~advtrain.models.build_model` name) must agree with it."""
    from .models import build_model
    from .training import CheckpointError, load_checkpoint

    path, run_config = _locate_checkpoint(checkpoint)
    try:
        state = load_checkpoint(path, map_location="cpu")
    except CheckpointError as exc:
        if exc.__cause__ is None:
            raise
        raise CLIError(f"{path} is not a readable advtrain checkpoint "
                       f"({type(exc.__cause__).__name__} while loading it): pass a checkpoint.pt written by "
                       "advtrain, or rerun the training that writes it") from None
    recorded = state.get("config", {}).get("model")
    name = MODEL_CLASSES.get(recorded) if recorded else run_config.get("model")
    if recorded and name is None and model is None:
        raise CLIError(f"checkpoint {path} holds a {recorded}, which is not one of advtrain's models "
                       f"({', '.join(MODELS)}); load it in Python and use advtrain.evaluation.evaluate")
    if model is not None:
        if name is not None and name != model:
            raise CLIError(f"checkpoint {path} was written for a {recorded or name} model, not {model} "
                           f"(drop --model, or pass --model {name})")
        name = model
    if name is None:
        raise CLIError(f"checkpoint {path} does not record its model; pass --model ({', '.join(MODELS)})")
    weights = _strip_prefixes(dict(state["model"]))
    kwargs = _model_kwargs(name, weights)
    recorded_kwargs = state.get("config", {}).get("model_kwargs")
    if recorded_kwargs:
        kwargs.update(recorded_kwargs)
    elif name == "preactresnet18":
        # Checkpoints that record no constructor arguments were written when
        # the projection shortcuts read the pre-activation.
        kwargs["shortcut"] = "preact"
    try:
        net = build_model(name, **kwargs)
        net.load_state_dict(weights)
    except (KeyError, IndexError, RuntimeError) as exc:
        detail = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CLIError(f"checkpoint {path} does not hold {name} weights ({detail}): pass --model naming the "
                       f"architecture it was trained with, or the checkpoint of a {name}") from None
    return net, name, state, run_config


def run_eval(args: argparse.Namespace) -> int:
    import torch

    try:
        from .evaluation import GradientMaskingWarning, evaluate
    except ImportError as exc:  # pragma: no cover - a broken install
        raise CLIError(f"advtrain.evaluation is not available: {exc}") from None
    from .data import cifar10, cifar100

    model, name, state, run_config = load_model(args.checkpoint, args.model)
    num_classes = int(next(m for m in reversed(list(model.modules())) if isinstance(m, torch.nn.Linear))
                      .out_features)
    dataset = args.dataset or run_config.get("dataset") or ("cifar100" if num_classes == 100 else "cifar10")
    if not Path(args.data).is_dir():
        raise CLIError(f"data directory {args.data} does not exist: pass --data DIR holding the test split "
                       "(e.g. cifar-10-batches-py/)")
    test = (cifar10 if dataset == "cifar10" else cifar100)(args.data, train=False)
    if len(test.classes) != num_classes:
        raise CLIError(f"the checkpoint's model has {num_classes} classes but {dataset} has {len(test.classes)}; "
                       "pass the right --dataset")
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    bf16 = args.precision == "bf16" or (args.precision == "auto" and device.type == "cuda")
    model.to(device)
    with warnings.catch_warnings():
        # the printed report lists every masking finding with its explanation
        warnings.simplefilter("ignore", GradientMaskingWarning)
        report = evaluate(model, test, attacks=args.suite, eps=args.eps, batch_size=args.batch_size,
                          n_examples=args.n_examples, device=device, progress=not args.no_progress,
                          autocast_dtype=torch.bfloat16 if bf16 else None,
                          masking_checks=not args.no_masking_checks)
    result = {"checkpoint": str(args.checkpoint), "model": name, "dataset": dataset, "epoch": state.get("epoch"),
              "suite": args.suite, "precision": "bf16" if bf16 else "fp32", **report.to_dict()}
    print(f"{name} from {args.checkpoint} (epoch {state.get('epoch')}), {dataset} test split, suite {args.suite}")
    print(report)
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=2) + "\n")
        print(f"report written to {out}")
    return 0


# -------------------------------------------------------------------- plot
def _plot_parser(sub: Any) -> argparse.ArgumentParser:
    p = sub.add_parser("plot", help="overlay the accuracy curves of training runs (needs matplotlib)",
                       description="Plot clean and robust accuracy per epoch from each run's metrics.jsonl, "
                                   "one line per run.")
    p.add_argument("runs", nargs="+", metavar="RUN_DIR", help="run directories (or metrics.jsonl files)")
    p.add_argument("--out", required=True, metavar="FILE", help="PNG file to write")
    p.add_argument("--title", default=None, help="figure title")
    p.add_argument("--robust-key", default="robust_acc", metavar="KEY",
                   help="record key of the robust accuracy (default robust_acc)")
    p.set_defaults(func=run_plot)
    return p


def _run_labels(paths: Sequence[Path]) -> List[str]:
    """Short unique labels: the run directory names, or their full paths when those clash."""
    names = [p.parent.name if p.name == METRICS_NAME else p.stem for p in paths]
    if len(set(names)) == len(names):
        return names
    return [str(p.parent if p.name == METRICS_NAME else p) for p in paths]


def run_plot(args: argparse.Namespace) -> int:
    files = []
    for run in args.runs:
        path = Path(run)
        metrics = path / METRICS_NAME if path.is_dir() else path
        if not metrics.is_file():
            raise CLIError((f"no {METRICS_NAME} in {run}" if path.is_dir() else f"{run} does not exist")
                           + ": pass run directories written by `advtrain train` (or their metrics.jsonl files)")
        files.append(metrics)
    labels = _run_labels(files)
    if len(set(labels)) != len(labels):
        raise CLIError("the same run is given twice: give each run once")
    # The arguments are checked first, so a wrong path is reported as such
    # whether or not matplotlib is installed.
    if importlib.util.find_spec("matplotlib") is None:
        raise CLIError('plotting needs matplotlib: pip install "advtrain[plot]"')
    from .diagnostics.plots import plot_accuracy_curves

    out = plot_accuracy_curves(dict(zip(labels, files)), args.out, title=args.title, robust_key=args.robust_key)
    print(f"wrote {out}")
    return 0


# ------------------------------------------------------------------- bench
def _bench_parser(sub: Any) -> argparse.ArgumentParser:
    p = sub.add_parser("bench", help="run the benchmark table (the repository's benchmarks/ suite)",
                       description="Measure epoch time of each method against PGD-10 in the same run by "
                                   "running the pytest suite in the repository's benchmarks/ folder "
                                   "(not part of an installed wheel).")
    p.add_argument("--size", choices=("cpu", "gpu", "smoke"), default="cpu",
                   help="cpu: PreActResNet18(width=16), minutes on 2 cores (default); gpu: full CIFAR-10 epochs "
                        "of PreActResNet18 in bf16 (needs CUDA); smoke: seconds, checks the machinery")
    p.add_argument("--report", default=None, metavar="FILE",
                   help="write this size's measured table into this Markdown file (e.g. docs/benchmarks.md)")
    p.add_argument("--data", default=None, metavar="DIR",
                   help="CIFAR-10 directory (default: $ADVTRAIN_CIFAR10_DIR, else synthetic images)")
    p.add_argument("--benchmarks", default=None, metavar="DIR",
                   help="the benchmarks/ folder (default: the one next to this advtrain checkout)")
    p.add_argument("pytest_args", nargs=argparse.REMAINDER,
                   help="further pytest or --bench-* options, after `--` (e.g. -- --bench-rounds 5 -k apart)")
    p.set_defaults(func=run_bench)
    return p


def find_benchmarks(explicit: Optional[str] = None) -> Path:
    """The ``benchmarks/`` folder: ``explicit``, or the one in the source
    checkout this package was imported from."""
    if explicit:
        folder = Path(explicit)
    else:
        folder = Path(__file__).resolve().parent.parent / "benchmarks"
    if not folder.is_dir() or not any(folder.glob("*.py")):
        raise CLIError(f"no benchmark suite at {folder}: `advtrain bench` runs the benchmarks/ folder of a source "
                       "checkout (git clone, then pip install -e .); pass --benchmarks DIR to point at one")
    return folder


def bench_command(folder: Path, size: str, report: Optional[str], extra: Sequence[str] = (),
                  data: Optional[str] = None) -> List[str]:
    """The pytest command line that runs the benchmark suite (see
    ``benchmarks/conftest.py`` for its ``--bench-*`` options)."""
    cmd = [sys.executable, "-m", "pytest", str(folder), "--bench-size", size, "-q"]
    if report:
        cmd += ["--bench-report", str(Path(report).resolve())]
    if data:
        cmd += ["--bench-data", data if data == "synthetic" else str(Path(data).resolve())]
    return cmd + [a for a in extra if a != "--"]


def run_bench(args: argparse.Namespace) -> int:
    if importlib.util.find_spec("pytest") is None:
        raise CLIError('the benchmarks need pytest: pip install "advtrain[test]"')
    folder = find_benchmarks(args.benchmarks)
    cmd = bench_command(folder, args.size, args.report, args.pytest_args, data=args.data)
    print("running: " + " ".join(cmd), flush=True)
    return subprocess.call(cmd, cwd=folder.parent)


# -------------------------------------------------------------------- main
def make_parser() -> argparse.ArgumentParser:
    """The ``advtrain`` argument parser with its subcommands."""
    parser = _Parser(prog="advtrain", description="Fast adversarial training for PyTorch.",
                     epilog="Run `advtrain COMMAND --help` for a command's options.")
    parser.add_argument("--version", action="version", version=f"advtrain {_version()}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _train_parser(sub)
    _eval_parser(sub)
    _plot_parser(sub)
    _bench_parser(sub)
    return parser


def _version() -> str:
    from . import __version__

    return __version__


def _subparser(parser: argparse.ArgumentParser, name: str) -> argparse.ArgumentParser:
    for action in parser._actions:  # argparse keeps subparsers in a private action
        if isinstance(action, argparse._SubParsersAction):
            return action.choices[name]
    raise KeyError(name)


def _show_warning(message: Any, category: Any, filename: str, lineno: int, file: Any = None,
                  line: Optional[str] = None) -> None:
    print(f"advtrain: warning: {message}", file=sys.stderr if file is None else file)


def _exit_status(exc: SystemExit) -> int:
    code = exc.code
    return code if isinstance(code, int) else (0 if code is None else 2)


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return text or type(exc).__name__


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of the ``advtrain`` console script."""
    parser = make_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help, --version and usage errors (already printed)
        return _exit_status(exc)
    debug = bool(os.environ.get("ADVTRAIN_TRACEBACK"))
    with warnings.catch_warnings():
        if not debug:
            warnings.showwarning = _show_warning
        try:
            if args.command == "train":
                try:
                    args = _apply_config(parser, _subparser(parser, "train"), argv, args)
                except SystemExit as exc:
                    return _exit_status(exc)
            problem = device_problem(getattr(args, "device", None))
            if problem is not None:
                raise CLIError(problem)
            return int(args.func(args))
        except (CLIError, ValueError, OSError) as exc:
            if debug:
                raise
            line = os_error_line(exc) if isinstance(exc, OSError) else _one_line(exc)
            print(f"advtrain: error: {line}", file=sys.stderr)
            return 2
        except RuntimeError as exc:  # from torch; only the conditions the user can fix become one line
            line = runtime_error_line(exc, compiled=bool(getattr(args, "compile", False)))
            if debug or line is None:
                raise
            print(f"advtrain: error: {line}", file=sys.stderr)
            return 2
        except FloatingPointError as exc:
            if debug:
                raise
            print(f"advtrain: error: {_one_line(exc)}", file=sys.stderr)
            return 1
        except KeyboardInterrupt:
            print("advtrain: interrupted (the last completed epoch's checkpoint is kept)", file=sys.stderr)
            return 130


__all__: List[str] = ["main", "make_parser", "parse_eps", "build_trainer", "run_train", "load_model",
                      "recorded_options"]
