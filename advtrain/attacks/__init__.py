"""Stateless adversarial attacks: ``attack(model, x, y) -> x_adv``.

Images are pixels in [0, 1] (N, C, H, W) and every radius is in pixel units.
"""
from .apgd import APGD
from .base import Attack
from .fab import FAB
from .losses import cross_entropy, dlr_loss, get_loss, margin_loss, targeted_dlr_loss
from .pgd import FGSM, FGSMRS, NFGSM, PGD
from .square import Square

__all__ = [
    "Attack",
    "PGD",
    "FGSM",
    "FGSMRS",
    "NFGSM",
    "APGD",
    "FAB",
    "Square",
    "cross_entropy",
    "margin_loss",
    "dlr_loss",
    "targeted_dlr_loss",
    "get_loss",
]
