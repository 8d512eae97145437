"""GradAlign and Free-AT on the method contract.

GradAlign: the regularizer's weight gradient (a double backward) against
finite differences in float64, the training loss against a hand computation,
the paper's λ by ε, and ``compile=True`` refused. Free-AT: m optimizer steps
per batch, the carried perturbation against a hand-written loop of sign
steps across replays and batches, δ inside the ball, and resume equal to an
uninterrupted run. Everything runs on the CPU with tiny models.
"""
from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from advtrain.data import Batch, DeviceLoader
from advtrain.methods import (METHODS, FreeATPolicy, FreeATTrainer, GradAlignPolicy, GradAlignTrainer)
from advtrain.methods.gradalign import LAMBDA_BY_EPS, default_lambda, gradient_misalignment
from advtrain.policies import LossContext, PolicyContext
from advtrain.training import LambdaCallback, Trainer

EPS = 8 / 255
EPS32 = float(torch.tensor(EPS, dtype=torch.float32))  # ε as a float32 perturbation holds it
SHAPE = (3, 8, 8)


class TinyNet(nn.Module):
    """conv → BatchNorm → tanh → linear for 8×8 images; tanh keeps second
    derivatives non-zero, so the double backward has something to carry."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.fc = nn.Linear(4 * 8 * 8, 10)

    def forward(self, x):
        return self.fc(torch.tanh(self.bn(self.conv(x))).flatten(1))


def make_model(seed: int = 0, dtype=torch.float32) -> TinyNet:
    torch.manual_seed(seed)
    return TinyNet().to(dtype)


def make_batch(n: int = 6, seed: int = 0, dtype=torch.float32) -> Batch:
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, *SHAPE, generator=g).to(dtype)
    return Batch(x, torch.randint(0, 10, (n,), generator=g), torch.arange(n), None)


def make_data(n: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randint(0, 256, (n, *SHAPE), generator=g, dtype=torch.uint8),
            torch.randint(0, 10, (n,), generator=g))


def quiet(**kw):
    return {**dict(device="cpu", eval_every=0, progress=False, seed=0), **kw}


def train_forward(model):
    def forward(x, sites=None):
        model.train()
        return model(x)
    return forward


def same_state(a: nn.Module, b: nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


# ==================================================================== GradAlign


def test_default_lambda_is_the_papers_value_by_eps():
    assert default_lambda(8 / 255) == 0.2 and default_lambda(16 / 255) == 2.0 and default_lambda(1 / 255) == 0.027
    assert [default_lambda(k / 255) for k in range(1, 17)] == list(LAMBDA_BY_EPS.values())
    # between the runs: the log-linear rule the table was chosen by
    assert math.isclose(default_lambda(4.5 / 255), 0.02 * 10 ** (4.5 / 8))
    assert LAMBDA_BY_EPS[4] < default_lambda(4.5 / 255) < LAMBDA_BY_EPS[5]
    assert GradAlignPolicy(12 / 255).lam == 0.632 and GradAlignPolicy(lam=0.5).lam == 0.5
    assert GradAlignTrainer(TinyNet(), eps=4 / 255, device="cpu").policy.lam == 0.063


def _cosines_by_hand(model, x, y, reference):
    leaf = x.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(F.cross_entropy(model(leaf), y), leaf, create_graph=True)
    return F.cosine_similarity(g.flatten(1), reference.flatten(1), dim=1)


def _misalignment_by_hand(model, x, y, reference):
    return 1 - _cosines_by_hand(model, x, y, reference).mean()


def test_regularizer_and_its_weight_gradient_pass_gradcheck_in_float64():
    model = make_model(1, torch.float64).train()
    batch = make_batch(3, seed=2, dtype=torch.float64)
    reference = torch.randn_like(batch.x)
    weight = model.conv.weight.detach().clone()

    def regularizer(w):
        forward = lambda inp: torch.func.functional_call(model, {"conv.weight": w}, (inp,))  # noqa: E731
        return gradient_misalignment(forward, batch.x, batch.y, reference)

    value = regularizer(weight)
    assert value.dtype == torch.float64 and 0 < float(value.detach()) < 2
    assert torch.allclose(value, _misalignment_by_hand(model, batch.x, batch.y, reference), rtol=1e-12, atol=0)
    # the gradient with respect to a weight runs through ∇ₓ (create_graph): a double backward
    assert torch.autograd.gradcheck(regularizer, (weight.requires_grad_(True),), eps=1e-6, atol=1e-8)


def test_regularizer_leaves_out_examples_with_a_zero_gradient():
    model = make_model(3, torch.float64).train()
    batch = make_batch(4, seed=4, dtype=torch.float64)
    reference = torch.randn_like(batch.x)
    reference[1] = 0
    value = gradient_misalignment(model, batch.x, batch.y, reference)
    cosines = _cosines_by_hand(model, batch.x, batch.y, reference)
    assert torch.allclose(value, 1 - cosines[[0, 2, 3]].mean(), rtol=1e-12, atol=0)
    value.backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())
    # none left: the constant 1, and zero (not NaN) weight gradients
    model.zero_grad()
    value = gradient_misalignment(model, batch.x, batch.y, torch.zeros_like(batch.x))
    value.backward()
    assert float(value.detach()) == 1.0 and all(float(p.grad.abs().max()) == 0.0 for p in model.parameters())


def test_gradalign_loss_is_ce_of_fgsm_plus_lambda_misalignment():
    model = make_model(5, torch.float64)
    batch = make_batch(6, seed=6, dtype=torch.float64)
    policy = GradAlignPolicy(EPS, lam=0.7)
    hand_model = copy.deepcopy(model)

    torch.manual_seed(7)
    pert = policy.perturb(model, batch)
    out = policy.loss(LossContext(forward=train_forward(model)), batch, pert)

    torch.manual_seed(7)
    x, y = batch.x, batch.y
    hand_model.train()
    leaf = x.clone().requires_grad_(True)
    (g1,) = torch.autograd.grad(F.cross_entropy(hand_model(leaf), y), leaf)
    x_adv = (x + EPS * g1.sign()).clamp(0, 1)
    x_noisy = (x + torch.empty_like(x).uniform_(-EPS, EPS)).clamp(0, 1)
    logits = hand_model(x_adv)
    hand = F.cross_entropy(logits, y) + 0.7 * _misalignment_by_hand(hand_model, x_noisy, y, g1)

    assert torch.equal(pert.x, x_adv) and torch.equal(pert.extras["noisy"], x_noisy)
    assert float((pert.x - x).abs().max()) <= EPS + 1e-12 and float((x_noisy - x).abs().max()) <= EPS + 1e-12
    assert torch.allclose(out.loss, hand, rtol=1e-12, atol=0) and torch.allclose(out.logits, logits)
    # BatchNorm statistics moved on each of the three passes, as in the paper's code
    assert int(model.bn.num_batches_tracked) == 3 and same_state(model, hand_model)
    # the regularizer's gradient reaches the weights: they differ from CE's alone
    grads = torch.autograd.grad(out.loss, list(model.parameters()))
    hand_grads = torch.autograd.grad(hand, list(hand_model.parameters()))
    ce_grads = torch.autograd.grad(F.cross_entropy(hand_model(x_adv), y), list(hand_model.parameters()))
    assert all(torch.allclose(a, b, rtol=1e-10, atol=1e-14) for a, b in zip(grads, hand_grads))
    assert not torch.allclose(grads[0], ce_grads[0], rtol=1e-3)


def test_compile_refuses_gradalign_by_name():
    with pytest.raises(ValueError, match="GradAlignPolicy.*double backward"):
        Trainer(TinyNet(), GradAlignPolicy(), compile=True, device="cpu")
    with pytest.raises(ValueError, match="GradAlignPolicy"):
        GradAlignTrainer(TinyNet(), compile=True, device="cpu")
    assert METHODS["gradalign"].compiles is False and GradAlignPolicy.compilable is False


def test_gradalign_preset_holds_the_papers_schedule():
    t = GradAlignTrainer(TinyNet(), device="cpu")
    assert (t.epochs, t.lr, t.weight_decay, t.momentum, t.batch_size, t.pad_fill) == (30, 0.3, 5e-4, 0.9, 128, 0.0)
    assert t.lr_schedule(0) == 0 and math.isclose(t.lr_schedule(12), 0.3) and t.lr_schedule(30) == 0
    assert math.isclose(t.lr_schedule(6), 0.15)  # the triangle peaks at 40 % of the run
    short = GradAlignTrainer(TinyNet(), epochs=10, lr=0.1, device="cpu")
    assert math.isclose(short.lr_schedule(4), 0.1)
    assert GradAlignTrainer(TinyNet(), schedule="constant", device="cpu").lr_schedule(29) == 0.3


def _forwards_per_step(trainer, data) -> float:
    calls = []
    trainer.model.register_forward_pre_hook(lambda *_: calls.append(1))
    trainer.setup(data)
    calls.clear()
    steps = trainer.global_step
    trainer.train_epoch()
    return len(calls) / (trainer.global_step - steps)


def test_registry_passes_count_the_forward_passes_of_a_step():
    data = make_data(16)
    ga = GradAlignTrainer(TinyNet(), epochs=1, batch_size=8, channels_last=False, **quiet())
    free = FreeATTrainer(TinyNet(), replays=2, epochs=2, batch_size=8, channels_last=False, **quiet())
    assert _forwards_per_step(ga, data) == METHODS["gradalign"].passes().forward == 3
    assert _forwards_per_step(free, data) == METHODS["free-at"].passes().forward == 1
    assert METHODS["gradalign"].passes().cost == 11 and METHODS["free-at"].passes().cost == 3
    assert METHODS["gradalign"].trainer is GradAlignTrainer and METHODS["free-at"].trainer is FreeATTrainer
    assert all(math.isfinite(r["train_loss"]) for r in ga.history.records + free.history.records)


def test_gradalign_bad_input():
    with pytest.raises(ValueError, match="eps"):
        GradAlignPolicy(8)
    with pytest.raises(ValueError, match="lam"):
        GradAlignPolicy(lam=-0.1)
    with pytest.raises(ValueError, match="lam"):
        GradAlignPolicy(lam=float("nan"))
    for bad in ("0.2", True):
        with pytest.raises(TypeError, match="lam"):
            GradAlignPolicy(lam=bad)
    batch = make_batch(2)
    with pytest.raises(ValueError, match="reference"):
        gradient_misalignment(TinyNet(), batch.x, batch.y, torch.zeros(1, *SHAPE))


# ====================================================================== Free-AT


def test_free_at_takes_m_optimizer_steps_per_batch():
    trainer = FreeATTrainer(TinyNet(), replays=3, epochs=6, batch_size=4, **quiet())
    assert trainer.epochs == 2 and trainer.epoch_budget == 6 and trainer.replays == 3
    assert FreeATTrainer(TinyNet(), replays=4, epochs=7, device="cpu").epochs == 2  # ⌈7 / 4⌉
    assert FreeATTrainer(TinyNet(), device="cpu").epochs == 26  # ⌈205 / 8⌉
    steps = []
    step = trainer.optimizer.step
    trainer.optimizer.step = lambda *a, **k: (steps.append(1), step(*a, **k))[1]
    trainer.fit(make_data(10))  # batches of 4, 4 and 2
    assert len(steps) == trainer.global_step == 2 * 3 * 3


def test_free_at_perturbation_is_the_hand_computed_sequence_of_sign_steps():
    """Two batches (4 and 2 examples), m = 3: δ carries over from replay to
    replay and from batch to batch; the short batch uses δ's first rows."""
    images, labels = make_data(6, seed=1)
    model = make_model(2, torch.float64)
    hand_model = copy.deepcopy(model)
    loader = DeviceLoader((images, labels), 4, shuffle=False, augment=False, device="cpu", dtype=torch.float64)
    trainer = FreeATTrainer(model, replays=3, epochs=3, lr=0.05, schedule="constant", channels_last=False,
                            **quiet())
    trainer.fit(loader)

    opt = torch.optim.SGD(hand_model.parameters(), lr=0.05, momentum=0.9, weight_decay=2e-4)
    delta = torch.zeros(4, *SHAPE, dtype=torch.float64)
    x_all, y_all = images.double() / 255, labels
    for rows in (slice(0, 4), slice(4, 6)):
        x, y = x_all[rows], y_all[rows]
        n = x.shape[0]
        for _ in range(3):
            x_in = (x + delta[:n]).clamp(0, 1).requires_grad_(True)
            opt.zero_grad()
            F.cross_entropy(hand_model(x_in), y).backward()
            opt.step()
            delta[:n] = (delta[:n] + EPS * x_in.grad.sign()).clamp(-EPS, EPS)

    assert torch.equal(trainer.policy.delta, delta)
    assert all(torch.allclose(p, q, rtol=1e-12, atol=1e-15)
               for p, q in zip(model.parameters(), hand_model.parameters()))
    # non-trivial: steps of ε that flipped sign left zeros next to ±ε
    assert bool((delta.abs() == EPS).any()) and bool((delta == 0).any())


