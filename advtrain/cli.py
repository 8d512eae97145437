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
import difflib
import importlib.util
import json
import os
import subprocess
import sys
import warnings
from fractions import Fraction
from pathlib import Path
from typing import Any, Callable, Dict, List, NoReturn, Optional, Sequence, Tuple

from .cli_errors import device_problem, os_error_line, runtime_error_line
from .cli_methods import add_method_arguments, flag_and_value, method_kwargs
from .cli_study import add_study_parser
from .config import RESERVED, load_config, resolve_config
from .distributed import init_distributed, rank as process_rank, shutdown_distributed
from .methods import METHODS, get_method
from .models import model_names
from .training.atomic import atomic_write_text
from .training.callbacks import Callback
from .training.run_files import describe, existing_run
from .training.run_lock import lock_run_dir
from .methods.protocols import (PROTOCOLS, apply_protocol_schedule, describe_protocol, get_protocol,
                                 method_settings, protocol_kwargs)
from .training.scales import SCALES, get_scale
from .training.schedules import NAMES as SCHEDULES, MultiStep, ScheduleLike

SUITES = ("pgd20", "cw", "autoattack", "standard", "full")
PRECISIONS = ("auto", "fp32", "bf16")
CONFIG_NAME = "config.json"
CHECKPOINT_NAME = "checkpoint.pt"
METRICS_NAME = "metrics.jsonl"


class CLIError(Exception):
    """An error reported to the user as one line."""


class _Parser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are one line ``advtrain: error: ...``
    (exit 2) pointing at the command's ``--help``, rather than a usage block.
    Flags must be spelled out (no abbreviations, so a typo such as ``--epoch``
    is an error rather than a guess), and an unknown flag names the closest
    known one."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)

    def parse_known_args(self, args: Any = None, namespace: Any = None) -> Any:
        parsed, extras = super().parse_known_args(args, namespace)
        unknown = [a.split("=", 1)[0] for a in extras if a.startswith("--")]
        if unknown:
            known = [o for action in self._actions for o in action.option_strings if o.startswith("--")]
            close = difflib.get_close_matches(unknown[0], known, n=1)
            if close:
                self.error(f"unrecognized argument {unknown[0]}: did you mean {close[0]}?")
        return parsed, extras

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


def log_formats(text: str) -> str:
    """A comma list of metric formats (``csv,tensorboard``), each once; kept as
    text so that ``config.json`` records it as given."""
    from .training.loggers import LOG_FORMATS

    names = [name.strip() for name in str(text).split(",")]
    unknown = [name for name in names if name not in LOG_FORMATS]
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"expected a comma list of {', '.join(LOG_FORMATS)}, got {text!r}")
    return ",".join(dict.fromkeys(names))


def parse_eval_eps(text: Optional[str], norm: str) -> float:
    """The radius of ``advtrain eval --eps`` in ``norm``: a number or fraction,
    at most 1 in L∞ (see :func:`parse_eps`); ``None`` gives the usual CIFAR-10
    radii, 8/255 in L∞ and 0.5 in L2."""
    if text is None:
        return 8 / 255 if norm == "linf" else 0.5
    try:
        if norm == "linf":
            return parse_eps(text)
        value = float(Fraction(text)) if "/" in text else float(text)
    except argparse.ArgumentTypeError as exc:
        raise CLIError(f"argument --eps: {exc}") from None
    except (ValueError, ZeroDivisionError):
        raise CLIError(f"argument --eps: not a number or fraction: {text!r}") from None
    if not 0 <= value < float("inf"):
        raise CLIError(f"argument --eps: an L2 radius must be finite and >= 0, got {text}")
    return value


def _number(text: str, kind: Callable[[str], Any], ok: Callable[[Any], bool], requirement: str) -> Any:
    """``text`` read as ``kind`` (int or float), refused unless ``ok``: the
    argparse error says ``requirement``."""
    try:
        value = kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"not {'an integer' if kind is int else 'a number'}: {text!r}") from None
    if not ok(value):
        raise argparse.ArgumentTypeError(f"{requirement}, got {text}")
    return value


def positive_int(text: str) -> int:
    """Parse an integer >= 1."""
    return _number(text, int, lambda v: v >= 1, "must be >= 1")


