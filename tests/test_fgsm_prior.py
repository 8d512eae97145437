"""FGSM-PGI, FGSM-PCO, FGSM-MEP-CS and FGSM-RS-CS on the method contract.

Each step is written out by hand from the reference's formulas on a tiny
model: PGI's next prior is the momentum sign step from the stored prior and
its loss CE + λ·MSE(f(x_adv), f(x₀)); PCO's training input is the
confidence-weighted mix with the β-extrapolated FGSM point and its loss the
soft-target CE plus λ·|MSE − MSE|; MEP-CS and RS-CS add ±w2·ℓ (or nothing)
by the convergence-stability rule on the previous epoch's mean clean loss.
The prior written under one crop/flip is what the same example reads under
another; resume equals an uninterrupted run (weights and every policy
state); bad input is refused. Tiny models, CPU.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from _helpers import NoHostSync
from advtrain.data import Batch
from advtrain.data.augment import crop_padded, paste_padded
from advtrain.data.batch import Augmentation
from advtrain.methods import METHODS
from advtrain.methods._prior import soft_targets
from advtrain.methods.fgsm_mep_cs import FGSMMEPCSPolicy
from advtrain.methods.fgsm_pco import FGSMPCOPolicy
from advtrain.methods.fgsm_pgi import FASTAT_CONFIG, FGSMPGIPolicy
from advtrain.methods.fgsm_rs_cs import FGSMRSCSPolicy
from advtrain.policies import LossContext, PolicyContext
from advtrain.training import LambdaCallback

EPS = 8 / 255
SHAPE = (3, 8, 8)
NAMES = ["fgsm-pgi", "fgsm-pco", "fgsm-mep-cs", "fgsm-rs-cs"]


class TinyNet(nn.Module):
    """conv → BatchNorm → tanh → linear, 10 classes, for 8×8 images."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.fc = nn.Linear(4 * 8 * 8, 10)

    def forward(self, x):
        return self.fc(torch.tanh(self.bn(self.conv(x))).flatten(1))


def make_model(seed: int = 0) -> TinyNet:
    torch.manual_seed(seed)
    return TinyNet()


def make_batch(n: int = 6, seed: int = 0, aug=None) -> Batch:
    g = torch.Generator().manual_seed(seed)
    return Batch(torch.rand(n, *SHAPE, generator=g), torch.randint(0, 10, (n,), generator=g), torch.arange(n), aug)


def ready(policy, model, n: int = 6, padding: int = 0, seed: int = 1):
    torch.manual_seed(seed)
    policy.setup(model, PolicyContext(num_examples=n, image_shape=SHAPE, padding=padding, epochs=3,
                                      steps_per_epoch=1, device=torch.device("cpu")))
    return policy


def context(model, label_smoothing: float = 0.0) -> LossContext:
    def forward(x, sites=None):
        model.train()
        return model(x)
    return LossContext(forward=forward, label_smoothing=label_smoothing)


def soft_ce(logits, targets, ls=0.0):
    """The reference's ``CrossEntropyLoss(label_smoothing=ls)(logits, targets)`` for soft targets."""
    k = logits.shape[1]
    return -(((1 - ls) * targets + ls / k) * F.log_softmax(logits, 1)).sum(1).mean()


def proj(d, x):
    return torch.min(torch.max(d.clamp(-EPS, EPS), -x), 1 - x)


def weight_grads(model, loss):
    return torch.autograd.grad(loss, list(model.parameters()), retain_graph=True)


