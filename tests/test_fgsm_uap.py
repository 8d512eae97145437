"""FGSM-UAP, FGSM-CUAP and FGSM-FUAP on the method contract.

The start is the example's UAP (the class's for CUAP, the head's pick from a
random start for FUAP) projected onto the ε-ball and [0, 1], and the FGSM
step is taken from it; the bank update is the momentum sign step written out
by hand from the start gradient G — the attack's gradient plus the
consistency term's, which is what the reference's update reads, its
``adv_images.grad`` being accumulated into by the loss's backward — with a
loop over the batch's classes for CUAP, as the reference has it; the loss is
CE + λ·MSE of the two forwards' logits with gradients through both; the head
is one Adam step on its cross-entropy; two SGD steps equal the reference's
step re-implemented with plain statements (weights, BatchNorm statistics,
bank); resume equals an uninterrupted run; bad input is refused. Tiny
models, CPU.
"""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from _helpers import NoHostSync
from advtrain.data import Batch
from advtrain.methods import METHODS
from advtrain.methods._universal import FASTAT_CONFIG, project
from advtrain.methods.fgsm_cuap import FGSMCUAPPolicy, FGSMCUAPTrainer
from advtrain.methods.fgsm_fuap import FGSMFUAPPolicy, FGSMFUAPTrainer
from advtrain.methods.fgsm_uap import FGSMUAPPolicy, FGSMUAPTrainer
from advtrain.policies import LossContext, PolicyContext
from advtrain.training import LambdaCallback

EPS = 8 / 255
UE = 10 / 255
UE32 = float(torch.tensor(UE))  # the bank's float32 value of 10/255
SHAPE = (3, 8, 8)


