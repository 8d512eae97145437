"""ELLE and ELLE-A on the method contract.

ELLE: the perturbation and the training loss against a hand computation of
the FastAT Benchmark's step (FGSM from a random start without projection,
``CE(f(x_adv)) + λ·mean (L(x_c) − (1 − α)L(x_a) − αL(x_b))²``), the
penalty on hand-made losses, and no double backward (the step compiles).
ELLE-A: λ follows the reference rule (an error above mean + sensitivity·std
of every error so far sets λ_aux, otherwise λ decays) on constructed error
sequences, without host synchronisation; the loss uses the current λ; resume
equals an uninterrupted run. Bad input raises. CPU, tiny models.
"""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from _helpers import NoHostSync
from advtrain.data import Batch
from advtrain.methods import METHODS, ELLEAPolicy, ELLEATrainer, ELLEPolicy, ELLETrainer
from advtrain.methods.elle import local_linearity_error
from advtrain.policies import LossContext
from advtrain.training import LambdaCallback
from advtrain.training.checkpoint import non_finite_entries

EPS = 8 / 255
SHAPE = (3, 8, 8)


class TinyNet(nn.Module):
    """conv → tanh → linear for 8×8 images, no BatchNorm: each example's loss
    does not depend on the rest of its batch, so the hand computation may
    forward the three points separately."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.fc = nn.Linear(4 * 8 * 8, 10)

    def forward(self, x):
        return self.fc(torch.tanh(self.conv(x)).flatten(1))


class TinyBNNet(TinyNet):
    """TinyNet with BatchNorm, for whole training runs."""

    def __init__(self) -> None:
        super().__init__()
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x):
        return self.fc(torch.tanh(self.bn(self.conv(x))).flatten(1))


def make_model(seed: int = 0, cls=TinyNet) -> nn.Module:
    torch.manual_seed(seed)
    return cls()


def make_batch(n: int = 6, seed: int = 0) -> Batch:
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, *SHAPE, generator=g)
    x[0, 0, 0] = 0.0  # pixels at the box's edges, where the clip to [0, 1] acts
    x[1, 0, 0] = 1.0
    return Batch(x, torch.randint(0, 10, (n,), generator=g), torch.arange(n), None)


def context(model: nn.Module, label_smoothing: float = 0.0) -> LossContext:
    def forward(x, sites=None):
        model.train()
        return model(x)
    return LossContext(forward=forward, label_smoothing=label_smoothing)


def quiet(**kw):
    return {**dict(device="cpu", eval_every=0, eval_examples=8, progress=False, seed=0), **kw}


# ======================================================================== ELLE


def test_penalty_is_the_squared_gap_to_the_chord():
    alpha = torch.tensor([0.25, 0.5])
    la, lb = torch.tensor([1.0, 2.0]), torch.tensor([3.0, 6.0])
    on_chord = (1 - alpha) * la + alpha * lb  # 1.5, 4.0
    assert local_linearity_error(torch.cat([la, lb, on_chord]), alpha) == 0
    off = on_chord + torch.tensor([0.5, -2.0])
    assert torch.isclose(local_linearity_error(torch.cat([la, lb, off]), alpha), torch.tensor((0.25 + 4.0) / 2))
    with pytest.raises(ValueError, match="losses"):
        local_linearity_error(torch.zeros(5), alpha)


def test_elle_step_is_the_benchmarks_by_hand():
    # float64 and a wide ball, so that the linearity error is far above rounding
    eps = 64 / 255
    model, batch = make_model(1).double(), make_batch(seed=2)
    with torch.no_grad():
        model.conv.weight.mul_(8)  # a curved loss on the ball
    batch = Batch(batch.x.double(), batch.y, batch.index, None)
    x, y = batch.x, batch.y
    policy = ELLEPolicy(eps, lam=0.7)
    torch.manual_seed(5)
    pert = policy.perturb(model, batch)
    out = policy.loss(context(model, label_smoothing=0.1), batch, pert)

    torch.manual_seed(5)  # the same draws, in the same order
    delta = (2 * torch.rand_like(x, dtype=torch.float32) - 1) * eps
    delta = (x + delta).clamp(0, 1) - x
    delta.requires_grad_(True)
    (grad,) = torch.autograd.grad(F.cross_entropy(model(x + delta), y), delta)
    x_adv = (x + delta.detach() + 1.25 * eps * grad.sign()).clamp(0, 1)
    u = torch.rand(2 * len(x), *SHAPE, dtype=torch.float64)
    x_a, x_b = x + eps * (2 * u[:len(x)] - 1), x + eps * (2 * u[len(x):] - 1)
    alpha = torch.rand(len(x), 1, 1, 1, dtype=torch.float64)
    x_c = (1 - alpha) * x_a + alpha * x_b
    loss_a, loss_b, loss_c = (F.cross_entropy(model(p), y, reduction="none") for p in (x_a, x_b, x_c))
    alpha = alpha.flatten()
    error = ((loss_c - (1 - alpha) * loss_a - alpha * loss_b) ** 2).mean()
    expected = F.cross_entropy(model(x_adv), y, label_smoothing=0.1) + 0.7 * error

    assert torch.allclose(pert.x, x_adv, atol=1e-6, rtol=0)
    # no projection onto the ε-ball: the step of 1.25ε leaves it, the box holds
    moved = (pert.x - x).abs()
    assert eps * 1.01 < float(moved.max()) <= 2.25 * eps + 1e-6
    assert float(pert.x.min()) >= 0 and float(pert.x.max()) <= 1
    assert float(error.detach()) > 1e-4
    assert torch.allclose(pert.extras["linearity_error"], error, rtol=1e-6, atol=0)
    assert torch.allclose(out.loss, expected, rtol=1e-6, atol=0)
    assert torch.allclose(out.logits, model(x_adv), atol=1e-6, rtol=0)


def test_elle_has_no_double_backward_and_compiles(monkeypatch):
    graphs = []
    grad, backward = torch.autograd.grad, torch.autograd.backward

    def recording_grad(*args, **kwargs):
        graphs.append(bool(kwargs.get("create_graph", False)))
        return grad(*args, **kwargs)

    def recording_backward(*args, **kwargs):
        graphs.append(bool(kwargs.get("create_graph", False)))
        return backward(*args, **kwargs)

    monkeypatch.setattr(torch.autograd, "grad", recording_grad)
    monkeypatch.setattr(torch.autograd, "backward", recording_backward)
    trainer = ELLETrainer(make_model(0, TinyBNNet), **quiet())
    trainer.train_step(make_batch(4))
    assert graphs == [False, False]  # the attack's input gradient and the loss's backward
    assert ELLEPolicy.compilable and ELLEAPolicy.compilable
    assert METHODS["elle"].compiles and METHODS["elle-a"].compiles


def test_the_linearity_points_are_forwarded_in_full_precision_under_autocast():
    model = make_model(0, TinyBNNet)
    seen = []
    model.register_forward_hook(lambda module, args, out: seen.append((args[0].shape[0], out.dtype)))
    ELLETrainer(model, **quiet(precision="bf16")).train_step(make_batch(4))
    # the attack and the training forward under bf16 autocast, the 3N points in float32
    assert seen == [(4, torch.bfloat16), (4, torch.bfloat16), (12, torch.float32)]


def test_elle_presets_hold_the_benchmarks_method_settings():
    elle = ELLETrainer(make_model(), device="cpu")
    assert (elle.policy.lam, elle.policy.step_size, elle.policy.attack.project) == (1.0, 1.25 * EPS, False)
    assert (elle.epochs, elle.lr, elle.weight_decay, elle.pad_fill) == (30, 0.2, 5e-4, 0.0)
    adaptive = ELLEATrainer(make_model(), device="cpu").policy
    assert (adaptive.lam_aux, adaptive.lam_decay, adaptive.sensitivity) == (10.0, 0.99, 2.0)
    assert float(adaptive.lam) == 0.0 and int(adaptive.count) == 0


# ====================================================================== ELLE-A


def reference_rule(errors, lam_aux, decay, sensitivity):
    """The benchmark's onoff schedule, as it is written there: a list of
    every error and numpy's mean and (population) std."""
    values, lam, lams, jumps = [], 0.0, [], []
    for e in errors:
        values.append(e)
        jump = len(values) > 2 and e > np.mean(values) + sensitivity * np.std(values)
        lam = lam_aux if jump else lam * decay
        lams.append(lam)
        jumps.append(jump)
    return lams, jumps


