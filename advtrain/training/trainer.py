"""The :class:`Trainer`: the adversarial-training epoch loop."""
from __future__ import annotations

import dataclasses
import math
import time
import warnings
from pathlib import Path
from typing import Any, Callable, ContextManager, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel

from .._validation import check_choice, check_positive_int
from .. import distributed as dist_utils
from ..attacks.base import Attack
from ..attacks.pgd import PGD
from ..data.augment import check_fill
from ..data.batch import Batch
from ..data.loader import DeviceLoader, as_tensors
from ..models.input_only import InputOnlyGradients
from ..models.registry import model_record
from ..models.sites import SiteDelta, perturb_sites
from ..policies.attack_policy import CleanPolicy
from ..policies.base import LossContext, PerturbationPolicy, PolicyContext
from ..utils.batches import batched_correctness
from ..utils.devices import default_device
from ..utils.memory_format import unsafe_channels_last_convs
from ..utils.precision import mixed_precision, precision_dtype
from ..utils.progress import progress_bar
from .atomic import remove_stale_temp_files
from .callbacks import Callback
from .checkpoint import CheckpointError, NonFiniteCheckpointError, load_checkpoint, non_finite_entries, save_checkpoint
from .history import History
from .output_check import check_model_outputs
from .run_files import clear_run, describe, existing_run
from .run_lock import lock_run_dir
from .schedules import ScheduleLike, make_schedule
from .validation import pgd10, train_val_split
from .weight_average import WEIGHTS, WeightAverage, as_weight_average

PRECISIONS = ("auto", "fp32", "bf16")
CHECKPOINT_NAME = "checkpoint.pt"
METRICS_NAME = "metrics.jsonl"
#: The training loss is checked to be finite every this many steps (one host
#: synchronisation each, and an all-reduce in a distributed run), whether or
#: not progress is shown: a diverged run stops within this many steps.
FINITE_CHECK_STEPS = 50
#: Keys every Trainer checkpoint holds.
STATE_KEYS = ("epoch", "global_step", "model", "optimizer", "policy", "history", "rng")
_WEIGHTS_ONLY_HINT = ("to start a fresh run from its model weights alone, use --init-weights CHECKPOINT "
                      "(in Python: Trainer.fit(..., init_weights=CHECKPOINT))")


def pgd20(eps: float = 8 / 255) -> PGD:
    """The evaluation attack of the APART protocol: L∞ PGD, 20 steps of
    ε/4 (2/255 at ε = 8/255), random start, BatchNorm in eval mode."""
    return PGD(eps, steps=20, step_size=eps / 4, random_start=True, bn_mode="eval")


