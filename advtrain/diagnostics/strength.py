"""How strong are a training method's perturbations, epoch by epoch?

The APART paper (Li et al. 2020, §3) explains FGSM's robustness drop as
*perturbation underfitting*: the perturbations FGSM generates during training
lose their strength until they are no better than random noise. This module
measures that directly:

* :class:`PerturbationRecorder`, a Trainer callback, asks the training
  method for the perturbation of a fixed probe batch at the end of each epoch;
* :class:`PerturbationStrengthStudy` applies each epoch's perturbations to a
  fixed *reference* model and reports its accuracy on ``x + δ_epoch`` next to
  its accuracy under uniform random noise of the same radius. Lower accuracy
  means stronger perturbations; when the two curves meet, the method's
  perturbations have decayed to noise.

Images are pixels in [0, 1] (N, C, H, W); radii are in pixel units;
accuracies are fractions in [0, 1].
"""
from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Dict, List, Mapping, Optional, Sequence, Union

import numpy as np
import torch
from torch import Tensor, nn

from .._validation import check_choice, check_eps, check_positive_int
from ..attacks.base import Attack
from ..data.batch import Batch
from ..evaluation.inputs import image_label_tensors
from ..policies.base import PerturbationPolicy
from ..policies.store import PerExampleStore
from ..training.callbacks import Callback
from ..utils.batches import batched_correctness, device_batches
from ..utils.devices import DeviceLike, model_device, resolve_device
from ..utils.precision import mixed_precision

if TYPE_CHECKING:
    from ..training.trainer import Trainer

NOISES = ("uniform", "sign")


