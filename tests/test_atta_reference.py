"""One ATTA-k training step through advtrain equals the authors' semantics.

The reference (Zheng et al., github.com/hzzheng93/ATTA) keeps the
adversarial *images* of the whole training set, padded to 40 × 40 with 0.5
grey (``cifar_dataloader.py``), starting from the padded clean images plus
0.001·N(0, 1) (``train_atta_cifar.py``). Per batch it cuts each example's
crop window and mirrors it (``adaptive_data_aug.atta_aug``), takes ``k`` signed
gradient steps on ``(1/B)·CrossEntropyLoss(log_softmax(f(x_adv)), y)`` with
the model in eval mode, clipping to the ε-box around the clean crop and to
[0, 1] after each step (``adv_attack.get_adv_atta``), trains on
``(1/B)·CrossEntropyLoss(log_softmax(f(x_adv)), y)`` in train mode with SGD,
and pastes the un-mirrored result back (``inverse_atta_aug``).

The reference step is re-implemented below in float64 with plain loops over
the batch and compared with advtrain's, within 1e-9 relative, for k = 1 and
3: the adversarial batch, the store after the write-back, the weights and
the BatchNorm statistics. What the comparison pins down beyond "the same":

* loss scale: ``nn.CrossEntropyLoss()`` averages over the batch, so the
  reference's extra ``1/B`` makes its loss the mean cross-entropy divided by
  B. advtrain trains on the mean cross-entropy. With SGD (momentum, weight
  decay added to the gradient) the reference at learning rate ``lr`` and
  weight decay ``wd`` is exactly advtrain at ``lr / B`` and ``wd · B``.
* radii: advtrain holds ε and the step size as float32 numbers, so the
  reference's 0.031 and 0.015 / 0.01 enter as their float32 roundings
  (with the float64 values the results differ by about 1e-8 relative).
* start: advtrain projects the stored perturbation into the ε-ball and
  [0, 1] before the first step; the reference takes the first gradient at
  the stored image as it is, which after an initialization lies a few
  thousandths outside [0, 1] wherever the noise pushes a clean 0 or 1 out.
  The images here have such pixels; without the projection the adversarial
  batch differs by about 1e-4 relative.
* the store is float32 (advtrain's default): it holds the reference's stored
  perturbation (stored image minus padded clean image) rounded to float32.
"""
from __future__ import annotations

import copy
from typing import List, Tuple

import pytest
import torch
import torch.nn.functional as F

from advtrain.data import Augmentation, Batch
from advtrain.data.augment import apply_augmentation
from advtrain.models import SmallCNN
from advtrain.policies import ATTAPolicy, PolicyContext
from advtrain.training import Trainer

EPS = 0.031  # the reference configs' epsilon
STEP_SIZES = {1: 0.015, 3: 0.01}  # data-config/cifar-atta-{1,3}-mat.json
LR, MOMENTUM, WD = 0.1, 0.9, 2e-4  # train_atta_cifar.py defaults
PAD, GREY = 4, 0.5
SIZE = 16  # image side (the reference's is 32; the padding is the same)
NUM_EXAMPLES = 6
INDEX = [4, 0, 5, 2]
# (top, left, flip) per batch example: corners and a centre, so windows reach into every border
CROPS: List[Tuple[int, int, bool]] = [(0, 8, False), (8, 0, True), (4, 4, False), (1, 7, True)]


def float32(value: float) -> float:
    return float(torch.tensor(value, dtype=torch.float32))


def relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got.double() - want.double()).norm() / want.double().norm())


def dataset() -> Tuple[torch.Tensor, torch.Tensor]:
    """Float64 images of exact 8-bit levels, with saturated (0 and 255) pixels."""
    g = torch.Generator().manual_seed(0)
    levels = torch.randint(0, 256, (NUM_EXAMPLES, 3, SIZE, SIZE), generator=g)
    levels[:, :, :3, :3] = 0
    levels[:, :, -3:, -3:] = 255
    labels = torch.randint(0, 10, (NUM_EXAMPLES,), generator=g)
    return levels.double() / 255, labels


def padded(images: torch.Tensor) -> torch.Tensor:
    """cifar_dataloader.load_pading_training_data: pad, then set the border to 0.5."""
    out = torch.full((images.shape[0], 3, SIZE + 2 * PAD, SIZE + 2 * PAD), GREY, dtype=images.dtype)
    out[:, :, PAD:PAD + SIZE, PAD:PAD + SIZE] = images
    return out


def warmed_model() -> SmallCNN:
    """SmallCNN in float64 with BatchNorm running statistics away from (0, 1),
    so that the eval-mode attack and the train-mode step differ."""
    torch.manual_seed(1)
    model = SmallCNN(width=4).double().train()
    with torch.no_grad():
        for _ in range(3):
            model(torch.rand(8, 3, SIZE, SIZE, dtype=torch.float64) * 0.6 + 0.2)
    return model


# ------------------------------------------------------------------ the reference, re-implemented
def reference_window(store: torch.Tensor, top: int, left: int, flip: bool) -> torch.Tensor:
    """atta_aug / atta_aug_trans for one example: the window, then the mirror."""
    window = store[:, top:top + SIZE, left:left + SIZE]
    return window.flip(-1) if flip else window