class TinyNet(nn.Module):
    """conv → BatchNorm → tanh → linear classifier ``fc`` for 8×8 images."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.fc = nn.Linear(4 * 8 * 8, 10)

    def features(self, x):
        return torch.tanh(self.bn(self.conv(x))).flatten(1)

    def forward(self, x):
        return self.fc(self.features(x))


def make_model(seed: int = 0) -> TinyNet:
    torch.manual_seed(seed)
    return TinyNet()


def make_batch(n: int = 6, seed: int = 0, y=None) -> Batch:
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, *SHAPE, generator=g)
    y = torch.randint(0, 10, (n,), generator=g) if y is None else torch.tensor(y)
    return Batch(x, y, torch.arange(n), None)


def context(n: int = 6) -> PolicyContext:
    return PolicyContext(num_examples=n, image_shape=SHAPE, padding=0, epochs=1, steps_per_epoch=1,
                         device=torch.device("cpu"))


def ready(policy, model, seed: int = 1):
    torch.manual_seed(seed)
    policy.setup(model, context())
    return policy


def train_forward(model):
    def forward(x, sites=None):
        model.train()
        return model(x)
    return forward


def input_grad(model, x0, y):
    leaf = x0.clone().requires_grad_(True)
    model.train()
    return torch.autograd.grad(F.cross_entropy(model(leaf), y), leaf)[0]


def start_gradient(model, start, x_adv, y, lam=10.0):
    """The gradient the reference's update reads (its ``adv_images.grad``
    after both backward passes), written out: ``∇_{x₀}`` of
    ``CE(f(x₀), y) + λ·MSE(f(x_adv), f(x₀))`` with ``x_adv`` held fixed."""
    twin = copy.deepcopy(model).train()
    x0 = start.detach().clone().requires_grad_(True)
    z0, z_adv = twin(x0), twin(x_adv)
    return torch.autograd.grad(F.cross_entropy(z0, y) + lam * ((z_adv - z0) ** 2).mean(), x0)[0]


def step(policy, model, batch, label_smoothing=0.0):
    """perturb, loss, its backward and after_step, without a model update."""
    pert = policy.perturb(model, batch)
    policy.loss(LossContext(train_forward(model), label_smoothing), batch, pert).loss.backward()
    policy.after_step(model, batch, pert)
    return pert


def bank_step(u, m, grads_by_entry, total_l1):
    """The reference update of one bank entry: momentum of the mean of the
    batch-normalized gradients of its examples, then the signed UAP step."""
    m = (grads_by_entry / total_l1).mean(dim=0) + 0.3 * m
    return torch.clamp(u + UE * torch.sign(m), -UE, UE), m


# ------------------------------------------------------------ start and step
def test_uap_start_is_the_projected_uap_and_the_update_is_the_momentum_sign_step():
    model, batch = make_model(), make_batch()
    policy = ready(FGSMUAPPolicy(), model)
    assert policy.uaps.shape == (1, *SHAPE) and set(policy.uaps.abs().unique().tolist()) == {UE32}
    assert torch.equal(policy.momentum_buffer, torch.zeros(1, *SHAPE))
    u, m = policy.uaps.clone(), policy.momentum_buffer.clone()
    for _ in range(2):
        twin = copy.deepcopy(model)
        pert = step(policy, model, batch)
        start = pert.extras["start"].detach()
        # the start: x + u clipped to the ε-ball (u is ±10/255, beyond ε) and to [0, 1]
        assert torch.equal(start, torch.clamp(batch.x + torch.clamp((batch.x + u) - batch.x, -EPS, EPS), 0, 1))
        assert (start - batch.x).abs().max() <= EPS + 1e-7 and 0 <= start.min() and start.max() <= 1
        assert (start - batch.x).abs().max() > 0.99 * EPS  # the UAP reached the rim: it did start the step
        g = input_grad(twin, start, batch.y)  # the FGSM step's: the cross-entropy's alone
        assert torch.equal(pert.x, project(batch.x, start + EPS * g.sign(), EPS))
        assert (pert.x - batch.x).abs().max() <= EPS + 1e-7 and 0 <= pert.x.min() and pert.x.max() <= 1
        G = start_gradient(twin, start, pert.x, batch.y)  # the update's: with the consistency term's share
        attack_only = bank_step(u[0], m[0], g, g.abs().sum())[1]
        assert not torch.allclose(attack_only, bank_step(u[0], m[0], G, G.abs().sum())[1])
        u, m = bank_step(u[0], m[0], G, G.abs().sum())
        u, m = u[None], m[None]
        assert torch.allclose(policy.momentum_buffer, m, rtol=1e-5, atol=1e-9)
        assert torch.equal(policy.uaps, u)
        assert set(policy.uaps.unique().tolist()) <= {-UE32, 0.0, UE32}
    assert not torch.equal(policy.uaps, u.new_full(u.shape, UE))


def test_cuap_starts_from_the_class_uap_and_updates_only_the_batch_classes():
    model = make_model(2)
    batch = make_batch(6, seed=3, y=[1, 1, 3, 7, 3, 3])
    policy = ready(FGSMCUAPPolicy(), model)
    assert policy.uaps.shape == (10, *SHAPE)  # one per logit of the model
    u0, m0 = policy.uaps.clone(), torch.randn(10, *SHAPE) * 1e-3
    policy.momentum_buffer.copy_(m0)
    twin = copy.deepcopy(model)
    pert = step(policy, model, batch)
    start = pert.extras["start"].detach()
    assert torch.equal(start, project(batch.x, batch.x + u0[batch.y], EPS))
    g = start_gradient(twin, start, pert.x, batch.y)
    total = g.abs().sum()
    for c in range(10):  # the reference's loop over set(labels)
        rows = batch.y == c
        if rows.any():
            u, m = bank_step(u0[c], m0[c], g[rows], total)
            assert torch.equal(policy.uaps[c], u), c
            assert torch.allclose(policy.momentum_buffer[c], m, rtol=1e-5, atol=1e-9), c
        else:  # absent classes keep UAP and momentum
            assert torch.equal(policy.uaps[c], u0[c]) and torch.equal(policy.momentum_buffer[c], m0[c]), c
    assert not torch.equal(policy.uaps[3], u0[3])


def test_fuap_picks_the_head_argmax_from_the_random_start_and_steps_the_head_with_adam():
    model = make_model(4)
    batch = make_batch(8, seed=5)
    policy = ready(FGSMFUAPPolicy(uap_num=5), model)
    assert policy.uaps.shape == (5, *SHAPE) and policy.selector.scores.in_features == 4 * 8 * 8
    head, bank = copy.deepcopy(policy.selector), policy.uaps.clone()
    initial = policy.selector.scores.weight.detach().clone()
    twin = copy.deepcopy(model)
    state = torch.get_rng_state()
    pert = policy.perturb(model, batch)
    torch.set_rng_state(state)
    base = torch.clamp(batch.x + torch.empty_like(batch.x).uniform_(-EPS, EPS), 0, 1)
    twin.train()
    with torch.no_grad():
        h = twin.features(base)
    scores, logits = head(h)
    k = scores.argmax(dim=1)
    assert torch.equal(pert.extras["groups"], k)
    assert torch.equal(pert.extras["start"], project(batch.x, base + bank[k], EPS))
    # the training loss (with label smoothing) also gives the head its gradient; Adam steps it after the model
    policy.loss(LossContext(train_forward(model), label_smoothing=0.4), batch, pert)
    policy.after_step(model, batch, pert)
    adam = torch.optim.Adam(head.parameters(), lr=1e-3)
    F.cross_entropy(logits, batch.y, label_smoothing=0.4).backward()
    adam.step()
    for mine, theirs in zip(policy.selector.parameters(), head.parameters()):
        assert torch.allclose(mine, theirs, rtol=0, atol=1e-7)
    assert not torch.equal(policy.selector.scores.weight, initial)
    assert all(p.grad is None for p in policy.parameters())


def test_loss_is_cross_entropy_plus_lambda_mse_with_gradients_through_both_forwards():
    model, batch = make_model(6), make_batch(5, seed=7)
    policy = ready(FGSMUAPPolicy(lam=2.5), model)
    pert = policy.perturb(model, batch)
    twin = copy.deepcopy(model)
    out = policy.loss(LossContext(train_forward(model), label_smoothing=0.1), batch, pert)
    out.loss.backward()
    start_logits, logits = twin(pert.extras["start"]), twin(pert.x)
    by_hand = (F.cross_entropy(logits, batch.y, label_smoothing=0.1)
               + 2.5 * ((logits - start_logits) ** 2).mean())
    assert torch.allclose(out.loss, by_hand, rtol=1e-6) and torch.equal(out.logits, logits)
    by_hand.backward()
    for mine, theirs in zip(model.parameters(), twin.parameters()):
        assert torch.allclose(mine.grad, theirs.grad, rtol=1e-5, atol=1e-7)
    # the start's forward is trained too: held fixed, the weight gradient differs
    held = copy.deepcopy(twin)
    held.zero_grad()
    logits = held(pert.x)
    (F.cross_entropy(logits, batch.y, label_smoothing=0.1)
     + 2.5 * ((logits - held(pert.extras["start"]).detach()) ** 2).mean()).backward()
    assert not torch.allclose(held.conv.weight.grad, model.conv.weight.grad, rtol=1e-3)


def test_a_step_makes_no_host_sync_and_a_zero_gradient_only_decays_the_momentum():
    for policy in (FGSMUAPPolicy(), FGSMCUAPPolicy(), FGSMFUAPPolicy(uap_num=4)):
        model, batch = make_model(8), make_batch(6, seed=9)
        ready(policy, model)
        with NoHostSync():  # the bank update too; FUAP's Adam step reads its CPU step counter
            pert = policy.perturb(model, batch)
            policy.loss(LossContext(train_forward(model)), batch, pert)
            policy.update(pert.extras["grad"], pert.extras["groups"])
        used = torch.zeros(policy.uaps.shape[0], dtype=torch.bool)
        used[pert.extras["groups"]] = True
        before = policy.momentum_buffer.clone()
        policy.update(torch.zeros(6, *SHAPE), pert.extras["groups"])  # no 0/0: the reference's would be NaN
        assert torch.equal(policy.momentum_buffer[used], 0.3 * before[used])
        assert torch.equal(policy.momentum_buffer[~used], before[~used])


def _reference_steps(kind, model, bank, head, batches, seed):
    """The FastAT Benchmark's step for ``kind``, one plain statement per
    operation and a loop over the bank entries a batch used: SGD at 0.1 on
    ``CE(f(x_adv)) + 10·MSE(f(x_adv), f(x₀))`` with one forward at ``x₀`` for
    both the attack and the loss (BatchNorm in train mode throughout), then
    the momentum sign step of each entry from the start gradient G."""
    sgd = torch.optim.SGD(model.parameters(), lr=0.1)
    adam = torch.optim.Adam(head.parameters(), lr=1e-3) if head is not None else None
    momentum = torch.zeros_like(bank)
    torch.manual_seed(seed)
    model.train()
    for b in batches:
        x, y = b.x, b.y
        base = x
        if kind == "fgsm-fuap":
            base = torch.clamp(x + torch.empty_like(x).uniform_(-EPS, EPS), 0, 1)
            with torch.no_grad():
                h = model.features(base)
            scores, logits = head(h)
            entries = scores.argmax(dim=1)
            adam.zero_grad()
            F.cross_entropy(logits, y).backward()
            adam.step()
        else:
            entries = y if kind == "fgsm-cuap" else torch.zeros_like(y)
        x0 = torch.clamp(x + torch.clamp(base + bank[entries] - x, -EPS, EPS), 0, 1).requires_grad_(True)
        z0 = model(x0)
        g = torch.autograd.grad(F.cross_entropy(z0, y), x0, retain_graph=True)[0]
        x_adv = torch.clamp(x + torch.clamp(x0.detach() + EPS * g.sign() - x, -EPS, EPS), 0, 1)
        z_adv = model(x_adv)
        G = start_gradient(model, x0, x_adv, y)
        sgd.zero_grad()
        (F.cross_entropy(z_adv, y) + 10 * ((z_adv - z0) ** 2).mean()).backward()
        sgd.step()
        for k in entries.unique():
            bank[k], momentum[k] = bank_step(bank[k], momentum[k], G[entries == k], G.abs().sum())
    return bank


@pytest.mark.parametrize("name", ["fgsm-uap", "fgsm-cuap", "fgsm-fuap"])
def test_two_training_steps_equal_the_reference_step(name):
    kw = {"uap_num": 6} if name == "fgsm-fuap" else {}
    policy = METHODS[name].build(make_model(), device="cpu", **kw).policy
    model, batches = make_model(3), [make_batch(16, seed=s) for s in (11, 12)]
    theirs = copy.deepcopy(model)
    ready(policy, model)
    bank = policy.uaps.clone()
    head = copy.deepcopy(policy.selector) if name == "fgsm-fuap" else None
    sgd = torch.optim.SGD(model.parameters(), lr=0.1)
    torch.manual_seed(4)
    for b in batches:
        sgd.zero_grad()
        pert = policy.perturb(model, b)
        policy.loss(LossContext(train_forward(model)), b, pert).loss.backward()
        sgd.step()
        policy.after_step(model, b, pert)
    bank = _reference_steps(name, theirs, bank, head, batches, seed=4)
    for mine, ref in zip(list(model.parameters()) + list(model.buffers()),
                         list(theirs.parameters()) + list(theirs.buffers())):
        assert torch.allclose(mine, ref, rtol=1e-5, atol=1e-7)
    assert torch.equal(policy.uaps, bank)
    assert not torch.equal(policy.uaps, ready(type(policy)(**kw), make_model(3)).uaps)  # the bank moved


# ------------------------------------------------------------------- resume
@pytest.mark.parametrize("name", ["fgsm-uap", "fgsm-cuap", "fgsm-fuap"])
def test_resume_equals_an_uninterrupted_run(tmp_path, name):
    g = torch.Generator().manual_seed(3)
    data = (torch.randint(0, 256, (16, *SHAPE), generator=g, dtype=torch.uint8),
            torch.randint(0, 10, (16,), generator=g))
    kw = dict(epochs=2, batch_size=8, lr=0.05, device="cpu", eval_every=0, progress=False, seed=0)
    if name == "fgsm-fuap":
        kw["uap_num"] = 4
    method = METHODS[name]
    full = method.build(make_model(1), run_dir=tmp_path / "full", **kw)
    full.fit(data)
    stop = LambdaCallback(on_epoch_end=lambda tr, epoch, rec: setattr(tr, "stop_training", epoch == 0))
    first = method.build(make_model(1), run_dir=tmp_path / "split", callbacks=[stop], **kw)
    first.fit(data)
    moved = first.policy.uaps.clone()
    resumed = method.build(make_model(5), run_dir=tmp_path / "split", **kw)
    resumed.fit(data, resume=True)
    assert resumed.global_step == full.global_step == 4
    a, b = full.model.state_dict(), resumed.model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    sa, sb = full.policy.state_dict(), resumed.policy.state_dict()
    assert torch.equal(sa["uaps"], sb["uaps"]) and torch.equal(sa["momentum"], sb["momentum"])
    assert not torch.equal(moved, full.policy.uaps)  # the bank moved after the interruption
    if name == "fgsm-fuap":
        assert all(torch.equal(sa["selector"][k], sb["selector"][k]) for k in sa["selector"])
        opt_a, opt_b = sa["selector_optimizer"]["state"], sb["selector_optimizer"]["state"]
        assert all(torch.equal(opt_a[i]["exp_avg_sq"], opt_b[i]["exp_avg_sq"]) for i in opt_a)


# ---------------------------------------------------------------- bad input
def test_bad_input_is_refused_naming_the_argument():
    with pytest.raises(ValueError, match="eps"):
        FGSMUAPPolicy(8)
    with pytest.raises(ValueError, match="uap_eps"):
        FGSMCUAPPolicy(uap_eps=10)
    with pytest.raises(ValueError, match="lam"):
        FGSMUAPPolicy(lam=-1.0)
    with pytest.raises(TypeError, match="lam"):
        FGSMUAPPolicy(lam="10")
    with pytest.raises(ValueError, match="momentum_decay"):
        FGSMCUAPPolicy(momentum_decay=1.5)
    with pytest.raises(ValueError, match="uap_num"):
        FGSMFUAPPolicy(uap_num=0)
    with pytest.raises(TypeError, match="uap_num"):
        FGSMFUAPPolicy(uap_num=2.0)
    with pytest.raises(ValueError, match="feature_lr"):
        FGSMFUAPPolicy(feature_lr=-1e-3)
    with pytest.raises(TypeError, match="feature_module"):
        FGSMFUAPPolicy(feature_module=3)
    with pytest.raises(ValueError, match="feature_module 'head'"):
        FGSMFUAPPolicy(feature_module="head").setup(make_model(), context())
    with pytest.raises(ValueError, match="feature_module"):  # no classifier to read features from
        FGSMFUAPPolicy().setup(nn.Sequential(nn.Conv2d(3, 10, 8), nn.Flatten()), context())
    with pytest.raises(ValueError, match="eps"):
        FGSMFUAPTrainer(make_model(), eps=8, device="cpu")
    cuap = ready(FGSMCUAPPolicy(), make_model())
    with pytest.raises(ValueError, match="FGSMCUAPPolicy"):
        cuap.load_state_dict({"uaps": cuap.uaps})
    small = ready(FGSMCUAPPolicy(), nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 5)))
    with pytest.raises(ValueError, match="uaps"):  # a 10-class bank into a 5-class run
        small.load_state_dict(cuap.state_dict())


def test_presets_hold_the_benchmarks_method_settings():
    for trainer in (FGSMUAPTrainer, FGSMCUAPTrainer, FGSMFUAPTrainer):
        t = trainer(make_model(), device="cpu")
        p = t.policy
        assert (p.eps, p.uap_eps, p.lam, p.momentum_decay) == (EPS, UE, 10.0, 0.3)
        assert (t.epochs, t.lr, t.weight_decay) == (30, 0.2, 5e-4)
    assert (FGSMFUAPTrainer(make_model(), device="cpu").policy.uap_num, FGSMFUAPPolicy().feature_lr) == (50, 1e-3)
    assert FASTAT_CONFIG == {"label_smoothing": 0.4, "weight_average": 0.9995, "lr": 0.1}