class PerturbationRecorder(Callback):
    """Record the training method's perturbation of a probe batch every epoch.

    At the end of every ``every``-th epoch it asks ``source`` — by default the
    trainer's own policy — for the perturbation of the probe images and keeps
    ``δ = x_perturbed − x`` (float32, on the CPU) in :attr:`perturbations`,
    keyed by epoch number (1-based). A policy is called as in training,
    ``policy.perturb(trainer.model, Batch(x, y, index, aug=None))`` (no crop or
    flip), under the trainer's autocast; an :class:`~advtrain.attacks.Attack`
    is called as ``attack.run(trainer.model, x, y)``.

    Recording leaves the run as it was: BatchNorm running statistics changed
    by a train-mode attack are restored, the global RNG is untouched (random
    starts come from a fork seeded with ``seed + epoch``), and a per-example
    store (ATTA, APART) gets its probe rows back after the call.

    Per-example policies keep their state by dataset index: pass the training
    examples' indices as ``probe_index`` and those same training images as
    ``probe_images``, so the policy reads each probe example's own state.
    Policies without per-example state are called with indices
    ``0..n-1``.

    Args:
        probe_images: uint8 0..255 or float pixels in [0, 1], (n, C, H, W).
        probe_labels: int class indices, (n,).
        source: a :class:`PerturbationPolicy` or :class:`Attack`; ``None``
            uses ``trainer.policy``.
        every: record every this many epochs.
        probe_index: training-set indices of the probe examples (required
            for policies with a per-example store).
        batch_size: probe examples per call.
        seed: base seed of the recording's random numbers.
    """

    def __init__(
        self,
        probe_images: Tensor,
        probe_labels: Tensor,
        source: Union[PerturbationPolicy, Attack, None] = None,
        *,
        every: int = 1,
        probe_index: Optional[Tensor] = None,
        batch_size: int = 256,
        seed: int = 0,
    ) -> None:
        images, labels = image_label_tensors((probe_images, probe_labels))
        if source is not None and not isinstance(source, (PerturbationPolicy, Attack)):
            raise TypeError(f"source must be a PerturbationPolicy, an Attack or None, got {type(source).__name__}")
        if probe_index is not None:
            if not isinstance(probe_index, Tensor) or probe_index.dtype != torch.int64 \
                    or probe_index.shape != labels.shape:
                raise ValueError(f"probe_index must be an int64 tensor of shape ({labels.shape[0]},), one training "
                                 f"index per probe image")
            if int(probe_index.min()) < 0:
                raise ValueError("probe_index must hold training-set indices >= 0")
        self.images = images
        self.labels = labels
        self.source = source
        self.every = check_positive_int(every, "every")
        self.probe_index = probe_index
        self.batch_size = check_positive_int(batch_size, "batch_size")
        self.seed = check_positive_int(seed, "seed", minimum=0)
        self.perturbations: Dict[int, Tensor] = {}
        """Epoch number (1-based) -> perturbation, float32 CPU (n, C, H, W)."""

    def _policy_store(self, policy: PerturbationPolicy) -> Optional[PerExampleStore]:
        store = getattr(policy, "store", None)
        return store if isinstance(store, PerExampleStore) else None

    def on_fit_start(self, trainer: "Trainer") -> None:
        source = self.source if self.source is not None else trainer.policy
        if isinstance(source, PerturbationPolicy):
            store = self._policy_store(source)
            if store is not None:
                if self.probe_index is None:
                    raise ValueError(f"{type(source).__name__} keeps per-example state: pass probe_index (the "
                                     "training indices of the probe images) to PerturbationRecorder")
                if int(self.probe_index.max()) >= store.num_examples:
                    raise ValueError(f"probe_index holds {int(self.probe_index.max())}, beyond the "
                                     f"{store.num_examples} training examples")

    def on_epoch_end(self, trainer: "Trainer", epoch: int, record: Dict[str, Any]) -> None:
        number = epoch + 1
        if number % self.every == 0:
            self.perturbations[number] = self.record(trainer, number)

    def record(self, trainer: "Trainer", epoch: int) -> Tensor:
        """The source's perturbation of the probe batch now (float32, CPU)."""
        model = trainer.model
        source = self.source if self.source is not None else trainer.policy
        device = getattr(trainer, "device", None) or model_device(model)
        dtype = getattr(trainer, "autocast_dtype", None)
        store = self._policy_store(source) if isinstance(source, PerturbationPolicy) else None
        index = self.probe_index if self.probe_index is not None else torch.arange(self.labels.shape[0])
        index = index.to(device)
        saved_buffers = {name: b.detach().clone() for name, b in model.named_buffers()}
        parts: List[Tensor] = []
        forked = [device] if device.type == "cuda" else []
        try:
            with torch.random.fork_rng(devices=forked), mixed_precision(device, dtype), \
                    (store.preserved(index) if store is not None else nullcontext()):
                torch.manual_seed(self.seed + epoch)
                for rows, x, y in device_batches(self.images, self.labels, self.batch_size, device):
                    if isinstance(source, Attack):
                        x_adv = source.run(model, x, y, check=False)
                    else:
                        x_adv = source.perturb(model, Batch(x, y, index[rows], None)).x
                    parts.append(x_adv.detach().float() - x)
        finally:
            with torch.no_grad():
                for name, b in model.named_buffers():
                    b.copy_(saved_buffers[name])
        return torch.cat(parts).cpu()

    def state_dict(self) -> Dict[str, Any]:
        """The recorded perturbations (so a resumed run keeps them)."""
        return {"perturbations": {int(k): v for k, v in self.perturbations.items()}}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.perturbations = {int(k): v.float().cpu() for k, v in state["perturbations"].items()}


@dataclass
class StrengthResult:
    """Output of :meth:`PerturbationStrengthStudy.run`; arrays have shape
    (epochs,) and accuracies are fractions in [0, 1].

    ``epochs``: epoch numbers. ``perturbation_accuracy``: the reference
    model's accuracy on ``x + δ_epoch``. ``noise_accuracy``: its accuracy under
    random noise of radius ``eps`` (a fresh draw per epoch). ``linf``: the
    largest ``|δ_epoch|`` (pixel units). ``clean_accuracy``: on ``x``.
    ``noise``: ``"uniform"`` (uniform in the ε-box) or ``"sign"`` (random ±ε).
    """

    epochs: np.ndarray
    perturbation_accuracy: np.ndarray
    noise_accuracy: np.ndarray
    linf: np.ndarray
    clean_accuracy: float
    eps: float
    noise: str

    @property
    def gap(self) -> np.ndarray:
        """Noise accuracy minus perturbation accuracy per epoch: how much
        stronger than noise the perturbations are (0 when they have decayed
        to noise)."""
        return self.noise_accuracy - self.perturbation_accuracy

    def to_dict(self) -> Dict[str, Any]:
        """Plain, JSON-serializable values."""
        return {
            "epochs": [int(e) for e in self.epochs],
            "perturbation_accuracy": [float(a) for a in self.perturbation_accuracy],
            "noise_accuracy": [float(a) for a in self.noise_accuracy],
            "linf": [float(a) for a in self.linf],
            "clean_accuracy": self.clean_accuracy,
            "eps": self.eps,
            "noise": self.noise,
        }


