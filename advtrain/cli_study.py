"""``advtrain study``: the command line of :mod:`advtrain.study`."""
from __future__ import annotations

import argparse
import re
import shlex
from pathlib import Path
from typing import Any, List, Optional, Sequence

from .cli_methods import flag_and_value
from .methods import METHODS
from .study.plan import ORDERS
from .study.spec import DEFAULT_METHODS
from .training.scales import SCALES, get_scale

_UNITS = {"s": 1, "m": 60, "min": 60, "h": 3600}


def parse_duration(text: str) -> float:
    """A wall-clock budget in seconds: ``90``, ``90s``, ``45m``, ``2.5h``,
    ``1h30m``."""
    cleaned = str(text).strip().lower().replace(" ", "")
    if re.fullmatch(r"\d+(\.\d+)?", cleaned):
        seconds = float(cleaned)
    else:
        parts = re.findall(r"(\d+(?:\.\d+)?)(h|min|m|s)", cleaned)
        if not parts or "".join(n + u for n, u in parts) != cleaned:
            raise argparse.ArgumentTypeError(f"expected a duration like 90s, 45m, 2h or 1h30m, got {text!r}")
        seconds = sum(float(n) * _UNITS[u] for n, u in parts)
    if not seconds > 0:
        raise argparse.ArgumentTypeError(f"a budget must be > 0, got {text!r}")
    return seconds


def parse_methods(text: str) -> List[str]:
    """A comma list of registered method names."""
    names = [n.strip() for n in str(text).split(",") if n.strip()]
    unknown = [n for n in names if n not in METHODS]
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"unknown method {', '.join(unknown) or repr(text)}; "
                                         f"known methods: {', '.join(METHODS)}")
    return names


def add_study_parser(sub: Any, positive_int: Any, parse_eps: Any, protocols: Sequence[str]) -> argparse.ArgumentParser:
    """The ``study`` subcommand's parser, on the subparsers ``sub``."""
    p = sub.add_parser(
        "study", help="train and evaluate several methods under one protocol, within a budget; resumable",
        description="Train each method in its own run directory under OUT, evaluate every final model (and its "
                    "weight average) with clean, PGD-20, CW-20 and APGD-CE + APGD-T on the same test images, and "
                    "write OUT/results.md, OUT/results.json and figures. Run the same command again to continue: "
                    "finished methods are kept, an unfinished one resumes from its checkpoint.")
    p.add_argument("--data", required=True, metavar="DIR", help="directory holding cifar-10-batches-py/")
    p.add_argument("--download", action="store_true", help="download CIFAR-10 (MD5-verified) if missing")
    p.add_argument("--out", required=True, metavar="DIR", help="study directory")
    p.add_argument("--protocol", choices=(*protocols, "none"), default="apart",
                   help="training recipe of every method (default apart: the APART paper's schedule); none: "
                        "each method's own preset")
    p.add_argument("--methods", type=parse_methods, default=None, metavar="A,B",
                   help=f"comma list of methods (default: {','.join(n for n in DEFAULT_METHODS if n in METHODS)})")
    p.add_argument("--scale", choices=tuple(SCALES), default="cpu",
                   help="run size (default cpu: SmallCNN, 10,000 images, 10 epochs; gpu: PreActResNet18, all "
                        "images, the protocol's epochs); the flags below override it")
    p.add_argument("--model", default=None, help="model registry name (default: the scale's)")
    p.add_argument("--width", type=positive_int, default=None, metavar="W", help="the model's width argument")
    p.add_argument("--train-examples", type=positive_int, default=None, metavar="N")
    p.add_argument("--epochs", type=positive_int, default=None, metavar="N")
    p.add_argument("--eval-examples", type=positive_int, default=None, metavar="N",
                   help="fixed test images of the per-epoch curve and the final evaluation (default: the scale's)")
    p.add_argument("--eps", type=parse_eps, default=8 / 255, help="L∞ radius, pixel units (default 8/255)")
    p.add_argument("--batch-size", type=positive_int, default=128, metavar="N")
    p.add_argument("--seed", type=int, default=0, metavar="N")
    p.add_argument("--budget", type=parse_duration, default=None, metavar="DURATION",
                   help="wall-clock budget of this run, e.g. 150m or 2h: methods that would not finish in it are "
                        "left for the next run, and training stops at an epoch end before the deadline")
    p.add_argument("--order", choices=ORDERS, default="cost",
                   help="cost (default): cheapest first, PGD-10 last; given: the order of --methods")
    p.add_argument("--strength", action="store_true",
                   help="also measure FGSM's and FGSM-RS's training perturbations on the final PGD-10 model, "
                        "epoch by epoch, against random noise")
    p.add_argument("--strength-examples", type=positive_int, default=500, metavar="N")
    p.add_argument("--device", default=None, help="cpu, cuda, ... (default: cuda if available)")
    p.add_argument("--threads", type=positive_int, default=None, metavar="N", help="torch CPU threads")
    p.add_argument("--no-progress", action="store_true", help="no live progress bars")
    p.add_argument("--report-only", action="store_true", help="only rewrite the results files from OUT")
    p.set_defaults(func=run_study_command)
    return p


