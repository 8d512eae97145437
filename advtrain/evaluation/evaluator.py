"""Robust accuracy over a set of attacks, with a per-example worst case.

:func:`evaluate` is the evaluation protocol of DESIGN.md §5: clean accuracy,
then each attack of a suite, and the robust accuracy as a *worst case over
attacks per example* — an example counts as robust only when it is classified
correctly clean and under every attack. Accuracies are fractions in [0, 1].
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor, nn

from .._validation import check_eps, check_images, check_positive_int
from ..attacks.apgd import APGD
from ..attacks.base import Attack, model_mode
from ..attacks.pgd import PGD
from ..data.loader import as_tensors
from ..training.progress import ProgressBar

SUITES = ("pgd20", "cw", "autoattack", "full")
AttackSpec = Union[str, Sequence[Attack], Mapping[str, Attack]]
"""A suite name (``"pgd20"``, ``"cw"``, ``"autoattack"``, ``"full"``), a list of
attacks (named by class, numbered when repeated) or a dict name -> attack."""


def attack_suite(name: str, eps: float = 8 / 255) -> Dict[str, Attack]:
    """The named attacks of a protocol suite at radius ``eps`` (pixel units,
    at most 1), all L∞ with BatchNorm in eval mode:

    * ``"pgd20"``: ``PGD-20`` — 20 steps of ε/4 (2/255 at 8/255), random start,
      cross-entropy;
    * ``"cw"``: ``CW-20`` — the same PGD on the Carlini-Wagner margin loss (CW-∞);
    * ``"autoattack"``: ``APGD-CE`` (100 steps) then ``APGD-T`` (targeted DLR,
      100 steps for each of the 9 most likely wrong classes), the second run
      only on the points the first left robust, as AutoAttack does;
    * ``"full"``: all four, in the order above.
    """
    if name not in SUITES:
        raise ValueError(f"attacks must be one of {', '.join(map(repr, SUITES))}, a list or a dict of "
                         f"Attack objects; got {name!r}")
    eps = float(check_eps(eps, "linf", "eps"))
    suites: Dict[str, Dict[str, Attack]] = {
        "pgd20": {"PGD-20": PGD(eps, steps=20, step_size=eps / 4, random_start=True, bn_mode="eval")},
        "cw": {"CW-20": PGD(eps, steps=20, step_size=eps / 4, random_start=True, loss="margin", bn_mode="eval")},
        "autoattack": {"APGD-CE": APGD(eps, steps=100, loss="ce", bn_mode="eval"),
                       "APGD-T": APGD(eps, steps=100, loss="dlr", targeted=True, n_target_classes=9,
                                      bn_mode="eval")},
    }
    if name == "full":
        return {**suites["pgd20"], **suites["cw"], **suites["autoattack"]}
    return suites[name]


def _named_attacks(attacks: AttackSpec, eps: float) -> Dict[str, Attack]:
    if isinstance(attacks, str):
        return attack_suite(attacks, eps)
    named: Dict[str, Any]
    if isinstance(attacks, Mapping):
        named = dict(attacks)
    elif isinstance(attacks, Sequence):
        named = {}
        for attack in attacks:
            base = type(attack).__name__
            name, i = base, 1
            while name in named:
                i += 1
                name = f"{base}-{i}"
            named[name] = attack
    else:
        raise TypeError(f"attacks must be a suite name, a list or a dict of Attack objects, "
                        f"got {type(attacks).__name__}")
    if not named:
        raise ValueError("attacks is empty: give at least one attack")
    for name, attack in named.items():
        if not isinstance(name, str):
            raise TypeError(f"attack names must be strings, got {name!r}")
        if not isinstance(attack, Attack):
            raise TypeError(f"attack {name!r} must be an advtrain Attack, got {type(attack).__name__}")
    return named


def _as_image_label_tensors(data: Any) -> Tuple[Tensor, Tensor]:
    """``(images, labels)``: images uint8 or float pixels in [0, 1] as given for
    a pair of tensors, otherwise through :func:`advtrain.data.as_tensors`."""
    if isinstance(data, (tuple, list)) and len(data) == 2 and all(isinstance(t, Tensor) for t in data):
        images, labels = data
        if images.dtype != torch.uint8:
            check_images(images, "images")
        if labels.dim() != 1 or labels.shape[0] != images.shape[0] or labels.is_floating_point():
            raise ValueError(f"labels must be an integer tensor of shape ({images.shape[0]},) to match the images, "
                             f"got {labels.dtype} {tuple(labels.shape)}")
        if labels.numel() and int(labels.min()) < 0:
            raise ValueError(f"labels must be class indices >= 0, got a minimum of {int(labels.min())}")
        return images, labels.long()
    return as_tensors(data)


@dataclass
class EvaluationReport:
    """The result of :func:`evaluate`; accuracies are fractions in [0, 1].

    ``clean_accuracy``: on the unperturbed images. ``robust_accuracy``: the
    worst case — the share of examples correct clean *and* under every attack.
    ``per_attack``: robust accuracy per attack name; with ``sequential=True``
    (each attack ran only on the examples still robust) it is the accuracy
    after that attack and all before it, with ``sequential=False`` the attack's
    own. ``clean_correct``, ``robust_correct`` and ``per_attack_correct``: the
    same per example, as CPU bool tensors of shape (n_examples,).
    ``seconds``: wall time per attack. ``eps``: the radius of the suites
    (attacks given as objects carry their own).
    """

    clean_accuracy: float
    robust_accuracy: float
    per_attack: Dict[str, float]
    clean_correct: Tensor
    robust_correct: Tensor
    per_attack_correct: Dict[str, Tensor]
    n_examples: int
    eps: float
    sequential: bool
    seconds: Dict[str, float] = field(default_factory=dict)
    attacks: Dict[str, str] = field(default_factory=dict)

    def to_dict(self) -> Dict[str, Any]:
        """Plain, JSON-serializable summary (no per-example tensors)."""
        return {
            "n_examples": self.n_examples,
            "eps": self.eps,
            "clean_accuracy": self.clean_accuracy,
            "robust_accuracy": self.robust_accuracy,
            "per_attack": dict(self.per_attack),
            "sequential": self.sequential,
            "seconds": dict(self.seconds),
            "attacks": dict(self.attacks),
        }

    def __str__(self) -> str:
        rows = [("clean", self.clean_accuracy, "")]
        rows += [(name, acc, f"{self.seconds.get(name, float('nan')):.1f} s") for name, acc in self.per_attack.items()]
        rows.append(("worst case over attacks", self.robust_accuracy, ""))
        width = max(len(r[0]) for r in rows)
        how = ("each attack ran on the examples still robust; accuracies are cumulative" if self.sequential
               else "each attack ran on every clean-correct example")
        lines = [f"Evaluation on {self.n_examples} examples, eps = {self.eps * 255:.4g}/255 ({how})"]
        lines += [f"  {name:<{width}}  {100 * acc:6.2f}%  {extra}".rstrip() for name, acc, extra in rows]
        return "\n".join(lines)


def evaluate(
    model: nn.Module,
    data: Any,
    attacks: AttackSpec = "pgd20",
    *,
    eps: float = 8 / 255,
    batch_size: int = 256,
    n_examples: Optional[int] = None,
    device: Union[str, torch.device, None] = None,
    progress: bool = True,
    autocast_dtype: Optional[torch.dtype] = None,
    sequential: bool = True,
) -> EvaluationReport:
    """Clean and robust accuracy of ``model`` (in eval mode, restored after).

    Args:
        model: classifier taking pixels in [0, 1] (N, C, H, W), returning logits.
        data: ``(images, labels)`` tensors — images uint8 0..255 or float pixels
            in [0, 1], NCHW — or anything :func:`advtrain.data.as_tensors` accepts.
        attacks: a suite name (see :func:`attack_suite`), a list of attacks or a
            dict name -> attack; run in the given order.
        eps: L∞ radius of the suites, pixel units, at most 1 (8/255, not 8).
        batch_size: examples per batch.
        n_examples: evaluate the first ``n_examples`` only (``None``: all).
        device: where to run (default: the model's device).
        progress: show a progress bar.
        autocast_dtype: run forward passes under :func:`torch.autocast` with this
            dtype (e.g. ``torch.bfloat16`` on CUDA); ``None`` for full precision.
        sequential: run each attack only on the examples still robust (correct
            clean and under every earlier attack). The worst case is the same as
            running every attack on every example — an example already broken
            stays broken — and it is much cheaper; ``per_attack`` then holds
            cumulative accuracies. ``False`` runs every attack on every
            example classified correctly clean and reports each attack's own
            accuracy.

    Returns:
        An :class:`EvaluationReport`.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    eps = float(check_eps(eps, "linf", "eps"))
    named = _named_attacks(attacks, eps)
    batch_size = check_positive_int(batch_size, "batch_size")
    images, labels = _as_image_label_tensors(data)
    if n_examples is not None:
        check_positive_int(n_examples, "n_examples")
        images, labels = images[:n_examples], labels[:n_examples]
    n = int(images.shape[0])
    if device is None:
        param = next(model.parameters(), None)
        device = param.device if param is not None else torch.device("cpu")
    device = torch.device(device)

    clean_parts: List[Tensor] = []
    robust_parts: List[Tensor] = []
    attack_parts: Dict[str, List[Tensor]] = {name: [] for name in named}
    seconds = {name: 0.0 for name in named}
    n_batches = max(1, math.ceil(n / batch_size))
    bar = ProgressBar(n_batches, "evaluate", enabled=progress)
    n_clean = n_robust = 0
    with model_mode(model, "eval"), torch.autocast(device.type, dtype=autocast_dtype or torch.bfloat16,
                                                   enabled=autocast_dtype is not None):
        for start in range(0, n, batch_size):
            x = images[start:start + batch_size].to(device, non_blocking=True)
            x = x.float().div_(255) if x.dtype == torch.uint8 else x.float()
            y = labels[start:start + batch_size].to(device, non_blocking=True)
            with torch.no_grad():
                logits = model(x)
            if int(y.max()) >= logits.shape[1]:
                raise ValueError(f"labels hold class {int(y.max())} but the model returns {logits.shape[1]} logits")
            clean = logits.argmax(1) == y
            robust = clean
            for name, attack in named.items():
                t0 = time.perf_counter()
                idx = (robust if sequential else clean).nonzero().squeeze(1)
                correct = torch.zeros_like(clean)
                if idx.numel() > 0:
                    x_adv = attack.run(model, x[idx], y[idx], check=False)
                    with torch.no_grad():
                        correct[idx] = model(x_adv).argmax(1) == y[idx]
                robust = robust & correct
                attack_parts[name].append((robust if sequential else correct).cpu())
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                seconds[name] += time.perf_counter() - t0
            clean_parts.append(clean.cpu())
            robust_parts.append(robust.cpu())
            n_clean += int(clean_parts[-1].sum())
            n_robust += int(robust_parts[-1].sum())
            seen = start + x.shape[0]
            bar.update(1, clean=n_clean / seen, robust=n_robust / seen)
    bar.close()

    empty = torch.zeros(0, dtype=torch.bool)
    clean_correct = torch.cat(clean_parts) if clean_parts else empty
    robust_correct = torch.cat(robust_parts) if robust_parts else empty
    per_correct = {name: torch.cat(parts) if parts else empty for name, parts in attack_parts.items()}

    def acc(t: Tensor) -> float:
        return int(t.sum()) / t.numel() if t.numel() else float("nan")

    return EvaluationReport(
        clean_accuracy=acc(clean_correct),
        robust_accuracy=acc(robust_correct),
        per_attack={name: acc(t) for name, t in per_correct.items()},
        clean_correct=clean_correct,
        robust_correct=robust_correct,
        per_attack_correct=per_correct,
        n_examples=n,
        eps=eps,
        sequential=bool(sequential),
        seconds=seconds,
        attacks={name: repr(attack) for name, attack in named.items()},
    )


__all__ = ["evaluate", "attack_suite", "EvaluationReport", "SUITES", "AttackSpec"]
