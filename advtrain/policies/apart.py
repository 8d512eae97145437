"""APART: adaptive adversarial training with a learnable perturbation policy
(Li, Liu, Dong & Shang, "Overfitting or Underfitting? Understand Robustness
Drop in Adversarial Training", arXiv 2010.08034)."""
from __future__ import annotations

import warnings
from typing import Any, Dict, List, Mapping, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .._validation import check_eps, check_radius
from ..data.batch import Batch
from ..models.sites import ScaledDirection, attach_sites, capture_sites, find_sites, perturb_sites
from ..utils.modes import model_mode
from ..utils.precision import active_autocast_dtype, at_least_float32
from .base import Perturbation, PerturbationPolicy, PolicyContext
from .store import PerExampleStore, resolve_store_dtype


#: Optimizer steps of the reference training run (30 epochs × 391 batches of
#: 128 CIFAR-10 images), the run length the default ``lr`` was tuned for.
REFERENCE_STEPS = 30 * 391

#: How the step-size learning rate follows the run's length: ``"scaled"``
#: multiplies it by ``REFERENCE_STEPS / steps`` for runs shorter than the
#: reference, ``"reference"`` keeps it as given.
LR_RULES = ("scaled", "reference")


def scaled_step_lr(lr: float, total_steps: int, rule: str = "scaled") -> float:
    """The peak step-size learning rate a run of ``total_steps`` optimizer
    steps uses under ``rule`` (one of :data:`LR_RULES`).

    The learned step sizes grow by the sum of the triangular learning rate
    over the run, which is proportional to its length; ``"scaled"`` raises
    ``lr`` by ``REFERENCE_STEPS / total_steps`` when the run is shorter, so a
    short run's step sizes grow about as far as the reference run's. Longer
    runs, and ``"reference"``, keep ``lr``."""
    if rule not in LR_RULES:
        raise ValueError(f"lr_rule must be one of {list(LR_RULES)}, got {rule!r}")
    if isinstance(total_steps, bool) or not isinstance(total_steps, int) or total_steps < 1:
        raise ValueError(f"total_steps must be a positive integer, got {total_steps!r}")
    if rule == "reference":
        return float(lr)
    return float(lr) * max(1.0, REFERENCE_STEPS / total_steps)


def _triangle(peak: float, progress: float) -> float:
    """0 → peak at progress 0.5 → 0 at progress 1 (progress in [0, 1])."""
    return peak * max(0.0, 1.0 - abs(2.0 * progress - 1.0))