# ---------------------------------------------------------------- FGSM-PGI
def test_pgi_step_and_loss_are_the_references_by_hand():
    model, batch = make_model(), make_batch()
    policy = ready(FGSMPGIPolicy(EPS, lam=10.0, momentum_decay=0.3), model)
    x, y = batch.x, batch.y
    delta = policy.prior.delta.data.clone()
    assert torch.equal(delta.abs(), torch.full_like(delta, EPS))  # the ±ε draw
    old_m = torch.randn_like(delta)
    policy.prior.momentum.data.copy_(old_m)
    copy = make_model()
    pert = policy.perturb(model, batch)
    out = policy.loss(context(model, 0.4), batch, pert)

    x0 = (x + delta).clamp(0, 1).requires_grad_(True)
    prior_logits = context(copy).forward(x0)
    (g,) = torch.autograd.grad(F.cross_entropy(prior_logits, y), x0, retain_graph=True)
    m = g / g.abs().sum() + 0.3 * old_m
    logits = context(copy).forward(x + proj(delta + EPS * g.sign(), x))
    loss = F.cross_entropy(logits, y, label_smoothing=0.4) + 10.0 * ((logits - prior_logits) ** 2).mean()
    assert torch.allclose(out.loss, loss, atol=1e-6) and torch.allclose(out.logits, logits, atol=1e-6)
    for a, b in zip(weight_grads(model, out.loss), weight_grads(copy, loss)):  # through both forwards
        assert torch.allclose(a, b, atol=1e-5)
    policy.after_step(model, batch, pert)
    assert torch.allclose(policy.prior.momentum.data, m, atol=1e-7)
    assert torch.allclose(policy.prior.delta.data, proj(delta + EPS * m.sign(), x), atol=1e-7)
    assert not torch.equal(m.sign(), g.sign())  # the momentum really steers the prior


def _augmentation(top, left, flip, padding=2):
    return Augmentation(top=torch.tensor(top), left=torch.tensor(left), flip=torch.tensor(flip), padding=padding)


def test_pgi_next_epoch_starts_from_the_stored_prior_under_another_crop_and_flip():
    model, n = make_model(), 3
    g = torch.Generator().manual_seed(4)
    padded = torch.zeros(n, 3, 12, 12)
    padded[:, :, 2:10, 2:10] = torch.rand(n, 3, 8, 8, generator=g)  # black border, as pad_fill=0
    y = torch.tensor([1, 4, 7])
    first = _augmentation([0, 3, 2], [4, 1, 2], [False, True, True])
    second = _augmentation([4, 2, 1], [0, 2, 3], [True, False, True])
    policy = ready(FGSMPGIPolicy(EPS), model, n=n, padding=2)
    batch = Batch(crop_padded(padded, first), y, torch.arange(n), first)
    stored = policy.prior.delta.data.clone()
    pert = policy.perturb(model, batch)
    policy.loss(context(model), batch, pert)
    policy.after_step(model, batch, pert)
    written = pert.extras["next_delta"]
    assert torch.equal(policy.prior.delta.read(batch.index, first), written)  # exact round trip
    later = Batch(crop_padded(padded, second), y, torch.arange(n), second)
    expected = crop_padded(paste_padded(stored, written, first), second)  # same pixels, new window and flip
    assert torch.equal(policy.perturb(model, later).x, (later.x + expected).clamp(0, 1))
    assert torch.equal(policy.prior.momentum.read(later.index, second),
                       crop_padded(paste_padded(torch.zeros_like(stored), pert.extras["next_momentum"], first), second))


def test_pgi_prior_is_redrawn_every_reset_every_epochs():
    model, batch = make_model(), make_batch()
    policy = ready(FGSMPGIPolicy(EPS, reset_every=2), model)
    pert = policy.perturb(model, batch)
    policy.loss(context(model), batch, pert)
    policy.after_step(model, batch, pert)
    kept = policy.prior.delta.data.clone()
    policy.start_epoch(1)
    assert torch.equal(policy.prior.delta.data, kept)
    policy.start_epoch(2)
    assert not torch.equal(policy.prior.delta.data, kept) and torch.equal(policy.prior.momentum.data,
                                                                          torch.zeros_like(kept))
    assert torch.equal(policy.prior.delta.data.abs(), torch.full_like(kept, EPS))


