"""Perturbation sites: named points inside a model where an additive
perturbation can be injected and whose activation (and so its gradient) can be
read.

advtrain's own models declare their sites with :class:`SiteModule`; any other
model gets sites by module name through :func:`attach_sites` (a forward hook on
the module's input or output). A site is the identity unless a perturbation is
set for the current forward pass (:func:`perturb_sites`); :func:`capture_sites`
records the activations flowing through the sites so that
``torch.autograd.grad(loss, list(activations.values()))`` gives the activation
gradients.
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Dict, Iterator, List, Literal, Mapping, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor, nn

_ATTACHED = "_advtrain_attached_sites"


@dataclass(frozen=True)
class ScaledDirection:
    """A site perturbation ``scale * direction``, added in one fused step.

    ``scale``: a one-element tensor, typically a learned step size that
    requires grad (APART's α_l). ``direction``: a tensor of the activation's
    shape (batch N or 1), e.g. ``sign(g)``. Adding it reads the activation and
    the direction once and writes once (``torch.addcmul``), instead of first
    materialising ``scale * direction``; the gradient of ``scale`` is one dot
    product of the activation gradient with the direction, accumulated in
    float32. Values equal ``scale * direction`` added in the activation's
    dtype.
    """

    scale: Tensor
    direction: Tensor

    def value(self) -> Tensor:
        """``scale * direction`` as a plain tensor."""
        return self.scale * self.direction


SiteDelta = Union[Tensor, ScaledDirection]
"""What :func:`perturb_sites` adds at a site: a tensor or a :class:`ScaledDirection`."""


def _flat_view(t: Tensor) -> Optional[Tensor]:
    """``t`` as a 1-D view in memory order (contiguous or channels-last), or None."""
    if t.is_contiguous():
        return t.view(-1)
    if t.dim() == 4 and t.is_contiguous(memory_format=torch.channels_last):
        return t.permute(0, 2, 3, 1).reshape(-1)
    return None


def _dot(a: Tensor, b: Tensor) -> Tensor:
    """Sum of ``a * b`` (same shape), accumulated in float32 or wider, without
    a product tensor when both share one dense fp32/fp64 layout."""
    wide = torch.promote_types(a.dtype, torch.float32)
    if a.dtype == b.dtype == wide and a.stride() == b.stride():
        fa, fb = _flat_view(a), _flat_view(b)
        if fa is not None and fb is not None:
            return torch.dot(fa, fb)
    return (a * b).sum(dtype=wide)


class _AddScaled(torch.autograd.Function):
    """``h + scale * direction`` in one kernel, with the gradients of all three."""

    @staticmethod
    def forward(ctx: Any, h: Tensor, direction: Tensor, scale: Tensor) -> Tensor:
        ctx.save_for_backward(direction, scale)
        return torch.addcmul(h, direction, scale.reshape(()).to(h.dtype))

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> Tuple[Optional[Tensor], ...]:
        direction, scale = ctx.saved_tensors
        grad_direction = grad_scale = None
        if ctx.needs_input_grad[1]:
            grad_direction = grad * scale.reshape(()).to(grad.dtype)
            if direction.shape != grad.shape:  # broadcast over the batch
                grad_direction = grad_direction.sum(0, keepdim=True)
        if ctx.needs_input_grad[2]:
            grad_scale = _dot(grad, direction.expand_as(grad)).to(scale.dtype).reshape(scale.shape)
        return grad, grad_direction, grad_scale


def _check_delta_shape(name: str, d: Tensor, h: Tensor) -> None:
    same_shape = d.dim() == h.dim() and d.shape[1:] == h.shape[1:]
    if not same_shape or (d.dim() > 0 and d.shape[0] not in (1, h.shape[0])):
        raise ValueError(
            f"perturbation for site {name!r} has shape {tuple(d.shape)}, "
            f"but the activation there has shape {tuple(h.shape)} "
            f"(the perturbation's batch size must be 1 or {h.shape[0]})"
        )


class Site:
    """State of one perturbation site for the current forward pass."""

    __slots__ = ("name", "delta", "capturing", "activation")

    def __init__(self, name: str = "") -> None:
        self.name = name
        self.delta: Optional[SiteDelta] = None
        self.capturing = False
        self.activation: Optional[Tensor] = None

    def __call__(self, h: Tensor) -> Tensor:
        if self.capturing:
            self.activation = h
        d = self.delta
        if isinstance(d, ScaledDirection):
            _check_delta_shape(self.name, d.direction, h)
            h = _AddScaled.apply(h, d.direction.to(h.dtype), d.scale)
        elif d is not None:
            _check_delta_shape(self.name, d, h)
            h = h + d.to(h.dtype)
        return h


class _OutputHook:
    """Forward hook that passes a module's output through a site.

    A module-level class rather than a closure so that ``copy.deepcopy`` and
    pickling of a model carry the hook's site along with the model's record
    of attached sites (a closure would keep pointing at the original site).
    """

    __slots__ = ("site",)

    def __init__(self, site: Site) -> None:
        self.site = site

    def __call__(self, _module: nn.Module, _inputs: Tuple[object, ...], output: Tensor) -> Tensor:
        return self.site(output)


class _InputHook:
    """Forward pre-hook that passes a module's first positional input through a site."""

    __slots__ = ("site",)

    def __init__(self, site: Site) -> None:
        self.site = site

    def __call__(self, _module: nn.Module, inputs: Tuple[object, ...]) -> Tuple[object, ...]:
        return (self.site(inputs[0]),) + tuple(inputs[1:])  # type: ignore[arg-type]


class SiteModule(nn.Module):
    """An identity layer that marks a perturbation site inside a model.

    Its site's name is the module's qualified name in the model (for example
    ``"layer1.0.site"``).
    """

    def __init__(self) -> None:
        super().__init__()
        self.site = Site()

    def forward(self, h: Tensor) -> Tensor:
        return self.site(h)


def find_sites(model: nn.Module) -> Dict[str, Site]:
    """All sites of ``model`` by name: declared :class:`SiteModule` layers and
    sites attached with :func:`attach_sites`, in module-definition order (the
    order of ``model.named_modules()``, an attached site taking its target
    module's place)."""
    modules = list(model.named_modules())
    position = {name: i for i, (name, _) in enumerate(modules)}
    found: List[Tuple[int, str, Site]] = []
    for name, module in modules:
        if isinstance(module, SiteModule):
            module.site.name = name
            found.append((position[name], name, module.site))
        attached = getattr(module, _ATTACHED, None)
        if attached:
            prefix = f"{name}." if name else ""
            for sub, site in attached.items():
                site.name = prefix + sub
                found.append((position.get(site.name, len(modules)), site.name, site))
    found.sort(key=lambda entry: entry[0])
    return {name: site for _, name, site in found}


def attach_sites(
    model: nn.Module, module_names: Sequence[str], *, where: Literal["input", "output"] = "output"
) -> List[str]:
    """Attach a site to each named submodule of ``model`` and return the site
    names (the module names).

    ``where="output"`` perturbs/captures the module's output; ``"input"`` its
    first positional input. Attaching twice to the same module is an error.
    The hooks survive ``copy.deepcopy`` and pickling of the model.
    """
    if where not in ("input", "output"):
        raise ValueError(f"where must be 'input' or 'output', got {where!r}")
    modules = dict(model.named_modules())
    missing = [n for n in module_names if n not in modules or n == ""]
    if missing:
        known = [n for n in modules if n][:20]
        raise ValueError(f"no module named {missing!r} in the model; some module names: {known}")
    attached: Dict[str, Site] = getattr(model, _ATTACHED, None) or {}
    seen = set()
    for name in module_names:
        if name in attached or name in seen:
            raise ValueError(f"a site is already attached to module {name!r}")
        seen.add(name)
    for name in module_names:
        site = Site(name)
        module = modules[name]
        if where == "output":
            module.register_forward_hook(_OutputHook(site))
        else:
            module.register_forward_pre_hook(_InputHook(site))
        attached[name] = site
    object.__setattr__(model, _ATTACHED, attached)
    return list(module_names)


def _select(model: nn.Module, names: Optional[Sequence[str]]) -> Dict[str, Site]:
    sites = find_sites(model)
    if names is None:
        return sites
    unknown = [n for n in names if n not in sites]
    if unknown:
        raise ValueError(f"unknown perturbation site(s) {unknown}; the model has {list(sites)}")
    return {n: sites[n] for n in names}


@contextmanager
def perturb_sites(model: nn.Module, deltas: Mapping[str, SiteDelta]) -> Iterator[None]:
    """Add ``deltas[name]`` at each named site during forward passes inside the
    block.

    Each perturbation is a floating-point tensor or a :class:`ScaledDirection`
    of the activation's shape, with batch size N or 1 (one perturbation
    broadcast over the batch); a wrong shape raises ``ValueError`` at the
    forward pass. On exit, also by an exception, each site returns to what it
    was before the block (the identity, or an enclosing block's perturbation).
    """
    if not deltas:
        yield
        return
    for name, delta in deltas.items():
        if isinstance(delta, ScaledDirection):
            if not isinstance(delta.scale, Tensor) or delta.scale.numel() != 1:
                raise TypeError(f"the scale of site {name!r}'s ScaledDirection must be a one-element tensor")
            delta = delta.direction
        if not isinstance(delta, Tensor):
            raise TypeError(
                f"the perturbation for site {name!r} must be a tensor or a ScaledDirection, "
                f"got {type(delta).__name__}"
            )
        if not delta.is_floating_point():
            raise TypeError(
                f"the perturbation for site {name!r} must be floating-point, "
                f"got dtype {delta.dtype}"
            )
    sites = _select(model, list(deltas))
    previous = {name: site.delta for name, site in sites.items()}
    for name, site in sites.items():
        site.delta = deltas[name]
    try:
        yield
    finally:
        for name, site in sites.items():
            site.delta = previous[name]


@contextmanager
def capture_sites(
    model: nn.Module, names: Optional[Sequence[str]] = None
) -> Iterator[Dict[str, Tensor]]:
    """Record the activations at the named sites (all sites when ``names`` is
    None) of the last forward pass run inside the block.

    The yielded dict is filled when the block exits; take gradients after it::

        with capture_sites(model) as acts:
            loss = F.cross_entropy(model(x), y)
        grads = torch.autograd.grad(loss, list(acts.values()))
    """
    sites = _select(model, names)
    out: Dict[str, Tensor] = {}
    for site in sites.values():
        site.capturing = True
        site.activation = None
    try:
        yield out
    finally:
        for name, site in sites.items():
            site.capturing = False
            if site.activation is not None:
                out[name] = site.activation
            site.activation = None