def non_negative_int(text: str) -> int:
    """Parse an integer >= 0."""
    return _number(text, int, lambda v: v >= 0, "must be >= 0")


def parse_tau(text: str) -> float:
    """Parse a weight-average decay τ in (0, 1), e.g. ``0.9995``."""
    return _number(text, float, lambda v: 0 < v < 1, "must lie in (0, 1) (the decay per step, e.g. 0.9995)")


def parse_smoothing(text: str) -> float:
    """Parse a label smoothing in [0, 1)."""
    return _number(text, float, lambda v: 0 <= v < 1, "must lie in [0, 1)")


def schedule_spec(text: str) -> ScheduleLike:
    """The ``Trainer(schedule=...)`` that a ``--schedule`` value stands for:
    a schedule name, or ``multistep:EPOCHS[:GAMMA]`` — a :class:`MultiStep`
    with the comma-separated milestone epochs and γ (default 0.1)."""
    if text in SCHEDULES:
        return text
    kind, _, rest = text.partition(":")
    if kind != "multistep" or not rest:
        raise argparse.ArgumentTypeError(f"must be {', '.join(SCHEDULES)} or multistep:EPOCHS[:GAMMA] "
                                         f"(e.g. multistep:100,150), got {text!r}")
    milestones, _, gamma = rest.partition(":")
    try:
        return MultiStep([float(m) for m in milestones.split(",")], float(gamma) if gamma else 0.1)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"{text!r}: {exc}") from None


