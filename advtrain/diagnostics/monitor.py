"""Watch for the robustness drop while training.

Single-step adversarial training (FGSM) can suffer *catastrophic
overfitting*: within an epoch or two the robust accuracy collapses to about
zero while clean accuracy keeps rising. Long multi-step training slowly loses
robustness (*robust overfitting*). :class:`RobustnessDropMonitor` measures the
robust accuracy on held-out data after each epoch, flags a sudden drop or a
collapse, keeps the best-robust checkpoint and can stop the run;
:func:`detect_robustness_drop` applies the same rule to a list of accuracies.
Accuracies are fractions in [0, 1].
"""
from __future__ import annotations

import math
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any, Dict, List, Mapping, Optional, Sequence, Tuple

import torch
from torch import Tensor

from .. import distributed as dist_utils
from .._validation import check_eps, check_positive_int, check_radius
from ..attacks.pgd import PGD
from ..evaluation.inputs import image_label_tensors
from ..training.callbacks import Callback
from ..training.checkpoint import save_checkpoint
from ..utils.batches import batched_correctness
from ..utils.devices import DeviceLike, resolve_device

if TYPE_CHECKING:
    from ..training.trainer import Trainer

BEST_CHECKPOINT_NAME = "best.pt"


class RobustnessDropWarning(UserWarning):
    """Emitted when the robust accuracy drops sharply or collapses."""