def reference_step(model, optimizer, x_nat_pad, x_store, y, k: int, step: float, eps: float):
    """One batch of train_atta_cifar.train (training method "mat"); updates
    ``x_store`` in place and returns the adversarial batch and the loss."""
    batch = len(INDEX)
    x_batch = torch.stack([reference_window(x_store[i], *c) for i, c in zip(INDEX, CROPS)])
    x_nat = torch.stack([reference_window(x_nat_pad[i], *c) for i, c in zip(INDEX, CROPS)])
    y_batch = y[INDEX]

    # advtrain's deliberate difference: the start is projected first (a no-op
    # except where the initial noise left [0, 1])
    x_adv = torch.min(torch.max(x_batch, x_nat - eps), x_nat + eps).clamp(0.0, 1.0)
    model.eval()  # adv_attack.get_adv_atta
    for _ in range(k):
        x_adv = x_adv.detach().requires_grad_()
        loss = (1.0 / batch) * F.cross_entropy(F.log_softmax(model(x_adv), dim=1), y_batch)
        (grad,) = torch.autograd.grad(loss, [x_adv])
        x_adv = x_adv.detach() + step * torch.sign(grad)
        x_adv = torch.min(torch.max(x_adv, x_nat - eps), x_nat + eps)
        x_adv = torch.clamp(x_adv, 0.0, 1.0)

    model.train()
    optimizer.zero_grad()
    loss = (1.0 / batch) * F.cross_entropy(F.log_softmax(model(x_adv), dim=1), y_batch)
    loss.backward()
    optimizer.step()

    for j, (i, (top, left, flip)) in enumerate(zip(INDEX, CROPS)):  # inverse_atta_aug
        x_store[i, :, top:top + SIZE, left:left + SIZE] = x_adv[j].flip(-1) if flip else x_adv[j]
    return x_adv, loss.detach()


# ------------------------------------------------------------------ advtrain
class RecordingATTA(ATTAPolicy):
    """ATTAPolicy that keeps the last batch it trained on, for the comparison."""

    def perturb(self, model, batch):
        self.last = super().perturb(model, batch)
        return self.last


def make_trainer(model, k: int, lr: float, weight_decay: float) -> Trainer:
    policy = RecordingATTA(EPS, steps=k, step_size=STEP_SIZES[k])
    trainer = Trainer(model, policy, lr=lr, momentum=MOMENTUM, weight_decay=weight_decay, schedule="constant",
                      precision="fp32", channels_last=False, device="cpu", eval_every=0, progress=False)
    context = PolicyContext(num_examples=NUM_EXAMPLES, image_shape=(3, SIZE, SIZE), padding=PAD, epochs=1,
                            steps_per_epoch=1, device=torch.device("cpu"))
    policy.setup(trainer.model, context)
    policy.start_epoch(0)  # the reference resets before 1-based epochs 10, 20, ...: not before the first
    return trainer


def advtrain_batch(images: torch.Tensor, labels: torch.Tensor) -> Batch:
    aug = Augmentation(torch.tensor([c[0] for c in CROPS]), torch.tensor([c[1] for c in CROPS]),
                       torch.tensor([c[2] for c in CROPS]), PAD)
    index = torch.tensor(INDEX)
    return Batch(apply_augmentation(images[index], aug, fill=GREY), labels[index], index, aug)


def advtrain_step(trainer: Trainer, batch: Batch):
    """One Trainer.train_step; returns the batch it trained on and the loss."""
    loss, _ = trainer.train_step(batch)
    return trainer.policy.last.x, loss


# ------------------------------------------------------------------ tests
@pytest.mark.parametrize("k", [1, 3])
def test_atta_step_equals_the_reference_in_float64(k):
    images, labels = dataset()
    model = warmed_model()
    batch_size = len(INDEX)
    torch.manual_seed(2)
    trainer = make_trainer(copy.deepcopy(model), k, lr=LR / batch_size, weight_decay=WD * batch_size)
    delta0 = trainer.policy.store.data.clone()
    batch = advtrain_batch(images, labels)

    x_nat_pad = padded(images)
    # the reference crops the same windows out of the grey-padded images
    assert torch.equal(batch.x, torch.stack([reference_window(x_nat_pad[i], *c) for i, c in zip(INDEX, CROPS)]))
    x_store = x_nat_pad + delta0.double()  # the reference's initial store, with advtrain's draw
    ref_model = copy.deepcopy(model)
    optimizer = torch.optim.SGD(ref_model.parameters(), lr=LR, momentum=MOMENTUM, weight_decay=WD)
    ref_x, ref_loss = reference_step(ref_model, optimizer, x_nat_pad, x_store, labels, k,
                                     float32(STEP_SIZES[k]), float32(EPS))

    x_adv, loss = advtrain_step(trainer, batch)
    assert x_adv.dtype == torch.float64
    assert relative_error(x_adv, ref_x) <= 1e-9
    assert float((x_adv - batch.x).abs().max()) > 0.5 * EPS  # the attack moved the images
    # advtrain's mean cross-entropy is B times the reference's loss
    assert float(loss) == pytest.approx(batch_size * float(ref_loss), rel=1e-12)
    store = trainer.policy.store.data
    assert relative_error(store, (x_store - x_nat_pad).float()) <= 1e-9
    untouched = torch.ones(NUM_EXAMPLES, dtype=torch.bool)
    untouched[INDEX] = False
    assert torch.equal(store[untouched], delta0[untouched])
    got, want = trainer.model.state_dict(), ref_model.state_dict()
    assert got.keys() == want.keys()
    for name, value in want.items():
        if value.is_floating_point():
            assert relative_error(got[name], value) <= 1e-9, name
        else:
            assert torch.equal(got[name], value), name  # num_batches_tracked
    assert any(not torch.equal(value, model.state_dict()[name]) for name, value in want.items()
               if name.endswith("running_mean"))

    # the loss scale matters: advtrain at the reference's own lr and wd is another step
    torch.manual_seed(2)
    unscaled = make_trainer(copy.deepcopy(model), k, lr=LR, weight_decay=WD)
    advtrain_step(unscaled, batch)
    assert max(relative_error(unscaled.model.state_dict()[name], value) for name, value in want.items()
               if name.endswith("weight")) > 1e-3