def parse_schedule(text: str) -> str:
    """Check a ``--schedule`` value (see :func:`schedule_spec`); the text
    itself is kept, so that ``config.json`` records it as given."""
    schedule_spec(text)
    return text


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
    add_method_arguments(p, default="apart", parsers={"eps": parse_eps, "steps": positive_int, "step_size": parse_eps,
                                                      "uap_eps": parse_eps})
    p.add_argument("--scale", choices=tuple(SCALES), default=None,
                   help="run size: cpu (SmallCNN, 10,000 images, 10 epochs: minutes on a 2-core CPU) or gpu "
                        "(PreActResNet18, all 50,000 images, the method's epochs: the paper's setting); "
                        "--model, --train-examples, --epochs and --eval-examples override it "
                        "(default: the gpu size)")
    p.add_argument("--protocol", choices=tuple(PROTOCOLS), default=None,
                   help="training recipe shared by every method: fastat (the FastAT Benchmark's: ResNet-18, 100 "
                        "epochs, one-cycle LR 0.1, label smoothing and weight averaging as the method's config "
                        "says, 1,000 validation images, best by validation PGD-10) or apart (the APART paper's: "
                        "PreActResNet18, 30 epochs, cyclic LR 0.2, weight decay 2e-4); --scale shrinks its size, "
                        "explicit flags override both (default: none, the method's preset)")
    p.add_argument("--model", choices=model_names(), default=None,
                   help="model from advtrain's registry (default: the scale's, preactresnet18); on --resume the "
                        "checkpoint's recorded model, which this must name")
    p.add_argument("--dataset", choices=("cifar10", "cifar100"), default="cifar10", help="default: cifar10")
    p.add_argument("--data", default=None, metavar="DIR",
                   help="directory holding the official CIFAR python-format folder (required)")
    p.add_argument("--download", action="store_true", help="download the dataset (MD5-verified) if missing")
    p.add_argument("--epochs", type=positive_int, default=None, metavar="N",
                   help="epochs (default: the scale's; at the gpu size the method's preset, 30; 15 for fgsm-rs)")
    p.add_argument("--batch-size", type=positive_int, default=128, metavar="N", help="default: 128")
    p.add_argument("--lr", type=float, default=None, help="peak learning rate (default: the method's, 0.2)")
    p.add_argument("--schedule", type=parse_schedule, default=None, metavar="SCHEDULE",
                   help="learning-rate schedule: cyclic (default), piecewise, constant, onecycle, or "
                        "multistep:EPOCHS[:GAMMA], e.g. multistep:100,150 (x0.1 at epochs 100 and 150)")
    p.add_argument("--precision", choices=PRECISIONS, default="auto",
                   help="auto (default): bf16 autocast on CUDA, fp32 on CPU")
    p.add_argument("--compile", action="store_true", help="torch.compile the model")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    p.add_argument("--threads", type=positive_int, default=None, metavar="N",
                   help="CPU threads of torch's operators (torch.set_num_threads; default: torch's, one per "
                        "core); on a shared 2-core CPU one thread is often faster")
    p.add_argument("--seed", type=int, default=0, metavar="N", help="seed of weights, shuffling, attacks (default 0)")
    p.add_argument("--out", default=None, metavar="DIR",
                   help="run directory: checkpoint.pt, metrics.jsonl, config.json")
    p.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint.pt")
    p.add_argument("--overwrite", action="store_true",
                   help="OUT holds a run: remove what it wrote there (checkpoints, best.pt, metrics.jsonl, "
                        "config.json) and start a fresh one")
    p.add_argument("--init-weights", default=None, metavar="CKPT",
                   help="start a fresh run from the model weights of CKPT (a checkpoint file or run directory of "
                        "any method); nothing else is taken from it")
    p.add_argument("--checkpoint-every-steps", type=positive_int, default=None, metavar="N",
                   help="also write OUT/checkpoint.pt every N optimizer steps inside an epoch; --resume continues "
                        "that epoch exactly (default: at epoch ends only)")
    p.add_argument("--eval-every", type=non_negative_int, default=1, metavar="N",
                   help="evaluate every N epochs (0: only at the end; default 1)")
    p.add_argument("--eval-examples", type=positive_int, default=None, metavar="N",
                   help="test images used for evaluation (default: the scale's, 1000)")
    p.add_argument("--train-examples", type=positive_int, default=None, metavar="N",
                   help="use only the first N training images (default: the scale's; all at the gpu size)")
    p.add_argument("--weight-average", type=parse_tau, default=None, metavar="TAU",
                   help="keep an EMA of the weights with decay TAU per step (e.g. 0.9995), evaluated next to the "
                        "raw model and used by `advtrain eval` (default: none)")
    p.add_argument("--label-smoothing", type=parse_smoothing, default=None, metavar="S",
                   help="label smoothing of the training loss, in [0, 1) (default: the method's, 0)")
    p.add_argument("--val-examples", type=positive_int, default=None, metavar="N",
                   help="hold out N training images (fixed by --seed), never trained on, for per-epoch "
                        "validation clean and PGD-10 accuracy (default: none)")
    p.add_argument("--keep-best", action="store_true",
                   help="write OUT/best.pt with the model (raw or averaged) of best validation PGD-10 accuracy; "
                        "needs --val-examples")
    p.add_argument("--log", type=log_formats, default=None, metavar="FORMATS",
                   help="also write the per-epoch metrics as csv (OUT/metrics.csv) and/or tensorboard "
                        "(OUT/tensorboard/, needs the tensorboard package), e.g. --log csv,tensorboard; "
                        "OUT/metrics.jsonl is always written")
    p.add_argument("--no-progress", action="store_true",
                   help="no live progress bar (the startup line and one line per epoch stay)")
    p.set_defaults(func=run_train)
    return p


def apply_scale(args: argparse.Namespace) -> argparse.Namespace:
    """Fill ``--model``, ``--train-examples``, ``--epochs`` and
    ``--eval-examples`` left unset from ``--scale`` (the gpu size when no scale
    is given), and, when the run trains the scale's model, the method options
    the scale sets for ``--method``
    (:attr:`~advtrain.training.scales.Scale.method_options`); values given on
    the command line or in a config file win. Idempotent, and returns ``args``."""
    scale = get_scale(args.scale or "gpu")
    for key in ("model", "train_examples", "epochs", "eval_examples"):
        if getattr(args, key, None) is None:
            setattr(args, key, getattr(scale, key))
    for key, value in scale.options_for(getattr(args, "method", None), args.model).items():
        if getattr(args, key, None) is None:
            setattr(args, key, value)
    return args