class APARTPolicy(PerturbationPolicy):
    """The APART perturbation policy.

    Learnable step sizes — the input step α, the initialization scale α_ω and
    one step α_l per perturbation site — and a per-example initialization ω
    (kept in padded coordinates like ATTA's store, values in [-1, 1], never
    reset). Per batch:

    1. δ₀ = clamp(α_ω·ω, ±ε) read through the batch's crop/flip; x₀ = clamp(x + δ₀, 0, 1).
    2. Pass 1 (BatchNorm in train mode, no site perturbation): L₁ = CE(f(x₀), y);
       gradients g_x of L₁ w.r.t. x₀ and g_l w.r.t. each site's activation, by
       ``autograd.grad`` (no weight gradients are computed).
    3. δ = clamp(δ₀ + α·sign(g_x), ±ε); x₁ = clamp(x + δ, 0, 1), differentiable in α, α_ω.
    4. The Trainer's pass 2 adds α_l·sign(g_l) at each site (a
       :class:`~advtrain.models.ScaledDirection`, one fused step); its backward gives
       the weight gradients and those of α, α_ω, α_l and x₁.
    5. :meth:`after_step`: ω ← clamp(ω + α/(α_ω + 1e-7)·sign(∇ₓ₁L₂), −1, 1),
       written back aligned; gradient *ascent* on the step sizes with SGD
       (triangular LR 0 → ``lr`` → 0 over the run, momentum cycled 0.9 → 0.8 →
       0.9, weight decay ``weight_decay`` pulling them toward zero).

    The step sizes are kept in the model weights' dtype, at least float32, and
    both passes' losses in the logits' dtype, at least float32: a float64 model
    trained on float64 batches runs the whole step in float64.

    Args:
        eps: L∞ radius of the input perturbation, pixel units, at most 1
            (0.031 in the reference training runs).
        layerwise: perturb intermediate layers; ``False`` gives input-only APART.
        sites: site names to perturb. Default: every site the model declares.
            Names of plain submodules get a site attached to their output.
        init_step, init_scale, site_init: initial α, α_ω and α_l.
        lr: peak learning rate of the step-size ascent, for a run of the
            reference length (:data:`REFERENCE_STEPS` optimizer steps).
        lr_rule: ``"reference"`` (default here) uses ``lr`` as given, and
            warns once when the run is under a quarter of the reference
            length; ``"scaled"`` scales it to the run's length with
            :func:`scaled_step_lr` (the default of
            :class:`~advtrain.training.presets.APARTTrainer`). The peak in use
            is :attr:`run_lr` once :meth:`setup` knows the run's length.
        weight_decay: decay on the step sizes. The reference run effectively
            applied 1200 (400 in its own optimizer plus the model optimizer's
            decay, which reached the scalars too); that is the default.
        momentum: peak momentum of the step-size optimizer (cycled to
            ``momentum - 0.1`` at mid-run, like the model's).
        store_dtype: dtype of the ω store ("float32", "bfloat16", "float16").
            16-bit stores halve memory; ω is then rounded to 8 (bf16) or 11
            (fp16) significant bits on every write.
    """

    def __init__(
        self,
        eps: float = 0.031,
        *,
        layerwise: bool = True,
        sites: Optional[Sequence[str]] = None,
        init_step: float = 1e-4,
        init_scale: float = 1e-4,
        site_init: float = 0.0,
        lr: float = 5e-8,
        weight_decay: float = 1200.0,
        momentum: float = 0.9,
        store_dtype: Union[str, torch.dtype] = "float32",
        lr_rule: str = "reference",
    ) -> None:
        self.eps = float(check_eps(eps, "linf", "eps"))
        self.layerwise = bool(layerwise)
        if sites is not None and not self.layerwise:
            raise ValueError("sites were named but layerwise=False turns layer perturbation off")
        self.site_names_requested = list(sites) if sites is not None else None
        self.init_step = float(check_radius(init_step, "init_step"))
        self.init_scale = float(check_radius(init_scale, "init_scale"))
        self.site_init = float(check_radius(site_init, "site_init"))
        self.lr = float(check_radius(lr, "lr"))
        if lr_rule not in LR_RULES:
            raise ValueError(f"lr_rule must be one of {list(LR_RULES)}, got {lr_rule!r}")
        self.lr_rule = lr_rule
        self.run_lr = self.lr
        self._warned_short = False
        self.weight_decay = float(check_radius(weight_decay, "weight_decay"))
        if not 0.1 <= momentum < 1.0:
            raise ValueError(f"momentum must be in [0.1, 1), got {momentum}")
        self.momentum = float(momentum)
        self.store_dtype = resolve_store_dtype(store_dtype)
        self.site_names: List[str] = []
        self.store: Optional[PerExampleStore] = None
        self.step = 0

    # ------------------------------------------------------------------ setup
    def setup(self, model: nn.Module, context: PolicyContext) -> None:
        device = context.device
        self.context = context
        total_steps = max(1, context.epochs * context.steps_per_epoch)
        self.run_lr = scaled_step_lr(self.lr, total_steps, self.lr_rule)
        if self.lr_rule == "reference" and total_steps < REFERENCE_STEPS / 4 and not self._warned_short:
            self._warned_short = True
            warnings.warn(f"APART's step-size learning rate lr={self.lr:g} is tuned for {REFERENCE_STEPS} "
                          f"optimizer steps; this run has {total_steps}, so its learned step sizes grow only a "
                          f"little; use lr_rule='scaled' (--step-lr-rule scaled) to scale lr to the "
                          f"run's length", UserWarning, stacklevel=2)
        self.model = model  # the plain model: its sites are the ones perturbed
        if self.layerwise:
            declared = find_sites(model)
            if self.site_names_requested is None:
                if not declared:
                    raise ValueError(
                        f"{type(model).__name__} declares no perturbation sites: pass sites=[module names] "
                        "to APART, or layerwise=False for input-only APART")
                self.site_names = list(declared)
            else:
                missing = [n for n in self.site_names_requested if n not in declared]
                if missing:
                    attach_sites(model, missing)
                self.site_names = list(self.site_names_requested)
        # One probe pass gives the per-example activation shapes at the sites,
        # and their dtypes under the autocast state of setup. The probe image
        # has the dtype of the model's weights (float64 models take float64).
        weight = next((p for p in model.parameters() if p.is_floating_point()), None)
        weight_dtype = weight.dtype if weight is not None else torch.float32
        probe = torch.zeros((1,) + tuple(context.image_shape), device=device, dtype=weight_dtype)
        acts = self._probe_sites(model, probe) if self.site_names else {}
        self.site_shapes = [acts[name].shape[1:] for name in self.site_names]
        self._site_dtypes: Dict[Optional[torch.dtype], List[torch.dtype]] = {
            active_autocast_dtype(device.type): [acts[name].dtype for name in self.site_names]}
        # The step sizes in the weights' precision, at least float32.
        scalar = torch.promote_types(weight_dtype, torch.float32)
        self.alpha = torch.tensor(self.init_step, device=device, dtype=scalar, requires_grad=True)
        self.alpha_init = torch.tensor(self.init_scale, device=device, dtype=scalar, requires_grad=True)
        self.alpha_sites = torch.full((len(self.site_names),), self.site_init, device=device, dtype=scalar,
                                      requires_grad=True)
        self.optimizer = torch.optim.SGD(self.parameters(), lr=0.0, momentum=self.momentum,
                                         weight_decay=self.weight_decay, maximize=True)
        self.store = PerExampleStore.for_context(context, self.store_dtype)
        self.store.data.copy_(0.001 * torch.randn(self.store.data.shape, device=device))
        self.step = 0

    def _probe_sites(self, model: nn.Module, x: Tensor) -> Dict[str, Tensor]:
        """The site activations of one forward pass of ``x`` (one example) in
        eval mode without gradients (no statistics updated), under the
        autocast state in effect."""
        with model_mode(model, "eval"), torch.no_grad(), capture_sites(model, self.site_names) as acts:
            model(x)
        return acts

    def _activation_dtypes(self, x: Tensor) -> List[torch.dtype]:
        """The dtype of each site's activation under the autocast state in
        effect (float32 without autocast, typically bf16 under bf16 autocast),
        learned once per autocast dtype."""
        key = active_autocast_dtype(x.device.type)
        if key not in self._site_dtypes:
            acts = self._probe_sites(self.model, x[:1])
            self._site_dtypes[key] = [acts[name].dtype for name in self.site_names]
        return self._site_dtypes[key]

    def parameters(self) -> List[Tensor]:
        return [self.alpha, self.alpha_init, self.alpha_sites]

    # --------------------------------------------------------------- per batch
    def perturb(self, model: nn.Module, batch: Batch) -> Perturbation:
        assert self.store is not None, "APARTPolicy.setup must run before perturb"
        x, y = batch.x, batch.y
        omega = self.store.read(batch.index, batch.aug)
        omega = omega.to(torch.promote_types(omega.dtype, x.dtype))  # δ₀ in float64 for float64 batches
        delta0 = torch.clamp(self.alpha_init * omega, -self.eps, self.eps)
        x0 = torch.clamp(x + delta0, 0.0, 1.0)
        x0_leaf = x0.detach().requires_grad_(True)
        # Zero perturbations at the sites: the gradient with respect to them is
        # the activation gradient (this also holds under torch.compile, where
        # captured activations are not part of the traced graph). They are made
        # in the activation's dtype (bf16 under bf16 autocast): no cast at the
        # site, half the memory traffic, and the same signs.
        probes = [torch.zeros((x.shape[0],) + tuple(shape), device=x.device, dtype=dtype, requires_grad=True)
                  for shape, dtype in zip(self.site_shapes, self._activation_dtypes(x))]
        with model_mode(model, "train"), perturb_sites(self.model, dict(zip(self.site_names, probes))):
            logits = model(x0_leaf)
            loss1 = F.cross_entropy(at_least_float32(logits), y)
        grads = torch.autograd.grad(loss1, [x0_leaf] + probes)
        delta = torch.clamp(delta0 + self.alpha * grads[0].sign(), -self.eps, self.eps)
        x1 = torch.clamp(x + delta, 0.0, 1.0)
        x1.retain_grad()
        sites = {name: ScaledDirection(self.alpha_sites[i], g.sign())
                 for i, (name, g) in enumerate(zip(self.site_names, grads[1:]))}
        return Perturbation(x=x1, sites=sites, extras={"omega": omega})

    def after_step(self, model: nn.Module, batch: Batch, perturbation: Perturbation) -> None:
        assert self.store is not None
        x1_grad = perturbation.x.grad
        if x1_grad is None:
            raise RuntimeError("APART needs the training loss's backward pass through its input before after_step")
        with torch.no_grad():
            ratio = self.alpha / (self.alpha_init + 1e-7)
            omega = torch.clamp(perturbation.extras["omega"] + ratio * x1_grad.sign(), -1.0, 1.0)
            self.store.write(batch.index, batch.aug, omega)
        progress = self.step / max(1, self.context.epochs * self.context.steps_per_epoch)
        for group in self.optimizer.param_groups:
            group["lr"] = _triangle(self.run_lr, progress)
            group["momentum"] = self.momentum - 0.1 * (1.0 - abs(2.0 * progress - 1.0))
        self.optimizer.step()  # the Trainer has averaged the gradients across processes
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1

    # ----------------------------------------------------------------- state
    def metrics(self) -> Dict[str, Any]:
        out: Dict[str, Any] = {"apart_alpha": float(self.alpha.detach()),
                               "apart_alpha_init": float(self.alpha_init.detach())}
        if self.site_names:
            out["apart_alpha_sites"] = self.alpha_sites.detach().cpu().tolist()
        return out

    def state_dict(self) -> Dict[str, Any]:
        assert self.store is not None
        return {
            "alpha": self.alpha.detach(), "alpha_init": self.alpha_init.detach(),
            "alpha_sites": self.alpha_sites.detach(), "site_names": list(self.site_names),
            "optimizer": self.optimizer.state_dict(), "store": self.store.state_dict(), "step": self.step,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        assert self.store is not None, "APARTPolicy.setup must run before load_state_dict"
        super().load_state_dict(state)
        if list(state["site_names"]) != self.site_names:
            raise ValueError(f"checkpoint APART sites {state['site_names']} differ from this run's {self.site_names}")
        with torch.no_grad():
            self.alpha.copy_(state["alpha"])
            self.alpha_init.copy_(state["alpha_init"])
            self.alpha_sites.copy_(state["alpha_sites"])
        self.optimizer.load_state_dict(state["optimizer"])
        for group in self.optimizer.param_groups:  # this run's settings win over the checkpoint's
            group["weight_decay"] = self.weight_decay
        self.store.load_state_dict(state["store"])
        self.step = int(state["step"])

    def __repr__(self) -> str:
        return (f"APARTPolicy(eps={self.eps}, layerwise={self.layerwise}, sites={self.site_names_requested}, "
                f"lr={self.lr}, lr_rule={self.lr_rule!r}, run_lr={self.run_lr}, weight_decay={self.weight_decay})")