def observe_all(policy, errors):
    lams, jumps = [], []
    with NoHostSync():
        for e in errors:
            jump = policy.observe(torch.tensor(e, dtype=torch.float32))
            lams.append(policy.lam.clone())
            jumps.append(jump)
    return [float(v) for v in lams], [bool(j) for j in jumps]


def test_elle_a_sets_lambda_exactly_when_the_error_jumps():
    # errors as the float32 tensors a step yields; the jumps are at 6 and 11
    errors = [float(torch.tensor(v)) for v in
              (0.10, 0.12, 0.09, 0.11, 0.10, 0.30, 0.11, 0.10, 0.12, 0.09, 0.60, 0.12, 0.11)]
    policy = ELLEAPolicy(lam_aux=10.0, lam_decay=0.9, sensitivity=2.0)
    lams, jumps = observe_all(policy, errors)
    expected_lams, expected_jumps = reference_rule(errors, 10.0, 0.9, 2.0)
    assert jumps == expected_jumps
    assert [i for i, j in enumerate(jumps) if j] == [5, 10]
    assert all(math.isclose(a, b, rel_tol=1e-12) for a, b in zip(lams, expected_lams))
    assert lams[:5] == [0.0] * 5 and lams[5] == 10.0 and math.isclose(lams[6], 9.0)
    assert lams[10] == 10.0 and math.isclose(lams[12], 10.0 * 0.9 ** 2)
    # the running statistics are the record's mean and population std
    assert int(policy.count) == len(errors)
    assert math.isclose(float(policy.mean), np.mean(errors), rel_tol=1e-12)
    assert math.isclose(math.sqrt(float(policy.m2) / len(errors)), np.std(errors), rel_tol=1e-12)