# ---------------------------------------------------------------- FGSM-PCO
def test_pco_training_input_and_loss_are_the_references_by_hand():
    model, batch = make_model(), make_batch()
    policy = ready(FGSMPCOPolicy(EPS, lam=10.0, beta=1.5, factor=0.6), model)
    x, y = batch.x, batch.y
    delta = policy.prior.delta.data.clone()
    copy = make_model()
    pert = policy.perturb(model, batch)
    out = policy.loss(context(model, 0.4), batch, pert)

    t = torch.full((6, 10), 0.4 / 9).scatter(1, y[:, None], 0.6)
    x0 = (x + delta).clamp(0, 1).requires_grad_(True)
    o0 = context(copy).forward(x0)
    c = (1 - F.softmax(o0, 1).gather(1, y[:, None])).clamp(0, 1).view(-1, 1, 1, 1)
    (g,) = torch.autograd.grad(soft_ce(o0, t), x0, retain_graph=True)
    step = proj(delta + EPS * g.sign(), x)
    mixed = c * x0.detach() + (1 - c) * (x + 1.5 * step)
    o = context(copy).forward(mixed)
    o_fgsm = context(copy).forward(x + step)
    loss = soft_ce(o, t, 0.4) + 10.0 * (((o_fgsm - o0) ** 2).mean() - ((o_fgsm - o) ** 2).mean()).abs()
    assert torch.allclose(out.loss, loss, atol=1e-6) and torch.allclose(out.logits, o, atol=1e-6)
    for a, b in zip(weight_grads(model, out.loss), weight_grads(copy, loss)):  # through c and all three passes
        assert torch.allclose(a, b, atol=1e-5)
    assert (mixed - x).abs().max() > EPS  # β = 1.5 extrapolates past the ball
    policy.after_step(model, batch, pert)
    assert torch.allclose(policy.prior.delta.data, step, atol=1e-7)
    policy.start_epoch(1)
    assert torch.allclose(policy.prior.delta.data, step, atol=1e-7)  # never redrawn


# ------------------------------------------------------------ CS and MEP-CS
def test_cs_term_is_on_between_the_decay_epochs_and_follows_the_previous_epoch_mean():
    policy = ready(FGSMRSCSPolicy(EPS, gamma=0.03, ratio=2.0, w2=1.0), make_model())
    assert [e for e in range(101) if policy.cs_active(e)] == list(range(2, 99))
    policy.start_epoch(0)
    for value, n in ((2.0, 4), (1.0, 4)):
        policy.record_clean_loss(torch.tensor(value), n)
    policy.start_epoch(1)
    policy.record_clean_loss(torch.tensor(1.49), 8)
    policy.start_epoch(2)  # previous mean 1.49, change 1.49 - 1.5 = -0.01: threshold max(0.015, -0.01) = 0.015
    ell = torch.tensor(1.5, requires_grad=True)
    assert torch.allclose(policy.cs_term(ell), torch.tensor(0.0))  # |d| = 0.01 <= 0.015
    assert torch.allclose(policy.cs_term(ell + 0.01), ell + 0.01)  # d = 0.02: rising too fast, pushed down
    assert torch.allclose(policy.cs_term(ell - 0.03), -(ell - 0.03))  # d = -0.02: falling too fast, pushed up
    policy.record_clean_loss(torch.tensor(1.59), 8)
    policy.start_epoch(3)  # change 0.1 > γ: the threshold is γ
    assert torch.allclose(policy.cs_term(torch.tensor(1.61)), torch.tensor(0.0))
    assert torch.allclose(policy.cs_term(torch.tensor(1.63)), torch.tensor(1.63))


def _set_previous(policy, previous: float, epoch: int) -> None:
    policy._previous = torch.tensor(previous)
    policy._change = torch.tensor(0.0)
    policy._epoch = epoch


@pytest.mark.parametrize("previous, epoch, sign", [(0.0, 5, 1.0), (9.0, 5, -1.0), (None, 5, 0.0), (0.0, 1, 0.0)])
def test_mep_cs_step_and_loss_are_the_references_by_hand(previous, epoch, sign):
    model, batch = make_model(), make_batch()
    policy = ready(FGSMMEPCSPolicy(EPS, momentum_decay=0.3, factor=0.6, gamma=0.03, w2=1.0), model)
    x, y = batch.x, batch.y
    delta = policy.prior.delta.data.clone()
    copy = make_model()
    t = torch.full((6, 10), 0.4 / 9).scatter(1, y[:, None], 0.6)
    x0 = (x + delta).clamp(0, 1).requires_grad_(True)
    (g,) = torch.autograd.grad(soft_ce(context(copy).forward(x0), t), x0)
    x_adv = x + proj(delta + EPS * g.sign(), x)
    o = context(copy).forward(x_adv)
    ell = soft_ce(context(copy).forward(x), t, 0.4)
    _set_previous(policy, float(ell.detach()) if previous is None else previous, epoch)

    pert = policy.perturb(model, batch)
    assert torch.allclose(pert.x, x_adv, atol=1e-7)
    out = policy.loss(context(model, 0.4), batch, pert)
    loss = soft_ce(o, t, 0.4) + sign * ell
    assert torch.allclose(out.loss, loss, atol=1e-6)
    for a, b in zip(weight_grads(model, out.loss), weight_grads(copy, loss)):
        assert torch.allclose(a, b, atol=1e-5)
    m = g / g.abs().sum()
    assert torch.allclose(pert.extras["next_momentum"], m, atol=1e-7)
    assert torch.allclose(pert.extras["next_delta"], proj(delta + EPS * m.sign(), x), atol=1e-7)