def apply_protocol(args: argparse.Namespace) -> argparse.Namespace:
    """Fill ``--model`` and ``--epochs`` left unset from ``--protocol``
    (its network, the method's epochs in it), unless a smaller ``--scale``
    sets them: flags win over a scale, a scale over the protocol. A scale of
    all the training images (``gpu``) is the protocol's own size, with its
    network and epochs. Idempotent, and returns ``args``."""
    if getattr(args, "protocol", None) is None:
        return args
    protocol = get_protocol(args.protocol)
    scale = get_scale(args.scale) if args.scale is not None else None
    full_size = scale is None or scale.train_examples is None
    if args.model is None and full_size:
        args.model = protocol.model
    if args.epochs is None and (full_size or scale.epochs is None):
        args.epochs = method_settings(protocol, args.method)["total_epoch"]
    return args


FULL_SIZE = 20_000
"""Training images from which a run on a CPU gets the note that it is a long one."""


def _size_note(args: argparse.Namespace, n_train: int) -> Optional[str]:
    """What the user should know about the run's size before it starts: the
    scale it runs at, or that a run on ``n_train`` images (at least
    :data:`FULL_SIZE`) on a CPU takes hours per epoch."""
    if args.scale is not None:
        images = "all" if args.train_examples is None else f"the first {args.train_examples:,}"
        epochs = ("the method's epochs" if args.epochs is None
                  else f"{args.epochs} epoch" + ("s" if args.epochs != 1 else ""))
        scale = get_scale(args.scale)
        chosen = [flag_and_value(key, value) for key, value in scale.options_for(args.method, args.model).items()
                  if getattr(args, key, None) == value]
        recipe = f"; {args.method} with {', '.join(chosen)} for this size" if chosen else ""
        return (f"scale {args.scale}: {args.model} on {images} training images for {epochs}, "
                f"{args.eval_examples:,} test images per evaluation{recipe} ({scale.purpose})")
    import torch

    from .utils.devices import default_device

    device = torch.device(args.device) if args.device else default_device()
    if n_train >= FULL_SIZE and device.type == "cpu":
        return (f"note: this run trains on {n_train:,} images on a CPU, which takes hours per epoch; "
                "add --scale cpu for a run of minutes")
    return None


def build_trainer(args: argparse.Namespace, num_classes: int) -> Any:
    """The registered preset of ``args.method`` (see :data:`advtrain.methods.METHODS`)
    with the command's overrides, at the size of ``args.scale``."""
    import torch

    apply_protocol(args)
    apply_scale(args)
    options = method_kwargs(args)  # an option the method does not take is refused before any work
    torch.manual_seed(args.seed)  # the same --seed gives the same initial weights
    model = _train_model(args, num_classes)
    kwargs: Dict[str, Any] = dict(batch_size=args.batch_size, precision=args.precision, compile=args.compile,
                                  device=args.device, seed=args.seed, run_dir=args.out,
                                  eval_every=max(args.eval_every, 0) or 10**9, eval_examples=args.eval_examples,
                                  progress=not args.no_progress)
    protocol = get_protocol(args.protocol) if getattr(args, "protocol", None) else None
    if protocol is not None:  # the recipe under the command's own settings
        kwargs = {**protocol_kwargs(protocol, args.method), **kwargs}
    for key in ("epochs", "lr"):
        if getattr(args, key) is not None:
            kwargs[key] = getattr(args, key)
    if args.schedule is not None:
        kwargs["schedule"] = schedule_spec(args.schedule)
    for key in ("weight_average", "label_smoothing", "val_examples", "checkpoint_every_steps"):
        if getattr(args, key) is not None:
            kwargs[key] = getattr(args, key)
    if args.keep_best:
        if kwargs.get("val_examples") is None or not args.out:
            raise CLIError("--keep-best writes OUT/best.pt with the best model on held-out validation images: "
                           "add --val-examples N (e.g. 1000) and --out DIR")
        from .diagnostics import RobustnessDropMonitor

        kwargs["callbacks"] = [RobustnessDropMonitor()]  # reads the Trainer's validation accuracies
    elif protocol is not None and protocol.keep_best and kwargs.get("val_examples") is not None:
        from .diagnostics import RobustnessDropMonitor

        kwargs["callbacks"] = [RobustnessDropMonitor()]  # best.pt in --out, else the best weights in memory
    trainer = get_method(args.method).build(model, **kwargs, **options)
    if protocol is not None and args.schedule is None:
        apply_protocol_schedule(trainer, protocol)
    return trainer