def test_free_at_perturbation_stays_in_the_ball_and_the_input_in_the_box():
    policy = FreeATPolicy(EPS, replays=2, step_size=EPS / 3)
    model = make_model(3)
    policy.setup(model, PolicyContext(num_examples=8, image_shape=SHAPE, padding=0, epochs=1,
                                      steps_per_epoch=1, device=torch.device("cpu")))
    for seed in range(12):
        batch = make_batch(4 if seed % 3 else 2, seed=seed)
        pert = policy.perturb(model, batch)
        assert pert.x.requires_grad and 0 <= float(pert.x.detach().min()) and float(pert.x.detach().max()) <= 1
        F.cross_entropy(model(pert.x), batch.y).backward()
        policy.after_step(model, batch, pert)
        assert float(policy.delta.abs().max()) <= EPS32
    assert float(policy.delta.abs().max()) == EPS32  # the steps reached the boundary
    assert policy.delta.shape == (4, *SHAPE)
    # a larger batch extends δ with zero rows
    bigger = make_batch(6, seed=99)
    before = policy.delta.clone()
    pert = policy.perturb(model, bigger)
    assert policy.delta.shape == (6, *SHAPE) and torch.equal(policy.delta[:4], before)
    assert torch.equal(pert.x[4:], bigger.x[4:])


