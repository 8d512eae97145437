"""Robust accuracy over a set of attacks, with a per-example worst case.

:func:`evaluate` is advtrain's evaluation protocol: clean accuracy, then each
attack of a suite, and the robust accuracy as a *worst case over attacks per
example* — an example counts as robust only when it is classified correctly
clean and under every attack. Accuracies are fractions in [0, 1]. Around the
attacks it keeps three guard rails: the model's parameters and buffers are
put back after every attack, every adversarial batch is checked against the
declared threat model, and the AutoAttack suites run the cheap
gradient-masking checks first.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor, nn

from .._validation import check_choice, check_eps, check_positive_int
from ..attacks.apgd import APGD
from ..attacks.base import Attack
from ..attacks.fab import FAB
from ..attacks.pgd import PGD
from ..attacks.square import Square
from ..utils.batches import device_batches
from ..utils.devices import DeviceLike, resolve_device
from ..utils.modes import model_mode
from ..utils.precision import mixed_precision
from ..utils.progress import progress_bar
from .inputs import image_label_tensors
from .masking import CHEAP_CHECKS, MaskingWarning, check_gradient_masking
from .state import ModelSnapshot
from .threat_model import NORMS, check_threat_model, threat_model_stats

SUITES = ("pgd20", "cw", "autoattack", "standard", "full")
MASKING_SUITES = ("autoattack", "standard", "full")
"""The suites that run :data:`~advtrain.evaluation.masking.CHEAP_CHECKS` by default."""
MASKING_EXAMPLES = 200
"""How many of the first examples the gradient-masking checks look at."""
AttackSpec = Union[str, Sequence[Attack], Mapping[str, Attack]]
"""A suite name (``"pgd20"``, ``"cw"``, ``"autoattack"``, ``"standard"``, ``"full"``), a list of
attacks (named by class, numbered when repeated) or a dict name -> attack."""


def attack_suite(name: str, eps: float = 8 / 255, norm: str = "linf") -> Dict[str, Attack]:
    """The named attacks of a protocol suite at radius ``eps`` (pixel units;
    an L∞ radius is at most 1) in ``norm`` (``"linf"`` or ``"l2"``), all
    with BatchNorm in eval mode:

    * ``"pgd20"``: ``PGD-20`` — 20 steps of ε/4 (2/255 at 8/255), random start,
      cross-entropy;
    * ``"cw"``: ``CW-20`` — the same PGD on the Carlini-Wagner margin loss (CW-∞
      in L∞);
    * ``"autoattack"``: ``APGD-CE`` (100 steps) then ``APGD-T`` (targeted DLR,
      100 steps for each of the 9 most likely wrong classes), the second run
      only on the points the first left robust, as AutoAttack does;
    * ``"standard"``: the standard AutoAttack suite, as RobustBench reports
      it — ``APGD-CE`` and ``APGD-T`` as above, then ``FAB-T`` (targeted FAB,
      100 steps for each of the 9 most likely wrong classes) and ``Square``
      (5,000 queries, ``p_init`` 0.8), each on the points still robust;
    * ``"full"``: PGD-20, CW-20 and the standard suite, in the order above
      (the strongest: it adds a black-box attack to the gradient ones).

    In L2 the steps are L2 steps (the gradient scaled to length ε/4 for PGD,
    AutoAttack's L2 step rule for APGD), and FAB-T and Square run their L2
    versions.
    """
    if name not in SUITES:
        raise ValueError(f"attacks must be one of {', '.join(map(repr, SUITES))}, a list or a dict of "
                         f"Attack objects; got {name!r}")
    norm = check_choice(norm, "norm", NORMS)
    eps = float(check_eps(eps, norm, "eps"))
    suites: Dict[str, Dict[str, Attack]] = {
        "pgd20": {"PGD-20": PGD(eps, steps=20, step_size=eps / 4, random_start=True, norm=norm, bn_mode="eval")},
        "cw": {"CW-20": PGD(eps, steps=20, step_size=eps / 4, random_start=True, loss="margin", norm=norm,
                            bn_mode="eval")},
        "autoattack": {"APGD-CE": APGD(eps, steps=100, loss="ce", norm=norm, bn_mode="eval"),
                       "APGD-T": APGD(eps, steps=100, loss="dlr", targeted=True, n_target_classes=9, norm=norm,
                                      bn_mode="eval")},
    }
    suites["standard"] = {**suites["autoattack"],
                          "FAB-T": FAB(eps, steps=100, n_target_classes=9, norm=norm, bn_mode="eval"),
                          "Square": Square(eps, n_queries=5000, p_init=0.8, norm=norm, bn_mode="eval")}
    if name == "full":
        return {**suites["pgd20"], **suites["cw"], **suites["standard"]}
    return suites[name]


def _named_attacks(attacks: AttackSpec, eps: float, norm: str) -> Dict[str, Attack]:
    if isinstance(attacks, str):
        return attack_suite(attacks, eps, norm)
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
    ``seconds``: wall time per attack. ``eps`` and ``norm``: the declared
    threat model (pixel units), which every attack's output was checked
    against. ``masking_checks``: the gradient-masking checks that ran (empty
    when none did); ``masking_findings``: those that fired.
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
    norm: str = "linf"
    masking_checks: Tuple[str, ...] = ()
    masking_findings: List[MaskingWarning] = field(default_factory=list)

    def to_dict(self) -> Dict[str, Any]:
        """Plain, JSON-serializable summary (no per-example tensors)."""
        return {
            "n_examples": self.n_examples,
            "eps": self.eps,
            "norm": self.norm,
            "clean_accuracy": self.clean_accuracy,
            "robust_accuracy": self.robust_accuracy,
            "per_attack": dict(self.per_attack),
            "sequential": self.sequential,
            "seconds": dict(self.seconds),
            "attacks": dict(self.attacks),
            "masking_checks": list(self.masking_checks),
            "masking_findings": [{"check": f.check, "message": f.message, "value": f.value,
                                  "threshold": f.threshold} for f in self.masking_findings],
        }

    def __str__(self) -> str:
        rows = [("clean", self.clean_accuracy, "")]
        rows += [(name, acc, f"{self.seconds.get(name, float('nan')):.1f} s") for name, acc in self.per_attack.items()]
        rows.append(("worst case over attacks", self.robust_accuracy, ""))
        width = max(len(r[0]) for r in rows)
        how = ("each attack ran on the examples still robust; accuracies are cumulative" if self.sequential
               else "each attack ran on every clean-correct example")
        radius = f"L∞ eps = {self.eps * 255:.4g}/255" if self.norm == "linf" else f"L2 eps = {self.eps:.4g}"
        lines = [f"Evaluation on {self.n_examples} examples, {radius} ({how})"]
        lines += [f"  {name:<{width}}  {100 * acc:6.2f}%  {extra}".rstrip() for name, acc, extra in rows]
        if self.masking_checks:
            ran = ", ".join(self.masking_checks)
            lines.append(f"gradient-masking checks ({ran}): "
                         + ("nothing found" if not self.masking_findings else
                            f"{len(self.masking_findings)} fired, the robust accuracy is not to be trusted"))
            lines += [f"  {f.check}: {f.message}" for f in self.masking_findings]
        return "\n".join(lines)


def evaluate(
    model: nn.Module,
    data: Any,
    attacks: AttackSpec = "pgd20",
    *,
    eps: float = 8 / 255,
    norm: str = "linf",
    batch_size: int = 256,
    n_examples: Optional[int] = None,
    device: DeviceLike = None,
    progress: bool = True,
    autocast_dtype: Optional[torch.dtype] = None,
    sequential: bool = True,
    masking_checks: Optional[bool] = None,
) -> EvaluationReport:
    """Clean and robust accuracy of ``model`` (in eval mode, restored after).

    Guard rails:

    * the model's parameters and buffers are copied at the start and copied
      back after every attack call, so an attack that writes them (one in
      ``bn_mode="train"`` updates BatchNorm running statistics) changes
      neither what is reported nor the model handed back. Cost: one copy of
      the parameters and buffers in device memory and one device-to-device
      copy of them per attack per batch, small next to an attack's passes;
    * every adversarial batch is checked against the declared threat model
      — within ``eps`` in ``norm`` of the clean images and inside [0, 1], up
      to float32 rounding (a relative 1e-6 of ε plus one float32 ulp per
      pixel) — with one host synchronisation per batch; an attack that
      leaves it raises :class:`~advtrain.evaluation.threat_model.ThreatModelError`
      (a ``ValueError``) naming the attack, and nothing is reported;
    * with ``masking_checks`` the cheap gradient-masking checks
      (probability outputs, zero input gradients, randomized outputs; no
      attack) run on the first 200 examples before the attacks; their
      findings are in the report and emitted as
      :class:`~advtrain.evaluation.GradientMaskingWarning`.

    Args:
        model: classifier taking pixels in [0, 1] (N, C, H, W), returning logits.
        data: ``(images, labels)`` tensors — images uint8 0..255 or float pixels
            in [0, 1], NCHW — or anything :func:`advtrain.data.as_tensors` accepts.
        attacks: a suite name (see :func:`attack_suite`), a list of attacks or a
            dict name -> attack; run in the given order.
        eps: radius of the threat model, pixel units: the suites' radius (an
            L∞ one at most 1: 8/255, not 8), and the bound every attack's
            output is checked against.
        norm: the threat model's norm, ``"linf"`` or ``"l2"``; a suite name
            runs its attacks in this norm.
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
        masking_checks: run the cheap gradient-masking checks first;
            ``None`` (the default) runs them for the ``"autoattack"``,
            ``"standard"`` and ``"full"`` suites only.

    Returns:
        An :class:`EvaluationReport`.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    norm = check_choice(norm, "norm", NORMS)
    eps = float(check_eps(eps, norm, "eps"))
    named = _named_attacks(attacks, eps, norm)
    if masking_checks is None:
        masking_checks = isinstance(attacks, str) and attacks in MASKING_SUITES
    elif not isinstance(masking_checks, bool):
        raise TypeError(f"masking_checks must be True, False or None, got {type(masking_checks).__name__}")
    batch_size = check_positive_int(batch_size, "batch_size")
    images, labels = image_label_tensors(data)
    if n_examples is not None:
        check_positive_int(n_examples, "n_examples")
        images, labels = images[:n_examples], labels[:n_examples]
    n = int(images.shape[0])
    device = resolve_device(device, model)

    snapshot = ModelSnapshot(model)
    findings: List[MaskingWarning] = []
    ran_checks = CHEAP_CHECKS if masking_checks and n > 0 else ()
    if ran_checks:
        with snapshot:
            findings = check_gradient_masking(model, images, labels, checks=ran_checks, n_examples=MASKING_EXAMPLES,
                                              batch_size=batch_size, device=device)
    n_pixels = math.prod(images.shape[1:])
    clean_parts: List[Tensor] = []
    robust_parts: List[Tensor] = []
    attack_parts: Dict[str, List[Tensor]] = {name: [] for name in named}
    seconds = {name: 0.0 for name in named}
    bar = progress_bar(math.ceil(n / batch_size), "evaluate", enabled=progress, unit="batch")
    n_clean = n_robust = seen = 0
    with bar, snapshot, model_mode(model, "eval"), mixed_precision(device, autocast_dtype):
        for _, x, y in device_batches(images, labels, batch_size, device):
            with torch.no_grad():
                logits = model(x)
            if int(y.max()) >= logits.shape[1]:
                raise ValueError(f"labels hold class {int(y.max())} but the model returns {logits.shape[1]} logits")
            clean = logits.argmax(1) == y
            robust = clean
            stats: Dict[str, Tensor] = {}
            for name, attack in named.items():
                t0 = time.perf_counter()
                idx = (robust if sequential else clean).nonzero().squeeze(1)
                correct = torch.zeros_like(clean)
                if idx.numel() > 0:
                    x_clean = x[idx]
                    x_adv = attack.run(model, x_clean, y[idx], check=False)
                    snapshot.restore()
                    stats[name] = threat_model_stats(x_clean, x_adv, norm)
                    with torch.no_grad():
                        correct[idx] = model(x_adv).argmax(1) == y[idx]
                robust = robust & correct
                attack_parts[name].append((robust if sequential else correct).cpu())
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                seconds[name] += time.perf_counter() - t0
            check_threat_model(stats, eps, norm, n_pixels)
            clean_parts.append(clean.cpu())
            robust_parts.append(robust.cpu())
            n_clean += int(clean_parts[-1].sum())
            n_robust += int(robust_parts[-1].sum())
            seen += x.shape[0]
            bar.set_postfix({"clean": f"{n_clean / seen:.4g}", "robust": f"{n_robust / seen:.4g}"}, refresh=False)
            bar.update(1)

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
        norm=norm,
        masking_checks=ran_checks,
        masking_findings=findings,
    )


__all__ = ["evaluate", "attack_suite", "EvaluationReport", "SUITES", "MASKING_SUITES", "MASKING_EXAMPLES",
           "AttackSpec"]