def _train_model(args: argparse.Namespace, num_classes: int) -> Any:
    """The model of ``advtrain train``: ``--model`` with its default
    arguments, or on ``--resume`` the model recorded in ``OUT/checkpoint.pt``
    (registry name and constructor arguments), which ``--model`` (from the
    command line or ``OUT/config.json``) must name."""
    from .models import build_model
    from .training import load_checkpoint

    if not args.resume:
        return build_model(args.model, num_classes=num_classes, **_protocol_model_kwargs(args))
    path = Path(args.out) / CHECKPOINT_NAME
    config = load_checkpoint(path).get("config", {})
    name, kwargs = _recorded_model(config, path, "build it in Python and resume with Trainer.fit(..., resume=path)")
    if name != args.model:
        raise CLIError(f"cannot resume {path}: it was written for a different model, {name} ({config.get('model')}), "
                       f"than the {args.model} that --model or {Path(args.out) / CONFIG_NAME} names; "
                       f"pass --model {name}")
    if kwargs.get("num_classes") != num_classes:
        raise CLIError(f"cannot resume {path}: its model has {kwargs.get('num_classes')} classes and "
                       f"{args.dataset} has {num_classes}; pass the run's --dataset")
    return _rebuild(name, kwargs, path)


def _protocol_model_kwargs(args: argparse.Namespace) -> Dict[str, Any]:
    """The constructor arguments ``--protocol`` gives its own model (the
    benchmark's and APART's networks see raw pixels: ``normalize=False``);
    none for any other model."""
    protocol = get_protocol(args.protocol) if getattr(args, "protocol", None) else None
    return dict(protocol.model_kwargs) if protocol is not None and args.model == protocol.model else {}


def _read_splits(args: argparse.Namespace) -> Tuple[Any, Any]:
    """The training and test splits named by ``--dataset`` / ``--data``."""
    from .data import DatasetNotFoundError, cifar10, cifar100

    if not args.download and not Path(args.data).is_dir():
        raise CLIError(f"data directory {args.data} does not exist "
                       f"(pass --download to fetch {args.dataset} into it)")
    reader = cifar10 if args.dataset == "cifar10" else cifar100
    try:
        train = reader(args.data, train=True, download=args.download)
    except DatasetNotFoundError as exc:  # its message names the Python argument, download=True
        raise CLIError(f"no {exc.folder}/ in {exc.root}: pass --download to fetch {exc.url}, or --data a "
                       f"directory holding the release unpacked as {exc.folder}/") from None
    test = reader(args.data, train=False, download=False)
    if args.train_examples is not None:
        train = train.subset(args.train_examples)
    return train, test


def recorded_options(args: argparse.Namespace) -> Dict[str, Any]:
    """The resolved options of a command, as written to ``config.json`` (and
    loadable again with ``--config``)."""
    # --overwrite acts once, on the run it replaces: a later --resume reading
    # config.json must not inherit it.
    return {k: v for k, v in vars(args).items() if k not in RESERVED and k != "overwrite"}


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


def _set_threads(args: argparse.Namespace) -> None:
    """Apply ``--threads`` (torch's intra-op CPU threads) when it is given."""
    if args.threads is not None:
        import torch

        torch.set_num_threads(args.threads)


def run_train(args: argparse.Namespace) -> int:
    _set_threads(args)
    apply_protocol(args)
    apply_scale(args)
    if args.resume and not args.out:
        raise CLIError("--resume needs --out (the run directory to continue)")
    init_weights = _initial_weights(args)
    init_distributed()  # a multi-process run under torchrun: data-parallel training
    if args.resume and args.overwrite:
        raise CLIError("--resume continues the run in --out, --overwrite replaces it: drop one of them")
    if args.out and process_rank() == 0:
        # Locked before the data are read, so that a second run into OUT stops at once.
        with lock_run_dir(args.out):
            found = [] if args.resume or args.overwrite else existing_run(args.out)
            if found:
                raise CLIError(f"{args.out} already holds a run ({describe(found)}): pass --resume to continue "
                               "it, --overwrite to replace it, or another --out")
            return _train(args, init_weights)
    return _train(args, init_weights)


