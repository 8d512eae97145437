"""The training loop, its callbacks and checkpoints, and method presets."""
from .callbacks import Callback, LambdaCallback
from .checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from .history import History
from .presets import APARTTrainer, ATTATrainer, FastATTrainer, FGSMTrainer, NFGSMTrainer, PGDTrainer
from .schedules import Piecewise, Schedule, cyclic_momentum, multistep, triangular
from .trainer import Trainer, pgd20

__all__ = [
    "Callback", "LambdaCallback", "CheckpointError", "load_checkpoint", "save_checkpoint", "History",
    "APARTTrainer", "ATTATrainer", "FastATTrainer", "FGSMTrainer", "NFGSMTrainer", "PGDTrainer", "Piecewise", "Schedule", "cyclic_momentum",
    "multistep", "triangular", "Trainer", "pgd20",
]
