"""advtrain: fast, reliable adversarial training for PyTorch.

The three interfaces:

* :class:`Attack` — stateless ``attack(model, x, y) -> x_adv`` (FGSM, PGD, ...),
  for evaluation and, through :class:`AttackPolicy`, for training;
* :class:`PerturbationPolicy` — stateful training-time perturbation
  (:class:`ATTAPolicy`, :class:`APARTPolicy`);
* :class:`Trainer` — the training loop, with method presets
  (:class:`FGSMTrainer`, :class:`FastATTrainer`, :class:`PGDTrainer`,
  :class:`NFGSMTrainer`, :class:`ATTATrainer`, :class:`APARTTrainer`,
  :class:`TRADESTrainer`, :class:`MARTTrainer`, :class:`GradAlignTrainer`,
  :class:`FreeATTrainer`, :class:`ELLETrainer`, :class:`ELLEATrainer`).

Images are pixels in [0, 1], NCHW; ε is in pixel units; normalization lives
inside the model.
"""
from .attacks import APGD, FAB, FGSM, FGSMRS, NFGSM, PGD, Attack, Square
from .data import DeviceLoader, cifar10, cifar100
from .evaluation import evaluate
from .methods import (FreeATPolicy, FreeATTrainer, GradAlignPolicy, GradAlignTrainer, MARTPolicy, MARTTrainer,
                      TRADESPolicy, TRADESTrainer)
from .methods.elle import ELLEAPolicy, ELLEATrainer, ELLEPolicy, ELLETrainer
from .models import Normalize, PreActResNet18, ResNet18, WideResNet
from .policies import APARTPolicy, ATTAPolicy, AttackPolicy, Perturbation, PerturbationPolicy
from .training import (APARTTrainer, ATTATrainer, Callback, FastATTrainer, FGSMTrainer, History, NFGSMTrainer,
                       PGDTrainer, Trainer)
from .methods.protocols import build_protocol_trainer

__version__ = "0.1.0"

__all__ = [
    "Attack", "FGSM", "FGSMRS", "NFGSM", "PGD", "APGD", "FAB", "Square", "evaluate",
    "PerturbationPolicy", "Perturbation", "AttackPolicy", "ATTAPolicy", "APARTPolicy",
    "Trainer", "FGSMTrainer", "FastATTrainer", "PGDTrainer", "NFGSMTrainer", "ATTATrainer", "APARTTrainer",
    "TRADESPolicy", "TRADESTrainer", "MARTPolicy", "MARTTrainer",
    "GradAlignPolicy", "GradAlignTrainer", "FreeATPolicy", "FreeATTrainer",
    "ELLEPolicy", "ELLETrainer", "ELLEAPolicy", "ELLEATrainer",
    "Callback", "History", "build_protocol_trainer",
    "DeviceLoader", "cifar10", "cifar100",
    "PreActResNet18", "ResNet18", "WideResNet", "Normalize",
]