def _train(args: argparse.Namespace, init_weights: Optional[Path]) -> int:
    train, test = _read_splits(args)
    note = _size_note(args, len(train))
    if note and process_rank() == 0:
        print(note, flush=True)
    if args.protocol and process_rank() == 0:
        print(describe_protocol(args.protocol, args.method), flush=True)
    trainer = build_trainer(args, num_classes=len(train.classes))
    if args.log and not args.out:
        raise CLIError("--log writes its files into the run directory: add --out DIR")
    if args.out and trainer.is_main:
        trainer.callbacks.append(_RecordConfig(Path(args.out) / CONFIG_NAME, recorded_options(args)))
        if args.log:
            from .training.loggers import metric_loggers

            try:
                trainer.callbacks.extend(metric_loggers(args.log.split(","), args.out))
            except ImportError as exc:
                raise CLIError(f"--log tensorboard: {exc}") from None
    try:
        history = trainer.fit(train, eval_data=test, resume=bool(args.resume), init_weights=init_weights,
                              overwrite=bool(args.overwrite))
    except KeyboardInterrupt as exc:  # main() reports what is on disk to resume from
        raise KeyboardInterrupt(trainer.checkpoint_note()) from exc
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
    p.add_argument("--model", choices=model_names(), default=None,
                   help="the model the checkpoint must hold (default: the one it records)")
    p.add_argument("--dataset", choices=("cifar10", "cifar100"), default=None,
                   help="default: the run's, else cifar100 for 100 classes and cifar10 otherwise")
    p.add_argument("--suite", choices=SUITES, default="pgd20",
                   help="pgd20 (default), cw, autoattack (APGD-CE + APGD-T), standard (AutoAttack's standard "
                        "suite: APGD-CE, APGD-T, FAB-T, Square) or full (PGD-20, CW-20 and standard)")
    p.add_argument("--norm", choices=("linf", "l2"), default="linf",
                   help="threat model: linf (default) or l2; the suite's attacks run in this norm")
    p.add_argument("--eps", default=None, metavar="EPS",
                   help="radius, pixel units: L∞ as a fraction like 8/255 (default), L2 as a number "
                        "(default 0.5)")
    p.add_argument("--seed", type=int, default=0, metavar="N",
                   help="seed of the attacks' random starts, so a report can be reproduced (default 0)")
    p.add_argument("--n-examples", type=positive_int, default=None, metavar="N",
                   help="evaluate the first N test images (default: all)")
    p.add_argument("--batch-size", type=positive_int, default=256, metavar="N", help="default: 256")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    p.add_argument("--threads", type=positive_int, default=None, metavar="N",
                   help="CPU threads of torch's operators (torch.set_num_threads; default: torch's, one per "
                        "core); on a shared 2-core CPU one thread is often faster")
    p.add_argument("--precision", choices=PRECISIONS, default="auto",
                   help="auto: bf16 autocast on CUDA, fp32 on CPU")
    p.add_argument("--out", default=None, metavar="FILE", help="write the report as JSON here")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--no-masking-checks", action="store_true",
                   help="skip the cheap gradient-masking checks (probability outputs, zero input gradients, "
                        "randomized outputs) that run on the first 200 test images before the attacks")
    p.add_argument("--weights", choices=("raw", "averaged"), default=None,
                   help="which weights to evaluate: the averaged ones of a run with --weight-average, or the raw "
                        "ones (default: the checkpoint's choice, i.e. averaged when it has an average and, in a "
                        "best.pt, the weights that scored best)")
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


def _recorded_model(config: Dict[str, Any], path: Path, todo: str) -> Tuple[str, Dict[str, Any]]:
    """The registry name and constructor arguments that checkpoint ``path``'s
    ``config`` records, or a :class:`CLIError` that says why it records none
    and, in ``todo``, what to do instead."""
    if "model_name" not in config or not isinstance(config.get("model_kwargs"), dict):
        raise CLIError(f"checkpoint {path} does not record its model's registry name and constructor arguments "
                       f"(an older advtrain wrote it), so its model cannot be rebuilt: {todo}")
    name, kind = config["model_name"], config.get("model")
    if name not in model_names():
        raise CLIError(f"checkpoint {path} holds a {kind}, which is not in advtrain's model registry "
                       f"({', '.join(model_names())}): {todo}")
    return name, dict(config["model_kwargs"])


