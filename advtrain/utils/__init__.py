"""The bottom layer: small helpers every other part of advtrain uses, and
which import nothing else of advtrain.

* :mod:`.modes` — :func:`model_mode`, train/eval mode for a block;
* :mod:`.devices` — the default device and a model's device;
* :mod:`.pixels` — :func:`to_pixels`, uint8 levels to float pixels in [0, 1];
* :mod:`.precision` — :func:`mixed_precision` (autocast or full precision)
  and :func:`active_autocast_dtype`;
* :mod:`.batches` — :func:`device_batches` and :func:`batched_correctness`,
  the batched evaluation loop;
* :mod:`.progress` — :func:`progress_bar` (tqdm, short logs off a terminal).
"""
from .batches import Perturb, batched_correctness, device_batches
from .devices import DeviceLike, default_device, model_device, resolve_device
from .modes import BN_MODES, BNMode, model_mode
from .pixels import to_pixels
from .precision import active_autocast_dtype, at_least_float32, mixed_precision, precision_dtype
from .progress import progress_bar

__all__ = [
    "model_mode", "BNMode", "BN_MODES",
    "default_device", "model_device", "resolve_device", "DeviceLike",
    "to_pixels",
    "mixed_precision", "active_autocast_dtype", "at_least_float32", "precision_dtype",
    "device_batches", "batched_correctness", "Perturb",
    "progress_bar",
]
