"""APART through advtrain equals the authors' training step.

The authors' code (Li et al., ``train.py`` and ``models/preresnet.py`` of the
APART repository) is re-implemented here in float64, in its own order of
operations: the pre-activation ResNet-18 whose 1×1 shortcuts read the block
input, with gradient hooks that leave each tensor's gradient in an ``info``
dict; pass 1 on ``x₀ = clamp(x + clamp(α_ω·ω, ±ε), 0, 1)`` with a full
backward (weight gradients computed and thrown away); ``x₁ = clamp(x +
clamp(δ₀ + α·sign(g_x), ±ε), 0, 1)``; pass 2 with ``α_l·sign(g_l)`` added on
each block's residual branch; the model's SGD step; ω written back through the
crop/flip; and the step sizes' SGD ascent. Both passes run with BatchNorm in
train mode, so the running statistics move twice per step.

Two steps of ``APARTTrainer`` on ``PreActResNet18(width=4, normalize=False,
shortcut="input")`` in float64 must agree with it to 1e-9 (relative, in the
max norm) in everything the step produces: x₁, the site directions, the
gradients of x₁ and of the step sizes, ω in the store, the step sizes, every
weight and every BatchNorm statistic. The first step is at the start of the
triangular schedules (both learning rates 0, momenta 0.9), the second at
their peak (0.2 and the step sizes' peak, momenta 0.8), so it also checks the
momentum buffers the first step left behind.

ω lives in float32 on both sides (advtrain's default store dtype; the
reference's ω is float32 like its data): what is written back is rounded
there, identically, so the stores must be equal.
"""
from __future__ import annotations

import math
from typing import Dict, List

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from advtrain.data import Batch, random_augmentation
from advtrain.models import PreActResNet18
from advtrain.policies import PolicyContext
from advtrain.training import APARTTrainer

# These tests run APART for a few steps on purpose, with the reference
# step-size schedule: its short-run warning is expected here.
pytestmark = pytest.mark.filterwarnings("ignore:APART's step-size learning rate .* is tuned for")

EPS = 0.031  # the reference's training ε
LR, WEIGHT_DECAY = 0.2, 2e-4  # the reference's model optimizer: peak LR and decay
STEP_LR, STEP_DECAY = 1e-4, 1200.0  # the step sizes' peak LR (larger than 5e-8: visible in two steps) and decay
ALPHA, ALPHA_OMEGA = 0.02, 0.04  # with |ω| up to 1 both ε-clamps (of δ₀ and of δ) act
ALPHA_SITES = [0.004 * (i + 1) for i in range(8)]
N, BATCH, PAD = 8, 4, 4


# ------------------------------------------------------------------------- the reference network


class RefBlock(nn.Module):
    """The reference's pre-activation block: shortcut from the block input,
    the layer perturbation ``alpha * sign(pass-1 gradient)`` added to
    ``relu(bn1(x))`` before ``conv1``, a hook storing that tensor's gradient."""

    def __init__(self, in_planes: int, planes: int, stride: int) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.alpha = nn.Parameter(torch.zeros(1))
        self.info: Dict[str, Tensor] = {}
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False))

    def _keep_grad(self, grad: Tensor) -> None:
        self.info["input_grad"] = grad.detach().clone()

    def forward(self, x: Tensor, layerwise: bool) -> Tensor:
        out = F.relu(self.bn1(x))
        shortcut = self.shortcut(x) if hasattr(self, "shortcut") else x
        if out.requires_grad:
            out.register_hook(self._keep_grad)
        if layerwise:
            out = out + self.alpha * self.info["input_grad"].sign()
        out = self.conv2(F.relu(self.bn2(self.conv1(out))))
        return out + shortcut


