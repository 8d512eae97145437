"""What a study trains: the protocol, the methods, the run size, the seed.

A :class:`StudySpec` is written to ``OUT/study.json`` when a study starts; a
later ``advtrain study`` into the same directory continues it only when its
spec is the same (what it trains and how it is evaluated), so the rows of one
table always come from one setting. The budget and the output directory are
not part of it: a resumed study may get more time.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Tuple

from .._validation import check_eps, check_positive_int

DEFAULT_METHODS: Tuple[str, ...] = ("fgsm", "fgsm-rs", "nfgsm", "atta", "apart", "pgd", "pgd-at-wa", "trades",
                                    "fgsm-pgi")
"""The default method list: the APART paper's comparison (FGSM, FGSM-RS,
N-FGSM, ATTA-1, APART, PGD-10) and PGD-AT-WA, TRADES and FGSM-PGI."""
REFERENCE_METHOD = "pgd"
"""The method every epoch-time ratio is taken against (PGD-10), and whose
final model is the strength study's fixed reference."""
STRENGTH_METHODS: Tuple[str, ...] = ("fgsm", "fgsm-rs")
"""The methods whose training perturbations the strength study records: the
single-step attacks without per-example state. The probes are test images,
which a per-example store (ATTA, APART) holds no rows for."""


@dataclass(frozen=True)
class StudySpec:
    """One study's setting.

    ``protocol``: a protocol name (``"apart"``, ``"fastat"``) whose training
    recipe every method uses, or ``None`` for each method's own preset.
    ``methods``: registered method names, in the order given.
    ``model`` / ``model_kwargs``: the network (a model registry name and
    constructor arguments, e.g. ``{"width": 16}``). ``train_examples``: the
    first N training images (``None``: all). ``epochs``: per method
    (``None``: the protocol's or preset's). ``eval_examples``: the fixed test
    images of the per-epoch PGD-20 curve and of the final evaluation.
    ``eps``: the L∞ radius of training and evaluation, pixel units.
    ``batch_size``, ``seed``: as for ``advtrain train``. ``strength``: also
    run the perturbation-strength study on ``strength_examples`` test images.
    ``scale``: the name of the scale the sizes came from, for the record.
    ``method_options``: per method in ``methods``, preset options that win
    over the protocol's and the preset's (``{"apart": {"step_weight_decay":
    400.0}}``, what ``advtrain study --scale cpu`` sets from the scale).
    """

    methods: Tuple[str, ...] = DEFAULT_METHODS
    protocol: Optional[str] = "apart"
    model: str = "smallcnn"
    model_kwargs: Mapping[str, Any] = field(default_factory=dict)
    train_examples: Optional[int] = 10_000
    epochs: Optional[int] = 15
    eval_examples: int = 1000
    eps: float = 8 / 255
    batch_size: int = 128
    seed: int = 0
    strength: bool = False
    strength_examples: int = 500
    scale: Optional[str] = None
    method_options: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        from ..methods import get_method  # refuses an unknown name, naming the known ones

        if not self.methods:
            raise ValueError("a study needs at least one method")
        if len(set(self.methods)) != len(self.methods):
            raise ValueError(f"methods lists a method twice: {', '.join(self.methods)}")
        for name in self.methods:
            get_method(name)
        for name, options in self.method_options.items():
            if name not in self.methods:
                raise ValueError(f"method_options names {name!r}, which is not among the methods "
                                 f"({', '.join(self.methods)})")
            unknown = sorted(set(options) - set(get_method(name).options))
            if unknown:
                raise ValueError(f"method_options for {name}: {name} takes no option {', '.join(unknown)}")
        if self.train_examples is not None:
            check_positive_int(self.train_examples, "train_examples")
        if self.epochs is not None:
            check_positive_int(self.epochs, "epochs")
        check_positive_int(self.eval_examples, "eval_examples")
        check_positive_int(self.batch_size, "batch_size")
        check_positive_int(self.strength_examples, "strength_examples")
        check_eps(self.eps, "linf", "eps")

    def to_dict(self) -> Dict[str, Any]:
        """Plain JSON values."""
        record = asdict(self)
        record["methods"] = list(self.methods)
        record["model_kwargs"] = dict(self.model_kwargs)
        record["method_options"] = {name: dict(options) for name, options in self.method_options.items()}
        return record

    @classmethod
    def from_dict(cls, record: Mapping[str, Any]) -> "StudySpec":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(record) - known)
        if unknown:
            raise ValueError(f"unknown study settings {', '.join(unknown)}")
        values = dict(record)
        values["methods"] = tuple(values.get("methods", DEFAULT_METHODS))
        return cls(**values)

    def differences(self, other: "StudySpec") -> List[str]:
        """The settings in which ``other`` differs from this spec, as
        ``name: this -> other`` lines (empty when they are the same)."""
        mine, theirs = self.to_dict(), other.to_dict()
        return [f"{k}: {mine[k]!r} -> {theirs[k]!r}" for k in mine if mine[k] != theirs[k]]


SPEC_NAME = "study.json"


def method_title(name: str) -> str:
    """How tables name the registered method ``name`` at its defaults:
    its registry title with a ``-k`` made the preset's step count
    (``PGD-10``, ``ATTA-1``)."""
    import inspect

    from ..methods import get_method

    method = get_method(name)
    steps = inspect.signature(method.trainer).parameters.get("steps")
    if method.title.endswith("-k") and steps is not None and isinstance(steps.default, int):
        return f"{method.title[:-2]}-{steps.default}"
    return method.title


def read_spec(out: Path) -> Optional[StudySpec]:
    """The spec a study in ``out`` started with, or None when none did."""
    path = Path(out) / SPEC_NAME
    if not path.is_file():
        return None
    try:
        return StudySpec.from_dict(json.loads(path.read_text()))
    except (ValueError, TypeError) as exc:
        raise ValueError(f"{path} is not a study record ({exc}); pass another --out") from None


__all__ = ["DEFAULT_METHODS", "REFERENCE_METHOD", "SPEC_NAME", "STRENGTH_METHODS", "StudySpec", "method_title",
           "read_spec"]
