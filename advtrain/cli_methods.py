"""The training methods on the command line, read from the method registry
(:data:`advtrain.methods.METHODS`): the ``--method`` choices, one flag per
method option (``--eps``, ``--steps``, and any option a registered method
declares), and the preset keywords a parsed command gives its method.

A method registered in :data:`~advtrain.methods.METHODS` is on the command
line with its options without any change here: an option without a parser
below gets a flag typed like its default in the preset's signature.
"""
from __future__ import annotations

import argparse
import inspect
from collections import Counter
from fractions import Fraction
from typing import Any, Callable, Dict, List, Sequence, Tuple

from .methods import METHODS, Method, get_method

#: What an option is, for its ``--help`` line (other options are named by their keyword).
OPTION_HELP: Dict[str, str] = {
    "eps": "training radius in pixel units, e.g. 8/255",
    "steps": "attack steps",
    "step_lr": "peak learning rate of the step-size ascent, for the reference run's 11,730 steps",
    "step_lr_rule": "scaled: step_lr x 11,730 / this run's steps when shorter; reference: step_lr as given",
    "step_weight_decay": "weight decay on the learned step sizes",
    "init_step": "initial input step size, pixel units",
    "init_scale": "initial scale of the learned initialization, pixel units",
    "layerwise": "perturb the model's intermediate layers too",
    "sites": "comma list of module names to perturb (default: the model's declared sites)",
    "store_dtype": "dtype of the per-example store",
    "reset_every": "redraw the per-example store every N epochs",
    "lam1": "weight of the whole abnormal-example regularizer (AAER's lambda1)",
    "lam2": "weight of the abnormal examples' loss drop (AAER's lambda2)",
    "lam3": "weight of the abnormal examples' logit-variation gap (AAER's lambda3)",
    "li_every": "recompute the label-information perturbations every N steps",
    "uap_eps": "radius and update step of the universal perturbations, pixel units, e.g. 10/255",
    "uap_num": "FGSM-FUAP's number of universal perturbations the feature head chooses from",
    "feature_lr": "FGSM-FUAP's Adam learning rate of the feature head that picks each example's perturbation",
    "step_size": "attack step size, pixel units, e.g. 10/255",
    "divisions": "SSAT's c: the perturbation is checked at k/c of its length, k = 1..c",
    "quantile": "ZeroGrad's q: the fraction of each example's input-gradient components (the smallest) zeroed",
    "random_start": "start the attack from a uniform point of the eps-ball",
    "samples": "MultiGrad's random points whose gradient signs vote",
    "min_agree": "MultiGrad's votes (1..samples) a component's sign needs to move; the method's default is all samples",
    "lam_max": "NuAT's λ at the end of its linear ramp from 0",
    "lam_aux": "ELLE-A's regularization weight, set when the linearity error jumps",
    "lam_decay": "ELLE-A's per-step decay factor of the regularization weight between jumps",
    "sensitivity": "ELLE-A's jump threshold, in standard deviations of the linearity error above its mean",
    "factor": "probability of the true class in the soft training targets, in (0, 1]",
    "gamma": "largest change of the clean loss from the previous epoch's mean the convergence-stability term lets pass",
    "w2": "weight of the convergence-stability term",
}


def parse_names(text: str) -> List[str]:
    """A comma list of names (``"block1,block2"``) as a list; empty names are
    an error."""
    names = [name.strip() for name in str(text).split(",")]
    if not names or any(not name for name in names):
        raise argparse.ArgumentTypeError(f"expected a comma list of names like block1,block2, got {text!r}")
    return names


#: Value parsers of method options whose presets' types argparse cannot infer.
OPTION_PARSERS: Dict[str, Callable[[str], Any]] = {"sites": parse_names}

#: The allowed values of method options that take one of a few names.
OPTION_CHOICES: Dict[str, Tuple[str, ...]] = {
    "store_dtype": ("float32", "bfloat16", "float16"),
    "step_lr_rule": ("scaled", "reference"),
}


def options() -> List[str]:
    """Every option some registered method takes, in order of first appearance."""
    return list(dict.fromkeys(option for method in METHODS.values() for option in method.options))


def takers(option: str) -> List[str]:
    """The names of the methods that take ``option``."""
    return [name for name, method in METHODS.items() if option in method.options]


def flag(option: str) -> str:
    """The command-line flag of ``option`` (``step_size`` → ``--step-size``)."""
    return "--" + option.replace("_", "-")


def _preset_default(method: Method, option: str) -> Any:
    parameter = inspect.signature(method.trainer).parameters.get(option)
    return None if parameter is None else parameter.default


def _annotation(method: Method, option: str) -> str:
    parameter = inspect.signature(method.trainer).parameters.get(option)
    return "" if parameter is None else str(parameter.annotation)