class RefNet(nn.Module):
    """The reference's PreActResNet-18 (raw pixels in, no normalization), with
    its input-gradient hook and the step sizes α and α_ω as model parameters."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, width, 3, stride=1, padding=1, bias=False)
        planes, in_planes = [width, 2 * width, 4 * width, 8 * width], width
        for i, (p, stride) in enumerate(zip(planes, (1, 2, 2, 2))):
            setattr(self, f"layer{i + 1}", nn.Sequential(RefBlock(in_planes, p, stride), RefBlock(p, p, 1)))
            in_planes = p
        self.bn = nn.BatchNorm2d(planes[-1])
        self.linear = nn.Linear(planes[-1], 10)
        self.alpha = nn.Parameter(torch.zeros(1))
        self.alpha_omega = nn.Parameter(torch.zeros(1))
        self.info: Dict[str, Tensor] = {}

    def blocks(self) -> List[RefBlock]:
        return [m for m in self.modules() if isinstance(m, RefBlock)]

    def _keep_grad(self, grad: Tensor) -> None:
        self.info["input_grad"] = grad.detach().clone()

    def forward(self, x: Tensor, layerwise: bool = False) -> Tensor:
        if x.requires_grad:
            x.register_hook(self._keep_grad)
        out = self.conv1(x)
        for layer in (self.layer1, self.layer2, self.layer3, self.layer4):
            for block in layer:
                out = block(out, layerwise)
        out = F.avg_pool2d(F.relu(self.bn(out)), 4)
        return self.linear(out.flatten(1))


# ------------------------------------------------------------------- the reference training step


def crop(omega: Tensor, index: Tensor, aug) -> Tensor:
    """Each example's window of the padded ω (crop, then mirror), one by one."""
    h, w = omega.shape[2] - 2 * aug.padding, omega.shape[3] - 2 * aug.padding
    rows = []
    for i, k in enumerate(index.tolist()):
        top, left = int(aug.top[i]), int(aug.left[i])
        window = omega[k, :, top:top + h, left:left + w]
        rows.append(window.flip(-1) if bool(aug.flip[i]) else window)
    return torch.stack(rows)


def paste(omega: Tensor, index: Tensor, aug, values: Tensor) -> None:
    """Un-mirror each example's values and write them into its window of ω."""
    h, w = values.shape[2:]
    for i, k in enumerate(index.tolist()):
        top, left = int(aug.top[i]), int(aug.left[i])
        omega[k, :, top:top + h, left:left + w] = values[i].flip(-1) if bool(aug.flip[i]) else values[i]


def cyclic(step: int, total: int) -> float:
    """``torch.optim.lr_scheduler.CyclicLR``'s triangle factor at ``step`` for
    a cycle of ``total`` steps (half up, half down), as the reference uses it."""
    half = total / 2
    cycle = math.floor(1 + step / (2 * half))
    return max(0.0, 1.0 - abs(step / half - 2 * cycle + 1))


def sgd(params: Dict[str, Tensor], grads: Dict[str, Tensor], buffers: Dict[str, Tensor], lr: float,
        momentum: float, decay: float) -> None:
    """Heavy-ball SGD with weight decay, as ``torch.optim.SGD`` (no dampening)."""
    with torch.no_grad():
        for name, p in params.items():
            d = grads[name] + decay * p
            buffers[name] = d.clone() if name not in buffers else momentum * buffers[name] + d
            p -= lr * buffers[name]


def reference_step(ref: RefNet, omega: Tensor, batch, step: int, total: int, buffers: Dict[str, Tensor]) -> dict:
    """One iteration of the reference's ``train`` loop on ``batch``; updates
    ``ref`` and ``omega`` in place and returns what advtrain is compared on."""
    x, y = batch.x, batch.y
    ref.train()
    omega_batch = crop(omega, batch.index, batch.aug)
    delta = torch.clamp(ref.alpha_omega * omega_batch, -EPS, EPS)
    inputs = torch.clamp(x + delta, 0.0, 1.0)
    loss = F.cross_entropy(ref(inputs), y)
    loss.backward(retain_graph=True)  # a full backward, like the reference's
    site_grads = [block.info["input_grad"] for block in ref.blocks()]
    delta = torch.clamp(delta + ref.alpha * ref.info["input_grad"].sign(), -EPS, EPS)
    adv = torch.clamp(x + delta, 0.0, 1.0)
    loss = F.cross_entropy(ref(adv, layerwise=True), y)
    for p in ref.parameters():  # the reference's optimizer.zero_grad(): pass 1's gradients are dropped
        p.grad = None
    loss.backward()
    adv_grad = ref.info["input_grad"]
    ratio = ref.alpha.item() / (ref.alpha_omega.item() + 1e-7)  # Python floats, as in the reference
    paste(omega, batch.index, batch.aug, torch.clamp(omega_batch + ratio * adv_grad.sign(), -1.0, 1.0))

    factor = cyclic(step, total)
    momentum = 0.9 - 0.1 * factor  # CyclicLR's default momentum cycle, 0.9 → 0.8 → 0.9
    step_sizes = {n: p for n, p in ref.named_parameters() if n.endswith("alpha") or n == "alpha_omega"}
    weights = {n: p for n, p in ref.named_parameters() if n not in step_sizes}
    recorded = {"x1": adv.detach(), "x1_grad": adv_grad, "site_grads": site_grads,
                "step_grads": step_size_vector(ref, lambda p: p.grad)}
    sgd(weights, {n: p.grad for n, p in weights.items()}, buffers, LR * factor, momentum, WEIGHT_DECAY)
    # Gradient ascent: the reference negates the gradients and descends. Its
    # model optimizer, whose LR is 0.2 / 5e-8 = 4e6 times the step sizes', also
    # decays them by 2e-4 (their gradient zeroed by then): 800 in the step
    # sizes' LR units, on top of their own 400, so 1200 here (the two updates'
    # order within a step is a second-order difference).
    sgd(step_sizes, {n: -p.grad for n, p in step_sizes.items()}, buffers, STEP_LR * factor, momentum, STEP_DECAY)
    return recorded


