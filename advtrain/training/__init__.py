"""The training loop, its callbacks and checkpoints, and method presets."""
from .atomic import AtomicWriteError
from .callbacks import Callback, LambdaCallback
from .checkpoint import CheckpointError, NonFiniteCheckpointError, load_checkpoint, save_checkpoint
from .history import History
from .loggers import CSVLogger, TensorBoardLogger
from .presets import APARTTrainer, ATTATrainer, FastATTrainer, FGSMTrainer, NFGSMTrainer, PGDTrainer
from .run_lock import RunLockError
from .schedules import (CosineSchedule, MultiStep, Piecewise, Schedule, cyclic_momentum, multistep, one_cycle,
                        one_cycle_momentum, triangular)
from .trainer import CheckpointInfo, Trainer, pgd20
from .validation import pgd10, train_val_split
from .weight_average import WeightAverage, evaluation_weights

__all__ = [
    "AtomicWriteError", "Callback", "LambdaCallback", "CheckpointError", "NonFiniteCheckpointError", "RunLockError",
    "load_checkpoint", "save_checkpoint", "History", "CSVLogger", "TensorBoardLogger",
    "APARTTrainer", "ATTATrainer", "FastATTrainer", "FGSMTrainer", "NFGSMTrainer", "PGDTrainer", "Piecewise", "Schedule", "cyclic_momentum",
    "multistep", "triangular", "CosineSchedule", "MultiStep", "one_cycle", "one_cycle_momentum", "Trainer", "CheckpointInfo", "pgd20",
    "WeightAverage", "evaluation_weights", "pgd10", "train_val_split",
]