def study_spec(args: argparse.Namespace) -> Any:
    """The :class:`~advtrain.study.StudySpec` the flags describe."""
    from .study import StudySpec

    scale = get_scale(args.scale)
    model_kwargs = {} if args.width is None else {"width": args.width}
    methods = args.methods or [n for n in DEFAULT_METHODS if n in METHODS]
    model = args.model or scale.model
    method_options = {name: options for name in methods if (options := scale.options_for(name, model))}
    return StudySpec(methods=tuple(methods), protocol=None if args.protocol == "none" else args.protocol,
                     model=model, model_kwargs=model_kwargs, method_options=method_options,
                     train_examples=args.train_examples or scale.train_examples,
                     epochs=args.epochs or scale.epochs, eval_examples=args.eval_examples or scale.eval_examples,
                     eps=args.eps, batch_size=args.batch_size, seed=args.seed, strength=args.strength,
                     strength_examples=args.strength_examples, scale=args.scale)


def run_study_command(args: argparse.Namespace, argv: Optional[Sequence[str]] = None) -> int:
    import torch

    from .data import cifar10
    from .study import Study, report

    if args.threads is not None:
        torch.set_num_threads(args.threads)
    spec = study_spec(args)
    train = cifar10(args.data, train=True, download=args.download)
    test = cifar10(args.data, train=False)
    study = Study(spec, Path(args.out), train, test, budget=args.budget, order=args.order, device=args.device,
                  progress=not args.no_progress)
    command = "advtrain study " + " ".join(shlex.quote(a) for a in (argv or []))
    if not args.report_only:
        print(f"study of {len(spec.methods)} methods in {args.out}: {spec.model} on "
              f"{len(study.train):,} images, {spec.epochs or 'the preset'} epochs, protocol {spec.protocol}"
              + "".join(f"; {name} with " + ", ".join(flag_and_value(key, value) for key, value in options.items())
                        for name, options in spec.method_options.items())
              + f"; order {', '.join(study.order)}", flush=True)
        try:
            study.run()
        except KeyboardInterrupt:
            report(study, command)
            raise KeyboardInterrupt(f"the results so far are in {Path(args.out) / 'results.md'}; run the same "
                                    "command again to continue the study") from None
    elif not (Path(args.out) / "study.json").is_file():
        raise ValueError(f"{args.out} holds no study to report on")
    else:
        study.claim()
    results = report(study, command)
    done = sum(r["status"] == "finished" for r in results["rows"])
    print(f"{done} of {len(results['rows'])} methods finished; table in {Path(args.out) / 'results.md'}")
    return 0


__all__ = ["add_study_parser", "parse_duration", "parse_methods", "run_study_command", "study_spec"]
