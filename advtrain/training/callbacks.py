"""Trainer callbacks: hooks into the epoch loop."""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, Dict, Mapping

if TYPE_CHECKING:
    from .trainer import Trainer


class Callback:
    """Base class of Trainer callbacks; override the hooks you need.

    A callback may set ``trainer.stop_training = True`` to end the run after
    the current epoch. Callbacks with state (``state_dict``/``load_state_dict``)
    are saved in checkpoints under their :attr:`name`.
    """

    @property
    def name(self) -> str:
        """Key of this callback's state in checkpoints (unique per trainer)."""
        return type(self).__name__

    def on_fit_start(self, trainer: "Trainer") -> None:
        """Before the first epoch of :meth:`Trainer.fit` (after any resume)."""

    def on_epoch_start(self, trainer: "Trainer", epoch: int) -> None:
        """At the start of epoch ``epoch`` (0-based)."""

    def on_epoch_end(self, trainer: "Trainer", epoch: int, record: Dict[str, Any]) -> None:
        """After epoch ``epoch`` is trained and evaluated; ``record`` is its
        history entry, which the callback may extend before it is written."""

    def on_fit_end(self, trainer: "Trainer") -> None:
        """After the last epoch (also when stopped early)."""

    def state_dict(self) -> Dict[str, Any]:
        return {}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore the output of :meth:`state_dict`."""


class LambdaCallback(Callback):
    """A callback from plain functions, for quick hooks in scripts."""

    def __init__(self, on_epoch_end=None, on_fit_start=None, on_fit_end=None, on_epoch_start=None) -> None:
        self._fns = {"on_epoch_end": on_epoch_end, "on_fit_start": on_fit_start,
                     "on_fit_end": on_fit_end, "on_epoch_start": on_epoch_start}

    def on_fit_start(self, trainer: "Trainer") -> None:
        if self._fns["on_fit_start"]:
            self._fns["on_fit_start"](trainer)

    def on_epoch_start(self, trainer: "Trainer", epoch: int) -> None:
        if self._fns["on_epoch_start"]:
            self._fns["on_epoch_start"](trainer, epoch)

    def on_epoch_end(self, trainer: "Trainer", epoch: int, record: Dict[str, Any]) -> None:
        if self._fns["on_epoch_end"]:
            self._fns["on_epoch_end"](trainer, epoch, record)

    def on_fit_end(self, trainer: "Trainer") -> None:
        if self._fns["on_fit_end"]:
            self._fns["on_fit_end"](trainer)