def step_size_vector(ref: RefNet, value) -> Tensor:
    """α, α_ω and α_l (block order) of the reference net as one vector, via ``value(parameter)``."""
    params = [ref.alpha, ref.alpha_omega] + [block.alpha for block in ref.blocks()]
    return torch.cat([value(p).detach().reshape(1) for p in params])


# --------------------------------------------------------------------------------------- checks


def assert_close(actual: Tensor, expected: Tensor, what: str, rtol: float = 1e-9) -> None:
    """Agreement within ``rtol`` of the expected tensor's largest magnitude."""
    assert actual.shape == expected.shape, what
    assert actual.dtype == expected.dtype == torch.float64, what
    scale = float(expected.abs().max())
    error = float((actual - expected).abs().max())
    assert error <= rtol * scale, f"{what}: max difference {error:.3g} vs scale {scale:.3g}"


def assert_same_signs(direction: Tensor, gradient: Tensor, what: str) -> None:
    """``direction`` is ``sign(gradient)`` wherever the gradient is not ~0."""
    clear = gradient.abs() > 1e-9 * float(gradient.abs().max())
    assert bool(clear.any()), what
    assert torch.equal(direction[clear], gradient.sign()[clear]), what
    assert float((direction != gradient.sign()).float().mean()) < 1e-3, what


