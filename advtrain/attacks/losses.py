"""Per-example attack losses on logits.

Every loss takes logits ``(N, K)`` (any floating dtype, e.g. bf16 under
autocast) and integer class indices ``(N,)`` and returns a float32 tensor of
shape ``(N,)``: one value per example, larger meaning "more adversarial" for an
untargeted attack. Attacks sum it for the input gradient and compare it per
example to choose among restarts. Only tensor shapes are checked here (no host
synchronisation), so the functions can sit inside an attack's step loop.
"""
from __future__ import annotations

from typing import Callable, Dict, Tuple, Union

import torch.nn.functional as F
from torch import Tensor

LossFn = Callable[[Tensor, Tensor], Tensor]
"""A per-example loss ``loss(logits, y) -> (N,)``."""

LossSpec = Union[str, LossFn]
"""A loss given by registry name (``"ce"``, ``"margin"``, ``"dlr"``) or as a callable."""


def _check_logits(logits: Tensor, y: Tensor, min_classes: int, what: str) -> None:
    if logits.dim() != 2:
        raise ValueError(f"{what} expects logits of shape (N, K), got {tuple(logits.shape)}")
    if logits.shape[1] < min_classes:
        raise ValueError(f"{what} needs at least {min_classes} classes, "
                         f"got logits of shape {tuple(logits.shape)}")
    if y.shape != (logits.shape[0],):
        raise ValueError(f"{what} expects labels of shape ({logits.shape[0]},), "
                         f"got {tuple(y.shape)}")


def _true_and_best_other(z: Tensor, y: Tensor) -> Tuple[Tensor, Tensor]:
    """``z_y`` and ``max_{j != y} z_j`` for float32 logits ``z``."""
    idx = y.long().unsqueeze(1)
    z_y = z.gather(1, idx).squeeze(1)
    z_other = z.scatter(1, idx, float("-inf")).amax(dim=1)
    return z_y, z_other


def cross_entropy(logits: Tensor, y: Tensor) -> Tensor:
    """Cross-entropy ``-log softmax(z)_y`` per example, in float32."""
    _check_logits(logits, y, 1, "cross_entropy")
    return F.cross_entropy(logits.float(), y.long(), reduction="none")


def margin_loss(logits: Tensor, y: Tensor) -> Tensor:
    """Carlini-Wagner L∞ margin ``max_{j != y} z_j - z_y`` per example, in float32.

    Positive exactly when the example is misclassified; attacking with it is
    the "CW-∞" evaluation (PGD on the margin instead of cross-entropy).
    """
    _check_logits(logits, y, 2, "margin_loss")
    z_y, z_other = _true_and_best_other(logits.float(), y)
    return z_other - z_y


def dlr_loss(logits: Tensor, y: Tensor) -> Tensor:
    """Difference of Logits Ratio (Croce & Hein 2020, untargeted), float32:

    ``-(z_y - max_{j != y} z_j) / (z_π1 - z_π3 + 1e-12)`` where ``z_π1 >= z_π2 >=
    ...`` are the sorted logits. Invariant to shifting and scaling the logits,
    which makes it robust to gradient masking by logit rescaling. Needs at
    least 3 classes.
    """
    _check_logits(logits, y, 3, "dlr_loss")
    z = logits.float()
    z_y, z_other = _true_and_best_other(z, y)
    top = z.topk(3, dim=1).values
    return -(z_y - z_other) / (top[:, 0] - top[:, 2] + 1e-12)


def targeted_dlr_loss(logits: Tensor, y: Tensor, target: Tensor) -> Tensor:
    """Targeted DLR (Croce & Hein 2020), float32:

    ``-(z_y - z_t) / (z_π1 - (z_π3 + z_π4) / 2 + 1e-12)`` with ``y`` the true
    classes and ``t = target`` the target classes; maximising it pushes the
    target logit above the true one. Needs at least 4 classes.
    """
    _check_logits(logits, y, 4, "targeted_dlr_loss")
    if target.shape != y.shape:
        raise ValueError(f"targeted_dlr_loss expects target of shape {tuple(y.shape)}, "
                         f"got {tuple(target.shape)}")
    z = logits.float()
    z_y = z.gather(1, y.long().unsqueeze(1)).squeeze(1)
    z_t = z.gather(1, target.long().unsqueeze(1)).squeeze(1)
    top = z.topk(4, dim=1).values
    return -(z_y - z_t) / (top[:, 0] - 0.5 * (top[:, 2] + top[:, 3]) + 1e-12)


LOSSES: Dict[str, LossFn] = {"ce": cross_entropy, "margin": margin_loss, "dlr": dlr_loss}


def get_loss(loss: LossSpec) -> LossFn:
    """Resolve ``"ce"``, ``"margin"`` or ``"dlr"`` to its function; a callable
    ``loss(logits, y) -> (N,)`` is returned unchanged."""
    if isinstance(loss, str):
        if loss not in LOSSES:
            raise ValueError(f"loss must be one of {', '.join(map(repr, LOSSES))} or a callable; "
                             f"got {loss!r}")
        return LOSSES[loss]
    if callable(loss):
        return loss
    raise TypeError(f"loss must be a loss name ({', '.join(map(repr, LOSSES))}) or a callable "
                    f"loss(logits, y) -> per-example loss, got {type(loss).__name__}")


__all__ = ["LossFn", "LossSpec", "LOSSES", "cross_entropy", "margin_loss", "dlr_loss",
           "targeted_dlr_loss", "get_loss"]
