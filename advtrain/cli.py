"""The ``advtrain`` command line (also ``python -m advtrain``)."""
from __future__ import annotations

import argparse
import json
import sys
from fractions import Fraction
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence

METHODS = ("standard", "fgsm", "fgsm-rs", "nfgsm", "pgd", "atta", "apart")


class CLIError(Exception):
    """An error reported to the user as one line."""


def parse_eps(text: str) -> float:
    """Parse a radius in pixel units: ``0.031``, ``8/255``."""
    try:
        value = float(Fraction(text)) if "/" in text else float(text)
    except (ValueError, ZeroDivisionError):
        raise argparse.ArgumentTypeError(f"not a number or fraction: {text!r}") from None
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {text}")
    return value


def _train_parser(sub: Any) -> None:
    p = sub.add_parser("train", help="adversarially train a model and report clean and robust accuracy")
    p.add_argument("--method", choices=METHODS, default="apart", help="training method (default: apart)")
    p.add_argument("--model", default="preactresnet18", help="preactresnet18, wideresnet or smallcnn")
    p.add_argument("--dataset", choices=("cifar10", "cifar100"), default="cifar10")
    p.add_argument("--data", required=True, help="directory holding the official CIFAR python-format folder")
    p.add_argument("--download", action="store_true", help="download the dataset (MD5-verified) if missing")
    p.add_argument("--epochs", type=int, default=None, help="epochs (default: the method's preset)")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--eps", type=parse_eps, default=None,
                   help="training radius in pixel units, e.g. 8/255 (default: the method's)")
    p.add_argument("--steps", type=int, default=None, help="attack steps for pgd / atta")
    p.add_argument("--lr", type=float, default=None, help="peak learning rate")
    p.add_argument("--schedule", choices=("cyclic", "piecewise", "constant"), default=None)
    p.add_argument("--precision", choices=("auto", "fp32", "bf16"), default="auto")
    p.add_argument("--compile", action="store_true", help="torch.compile the model")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="run directory: checkpoints, metrics.jsonl, config.json")
    p.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint.pt")
    p.add_argument("--eval-every", type=int, default=1, help="evaluate every N epochs (0: only at the end)")
    p.add_argument("--eval-examples", type=int, default=1000, help="test images used for evaluation")
    p.add_argument("--train-examples", type=int, default=None, help="use only the first N training images")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=run_train)


def build_trainer(args: argparse.Namespace, num_classes: int) -> Any:
    """The Trainer preset for ``args.method`` with the command's overrides."""
    from . import training
    from .models import build_model

    model = build_model(args.model, num_classes=num_classes)
    kwargs: Dict[str, Any] = dict(batch_size=args.batch_size, precision=args.precision, compile=args.compile,
                                  device=args.device, seed=args.seed, run_dir=args.out,
                                  eval_every=max(args.eval_every, 0) or 10**9, eval_examples=args.eval_examples,
                                  progress=not args.no_progress)
    for key in ("epochs", "lr", "schedule"):
        if getattr(args, key) is not None:
            kwargs[key] = getattr(args, key)
    if args.eps is not None and args.method != "standard":
        kwargs["eps"] = args.eps
    if args.steps is not None:
        if args.method not in ("pgd", "atta"):
            raise CLIError(f"--steps applies to pgd and atta, not {args.method}")
        kwargs["steps"] = args.steps
    presets: Dict[str, Callable[..., Any]] = {
        "standard": training.Trainer, "fgsm": training.FGSMTrainer, "fgsm-rs": training.FastATTrainer,
        "nfgsm": training.NFGSMTrainer, "pgd": training.PGDTrainer, "atta": training.ATTATrainer,
        "apart": training.APARTTrainer,
    }
    return presets[args.method](model, **kwargs)


def run_train(args: argparse.Namespace) -> int:
    from .data import cifar10, cifar100

    if args.resume and not args.out:
        raise CLIError("--resume needs --out (the run directory to continue)")
    reader = cifar10 if args.dataset == "cifar10" else cifar100
    train = reader(args.data, train=True, download=args.download)
    test = reader(args.data, train=False, download=False)
    if args.train_examples is not None:
        train = train.subset(args.train_examples)
    trainer = build_trainer(args, num_classes=len(train.classes))
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        config = {k: v for k, v in vars(args).items() if k != "func"}
        (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    history = trainer.fit(train, eval_data=test, resume=bool(args.resume))
    last = history[-1]
    total = sum(r.get("time", 0.0) for r in history)
    print(f"done: {args.method} {args.model} {len(history)} epochs, {total:.1f} s training; "
          f"clean accuracy {last.get('clean_acc', float('nan')):.4f}, "
          f"PGD-20 robust accuracy {last.get('robust_acc', float('nan')):.4f} "
          f"on {min(args.eval_examples, len(test))} test images")
    return 0


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="advtrain", description="Fast adversarial training for PyTorch.")
    sub = parser.add_subparsers(dest="command", required=True)
    _train_parser(sub)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of the ``advtrain`` console script."""
    parser = make_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args))
    except (CLIError, ValueError, FileNotFoundError) as exc:
        print(f"advtrain: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("advtrain: interrupted (the last completed epoch's checkpoint is kept)", file=sys.stderr)
        return 130


__all__: List[str] = ["main", "make_parser", "parse_eps"]