def test_apart_steps_equal_the_reference_code_in_float64(monkeypatch) -> None:
    torch.manual_seed(0)
    model = PreActResNet18(width=4, normalize=False, shortcut="input").double()
    for m in model.modules():  # non-trivial BatchNorm affine parameters
        if isinstance(m, nn.BatchNorm2d):
            nn.init.uniform_(m.weight, 0.5, 1.5)
            nn.init.uniform_(m.bias, -0.2, 0.2)
    ref = RefNet(width=4).double()
    missing, unexpected = ref.load_state_dict(model.state_dict(), strict=False)
    assert unexpected == [] and sorted(missing) == sorted(n for n, _ in ref.named_parameters() if "alpha" in n)

    g = torch.Generator().manual_seed(1)
    images = torch.randint(0, 256, (N, 3, 32, 32), generator=g).double() / 255
    images[0, :, :4] = 0.0  # pixels at 0 and 1 make the [0, 1] clamps act
    images[1, :, :4] = 1.0
    padded = F.pad(images, [PAD] * 4, value=0.5)  # the reference pads with grey
    labels = torch.randint(0, 10, (N,), generator=g)
    order = torch.randperm(N, generator=g)
    batches = []
    for index in order.view(-1, BATCH):
        aug = random_augmentation(BATCH, PAD, generator=g)
        batches.append(Batch(crop(padded, index, aug), labels[index], index, aug))
    omega0 = torch.rand(N, 3, 32 + 2 * PAD, 32 + 2 * PAD, generator=g) * 2 - 1  # a grown ω
    with torch.no_grad():
        ref.alpha.fill_(ALPHA)
        ref.alpha_omega.fill_(ALPHA_OMEGA)
        for block, value in zip(ref.blocks(), ALPHA_SITES):
            block.alpha.fill_(value)

    # the reference code's learning rate as given, at this two-step run's length
    trainer = APARTTrainer(model, init_step=ALPHA, init_scale=ALPHA_OMEGA, step_lr=STEP_LR, step_lr_rule="reference",
                           epochs=1, batch_size=BATCH, channels_last=False, precision="fp32", device="cpu",
                           eval_every=0, progress=False)
    policy = trainer.policy
    assert (policy.eps, policy.weight_decay, policy.momentum) == (EPS, STEP_DECAY, 0.9)
    assert (trainer.lr, trainer.weight_decay) == (LR, WEIGHT_DECAY)
    policy.setup(trainer.model, PolicyContext(num_examples=N, image_shape=(3, 32, 32), padding=PAD, epochs=1,
                                              steps_per_epoch=len(batches), device=torch.device("cpu")))
    assert all(t.dtype == torch.float64 for t in policy.parameters())  # a float64 model's step sizes
    assert policy.site_names == [f"layer{i}.{j}.site" for i in range(1, 5) for j in range(2)]
    with torch.no_grad():
        policy.alpha_sites.copy_(torch.tensor(ALPHA_SITES, dtype=torch.float64))
        policy.store.data.copy_(omega0)

    records: List[dict] = []
    perturb, after_step = policy.perturb, policy.after_step

    def recording_perturb(m, batch):
        pert = perturb(m, batch)
        records.append({"x1": pert.x.detach().clone(),
                        "directions": [pert.sites[n].direction.clone() for n in policy.site_names]})
        return pert

    def recording_after_step(m, batch, pert):
        records[-1]["x1_grad"] = pert.x.grad.clone()
        records[-1]["step_grads"] = torch.cat([t.grad.reshape(-1) for t in policy.parameters()])
        after_step(m, batch, pert)
        records[-1]["step_sizes"] = torch.cat([t.detach().reshape(-1) for t in policy.parameters()])
        records[-1]["omega"] = policy.store.data.clone()
        records[-1]["state"] = {k: v.clone() for k, v in model.state_dict().items()}

    initial = {k: v.clone() for k, v in model.state_dict().items()}
    monkeypatch.setattr(policy, "perturb", recording_perturb)
    monkeypatch.setattr(policy, "after_step", recording_after_step)
    for step, batch in enumerate(batches):
        trainer._set_hyperparameters(step / len(batches))  # the training loop's position, in epochs
        trainer.train_step(batch)
    assert len(records) == len(batches) == 2

    omega = omega0.clone()
    buffers: Dict[str, Tensor] = {}
    for step, (record, batch) in enumerate(zip(records, batches)):
        assert batch.aug is not None and bool(batch.aug.flip.any()) and not bool(batch.aug.flip.all())
        expected = reference_step(ref, omega, batch, step, len(records), buffers)
        where = f"step {step}"
        assert_close(record["x1"], expected["x1"], f"{where}: x1")
        for name, direction, gradient in zip(policy.site_names, record["directions"], expected["site_grads"]):
            assert_same_signs(direction, gradient, f"{where}: direction at {name}")
        assert_close(record["x1_grad"], expected["x1_grad"], f"{where}: gradient of x1")
        assert_close(record["step_grads"], expected["step_grads"], f"{where}: step-size gradients")
        assert record["omega"].dtype == omega.dtype == torch.float32
        assert torch.equal(record["omega"], omega), f"{where}: ω in the store"
        assert_close(record["step_sizes"], step_size_vector(ref, lambda p: p), f"{where}: step sizes")
        ref_state = ref.state_dict()
        for key, value in record["state"].items():
            if value.is_floating_point():
                assert_close(value, ref_state[key], f"{where}: {key}")
            else:  # BatchNorm's num_batches_tracked: both passes count
                assert int(value) == int(ref_state[key]) == 2 * (step + 1), f"{where}: {key}"
    # the first step's LRs are 0 and the second's are not: weights and step sizes move in the second only
    first, second = records[0]["state"]["layer2.0.conv1.weight"], records[1]["state"]["layer2.0.conv1.weight"]
    assert torch.equal(first, initial["layer2.0.conv1.weight"]) and not torch.allclose(second, first)
    assert torch.equal(records[0]["step_sizes"][:2], torch.tensor([ALPHA, ALPHA_OMEGA], dtype=torch.float64))
    assert not torch.allclose(records[1]["step_sizes"], records[0]["step_sizes"])
    assert not torch.equal(records[1]["omega"], omega0)