def _rebuild(name: str, kwargs: Dict[str, Any], path: Path) -> Any:
    """``build_model(name, **kwargs)`` for the record of checkpoint ``path``."""
    from .models import build_model

    try:
        return build_model(name, **kwargs)
    except (TypeError, ValueError) as exc:
        raise CLIError(f"checkpoint {path} records a {name} that this advtrain cannot build ({exc}): "
                       "use the advtrain version that wrote it") from None


def load_model(checkpoint: str, model: Optional[str] = None,
               weights: Optional[str] = None) -> Tuple[Any, str, Dict[str, Any], Dict[str, Any]]:
    """Rebuild the model saved in an advtrain checkpoint (file or run
    directory) from the registry name and constructor arguments it records.
    Returns ``(model, registry name, checkpoint state, run config)``.
    ``model`` (a registry name), when given, must be the recorded one.
    ``weights`` (``"raw"``, ``"averaged"``; default: the checkpoint's
    choice) picks the weights loaded (see
    :func:`advtrain.training.evaluation_weights`)."""
    from .training import CheckpointError, evaluation_weights, load_checkpoint

    path, run_config = _locate_checkpoint(checkpoint)
    try:
        state = load_checkpoint(path, map_location="cpu")
    except CheckpointError as exc:
        if exc.__cause__ is None:
            raise
        raise CLIError(f"{path} is not a readable advtrain checkpoint "
                       f"({type(exc.__cause__).__name__} while loading it): pass a checkpoint.pt written by "
                       "advtrain, or rerun the training that writes it") from None
    config = state.get("config", {})
    name, kwargs = _recorded_model(config, path, "build the model in Python, load the checkpoint's weights "
                                                 "(load_checkpoint(path)['model']) and call advtrain.evaluation.evaluate")
    if model is not None and model != name:
        raise CLIError(f"checkpoint {path} was written for a {name} model ({config.get('model')}), not {model} "
                       f"(drop --model, or pass --model {name})")
    net = _rebuild(name, kwargs, path)
    try:
        chosen, _ = evaluation_weights(state, weights)
    except ValueError as exc:
        raise CLIError(f"checkpoint {path}: {exc} (drop --weights averaged)") from None
    try:
        net.load_state_dict(chosen)
    except RuntimeError as exc:
        detail = " ".join(str(exc).split())[:300]
        raise CLIError(f"checkpoint {path} does not hold the weights of the {name} it records ({detail}): the "
                       "model was changed after it was built; load the checkpoint in Python") from None
    return net, name, state, run_config