def _fraction(value: object, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value <= 1.0:
        raise ValueError(f"{name} must be a fraction in [0, 1], got {value!r}")
    return float(value)


def _valid(acc: Optional[float]) -> bool:
    return acc is not None and math.isfinite(acc)


def _read_validation(record: Mapping[str, Any]) -> Tuple[float, Tuple[str, float, Optional[float]]]:
    """The raw model's validation robust accuracy, and the epoch's candidate
    ``(weights, robust accuracy, clean accuracy)``: the averaged model when
    its validation robust accuracy is higher, else the raw one."""
    raw = float(record["val_robust_acc"])
    averaged = record.get("wa_val_robust_acc")
    if averaged is not None and float(averaged) > raw:
        return raw, ("averaged", float(averaged), record.get("wa_val_clean_acc"))
    return raw, ("raw", raw, record.get("val_clean_acc"))


class _DropDetector:
    """The drop/collapse rule, applied one measurement at a time."""

    def __init__(self, threshold: float, floor: float) -> None:
        self.threshold = threshold
        self.floor = floor
        self.previous: Optional[float] = None
        self.peak: Optional[float] = None
        self.collapsed = False

    def update(self, epoch: int, acc: float) -> List[Tuple[int, str, str]]:
        found: List[Tuple[int, str, str]] = []
        prev, peak = self.previous, self.peak
        if prev is not None and prev - acc > self.threshold:
            found.append((epoch, "drop",
                          f"epoch {epoch}: robust accuracy fell from {prev:.1%} to {acc:.1%} in one evaluation "
                          f"(a drop of {prev - acc:.1%}, more than the threshold of {self.threshold:.0%}): "
                          "catastrophic overfitting"))
        if acc >= 2 * self.floor:
            self.collapsed = False
        elif acc <= self.floor and peak is not None and peak >= 2 * self.floor and not self.collapsed:
            self.collapsed = True
            found.append((epoch, "collapse",
                          f"epoch {epoch}: robust accuracy collapsed to {acc:.1%} (at or below {self.floor:.0%}) "
                          f"after reaching {peak:.1%}: catastrophic overfitting"))
        self.previous = acc
        self.peak = acc if peak is None else max(peak, acc)
        return found


def detect_robustness_drop(
    robust_accs: Sequence[Optional[float]],
    threshold: float = 0.2,
    floor: float = 0.05,
    *,
    epochs: Optional[Sequence[int]] = None,
) -> List[Tuple[int, str, str]]:
    """Find the epochs where a run's robust accuracy dropped or collapsed.

    Two events are reported, as ``(epoch, kind, message)`` in epoch order:

    * ``"drop"``: the accuracy fell by more than ``threshold`` (absolute,
      e.g. 0.2 = 20 points) from the previous measurement;
    * ``"collapse"``: it fell to ``floor`` or below after having reached at
      least ``2 * floor``. A collapse is reported once, when it happens, and
      again only after the accuracy has recovered to ``2 * floor`` or more
      (so values hovering around ``floor`` do not repeat it).

    Args:
        robust_accs: one robust accuracy (fraction in [0, 1]) per epoch;
            ``None`` or NaN for epochs without a measurement (skipped).
        threshold: largest allowed fall between consecutive measurements.
        floor: accuracy at or below which the model counts as collapsed.
        epochs: epoch numbers of the entries (default 1, 2, ...).

    Returns:
        The events found, empty for a steady history.
    """
    threshold = _fraction(threshold, "threshold")
    floor = _fraction(floor, "floor")
    numbers = list(epochs) if epochs is not None else list(range(1, len(robust_accs) + 1))
    if len(numbers) != len(robust_accs):
        raise ValueError(f"epochs has {len(numbers)} entries, robust_accs {len(robust_accs)}")
    detector = _DropDetector(threshold, floor)
    events: List[Tuple[int, str, str]] = []
    for epoch, acc in zip(numbers, robust_accs):
        if _valid(acc):
            events += detector.update(int(epoch), float(acc))  # type: ignore[arg-type]
    return events


class RobustnessDropMonitor(Callback):
    """A :class:`~advtrain.training.Callback` that measures PGD robust accuracy
    on held-out data after each epoch and reacts to a robustness drop.

    After every ``every``-th epoch it evaluates ``trainer.model`` (in eval
    mode; the model's flags are restored) under L∞ PGD-``steps`` (step
    ``step_size``, random start) on the first ``n_examples`` of ``eval_data``,
    and adds to the epoch's record:

    * ``monitor_robust_acc``: the robust accuracy (fraction);
    * ``overfitting_flag``: ``True`` when :func:`detect_robustness_drop`'s
      rule fires at this epoch (a fall of more than ``drop_threshold`` since
      the previous measurement, or a collapse to ``collapse_below`` or less),
      with ``overfitting_kind`` naming the event(s), e.g. ``"drop,collapse"``.

    A flagged epoch also emits a :class:`RobustnessDropWarning` naming the
    epoch and the numbers. The best robust accuracy so far is kept: with
    ``best_checkpoint`` the whole trainer state is written atomically to
    ``trainer.run_dir / "best.pt"`` (a checkpoint that
    ``Trainer.fit(..., resume=path)`` accepts; its history includes the best
    epoch's record as it stood when the monitor ran), or, without a
    ``run_dir``, a CPU copy of the best weights' ``state_dict`` is kept in
    :attr:`best_model_state` (see :meth:`restore_best`).

    **Reading the Trainer's validation** (``eval_data=None``): the monitor
    measures nothing itself but reads the accuracies that
    ``Trainer(val_examples=N)`` puts in the record (``val_robust_acc``,
    ``val_clean_acc``, and with weight averaging ``wa_val_robust_acc``,
    ``wa_val_clean_acc``; epochs without them are skipped), as the FastAT
    Benchmark selects its checkpoint. ``monitor_robust_acc`` is then the raw
    model's validation robust accuracy (the drop rule watches the model
    being trained); the epoch's candidate is the averaged model when its
    validation robust accuracy is higher, else the raw one
    (``monitor_weights`` in the record), and it becomes the best when its
    robust accuracy beats the best so far, or equals it with a higher clean
    accuracy. ``best.pt`` records which weights scored (``eval_weights``:
    ``"raw"`` or ``"averaged"``), and ``advtrain eval`` evaluates those. The
    attack settings (``eps``, ``steps``, ``step_size``, ``n_examples``,
    ``batch_size``) belong to ``eval_data`` and cannot be given without it:
    the Trainer's ``val_attack`` is the attack then.

    The PGD random starts come from a fork of the RNG seeded with the epoch
    number, so monitoring does not change the training run's random stream.
    In a distributed run each rank attacks its share of the images and the
    counts are summed, so all ranks agree; ``best.pt`` is then written by
    ``Trainer.save_checkpoint`` (with the per-rank parts, without the best
    epoch's record in its history) and only rank 0 warns.

    ``stop_on_collapse`` sets ``trainer.stop_training`` when a collapse is
    flagged; ``patience`` stops training after that many consecutive
    measurements without a new best (early stopping against robust
    overfitting, as in Rice et al. 2020).

    Args:
        eval_data: held-out split — ``(images, labels)`` tensors or anything
            :func:`advtrain.data.as_tensors` accepts. Not the training data.
            ``None``: read the Trainer's validation accuracies instead.
        eps: L∞ radius, pixel units.
        steps: PGD steps.
        step_size: PGD step in pixel units (default ``eps / 4``).
        n_examples: measure on the first ``n_examples`` (``None``: all).
        batch_size: evaluation batch size.
        drop_threshold: fall between consecutive measurements that is flagged.
        collapse_below: robust accuracy at or below which the model counts as
            collapsed (after having reached twice this value).
        patience: stop after this many measurements without improvement
            (``None``: never).
        stop_on_collapse: stop training when a collapse is flagged.
        best_checkpoint: keep the best-robust model (file or memory).
        every: measure every this many epochs.
    """

    def __init__(
        self,
        eval_data: Any = None,
        *,
        eps: float = 8 / 255,
        steps: int = 10,
        step_size: Optional[float] = None,
        n_examples: Optional[int] = 1000,
        batch_size: int = 256,
        drop_threshold: float = 0.20,
        collapse_below: float = 0.05,
        patience: Optional[int] = None,
        stop_on_collapse: bool = False,
        best_checkpoint: bool = True,
        every: int = 1,
    ) -> None:
        self.reads_validation = eval_data is None
        """True when the monitor reads the Trainer's validation accuracies (``eval_data=None``)."""
        self.images: Optional[Tensor] = None
        self.labels: Optional[Tensor] = None
        self.attack: Optional[PGD] = None
        if self.reads_validation:
            given = {name: value for name, value, default in (
                ("eps", eps, 8 / 255), ("steps", steps, 10), ("step_size", step_size, None),
                ("n_examples", n_examples, 1000), ("batch_size", batch_size, 256)) if value != default}
            if given:
                raise ValueError(f"{', '.join(given)} set the monitor's own attack on eval_data; with "
                                 "eval_data=None it reads the Trainer's validation accuracies: set the attack "
                                 "with Trainer(val_attack=...), or pass eval_data")
        else:
            images, labels = image_label_tensors(eval_data)
            if n_examples is not None:
                check_positive_int(n_examples, "n_examples")
                images, labels = images[:n_examples], labels[:n_examples]
            self.images, self.labels = images, labels
        self.eps = float(check_eps(eps, "linf", "eps"))
        self.steps = check_positive_int(steps, "steps")
        self.step_size = self.eps / 4 if step_size is None else float(check_radius(step_size, "step_size"))
        if not self.reads_validation:
            self.attack = PGD(self.eps, steps=self.steps, step_size=self.step_size, random_start=True,
                              bn_mode="eval")
        self.batch_size = check_positive_int(batch_size, "batch_size")
        self.drop_threshold = _fraction(drop_threshold, "drop_threshold")
        self.collapse_below = _fraction(collapse_below, "collapse_below")
        self.patience = None if patience is None else check_positive_int(patience, "patience")
        self.stop_on_collapse = bool(stop_on_collapse)
        self.best_checkpoint = bool(best_checkpoint)
        self.every = check_positive_int(every, "every")
        self.best_model_state: Optional[Dict[str, Tensor]] = None
        """CPU copy of the best weights' ``state_dict`` when the trainer has no ``run_dir``."""
        self._reset()

    def _reset(self) -> None:
        self.best: Optional[float] = None
        self.best_clean: Optional[float] = None
        self.best_epoch: Optional[int] = None
        self.best_weights: Optional[str] = None
        """Which weights scored best: ``"raw"`` or ``"averaged"`` (the Trainer's weight average)."""
        self.since_best = 0
        self.measurements: List[Tuple[int, float]] = []
        self.events: List[Tuple[int, str, str]] = []
        self._detector = _DropDetector(self.drop_threshold, self.collapse_below)

    # ------------------------------------------------------------------ hooks
    def measure(self, model: torch.nn.Module, device: DeviceLike = None,
                autocast_dtype: Optional[torch.dtype] = None, *, seed: int = 0) -> float:
        """PGD robust accuracy of ``model`` on the monitor's data (fraction).
        The attack's random starts come from a fork of the RNG seeded with
        ``seed``: the training run's random stream is left untouched."""
        if self.images is None or self.labels is None:
            raise RuntimeError("this monitor reads the Trainer's validation accuracies and holds no data to "
                               "measure on: build it with eval_data to measure models itself")
        correct = self._count(model, self.images, self.labels, device, autocast_dtype, seed)
        return int(correct) / max(1, len(self.labels))

    def _count(self, model: torch.nn.Module, images: Tensor, labels: Tensor, device: DeviceLike,
               autocast_dtype: Optional[torch.dtype], seed: int) -> Tensor:
        """How many of ``images`` stay correct under the attack: a 0-dim int64
        tensor on ``device`` (default: the model's), nothing read back."""
        device = resolve_device(device, model)
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            torch.manual_seed(seed)
            correct = batched_correctness(model, images, labels, self.attack, batch_size=self.batch_size,
                                          device=device, autocast_dtype=autocast_dtype)
        return correct.sum()

    def on_fit_start(self, trainer: "Trainer") -> None:
        if self.reads_validation and (getattr(trainer, "val_examples", None) is None
                                      or getattr(trainer, "val_attack", None) is None):
            raise ValueError("RobustnessDropMonitor without eval_data reads the Trainer's validation robust "
                             "accuracy: train with Trainer(val_examples=N) and a val_attack, or pass eval_data "
                             "to the monitor")

    def on_epoch_end(self, trainer: "Trainer", epoch: int, record: Dict[str, Any]) -> None:
        number = epoch + 1
        if number % self.every != 0:
            return
        if self.reads_validation:
            if record.get("val_robust_acc") is None:  # no validation this epoch
                return
            acc, (weights, score, clean) = _read_validation(record)
            record["monitor_weights"] = weights
        else:
            acc = self._measure_trainer(trainer, seed=number)
            weights, score, clean = "raw", acc, None
        self.measurements.append((number, acc))
        events = self._detector.update(number, acc)
        self.events += events
        record["monitor_robust_acc"] = acc
        record["overfitting_flag"] = bool(events)
        if events:
            record["overfitting_kind"] = ",".join(kind for _, kind, _ in events)
            if getattr(trainer, "is_main", True):
                for _, _, message in events:
                    warnings.warn(message, RobustnessDropWarning, stacklevel=2)
        if self._improves(score, clean):
            self.best, self.best_clean, self.best_epoch, self.best_weights = score, clean, number, weights
            self.since_best = 0
            if self.best_checkpoint:
                self._keep_best(trainer, record, weights)
        else:
            self.since_best += 1
        if self.stop_on_collapse and any(kind == "collapse" for _, kind, _ in events):
            trainer.stop_training = True
        if self.patience is not None and self.since_best >= self.patience:
            trainer.stop_training = True

    def _measure_trainer(self, trainer: "Trainer", seed: int) -> float:
        """Robust accuracy of ``trainer.model``; in a distributed run each rank
        attacks its share of the images and the counts are summed, so every
        rank gets the same value and takes the same decisions."""
        device = getattr(trainer, "device", None)
        dtype = getattr(trainer, "autocast_dtype", None)
        if not getattr(trainer, "distributed", False):
            return self.measure(trainer.model, device, dtype, seed=seed)
        rank, world = trainer.rank, trainer.world_size
        labels = self.labels[rank::world]
        correct = self._count(trainer.model, self.images[rank::world], labels, device, dtype, seed + rank)
        counts = torch.stack([correct.float(), torch.full((), float(labels.shape[0]), device=correct.device)])
        correct_total, total = dist_utils.all_reduce_sum(counts).tolist()
        return correct_total / max(1.0, total)

    def _improves(self, score: float, clean: Optional[float]) -> bool:
        """A higher robust accuracy than the best, or the same with a higher clean one."""
        if self.best is None or score > self.best:
            return True
        return score == self.best and clean is not None and self.best_clean is not None and clean > self.best_clean

    def _keep_best(self, trainer: "Trainer", record: Dict[str, Any], weights: str) -> None:
        run_dir = getattr(trainer, "run_dir", None)
        if run_dir is None:
            model = trainer.model if weights == "raw" else trainer.weight_average.module
            self.best_model_state = {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}
        elif getattr(trainer, "distributed", False):
            # collective: every rank writes its part
            trainer.save_checkpoint(Path(run_dir) / BEST_CHECKPOINT_NAME, eval_weights=weights)
        else:
            state = trainer.state_dict()
            state["history"] = list(state.get("history", [])) + [dict(record)]
            state["eval_weights"] = weights
            save_checkpoint(Path(run_dir) / BEST_CHECKPOINT_NAME, state)

    def restore_best(self, model: torch.nn.Module) -> None:
        """Load the in-memory best weights (raw or averaged, see
        :attr:`best_weights`) into ``model`` (runs without ``run_dir``; with
        one, load ``run_dir/best.pt`` instead)."""
        if self.best_model_state is None:
            raise RuntimeError("no in-memory best model: the monitor has not measured yet, best_checkpoint is off, "
                               "or the trainer has a run_dir (the best model is in run_dir/best.pt)")
        model.load_state_dict(self.best_model_state)

    # ------------------------------------------------------------------ state
    @property
    def robust_accs(self) -> List[float]:
        """The measured robust accuracies, in order."""
        return [acc for _, acc in self.measurements]

    def state_dict(self) -> Dict[str, Any]:
        """Best value, clean accuracy, epoch and weights, measurements and
        events (plain values)."""
        return {
            "best": self.best,
            "best_clean": self.best_clean,
            "best_epoch": self.best_epoch,
            "best_weights": self.best_weights,
            "since_best": self.since_best,
            "measurements": [[e, a] for e, a in self.measurements],
            "events": [[e, k, m] for e, k, m in self.events],
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict`'s output (the drop rule resumes from the
        last measurement)."""
        self._reset()
        for epoch, acc in state["measurements"]:
            self.measurements.append((int(epoch), float(acc)))
            self._detector.update(int(epoch), float(acc))
        self.events = [(int(e), str(k), str(m)) for e, k, m in state["events"]]
        self.best = None if state["best"] is None else float(state["best"])
        self.best_epoch = None if state["best_epoch"] is None else int(state["best_epoch"])
        # states written before validation reading hold no clean accuracy or weights
        self.best_clean = None if state.get("best_clean") is None else float(state["best_clean"])
        self.best_weights = state.get("best_weights", None if self.best is None else "raw")
        self.since_best = int(state["since_best"])

    def __repr__(self) -> str:
        data = ("validation" if self.labels is None else
                f"eps={self.eps:.6g}, steps={self.steps}, n_examples={len(self.labels)}")
        return (f"RobustnessDropMonitor({data}, "
                f"drop_threshold={self.drop_threshold}, collapse_below={self.collapse_below}, "
                f"patience={self.patience}, stop_on_collapse={self.stop_on_collapse})")


__all__ = ["RobustnessDropMonitor", "RobustnessDropWarning", "detect_robustness_drop"]