def test_elle_a_needs_three_errors_before_a_jump():
    # a low sensitivity, where the second error would already count as a jump
    errors = [0.0, 10.0, 20.0, 20.0]
    lams, jumps = observe_all(ELLEAPolicy(lam_aux=2.0, lam_decay=0.5, sensitivity=0.5), errors)
    assert jumps == reference_rule(errors, 2.0, 0.5, 0.5)[1] == [False, False, True, True]
    assert lams == [0.0, 0.0, 2.0, 2.0]


def test_elle_a_loss_takes_the_current_lambda_and_after_step_records_its_error():
    model, batch = make_model(3), make_batch(seed=4)
    policy = ELLEAPolicy()
    pert = policy.perturb(model, batch)
    out = policy.loss(context(model), batch, pert)
    assert torch.equal(out.loss, F.cross_entropy(out.logits, batch.y))  # λ = 0 at the start
    policy.lam = torch.tensor(3.0, dtype=torch.float64)
    out = policy.loss(context(model), batch, pert)
    error = pert.extras["linearity_error"]
    assert torch.allclose(out.loss, F.cross_entropy(out.logits, batch.y) + 3.0 * error, rtol=1e-6, atol=0)
    policy.after_step(model, batch, pert)
    assert int(policy.count) == 1 and float(policy.mean) == float(error)
    assert float(policy.lam) == pytest.approx(3.0 * 0.99, rel=1e-12)