class Trainer:
    """Trains ``model`` on batches perturbed by ``policy``.

    The loop: for each batch, ``policy.perturb`` gives the input (and optional
    layer perturbations at named sites); the model takes an SGD step on the
    cross-entropy of that input; the policy is told afterwards. The learning
    rate (and optionally momentum) follow per-iteration schedules. Every
    ``eval_every`` epochs the model is evaluated (clean and ``eval_attack``
    accuracy on the first ``eval_examples`` evaluation images). Each epoch's
    metrics go to :attr:`history` and, with ``run_dir``, to
    ``run_dir/metrics.jsonl``; checkpoints (model, optimizer, schedule
    position, policy, loader and RNG states, history) are written atomically,
    checksummed and only with finite values to ``run_dir/checkpoint.pt``, and
    the run directory is locked while ``fit`` runs (see ``docs/reliability.md``).
    ``fit(..., resume=True)`` continues from it and reproduces an
    uninterrupted run; ``fit(..., init_weights=path)`` starts a fresh run from
    a checkpoint's model weights alone.

    Args:
        model: a classifier taking pixels in [0, 1] (normalization inside).
        policy: the training perturbation; ``None`` trains on clean inputs.
        epochs: number of epochs.
        batch_size: training batch size (when ``fit`` gets a dataset rather
            than a :class:`DeviceLoader`).
        pad_fill: border value of the pad-and-crop augmentation of the loader
            ``fit`` builds, a pixel value in [0, 1] (0 black, 0.5 grey); a
            :class:`DeviceLoader` given to ``fit`` keeps its own.
        lr: peak learning rate of ``schedule``.
        schedule: ``"cyclic"`` (triangle 0 → lr at mid-run → 0), ``"piecewise"``
            (lr, ×0.1 at 50% and 75%), ``"onecycle"`` (torch's ``OneCycleLR``
            curve: lr/25, half cosine up to lr at 30%, half cosine down),
            ``"constant"``, a :class:`~advtrain.training.schedules.MultiStep`
            (lr × γ at milestone epochs), or a callable ``epoch (float) -> lr``.
        momentum: SGD momentum; ``momentum_schedule`` (callable of epoch)
            overrides it per iteration.
        weight_decay, nesterov: SGD options.
        label_smoothing: label smoothing of the training cross-entropy, in
            [0, 1) (0: none); the policy's loss applies it (see
            :class:`~advtrain.policies.LossContext`).
        weight_average: keep an exponential moving average of the weights,
            updated after every optimizer step (every replay of a replaying
            policy): a decay τ per step (e.g. 0.9995, the FastAT Benchmark's)
            or a :class:`~advtrain.training.WeightAverage` (τ and warm-up;
            BatchNorm statistics are averaged too). The averaged model is
            evaluated next to the raw one (``wa_clean_acc``, ``wa_robust_acc``,
            ``wa_val_*``) and saved in checkpoints, and ``advtrain eval``
            evaluates it by default.
        precision: ``"auto"`` (bf16 autocast on CUDA, fp32 on CPU), ``"fp32"``
            or ``"bf16"``.
        channels_last: use channels-last memory format (default: on, on every
            device: convolutions run faster in it on CUDA and on the CPU alike).
            On the CPU a model with a strided 1×1 convolution of fewer than 16
            input channels trains in contiguous format, with a warning: oneDNN
            computes that convolution's weight gradient wrongly in
            channels-last format (:mod:`advtrain.utils.memory_format`).
        compile: wrap the model in :func:`torch.compile` for training and attacks
            (two graphs: the attacks' forward with the parameters detached, so
            that its backward computes no weight gradients, and the training
            forward); the loader built by ``fit`` then fills up the last batch
            of each epoch (``pad_last``) so that shapes stay static.
        device: where to train (default: CUDA if available).
        eval_every: evaluate every this many epochs (and after the last); 0 never.
        eval_examples: how many evaluation images to use (``None``: all).
        eval_attack: attack for robust accuracy (default PGD-20 at 8/255);
            ``None`` reports clean accuracy only.
        val_examples: hold out this many training examples (a random subset
            fixed by ``seed``, 0 when ``seed`` is None; see
            :func:`~advtrain.training.train_val_split`) that are never trained
            on; every ``eval_every`` epochs (and after the last) the raw and
            averaged models' clean and ``val_attack`` accuracy on them go in
            the record (``val_clean_acc``, ``val_robust_acc``,
            ``wa_val_clean_acc``, ``wa_val_robust_acc``), where a
            :class:`~advtrain.diagnostics.RobustnessDropMonitor` without data
            reads them to keep the best checkpoint.
        val_attack: attack for validation robust accuracy (default PGD-10 at
            8/255, step 2/255, the FastAT Benchmark's); ``None``: clean only.
        run_dir: directory for ``metrics.jsonl`` and checkpoints.
        checkpoint_every: write a checkpoint every this many epochs (and after
            the last).
        checkpoint_every_steps: also write it every this many optimizer
            steps (counted over the run, :attr:`global_step`) inside an epoch,
            with the epoch's position and running sums, so that a resumed run
            continues that epoch where it stopped (default: only at epoch ends).
        keep_checkpoints: also keep ``checkpoint_epochNNN.pt`` per checkpoint.
        callbacks: :class:`Callback` objects.
        progress: show a live progress bar per epoch (stderr; see
            :func:`~advtrain.utils.progress_bar`), first drawn after step 1.
            ``False`` removes the bar alone: ``verbose`` keeps the lines.
        verbose: print (stdout, rank 0) a startup line when :meth:`fit`
            starts (device, threads, model and parameter count, method,
            epochs, steps, batch size, precision, run directory, resume
            epoch), a line before each evaluation, and a summary line per
            epoch with the run's elapsed time and its ETA (from the mean
            epoch time so far). ``False`` prints nothing, bars included.
        seed: seed the global RNG and the loader at the start of ``fit`` (in a
            distributed run, process ``r`` seeds its RNG with ``seed + r``).
            None (the default) leaves the global RNG as it is, so two runs
            differ unless the caller seeds it; ``advtrain train`` passes
            ``--seed``, default 0.
        distributed: train data-parallel over the initialized
            ``torch.distributed`` process group (default: whenever one with
            more than one process is initialized, e.g. under ``torchrun``
            after :func:`advtrain.distributed.init_distributed`).
            ``batch_size`` is then per process; see :mod:`advtrain.distributed`
            for how data, BatchNorm statistics, stores and checkpoints are handled.
    """

    def __init__(
        self,
        model: nn.Module,
        policy: Optional[PerturbationPolicy] = None,
        *,
        epochs: int = 30,
        batch_size: int = 128,
        pad_fill: float = 0.0,
        lr: float = 0.2,
        schedule: ScheduleLike = "cyclic",
        momentum: float = 0.9,
        momentum_schedule: Optional[Callable[[float], float]] = None,
        weight_decay: float = 5e-4,
        nesterov: bool = False,
        label_smoothing: float = 0.0,
        weight_average: Union[None, float, WeightAverage] = None,
        precision: str = "auto",
        channels_last: Optional[bool] = None,
        compile: bool = False,
        device: Union[str, torch.device, None] = None,
        eval_every: int = 1,
        eval_examples: Optional[int] = 1000,
        eval_batch_size: int = 256,
        eval_attack: Optional[Attack] = pgd20(),
        val_examples: Optional[int] = None,
        val_attack: Optional[Attack] = pgd10(),
        run_dir: Union[str, Path, None] = None,
        checkpoint_every: int = 1,
        checkpoint_every_steps: Optional[int] = None,
        keep_checkpoints: bool = False,
        callbacks: Sequence[Callback] = (),
        progress: bool = True,
        verbose: bool = True,
        seed: Optional[int] = None,
        distributed: Optional[bool] = None,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        if policy is not None and not isinstance(policy, PerturbationPolicy):
            raise TypeError(f"policy must be a PerturbationPolicy, got {type(policy).__name__}")
        if eval_attack is not None and not isinstance(eval_attack, Attack):
            raise TypeError(f"eval_attack must be an advtrain Attack or None, got {type(eval_attack).__name__}")
        if val_attack is not None and not isinstance(val_attack, Attack):
            raise TypeError(f"val_attack must be an advtrain Attack or None, got {type(val_attack).__name__}")
        if val_examples is not None:
            check_positive_int(val_examples, "val_examples")
        self.weight_average = as_weight_average(weight_average)
        self.val_examples = val_examples
        self.val_attack = val_attack
        self._val: Optional[Tuple[Tensor, Tensor]] = None  # the held-out split, once setup carved it
        self.epochs = check_positive_int(epochs, "epochs")
        self.batch_size = check_positive_int(batch_size, "batch_size")
        self.pad_fill = check_fill(pad_fill, "pad_fill")
        self.eval_every = check_positive_int(eval_every, "eval_every", minimum=0)
        self.checkpoint_every = check_positive_int(checkpoint_every, "checkpoint_every")
        self.checkpoint_every_steps = (None if checkpoint_every_steps is None
                                       else check_positive_int(checkpoint_every_steps, "checkpoint_every_steps"))
        self.eval_batch_size = check_positive_int(eval_batch_size, "eval_batch_size")
        if eval_examples is not None:
            check_positive_int(eval_examples, "eval_examples")
        for name, value in (("lr", lr), ("momentum", momentum), ("weight_decay", weight_decay)):
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value >= 0):
                raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
        is_number = isinstance(label_smoothing, (int, float)) and not isinstance(label_smoothing, bool)
        if not (is_number and 0.0 <= label_smoothing < 1.0):
            raise ValueError(f"label_smoothing must be a number in [0, 1), got {label_smoothing!r}")
        self.label_smoothing = float(label_smoothing)
        self.precision = check_choice(precision, "precision", PRECISIONS)
        if distributed is None:
            distributed = dist_utils.is_distributed()
        elif distributed and not dist_utils.is_distributed():
            raise ValueError("distributed=True needs an initialized torch.distributed process group of more than "
                             "one process: launch with torchrun and call advtrain.distributed.init_distributed()")
        self.distributed = bool(distributed)
        self.rank = dist_utils.rank() if self.distributed else 0
        self.world_size = dist_utils.world_size() if self.distributed else 1
        self.is_main = self.rank == 0
        if device is not None:
            self.device = torch.device(device)
        elif self.distributed:
            self.device = dist_utils.local_device()
        else:
            self.device = default_device()
        self.channels_last = True if channels_last is None else bool(channels_last)
        unsafe = unsafe_channels_last_convs(model) if self.channels_last and self.device.type == "cpu" else []
        if unsafe:
            warnings.warn(f"training in contiguous memory format, not channels-last: {unsafe[0]}"
                          + (f" (and {len(unsafe) - 1} more)" if len(unsafe) > 1 else "")
                          + " is a strided 1x1 convolution with fewer than 16 input channels, whose channels-last "
                          "weight gradient oneDNN's CPU kernel computes wrongly or with memory corruption "
                          "(oneDNN issue #6035)", UserWarning, stacklevel=2)
            self.channels_last = False
        self.model = model.to(self.device)
        if self.channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        # Attacks and policies run on forward_model (never DDP-wrapped: no
        # gradient synchronisation); the training forward runs on train_model.
        # Compiled, the attacks' forward is a separate graph with the
        # parameters detached, so that its backward computes no weight
        # gradients (see advtrain.models.input_only).
        self.compile = bool(compile)
        if self.compile and policy is not None and not policy.compilable:
            raise ValueError(f"{type(policy).__name__} cannot train under torch.compile (its training loss needs "
                             "a double backward, which compiled graphs do not support): drop compile=True")
        self.forward_model: nn.Module = (
            torch.compile(InputOnlyGradients(self.model)) if compile else self.model)  # type: ignore[assignment]
        self.train_model: nn.Module = torch.compile(self.model) if compile else self.model  # type: ignore[assignment]
        if self.distributed:
            ddp = DistributedDataParallel(self.model, device_ids=[self.device] if self.device.type == "cuda" else None,
                                          **dist_utils.no_forward_buffer_sync())
            self.train_model = torch.compile(ddp) if compile else ddp  # type: ignore[assignment]
        self.policy = policy if policy is not None else CleanPolicy()
        self.replays = check_positive_int(self.policy.replays, f"{type(self.policy).__name__}.replays")
        self.lr = float(lr)
        self.lr_schedule = make_schedule(schedule, self.lr, self.epochs)
        self.momentum = float(momentum)
        self.momentum_schedule = momentum_schedule
        self.weight_decay = float(weight_decay)
        self.nesterov = bool(nesterov)
        self.optimizer = torch.optim.SGD(self.model.parameters(), lr=self.lr, momentum=self.momentum,
                                         weight_decay=self.weight_decay, nesterov=self.nesterov)
        if self.weight_average is not None:
            self.weight_average.attach(self.model)
        self.eval_examples = eval_examples
        self.eval_attack = eval_attack
        self.run_dir = Path(run_dir) if run_dir is not None else None
        self.keep_checkpoints = bool(keep_checkpoints)
        self.callbacks: List[Callback] = list(callbacks)
        names = [cb.name for cb in self.callbacks]
        if len(set(names)) != len(names):
            raise ValueError(f"callback names must be unique (they key checkpoint state), got {names}")
        self.verbose = bool(verbose) and self.is_main
        self.progress = bool(progress) and self.verbose
        self.seed = seed
        self.history = History(path=self.run_dir / METRICS_NAME if self.run_dir and self.is_main else None)
        self.epoch = 0
        self.global_step = 0
        self.stop_training = False
        self.loader: Optional[DeviceLoader] = None
        self._last_checkpoint: Optional[CheckpointInfo] = None
        # The running sums of the epoch in progress while a mid-epoch checkpoint
        # is written, and those a resumed mid-epoch checkpoint hands to the epoch loop.
        self._epoch_progress: Optional[Dict[str, Any]] = None
        self._resumed_progress: Optional[Dict[str, Any]] = None

    # ------------------------------------------------------------------ setup
    @property
    def autocast_dtype(self) -> Optional[torch.dtype]:
        """The autocast dtype of forward passes, or None for plain fp32."""
        return precision_dtype(self.precision, self.device)

    def _autocast(self) -> ContextManager[None]:
        """Autocast with :attr:`autocast_dtype` on the trainer's device, or full precision."""
        return mixed_precision(self.device, self.autocast_dtype)

    def config(self) -> Dict[str, Any]:
        """The run's settings as plain values (recorded in checkpoints): the
        model's class name (``model``), registry name (``model_name``) and
        constructor arguments (``model_kwargs``) — None and ``{}`` for a model
        outside the registry; ``pad_fill`` is that of the training loader once
        ``fit`` has one."""
        record = model_record(self.model)
        return {
            "model": type(self.model).__name__, "model_name": record.name, "model_kwargs": record.kwargs,
            "policy": repr(self.policy), "epochs": self.epochs,
            "batch_size": self.batch_size, "lr": self.lr, "momentum": self.momentum,
            "weight_decay": self.weight_decay, "nesterov": self.nesterov, "label_smoothing": self.label_smoothing,
            "precision": self.precision,
            "eval_attack": repr(self.eval_attack),
            "pad_fill": self.loader.pad_fill if self.loader is not None else self.pad_fill,
            "weight_average": self.weight_average.config() if self.weight_average is not None else None,
            "val_examples": self.val_examples, "val_attack": repr(self.val_attack),
        }

    def _hold_out_validation(self, train: Any) -> Any:
        """The training part of ``train``, keeping ``val_examples`` of it aside
        (split by ``seed``, 0 when None: the same split on every rank)."""
        if self.val_examples is None:
            return train
        if isinstance(train, DeviceLoader):
            raise ValueError("val_examples needs the training data itself, not a DeviceLoader: pass the dataset "
                             "to fit, or split it with advtrain.training.train_val_split and build the loader "
                             "from the training part")
        train, val = train_val_split(train, self.val_examples, self.seed if self.seed is not None else 0)
        self._val = (val.images, val.labels)
        return train

    def _make_loader(self, train: Any) -> DeviceLoader:
        shards, shard = (self.world_size, self.rank) if self.distributed else (1, None)
        if isinstance(train, DeviceLoader):
            if self.distributed and (train.num_shards, train.shard) != (shards, shard):
                raise ValueError(f"in a distributed run the loader of rank {self.rank} needs num_shards="
                                 f"{shards}, shard={shard}; got num_shards={train.num_shards}, shard={train.shard}")
            return train
        # Under torch.compile the last batch is filled up (pad_last): shapes
        # stay static and the hot path is never recompiled for it.
        return DeviceLoader(train, self.batch_size, shuffle=True, augment=True, device=self.device,
                            seed=self.seed if self.seed is not None else 0, num_shards=shards, shard=shard,
                            pad_last=self.compile, pad_fill=self.pad_fill)

    # ------------------------------------------------------------- checkpoints
    def state_dict(self) -> Dict[str, Any]:
        """Everything needed to resume: model, optimizer, schedule position,
        policy, loader and RNG states, history and callback states, the
        weight average (``weight_average``), and which weights an evaluation
        of the checkpoint should use (``eval_weights``: ``"averaged"`` with
        weight averaging, else ``"raw"``)."""
        state: Dict[str, Any] = {
            "epoch": self.epoch,
            "global_step": self.global_step,
            "config": self.config(),
            "policy_type": type(self.policy).__name__,
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "policy": self.policy.state_dict(),
            "history": list(self.history.records),
            "callbacks": {cb.name: cb.state_dict() for cb in self.callbacks},
            "rng": {"torch": torch.get_rng_state()},
        }
        if torch.cuda.is_available():
            state["rng"]["cuda"] = torch.cuda.get_rng_state_all()
        if self.loader is not None:
            state["loader"] = self.loader.state_dict()
        if self.weight_average is not None:
            state["weight_average"] = self.weight_average.state_dict()
        if self._epoch_progress is not None:
            state["epoch_progress"] = self._epoch_progress
        state["eval_weights"] = "averaged" if self.weight_average is not None else "raw"
        return state

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        """Restore :meth:`state_dict`'s output (after the policy's setup).

        Raises :class:`CheckpointError` when ``state`` lacks one of
        :data:`STATE_KEYS`, was written for another model or with another
        policy type (another method), or holds a policy state that does not
        fit; ``fit(..., init_weights=path)`` takes the model weights alone
        from such a checkpoint."""
        missing = [k for k in STATE_KEYS if k not in state]
        if missing:
            raise CheckpointError(f"the checkpoint lacks {missing}, so it is not a complete Trainer checkpoint; "
                                  f"{_WEIGHTS_ONLY_HINT}")
        self._load_model(state)
        saved_policy, policy = state.get("policy_type"), type(self.policy).__name__
        if saved_policy is not None and saved_policy != policy:
            raise CheckpointError(f"the checkpoint was written with {saved_policy} and this run uses {policy}; "
                                  f"resume with the same method, or {_WEIGHTS_ONLY_HINT}")
        self.optimizer.load_state_dict(state["optimizer"])
        try:
            self.policy.load_state_dict(state["policy"])
        except (KeyError, TypeError, ValueError) as exc:
            raise CheckpointError(f"the checkpoint's policy state does not fit this run's {policy}: {exc}; "
                                  f"{_WEIGHTS_ONLY_HINT}") from exc
        if self.loader is not None and "loader" in state:
            self.loader.load_state_dict(state["loader"])
        if self.weight_average is not None and "weight_average" in state:
            try:
                self.weight_average.load_state_dict(state["weight_average"])
            except (RuntimeError, ValueError) as exc:
                raise CheckpointError(f"the checkpoint's weight average does not fit this model: {exc}") from exc
        elif self.weight_average is not None:  # a run without one: the average starts at the next step
            self.weight_average.attach(self.model)
        for cb in self.callbacks:
            if cb.name in state.get("callbacks", {}):
                cb.load_state_dict(state["callbacks"][cb.name])
        self.history.records = [dict(r) for r in state["history"]]
        self.history.rewrite()
        self.epoch = int(state["epoch"])
        self.global_step = int(state["global_step"])
        self._resumed_progress = state.get("epoch_progress")
        torch.set_rng_state(state["rng"]["torch"])
        if "cuda" in state["rng"] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["rng"]["cuda"])

    def _load_model(self, state: Dict[str, Any]) -> None:
        """Load the checkpoint ``state``'s model weights into the model,
        refusing weights of another architecture, of another registered model
        or of another variant with the same weights (recorded constructor
        arguments that differ, such as ``PreActResNet18``'s ``shortcut``)."""
        saved = state.get("config", {})
        record = model_record(self.model)
        saved_name, saved_kwargs, kwargs = saved.get("model_name"), saved.get("model_kwargs"), record.kwargs
        if saved_name and record.name and saved_name != record.name:
            raise CheckpointError(f"the checkpoint was written for a different model: {saved_name} "
                                  f"({saved.get('model')}), not this {record.name} ({type(self.model).__name__})")
        if saved_kwargs and kwargs and saved.get("model") == type(self.model).__name__ and saved_kwargs != kwargs:
            differ = {k: (saved_kwargs.get(k), kwargs.get(k)) for k in sorted(set(saved_kwargs) | set(kwargs))
                      if saved_kwargs.get(k) != kwargs.get(k)}
            raise CheckpointError(
                f"the checkpoint was written for a different model: {type(self.model).__name__} built with other "
                f"arguments (checkpoint, now): {differ}; build the model with the checkpoint's arguments")
        try:
            self.model.load_state_dict(state["model"])
        except RuntimeError as exc:
            detail = " ".join(line.strip() for line in str(exc).splitlines()[1:])
            detail = detail if len(detail) <= 300 else detail[:297] + "..."
            raise CheckpointError(
                f"the checkpoint was written for a different model ({state.get('config', {}).get('model')}) "
                f"than this {type(self.model).__name__}: {detail}") from exc

    def _init_weights(self, path: Path) -> None:
        """Start from the model weights of the checkpoint at ``path`` (of any method), nothing else."""
        state = load_checkpoint(path, map_location="cpu")
        if "model" not in state:
            raise CheckpointError(f"checkpoint {path} holds no model weights")
        try:
            self._load_model(state)
        except CheckpointError as exc:
            raise CheckpointError(f"cannot take the initial weights from {path}: {exc}") from exc

    def save_checkpoint(self, path: Union[str, Path, None] = None, *, eval_weights: Optional[str] = None) -> Path:
        """Write a checkpoint atomically (default ``run_dir/checkpoint.pt``).
        ``eval_weights`` (``"raw"`` or ``"averaged"``) overrides which weights
        an evaluation of it uses (the best-checkpoint monitor's choice).

        In a distributed run rank 0 writes ``path`` and every rank ``r`` also
        writes ``<path stem>.rank<r>.pt`` with its own policy state (its shard
        of any per-example store) and RNG state; all ranks must call this.

        Nothing is written, and ``FloatingPointError`` is raised, when the
        model's parameters or buffers, the optimizer or the policy hold inf or
        NaN (on any rank): the file keeps its last finite checkpoint."""
        main_path = self.run_dir / CHECKPOINT_NAME if self.run_dir is not None else None
        if path is None:
            if main_path is None:
                raise ValueError("save_checkpoint needs a path when the Trainer has no run_dir")
            path = main_path
        path = Path(path)
        state = self.state_dict()
        if eval_weights is not None:
            state["eval_weights"] = check_choice(eval_weights, "eval_weights", WEIGHTS)
            if eval_weights == "averaged" and self.weight_average is None:
                raise ValueError("eval_weights='averaged' needs a Trainer with weight_average")
        try:
            if self.distributed:
                bad = non_finite_entries(state)  # every rank decides alike before any rank writes
                flag = dist_utils.all_reduce_sum(torch.tensor([float(bool(bad))], device=self.device))
                if flag.item() > 0:
                    raise NonFiniteCheckpointError(f"refused to write checkpoint {path}: non-finite values in "
                                                   f"{', '.join(bad) if bad else 'another rank'}", bad)
                part = {"policy": state.pop("policy"), "rng": state["rng"], "world_size": self.world_size}
                for key in ("loader", "epoch_progress"):  # each rank's own shard position and running sums
                    if key in state:
                        part[key] = state[key]
                save_checkpoint(_rank_path(path, self.rank), part)
                if self.is_main:
                    save_checkpoint(path, state)
                dist_utils.barrier()
            else:
                save_checkpoint(path, state)
        except NonFiniteCheckpointError as exc:
            raise FloatingPointError(f"training diverged by epoch {self.epoch}: {exc}; lower the learning rate or "
                                     f"check the data; {self.checkpoint_note()}") from exc
        if main_path is not None and path == main_path:
            batch = self._epoch_progress["batch"] if self._epoch_progress is not None else None
            self._last_checkpoint = CheckpointInfo(path, self.epoch, self.global_step, batch)
        return path

    @property
    def last_checkpoint(self) -> Optional["CheckpointInfo"]:
        """What ``run_dir/checkpoint.pt`` holds, as this run last wrote or
        resumed it; None before the first."""
        return self._last_checkpoint

    def checkpoint_note(self) -> str:
        """What is on disk to resume from, in words (for error and interrupt
        messages): the checkpoint's epoch, step and file, or when the first
        will be written."""
        if self.run_dir is None:
            return "no checkpoint is kept (the Trainer has no run_dir)"
        info = self._last_checkpoint
        if info is None:
            every = self.checkpoint_every
            note = f"no checkpoint yet: the first is written at the end of epoch {min(every, self.epochs)}"
            if self.checkpoint_every_steps is not None:
                note += f" (or at step {self.checkpoint_every_steps:,}, whichever comes first)"
            return note
        if info.batch is None:
            return f"checkpoint of epoch {info.epoch} (step {info.step:,}) kept in {info.path}"
        return (f"checkpoint of step {info.step:,} (batch {info.batch} of epoch {info.epoch + 1}) "
                f"kept in {info.path}")

    def _resume(self, resume: Union[bool, str, Path]) -> None:
        if resume is True:
            if self.run_dir is None:
                raise ValueError("resume=True needs a run_dir; pass the checkpoint path instead")
            path = self.run_dir / CHECKPOINT_NAME
        else:
            path = Path(resume)  # type: ignore[arg-type]
        # Loaded on the CPU: the RNG states must stay there, and the model,
        # optimizer and policy copy their tensors onto the device themselves.
        state = load_checkpoint(path, map_location="cpu")
        if self.distributed:
            part = load_checkpoint(_rank_path(path, self.rank), map_location="cpu")
            if int(part["world_size"]) != self.world_size:
                raise CheckpointError(f"{path} was written by {part['world_size']} processes; "
                                      f"resume it with the same number, not {self.world_size}")
            state["policy"], state["rng"] = part["policy"], part["rng"]
            for key in ("loader", "epoch_progress"):
                if key in part:
                    state[key] = part[key]
        saved = state.get("config", {})
        diffs = {k: (saved[k], v) for k, v in self.config().items() if k in saved and saved[k] != v}
        try:
            self.load_state_dict(state)
        except CheckpointError as exc:
            raise CheckpointError(f"cannot resume from {path}: {exc}") from exc
        # Only a checkpoint that was accepted warns: a refused one's error says it all.
        if diffs:
            warnings.warn(f"resuming {path} with settings that differ from the checkpoint's (saved, now): {diffs}",
                          stacklevel=4)
        if self.run_dir is not None and path == self.run_dir / CHECKPOINT_NAME:
            progress = self._resumed_progress
            self._last_checkpoint = CheckpointInfo(path, self.epoch, self.global_step,
                                                   progress["batch"] if progress is not None else None)

    def _startup_line(self, resumed: bool) -> str:
        """What :meth:`fit` is about to run, in one line."""
        name = model_record(self.model).name or type(self.model).__name__
        params = sum(p.numel() for p in self.model.parameters())
        device = str(self.device)
        if self.device.type == "cuda":
            device += f" ({torch.cuda.get_device_name(self.device)})"
        dtype = self.autocast_dtype
        precision = "fp32" if dtype is None else f"{str(dtype).replace('torch.', '')} autocast"
        batch = f"batch {self.batch_size}"
        if self.distributed:
            batch += f" per process x {self.world_size} processes"
        steps = len(self.loader) if self.loader is not None else 0
        return "; ".join([
            f"training {name} ({params:,} parameters) with {type(self).__name__} ({type(self.policy).__name__})",
            f"{self.epochs} epochs x {steps} steps, {batch}, {precision}",
            f"device {device}, {torch.get_num_threads()} torch threads",
            f"run dir {self.run_dir}" if self.run_dir is not None else "no run dir",
            f"resuming at epoch {self.epoch + 1}" if resumed else "starting at epoch 1",
        ])

    # -------------------------------------------------------------- evaluation
    def evaluate(self, images: Tensor, labels: Tensor) -> Dict[str, float]:
        """Clean and (with ``eval_attack``) robust accuracy of the model, in
        eval mode, on the given images (uint8 or pixels in [0,1])."""
        return self._accuracies(self.forward_model, images, labels, self.eval_attack)

    def validate(self) -> Dict[str, float]:
        """Clean and ``val_attack`` accuracy on the held-out split
        (``val_examples``) of the raw model (``val_clean_acc``,
        ``val_robust_acc``) and, with weight averaging, of the averaged one
        (``wa_val_clean_acc``, ``wa_val_robust_acc``). The attack's random
        starts come from a fork of the RNG seeded with :attr:`epoch`: both
        models meet the same starts, and the training run's random stream
        is left as it was. Needs :meth:`setup` (or :meth:`fit`) first."""
        if self._val is None:
            raise RuntimeError("validate needs Trainer(val_examples=N) and setup(train) (or fit) first")
        images, labels = self._val
        out = self._accuracies(self.forward_model, images, labels, self.val_attack, "val_", seed=self.epoch)
        if self.weight_average is not None:
            out.update(self._accuracies(self.weight_average.module, images, labels, self.val_attack, "wa_val_",
                                        seed=self.epoch))
        return out

    def _accuracies(self, model: nn.Module, images: Tensor, labels: Tensor, attack: Optional[Attack],
                    prefix: str = "", seed: Optional[int] = None) -> Dict[str, float]:
        """``{prefix}clean_acc`` and (with ``attack``) ``{prefix}robust_acc``
        of ``model``; with ``seed``, the attack draws from a fork of the RNG
        seeded with it (plus the rank)."""
        if self.distributed:  # each rank evaluates its share; counts are summed
            images, labels = images[self.rank::self.world_size], labels[self.rank::self.world_size]
        kw = dict(batch_size=self.eval_batch_size, device=self.device, autocast_dtype=self.autocast_dtype)
        forked = seed is not None
        with torch.random.fork_rng(devices=[self.device] if self.device.type == "cuda" else [], enabled=forked):
            if forked:
                torch.manual_seed(seed + self.rank)
            counts = [batched_correctness(model, images, labels, **kw).sum()]
            if attack is not None:
                counts.append(batched_correctness(model, images, labels, attack, **kw).sum())
        total = torch.full((1,), float(labels.shape[0]), device=self.device)
        totals = torch.cat([torch.stack(counts).float(), total])  # read back once, below
        if self.distributed:
            dist_utils.all_reduce_sum(totals)
        *correct, n = totals.tolist()
        out = {f"{prefix}clean_acc": correct[0] / n}
        if attack is not None:
            out[f"{prefix}robust_acc"] = correct[1] / n
        return out

    # ------------------------------------------------------------------- loop
    def fit(self, train: Any, eval_data: Any = None, *, resume: Union[bool, str, Path, None] = None,
            init_weights: Union[str, Path, None] = None, overwrite: bool = False) -> History:
        """Train for the configured epochs and return the history.

        ``train``: a :class:`~advtrain.data.DeviceLoader`, or anything it
        accepts (an ``ArrayDataset``, ``(images, labels)`` tensors, any
        ``(image, label)`` dataset), wrapped with ``batch_size``, shuffling and
        pad-4 crop + flip. ``eval_data``: images for evaluation, in any form
        :func:`~advtrain.data.as_tensors` accepts. ``resume``: ``True`` for
        ``run_dir/checkpoint.pt`` or a checkpoint path; a checkpoint of
        another method (policy type) is refused. ``init_weights``: a
        checkpoint path (of any method) whose model weights start this fresh
        run; nothing else is taken from it.

        Before the first step, one no-grad forward pass on a few training
        images (in eval mode; parameters, buffers, flags and the RNG state
        are left as they were) checks the model's outputs: a training label
        >= their number raises ``ValueError``, and outputs that look like
        probabilities rather than logits give one ``UserWarning``.

        With ``run_dir``, the directory is locked while ``fit`` runs (rank 0
        holds the lock in a distributed run; see
        :mod:`advtrain.training.run_lock`): another training into it raises
        :class:`~advtrain.training.run_lock.RunLockError`. Once the lock is
        held, temporary files left there by interrupted writes are removed.
        A fresh run (no ``resume``) into a directory that already holds one
        (a ``checkpoint.pt``, a non-empty ``metrics.jsonl`` or a
        ``config.json``) raises ``FileExistsError``, since it would replace
        that run's checkpoint and metrics; ``overwrite=True`` first removes
        what a run wrote there (see :mod:`advtrain.training.run_files`).
        """
        if resume and init_weights is not None:  # refused before the lock is taken
            raise ValueError("resume and init_weights exclude each other: resume continues a run from its "
                             "checkpoint, init_weights starts a fresh run from a checkpoint's model weights")
        if resume and overwrite:
            raise ValueError("resume and overwrite exclude each other: resume continues the run in run_dir, "
                             "overwrite removes it and starts a fresh one")
        if self.run_dir is None or not self.is_main:
            return self._fit(train, eval_data, resume, init_weights)
        with lock_run_dir(self.run_dir):
            if overwrite:
                clear_run(self.run_dir)
            elif not resume and existing_run(self.run_dir):
                raise FileExistsError(f"run directory {self.run_dir} already holds a run "
                                      f"({describe(existing_run(self.run_dir))}): pass resume=True to continue it, "
                                      "overwrite=True to replace it, or another run_dir")
            remove_stale_temp_files(self.run_dir)
            return self._fit(train, eval_data, resume, init_weights)

    def setup(self, train: Any, *, resume: Union[bool, str, Path, None] = None,
              init_weights: Union[str, Path, None] = None) -> DeviceLoader:
        """Prepare a run without training it: build the training loader from
        ``train`` (as :meth:`fit` does), check the model's outputs, set up the
        policy, and load ``init_weights`` or ``resume``. Returns the loader.
        With ``val_examples``, the validation split is carved out of
        ``train`` first and the loader holds the remaining examples.

        :meth:`fit` calls it; call it yourself, then :meth:`train_epoch`, to
        drive the epochs one at a time (the benchmarks do). It takes no lock
        on ``run_dir``: that is :meth:`fit`'s.
        """
        if resume and init_weights is not None:
            raise ValueError("resume and init_weights exclude each other: resume continues a run from its "
                             "checkpoint, init_weights starts a fresh run from a checkpoint's model weights")
        self._last_checkpoint = None
        self._resumed_progress = None
        if self.seed is not None:
            torch.manual_seed(self.seed + self.rank)
        self.loader = loader = self._make_loader(self._hold_out_validation(train))
        # Once per run, on the plain model (never the compiled one, whose
        # graphs keep the training shapes): labels beyond the model's outputs
        # and probability outputs are reported before any step.
        check_model_outputs(self.model, loader.images, int(loader.labels.max()), self.device)
        context = PolicyContext(num_examples=loader.num_examples, image_shape=tuple(loader.image_shape),
                                padding=loader.padding, epochs=self.epochs, steps_per_epoch=len(loader),
                                device=self.device, shard=self.rank, num_shards=self.world_size)
        self.policy.setup(self.model, context)
        self.stop_training = False
        if init_weights is not None:
            self._init_weights(Path(init_weights))
        if resume:
            self._resume(resume)
        elif self.history.path is not None:
            self.history.rewrite()
        return loader

    def train_epoch(self) -> Dict[str, Any]:
        """Train epoch :attr:`epoch` (0-based) after :meth:`setup` and return its
        record (training loss and accuracy, LR, wall time, the policy's
        metrics); advances :attr:`epoch`. No evaluation, callbacks or
        checkpoints: :meth:`fit` adds those."""
        if self.loader is None:
            raise RuntimeError("train_epoch needs setup(train) (or fit) first")
        record = self._train_epoch(self.loader, self.epoch)
        self.epoch += 1
        return record

    def _fit(self, train: Any, eval_data: Any, resume: Union[bool, str, Path, None],
             init_weights: Union[str, Path, None]) -> History:
        self.setup(train, resume=resume, init_weights=init_weights)
        if self.verbose:
            print(self._startup_line(bool(resume)), flush=True)
        run_start, first_epoch = time.perf_counter(), self.epoch
        eval_images = eval_labels = None
        if eval_data is not None and self.eval_every > 0:
            eval_images, eval_labels = as_tensors(eval_data)
            if self.eval_examples is not None:
                eval_images, eval_labels = eval_images[:self.eval_examples], eval_labels[:self.eval_examples]
        for cb in self.callbacks:
            cb.on_fit_start(self)
        while self.epoch < self.epochs and not self.stop_training:
            epoch = self.epoch
            for cb in self.callbacks:
                cb.on_epoch_start(self, epoch)
            record = self.train_epoch()
            last = self.epoch == self.epochs
            due = self.eval_every > 0 and (self.epoch % self.eval_every == 0 or last)
            if eval_images is not None and due:
                if self.verbose:
                    print(_evaluation_line(f"evaluating {eval_images.shape[0]} images", self.eval_attack,
                                           self.weight_average is not None), flush=True)
                t0 = time.perf_counter()
                record.update(self.evaluate(eval_images, eval_labels))
                if self.weight_average is not None:
                    record.update(self._accuracies(self.weight_average.module, eval_images, eval_labels,
                                                   self.eval_attack, "wa_", seed=self.epoch))
                record["eval_time"] = time.perf_counter() - t0
            if self._val is not None and due:
                if self.verbose:
                    print(_evaluation_line(f"validating on {self._val[1].shape[0]} held-out images",
                                           self.val_attack, self.weight_average is not None), flush=True)
                t0 = time.perf_counter()
                record.update(self.validate())
                record["val_time"] = time.perf_counter() - t0
            for cb in self.callbacks:
                cb.on_epoch_end(self, epoch, record)
            if self.distributed:  # stop together when any rank's callback asks to
                flag = dist_utils.all_reduce_sum(torch.tensor([float(self.stop_training)], device=self.device))
                self.stop_training = bool(flag.item() > 0)
            self.history.append(record)
            if self.verbose:
                elapsed = time.perf_counter() - run_start
                remaining = elapsed / (self.epoch - first_epoch) * (self.epochs - self.epoch)
                print(_summary(record, elapsed, remaining), flush=True)
            if self.run_dir is not None and (self.epoch % self.checkpoint_every == 0 or last or self.stop_training):
                self.save_checkpoint()
                if self.keep_checkpoints:
                    self.save_checkpoint(self.run_dir / f"checkpoint_epoch{self.epoch:03d}.pt")
        for cb in self.callbacks:
            cb.on_fit_end(self)
        dist_utils.barrier()
        return self.history

    def _set_hyperparameters(self, progress_epochs: float) -> float:
        lr = float(self.lr_schedule(progress_epochs))
        for group in self.optimizer.param_groups:
            group["lr"] = lr
            if self.momentum_schedule is not None:
                group["momentum"] = float(self.momentum_schedule(progress_epochs))
        return lr

    def train_step(self, batch: Batch) -> Tuple[Tensor, Tensor]:
        """One optimizer step on ``batch``: the policy's perturbation and
        training loss, its backward, the optimizer step (and the weight
        average's update), then the policy's ``after_step``. Returns the loss and the number of correct predictions
        as device tensors (no host synchronisation). A replaying policy
        (Free-AT) gets :attr:`replays` of these per batch from the epoch loop."""
        if self.channels_last:
            batch = dataclasses.replace(batch, x=batch.x.contiguous(memory_format=torch.channels_last))
        self.model.train()
        self.optimizer.zero_grad(set_to_none=True)
        context = LossContext(forward=self._training_forward, label_smoothing=self.label_smoothing)
        with self._autocast():
            pert = self.policy.perturb(self.forward_model, batch)
            out = self.policy.loss(context, batch, pert)
        out.loss.backward()
        if self.distributed:  # the policy's learnable tensors stay equal on every rank
            dist_utils.average_gradients(self.policy.parameters())
        self.optimizer.step()
        if self.weight_average is not None:
            self.weight_average.update(self.model)
        self.policy.after_step(self.forward_model, batch, pert)
        correct = (out.logits.detach().argmax(1) == batch.y).sum()
        return out.loss.detach(), correct

    def _training_forward(self, x: Tensor, sites: Optional[Mapping[str, SiteDelta]] = None) -> Tensor:
        """The training module's logits for ``x`` with ``sites`` perturbed for this call."""
        with perturb_sites(self.model, sites or {}):
            return self.train_model(x)

    def _check_finite(self, loss: float, epoch: int, step: int) -> None:
        if not math.isfinite(loss):
            raise FloatingPointError(
                f"training loss became non-finite in epoch {epoch + 1} by step {step}; lower the learning rate "
                f"or check the data; {self.checkpoint_note()}")

    def _loss_sum_everywhere(self, loss_sum: Tensor) -> float:
        """The epoch's loss sum so far, summed over ranks: one host sync."""
        if not self.distributed:
            return float(loss_sum)
        return float(dist_utils.all_reduce_sum(loss_sum.detach().clone()))

    def _train_epoch(self, loader: DeviceLoader, epoch: int) -> Dict[str, Any]:
        steps = len(loader)
        resumed, self._resumed_progress = self._resumed_progress, None
        if resumed is None:
            loader.set_epoch(epoch)
            self.policy.start_epoch(epoch)
            loss_sum = torch.zeros((), device=self.device)
            correct = torch.zeros((), device=self.device, dtype=torch.long)
            seen, first, before = 0, 0, 0.0
        else:  # a mid-epoch checkpoint: the loader and the policy are where it left them
            loss_sum = resumed["loss_sum"].to(self.device)
            correct = resumed["correct"].to(self.device)
            seen, first, before = int(resumed["seen"]), int(resumed["batch"]), float(resumed["time"])
        bar = progress_bar(steps, f"epoch {epoch + 1}/{self.epochs}", enabled=self.progress)
        log_every = max(1, steps // 20)
        start = time.perf_counter()
        lr = 0.0
        replays = self.replays
        every = self.checkpoint_every_steps if self.run_dir is not None else None
        for i, batch in enumerate(loader, start=first):
            for r in range(replays):  # one pass for every method but Free-AT
                lr = self._set_hyperparameters(epoch + (i * replays + r) / (steps * replays))
                loss, n_correct = self.train_step(batch)
                loss_sum += loss * len(batch)
                correct += n_correct
                seen += len(batch)
                self.global_step += 1
            # loss_sum is the divergence flag kept on the device: the
            # cross-entropy is >= 0, so the sum is finite while every loss is.
            if (i + 1) % FINITE_CHECK_STEPS == 0:
                self._check_finite(self._loss_sum_everywhere(loss_sum), epoch, i + 1)
            if self.progress and (i == first or (i + 1) % log_every == 0 or i + 1 == steps):
                mean_loss = float(loss_sum) / seen  # a host sync for the progress bar
                self._check_finite(mean_loss, epoch, i + 1)
                bar.set_postfix({"loss": f"{mean_loss:.4g}", "acc": f"{float(correct) / seen:.4g}", "lr": f"{lr:.4g}"},
                                refresh=False)
                bar.update(i + 1 - bar.n)
            # Not after the epoch's last batch: the epoch-end checkpoint follows.
            if (every is not None and i + 1 < steps
                    and self.global_step // every > (self.global_step - replays) // every):
                self._epoch_progress = {"batch": i + 1, "loss_sum": loss_sum.detach().clone(),
                                        "correct": correct.clone(), "seen": seen,
                                        "time": before + time.perf_counter() - start}
                try:
                    self.save_checkpoint()
                finally:
                    self._epoch_progress = None
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        elapsed = before + time.perf_counter() - start
        bar.close()
        totals = torch.stack([loss_sum, correct.to(loss_sum.dtype), torch.tensor(float(seen), device=self.device)])
        if self.distributed:
            dist_utils.all_reduce_sum(totals)
            dist_utils.average_buffers(self.model)
            if self.weight_average is not None:  # every rank then holds (and resumes) the same average
                dist_utils.average_buffers(self.weight_average.module)
        loss_total, correct_total, seen_total = totals.tolist()
        self._check_finite(loss_total, epoch, steps)
        record: Dict[str, Any] = {
            "epoch": epoch + 1,
            "train_loss": loss_total / max(seen_total, 1.0),
            "train_acc": correct_total / max(seen_total, 1.0),
            "lr": lr,
            "time": elapsed,
        }
        record.update(self.policy.metrics())
        return record


@dataclasses.dataclass(frozen=True)
class CheckpointInfo:
    """What a written checkpoint holds: its file, the completed epochs, the
    optimizer steps (:attr:`Trainer.global_step`), and for a mid-epoch
    checkpoint the batches done of epoch ``epoch + 1`` (None at an epoch end)."""

    path: Path
    epoch: int
    step: int
    batch: Optional[int] = None


def _rank_path(path: Path, rank: int) -> Path:
    """Where rank ``rank`` keeps its part of the checkpoint at ``path``."""
    return path.with_name(f"{path.stem}.rank{rank}{path.suffix}")


def _attack_name(attack: Attack) -> str:
    """A short name of an evaluation attack: its class, and its steps when it has them (``PGD-20``)."""
    steps = getattr(attack, "steps", None)
    return type(attack).__name__ + (f"-{steps}" if isinstance(steps, int) else "")


def _evaluation_line(what: str, attack: Optional[Attack], averaged: bool) -> str:
    """The line printed before an evaluation: its images and passes."""
    passes = "clean" if attack is None else f"clean, {_attack_name(attack)}"
    models = "; raw and averaged models" if averaged else ""
    return f"{what} ({passes}{models}) ..."


def _summary(record: Dict[str, Any], elapsed: float, remaining: float) -> str:
    """An epoch's summary line; ``elapsed`` and ``remaining`` are the run's seconds so far and still due."""
    parts = [f"epoch {record['epoch']}"]
    for key, label in (("train_loss", "loss"), ("train_acc", "train_acc"), ("clean_acc", "clean_acc"),
                       ("robust_acc", "robust_acc"), ("wa_robust_acc", "wa_robust_acc"),
                       ("val_robust_acc", "val_robust_acc"), ("wa_val_robust_acc", "wa_val_robust_acc"),
                       ("time", "time_s")):
        if record.get(key) is not None:
            parts.append(f"{label}={record[key]:.4f}" if key != "time" else f"{label}={record[key]:.1f}")
    parts += [f"elapsed={_clock(elapsed)}", f"eta={_clock(remaining)}"]
    return "  ".join(parts)


def _clock(seconds: float) -> str:
    """Seconds as ``H:MM:SS``."""
    minutes, secs = divmod(int(round(seconds)), 60)
    return f"{minutes // 60}:{minutes % 60:02d}:{secs:02d}"


__all__ = ["Trainer", "CheckpointInfo", "pgd20"]