def test_free_at_resume_equals_an_uninterrupted_run(tmp_path):
    data = make_data(24, seed=3)
    kw = quiet(replays=2, epochs=6, batch_size=8, lr=0.05)  # 3 passes of 3 batches × 2 replays
    full = FreeATTrainer(make_model(4), run_dir=tmp_path / "full", **kw)
    full.fit(data)
    stop = LambdaCallback(on_epoch_end=lambda tr, epoch, rec: setattr(tr, "stop_training", epoch == 0))
    first = FreeATTrainer(make_model(4), run_dir=tmp_path / "split", callbacks=[stop], **kw)
    first.fit(data)
    assert first.epoch == 1 and first.global_step == 6
    resumed = FreeATTrainer(make_model(9), run_dir=tmp_path / "split", **kw)
    resumed.fit(data, resume=True)
    assert resumed.epoch == full.epoch == 3 and resumed.global_step == full.global_step == 18
    assert same_state(full.model, resumed.model)
    assert torch.equal(full.policy.delta, resumed.policy.delta)
    assert not torch.equal(first.policy.delta, full.policy.delta)  # δ moved after the interruption


def test_free_at_bad_input():
    with pytest.raises(ValueError, match="eps"):
        FreeATPolicy(8)
    with pytest.raises(ValueError, match="replays"):
        FreeATPolicy(replays=0)
    with pytest.raises(TypeError, match="replays"):
        FreeATPolicy(replays=2.0)
    with pytest.raises(ValueError, match="step_size"):
        FreeATPolicy(step_size=-1.0)
    with pytest.raises(ValueError, match="epochs"):
        FreeATTrainer(TinyNet(), epochs=0, device="cpu")
    with pytest.raises(TypeError, match="epochs"):
        FreeATTrainer(TinyNet(), epochs=2.5, device="cpu")
    policy = FreeATPolicy()
    with pytest.raises(ValueError, match="FreeATPolicy"):
        policy.load_state_dict({"delta": None, "store": None})
    batch = make_batch(2)
    pert = policy.perturb(TinyNet(), batch)
    with pytest.raises(RuntimeError, match="backward"):
        policy.after_step(TinyNet(), batch, pert)