def _show(value: Any) -> str:
    """A default as the help text shows it: ε-like floats as k/255."""
    if isinstance(value, float):
        levels = Fraction(value).limit_denominator(255)
        if levels.denominator == 255 and abs(float(levels) - value) < 1e-12:
            return f"{levels.numerator}/255"
        return f"{value:g}"
    return str(value)


def _help(option: str) -> str:
    what = OPTION_HELP.get(option, option.replace("_", " "))
    users = takers(option)
    shown = {name: _show(d) for name in users
             for d in [_preset_default(METHODS[name], option)] if d is not None and d is not inspect.Parameter.empty}
    if not shown:
        default = "the method's"
    else:
        common, count = Counter(shown.values()).most_common(1)[0]
        if len(users) == 1:
            default = common
        elif count == 1:
            default = ", ".join(f"{name} {value}" for name, value in shown.items())
        else:
            others = [f"{name} {value}" for name, value in shown.items() if value != common]
            default = common + (f"; {', '.join(others)}" if others else "")
    return f"{what}, for {', '.join(users)} (default {default})"


def _kind(option: str, parsers: Dict[str, Callable[[str], Any]]) -> Dict[str, Any]:
    """``add_argument`` keywords that parse ``option`` as its presets type it."""
    if option in parsers:
        return {"type": parsers[option]}
    if option in OPTION_PARSERS:
        return {"type": OPTION_PARSERS[option]}
    if option in OPTION_CHOICES:
        return {"type": str, "choices": OPTION_CHOICES[option]}
    samples = [_preset_default(METHODS[name], option) for name in takers(option)]
    annotation = " ".join(_annotation(METHODS[name], option) for name in takers(option))
    if any(isinstance(s, bool) for s in samples) or "bool" in annotation:
        return {"action": argparse.BooleanOptionalAction}
    if any(isinstance(s, float) for s in samples) or "float" in annotation:
        return {"type": float}
    if any(isinstance(s, int) for s in samples) or "int" in annotation:
        return {"type": int}
    return {"type": str}


def add_method_arguments(parser: argparse.ArgumentParser, default: str,
                         parsers: Dict[str, Callable[[str], Any]]) -> None:
    """Add ``--method`` (a registered method, ``default`` unless given)
    and one flag per method option to ``parser``. ``parsers`` gives the value
    parser of options that need their own (``eps``: a fraction in pixel units);
    every flag defaults to None, meaning the method's own default."""
    parser.add_argument("--method", choices=list(METHODS), default=default,
                        help=f"training method (default: {default})")
    taken = {action.dest for action in parser._actions}  # argparse keeps its actions private
    for option in options():
        if option in taken:
            continue
        metavar = option.upper() if option != "steps" else "K"
        kind = _kind(option, parsers)
        extra = {} if "action" in kind or "choices" in kind else {"metavar": metavar}
        parser.add_argument(flag(option), dest=option, default=None, help=_help(option), **kind, **extra)


def _join(names: Sequence[str], word: str) -> str:
    return names[0] if len(names) == 1 else f"{', '.join(names[:-1])} {word} {names[-1]}"


def flag_and_value(option: str, value: Any) -> str:
    """How the command line writes ``option`` set to ``value``
    (``--step-weight-decay 400``)."""
    return f"{flag(option)} {value:g}" if isinstance(value, float) else f"{flag(option)} {value}"


def method_kwargs(args: argparse.Namespace) -> Dict[str, Any]:
    """The preset keywords of ``args.method`` that the command sets: every
    method option given a value. A value for an option the method does not
    take, and ``--compile`` for a method that does not compile, are a
    ``ValueError`` of one line saying what to do instead."""
    method = get_method(args.method)
    if getattr(args, "compile", False) and not method.compiles:
        compiling = [name for name, m in METHODS.items() if m.compiles]
        raise ValueError(f"--method {method.name} cannot train with --compile (its training loss needs a double "
                         f"backward, which compiled graphs do not support): drop --compile "
                         f"(methods that compile: {', '.join(compiling)})")
    kwargs: Dict[str, Any] = {}
    for option in options():
        value = getattr(args, option, None)
        if value is None:
            continue
        if option not in method.options:
            users = takers(option)
            raise ValueError(f"{flag(option)} applies to {_join(users, 'and')}, not {method.name}: "
                             f"drop {flag(option)}, or use --method {_join(users, 'or')}")
        kwargs[option] = value
    return kwargs


__all__ = ["OPTION_CHOICES", "OPTION_HELP", "OPTION_PARSERS", "add_method_arguments", "flag", "flag_and_value",
           "method_kwargs", "options", "parse_names", "takers"]