def test_elle_a_training_step_has_no_host_synchronisation():
    trainer = ELLEATrainer(make_model(0, TinyBNNet), **quiet())
    batch = make_batch(4)
    with NoHostSync():  # perturbation, loss, backward, optimizer step and the λ rule
        for _ in range(3):
            trainer.train_step(batch)
    assert int(trainer.policy.count) == 3


def test_elle_a_resume_equals_an_uninterrupted_run(tmp_path):
    g = torch.Generator().manual_seed(3)
    data = (torch.randint(0, 256, (24, *SHAPE), generator=g, dtype=torch.uint8),
            torch.randint(0, 10, (24,), generator=g))
    # sensitivity 0: any error above the mean so far switches λ on
    kw = quiet(epochs=2, batch_size=8, lr=0.05, sensitivity=0.0)
    full = ELLEATrainer(make_model(0, TinyBNNet), run_dir=tmp_path / "full", **kw)
    full.fit(data)
    stop = LambdaCallback(on_epoch_end=lambda tr, epoch, rec: setattr(tr, "stop_training", epoch == 0))
    first = ELLEATrainer(make_model(0, TinyBNNet), run_dir=tmp_path / "split", callbacks=[stop], **kw)
    first.fit(data)
    assert first.epoch == 1 and int(first.policy.count) == 3
    assert float(first.policy.lam) == 10.0  # switched on at the checkpoint's last step
    resumed = ELLEATrainer(make_model(9, TinyBNNet), run_dir=tmp_path / "split", **kw)
    resumed.fit(data, resume=True)
    assert resumed.global_step == full.global_step == 6
    sa, sb = full.model.state_dict(), resumed.model.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    state, resumed_state = full.policy.state_dict(), resumed.policy.state_dict()
    assert state.keys() == resumed_state.keys() == {"lam", "count", "mean", "m2"}
    assert all(torch.equal(state[k], resumed_state[k]) for k in state)
    assert int(state["count"]) == 6 and float(state["lam"]) > 0  # λ was switched on and carried over
    assert full.history[-1]["lam"] == resumed.history[-1]["lam"] == float(state["lam"])


def test_the_checkpoint_check_reads_the_float64_statistics():
    state = {"model": {"w": torch.ones(2)}, "policy": ELLEAPolicy().state_dict()}
    assert non_finite_entries(state) == []
    state["policy"]["mean"] = torch.tensor(float("nan"), dtype=torch.float64)
    assert non_finite_entries(state) == ["policy.mean"]


# =================================================================== bad input


def test_bad_input_raises_naming_the_argument():
    with pytest.raises(ValueError, match="eps"):
        ELLEPolicy(8)
    with pytest.raises(ValueError, match="lam"):
        ELLEPolicy(lam=-1.0)
    with pytest.raises(TypeError, match="lam"):
        ELLEPolicy(lam="1")
    with pytest.raises(ValueError, match="step_size"):
        ELLEPolicy(step_size=-0.1)
    with pytest.raises(ValueError, match="lam_aux"):
        ELLEAPolicy(lam_aux=float("inf"))
    with pytest.raises(ValueError, match="lam_decay"):
        ELLEAPolicy(lam_decay=1.5)
    with pytest.raises(ValueError, match="sensitivity"):
        ELLEAPolicy(sensitivity=-2.0)
    with pytest.raises(ValueError, match="eps"):
        ELLEATrainer(make_model(), eps=8, device="cpu")
    policy = ELLEAPolicy()
    with pytest.raises(ValueError, match="0-dim"):
        policy.observe(torch.zeros(3))
    with pytest.raises(ValueError, match="ELLEAPolicy"):
        policy.load_state_dict({"lam": torch.tensor(0.0)})
    batch = make_batch(2)
    pert = policy.perturb(make_model(), batch)
    with pytest.raises(RuntimeError, match="loss"):
        policy.after_step(make_model(), batch, pert)