class PerturbationStrengthStudy:
    """Score perturbations by how much they hurt a fixed reference model.

    Args:
        reference_model: a trained classifier (pixels in [0, 1] -> logits),
            kept fixed; evaluated in eval mode (its flags are restored).
        images: the probe images the perturbations were made for, uint8
            0..255 or float pixels in [0, 1], (n, C, H, W).
        labels: int class indices, (n,).
        eps: radius of the comparison noise, pixel units (the training ε).
        noise: ``"uniform"`` (uniform in [−ε, ε] per pixel) or ``"sign"``
            (±ε per pixel: the same norms as an FGSM perturbation).
        batch_size: examples per forward pass.
        device: where to run (default: the reference model's device).
        seed: seed of the noise (epoch ``e`` uses ``seed + e``).
    """

    def __init__(
        self,
        reference_model: nn.Module,
        images: Tensor,
        labels: Tensor,
        eps: float,
        *,
        noise: str = "uniform",
        batch_size: int = 256,
        device: DeviceLike = None,
        seed: int = 0,
    ) -> None:
        if not isinstance(reference_model, nn.Module):
            raise TypeError(f"reference_model must be a torch.nn.Module, got {type(reference_model).__name__}")
        self.model = reference_model
        self.images, self.labels = image_label_tensors((images, labels))
        self.eps = float(check_eps(eps, "linf", "eps"))
        self.noise = check_choice(noise, "noise", NOISES)
        self.batch_size = check_positive_int(batch_size, "batch_size")
        self.device = resolve_device(device, reference_model)
        self.seed = check_positive_int(seed, "seed", minimum=0)

    def accuracy(self, delta: Optional[Tensor] = None) -> float:
        """Reference accuracy on ``clip(x + delta, 0, 1)`` (``None``: clean)."""
        if delta is not None and delta.shape != self.images.shape:
            raise ValueError(f"a perturbation must have the probe images' shape {tuple(self.images.shape)}, "
                             f"got {tuple(delta.shape)}")
        correct = batched_correctness(self.model, self.images, self.labels, batch_size=self.batch_size,
                                      device=self.device, delta=delta)
        return int(correct.sum()) / max(1, self.labels.shape[0])

    def random_noise(self, epoch: int) -> Tensor:
        """The comparison noise of epoch ``epoch`` (float32 CPU, probe shape)."""
        generator = torch.Generator().manual_seed(self.seed + int(epoch))
        u = torch.rand(self.images.shape, generator=generator)
        if self.noise == "uniform":
            return (2 * u - 1) * self.eps
        return torch.where(u < 0.5, -self.eps, self.eps)

    def run(self, perturbations: Union[Mapping[int, Tensor], Sequence[Tensor], PerturbationRecorder]) -> StrengthResult:
        """Measure every epoch's perturbations.

        ``perturbations``: epoch -> δ (probe shape), a list of δ (epochs 1, 2,
        ...), or a :class:`PerturbationRecorder` after training.
        """
        if isinstance(perturbations, PerturbationRecorder):
            perturbations = perturbations.perturbations
        if isinstance(perturbations, Mapping):
            items = sorted((int(k), v) for k, v in perturbations.items())
        else:
            items = list(enumerate(perturbations, start=1))
        if not items:
            raise ValueError("no perturbations to study (did the recorder run?)")
        epochs = np.array([e for e, _ in items], dtype=np.int64)
        pert_acc = np.array([self.accuracy(d) for _, d in items], dtype=np.float64)
        noise_acc = np.array([self.accuracy(self.random_noise(e)) for e in epochs], dtype=np.float64)
        linf = np.array([float(d.detach().abs().max()) if d.numel() else 0.0 for _, d in items], dtype=np.float64)
        return StrengthResult(epochs=epochs, perturbation_accuracy=pert_acc, noise_accuracy=noise_acc, linf=linf,
                              clean_accuracy=self.accuracy(), eps=self.eps, noise=self.noise)


__all__ = ["PerturbationRecorder", "PerturbationStrengthStudy", "StrengthResult", "NOISES"]