def run_eval(args: argparse.Namespace) -> int:
    import torch

    _set_threads(args)

    try:
        from .evaluation import GradientMaskingWarning, evaluate
    except ImportError as exc:  # pragma: no cover - a broken install
        raise CLIError(f"advtrain.evaluation is not available: {exc}") from None
    from .data import cifar10, cifar100

    from .training import evaluation_weights
    from .utils.devices import default_device
    from .utils.precision import precision_dtype

    eps = parse_eval_eps(args.eps, args.norm)
    model, name, state, run_config = load_model(args.checkpoint, args.model, args.weights)
    weights = evaluation_weights(state, args.weights)[1]
    num_classes = int(state["config"]["model_kwargs"]["num_classes"])
    dataset = args.dataset or run_config.get("dataset") or ("cifar100" if num_classes == 100 else "cifar10")
    if not Path(args.data).is_dir():
        raise CLIError(f"data directory {args.data} does not exist: pass --data DIR holding the test split "
                       "(e.g. cifar-10-batches-py/)")
    test = (cifar10 if dataset == "cifar10" else cifar100)(args.data, train=False)
    if len(test.classes) != num_classes:
        raise CLIError(f"the checkpoint's model has {num_classes} classes but {dataset} has {len(test.classes)}; "
                       "pass the right --dataset")
    device = torch.device(args.device) if args.device else default_device()
    autocast_dtype = precision_dtype(args.precision, device)
    model.to(device)
    with warnings.catch_warnings():
        # the printed report lists every masking finding with its explanation
        warnings.simplefilter("ignore", GradientMaskingWarning)
        torch.manual_seed(args.seed)  # the attacks draw their random starts from the global generator
        report = evaluate(model, test, attacks=args.suite, eps=eps, norm=args.norm, batch_size=args.batch_size,
                          n_examples=args.n_examples, device=device, progress=not args.no_progress,
                          autocast_dtype=autocast_dtype,
                          masking_checks=not args.no_masking_checks)
    result = {"checkpoint": str(args.checkpoint), "model": name, "dataset": dataset, "epoch": state.get("epoch"),
              "weights": weights, "suite": args.suite, "seed": args.seed, "precision": "fp32" if autocast_dtype is None else "bf16", **report.to_dict()}
    print(f"{name} ({weights} weights) from {args.checkpoint} (epoch {state.get('epoch')}), {dataset} test split, "
          f"suite {args.suite}")
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
                       description="Time one training epoch of every registered method "
                                   f"({', '.join(METHODS)}) and the plain-PyTorch PGD-10 loop against advtrain's "
                                   "PGD-10 in the same run, and count their passes, by running the pytest suite "
                                   "in the repository's benchmarks/ folder (not part of an installed wheel).")
    p.add_argument("--size", choices=("cpu", "gpu", "smoke"), default="cpu",
                   help="cpu: PreActResNet18(width=16), minutes on 2 cores (default); gpu: full CIFAR-10 epochs "
                        "of PreActResNet18 in bf16 (needs CUDA); smoke: seconds, checks the machinery")
    p.add_argument("--report", default=None, metavar="FILE",
                   help="write this size's measured table into this Markdown file (e.g. docs/benchmarks.md)")
    p.add_argument("--data", default=None, metavar="DIR",
                   help="CIFAR-10 directory (default: $ADVTRAIN_CIFAR10_DIR, else synthetic images)")
    p.add_argument("--methods", type=method_list, default=None, metavar="A,B",
                   help="only these registered methods (and PGD-10, the reference); default: all")
    p.add_argument("--benchmarks", default=None, metavar="DIR",
                   help="the benchmarks/ folder (default: the one next to this advtrain checkout)")
    p.add_argument("pytest_args", nargs=argparse.REMAINDER,
                   help="further pytest or --bench-* options, after `--` (e.g. -- --bench-rounds 5 --bench-threads 1)")
    p.set_defaults(func=run_bench)
    return p


def method_list(text: str) -> List[str]:
    """Parse a comma-separated list of registered method names."""
    names = [name.strip() for name in text.split(",") if name.strip()]
    unknown = [name for name in names if name not in METHODS]
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"{', '.join(unknown) or repr(text)}: not a registered method "
                                         f"(choose from {', '.join(METHODS)})")
    return names


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
                  data: Optional[str] = None, methods: Optional[Sequence[str]] = None) -> List[str]:
    """The pytest command line that runs the benchmark suite (see
    ``benchmarks/conftest.py`` for its ``--bench-*`` options)."""
    cmd = [sys.executable, "-m", "pytest", str(folder), "--bench-size", size, "-q"]
    if report:
        cmd += ["--bench-report", str(Path(report).resolve())]
    if data:
        cmd += ["--bench-data", data if data == "synthetic" else str(Path(data).resolve())]
    if methods:
        cmd += ["--bench-methods", ",".join(methods)]
    return cmd + [a for a in extra if a != "--"]


def run_bench(args: argparse.Namespace) -> int:
    if importlib.util.find_spec("pytest") is None:
        raise CLIError('the benchmarks need pytest: pip install "advtrain[test]"')
    folder = find_benchmarks(args.benchmarks)
    cmd = bench_command(folder, args.size, args.report, args.pytest_args, data=args.data, methods=args.methods)
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
    add_study_parser(sub, positive_int, parse_eps, tuple(PROTOCOLS))
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
            if args.command == "study":  # its results record the exact command
                return int(args.func(args, argv[1:]))
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
        except KeyboardInterrupt as exc:
            print(f"advtrain: interrupted; {exc}" if str(exc) else "advtrain: interrupted", file=sys.stderr)
            return 130


__all__: List[str] = ["main", "make_parser", "parse_eps", "parse_schedule", "schedule_spec", "build_trainer",
                      "run_train", "load_model", "recorded_options", "apply_scale", "apply_protocol", "parse_eval_eps"]