# ---------------------------------------------------------------- FGSM-RS-CS
def test_rs_cs_step_and_loss_are_the_references_by_hand():
    model, batch = make_model(), make_batch()
    policy = ready(FGSMRSCSPolicy(EPS, factor=0.6), model)
    x, y = batch.x, batch.y
    _set_previous(policy, 0.0, 5)
    torch.manual_seed(7)
    pert = policy.perturb(model, batch)
    out = policy.loss(context(model, 0.4), batch, pert)

    copy = make_model()
    torch.manual_seed(7)
    start = (x + torch.empty_like(x).uniform_(-EPS, EPS)).clamp(0, 1).requires_grad_(True)
    (g,) = torch.autograd.grad(F.cross_entropy(context(copy).forward(start), y), start)
    x_adv = (start + EPS * g.sign()).clamp(0, 1).detach()
    t = soft_targets(y, 0.6, 10)
    ell = soft_ce(context(copy).forward(start.detach()), t, 0.4)
    loss = soft_ce(context(copy).forward(x_adv), t, 0.4) + ell  # d = ℓ - 0 > γ: the term is +w2·ℓ
    assert torch.allclose(pert.x, x_adv, atol=1e-7) and torch.allclose(out.loss, loss, atol=1e-6)
    assert (pert.x - x).abs().max() > EPS + 1e-3 and (pert.x - x).abs().max() <= 2 * EPS + 1e-6  # no projection


@pytest.mark.parametrize("policy", [FGSMPGIPolicy(EPS), FGSMPCOPolicy(EPS), FGSMMEPCSPolicy(EPS), FGSMRSCSPolicy(EPS)],
                         ids=NAMES)
def test_a_step_reads_nothing_back_to_the_host(policy):
    model, batch = make_model(), make_batch()
    ready(policy, model)
    with NoHostSync():
        pert = policy.perturb(model, batch)
        out = policy.loss(context(model, 0.4), batch, pert)
        out.loss.backward()
        policy.after_step(model, batch, pert)


# ------------------------------------------------------------------- resume
@pytest.mark.parametrize("name", NAMES)
def test_resume_equals_an_uninterrupted_run(tmp_path, name):
    g = torch.Generator().manual_seed(3)
    images = torch.randint(0, 256, (16, *SHAPE), generator=g, dtype=torch.uint8)
    data = (images, torch.randint(0, 10, (16,), generator=g))
    kw = dict(epochs=2, batch_size=8, lr=0.05, device="cpu", eval_every=0, progress=False, seed=0)
    if name in ("fgsm-pgi", "fgsm-mep-cs"):
        kw["reset_every"] = 1  # the resumed epoch starts with a redraw
    if name in ("fgsm-mep-cs", "fgsm-rs-cs"):
        kw.update(stride=0, decay_epochs=(0, 100))  # the CS term is on in epoch 1, after the interruption
    method = METHODS[name]
    full = method.build(make_model(1), run_dir=tmp_path / "full", **kw)
    full.fit(data)
    stop = LambdaCallback(on_epoch_end=lambda tr, epoch, rec: setattr(tr, "stop_training", epoch == 0))
    first = method.build(make_model(1), run_dir=tmp_path / "split", callbacks=[stop], **kw)
    first.fit(data)
    resumed = method.build(make_model(5), run_dir=tmp_path / "split", **kw)
    resumed.fit(data, resume=True)
    assert resumed.global_step == full.global_step == 4
    a, b = full.model.state_dict(), resumed.model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["fc.weight"], first.model.state_dict()["fc.weight"])

    def flat(state, prefix=""):
        for key, value in state.items():
            if isinstance(value, dict):
                yield from flat(value, f"{prefix}{key}.")
            else:
                yield f"{prefix}{key}", value

    sa, sb = dict(flat(full.policy.state_dict())), dict(flat(resumed.policy.state_dict()))
    assert sa.keys() == sb.keys()
    for key in sa:
        same = torch.equal(sa[key], sb[key]) if isinstance(sa[key], torch.Tensor) else sa[key] == sb[key]
        assert same, key
    if "cs.previous" in sa:
        assert float(sa["cs.previous"]) > 0 and sa["cs.count"] == 16


# ---------------------------------------------------------------- presets
def test_presets_hold_the_benchmarks_knobs_and_the_house_schedule():
    pgi = METHODS["fgsm-pgi"].build(make_model(), device="cpu")
    assert (pgi.policy.lam, pgi.policy.momentum_decay, pgi.policy.reset_every) == (10.0, 0.3, 40)
    pco = METHODS["fgsm-pco"].build(make_model(), device="cpu").policy
    assert (pco.lam, pco.beta, pco.factor) == (10.0, 1.5, 0.6)
    mep = METHODS["fgsm-mep-cs"].build(make_model(), device="cpu").policy
    rs = METHODS["fgsm-rs-cs"].build(make_model(), device="cpu").policy
    for cs in (mep, rs):
        assert (cs.factor, cs.gamma, cs.ratio, cs.stride, cs.w2, cs.decay_epochs) == (0.6, 0.03, 1.0, 1, 1.0,
                                                                                      (0, 100, 105, 110))
    assert (mep.momentum_decay, mep.reset_every) == (0.3, 40)
    assert (pgi.epochs, pgi.lr, pgi.weight_decay, pgi.pad_fill) == (30, 0.2, 5e-4, 0.0)
    assert FASTAT_CONFIG == {"label_smoothing": 0.4, "weight_average": 0.9995, "lr": 0.1}


# -------------------------------------------------------------- bad input
@pytest.mark.parametrize("make, error, match", [
    (lambda: FGSMPGIPolicy(8), ValueError, "eps"),
    (lambda: FGSMPGIPolicy(EPS, lam=-1.0), ValueError, "lam"),
    (lambda: FGSMPGIPolicy(EPS, momentum_decay=-0.1), ValueError, "momentum_decay"),
    (lambda: FGSMPGIPolicy(EPS, reset_every=-1), ValueError, "reset_every"),
    (lambda: FGSMPGIPolicy(EPS, store_dtype="int8"), ValueError, "store_dtype"),
    (lambda: FGSMPCOPolicy(EPS, factor=0.0), ValueError, "factor"),
    (lambda: FGSMPCOPolicy(EPS, factor=1.5), ValueError, "factor"),
    (lambda: FGSMPCOPolicy(EPS, beta="big"), TypeError, "beta"),
    (lambda: FGSMMEPCSPolicy(EPS, ratio=0.0), ValueError, "ratio"),
    (lambda: FGSMMEPCSPolicy(EPS, decay_epochs=(5, 3)), ValueError, "decay_epochs"),
    (lambda: FGSMRSCSPolicy(EPS, decay_epochs="0,100"), TypeError, "decay_epochs"),
    (lambda: FGSMRSCSPolicy(EPS, stride=1.5), TypeError, "stride"),
    (lambda: FGSMRSCSPolicy(EPS, w2=-1.0), ValueError, "w2"),
    (lambda: FGSMRSCSPolicy(EPS, gamma=float("nan")), ValueError, "gamma"),
])
def test_bad_input_is_refused_naming_the_argument(make, error, match):
    with pytest.raises(error, match=match):
        make()


def test_a_state_of_another_policy_is_refused():
    pgi, pco = ready(FGSMPGIPolicy(EPS), make_model()), ready(FGSMPCOPolicy(EPS), make_model())
    with pytest.raises(ValueError, match="missing keys"):
        pco.load_state_dict({})
    with pytest.raises(ValueError, match="unexpected keys"):
        ready(FGSMRSCSPolicy(EPS), make_model()).load_state_dict({**pgi.state_dict(), "cs": {}})
