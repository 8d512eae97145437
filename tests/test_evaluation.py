"""Tests of :func:`advtrain.evaluation.evaluate` (suites, per-example worst
case, sequential attacking, the report) and of the gradient-masking checks,
each on a model built to show its symptom and on a normal small model."""
from __future__ import annotations

import json
import warnings

import pytest
import torch
from torch import nn

from _helpers import trained_model

from advtrain.attacks.base import Attack
from advtrain.attacks.pgd import PGD
from advtrain.data import ArrayDataset
from advtrain.evaluation import (GradientMaskingWarning, MaskingWarning, attack_suite, check_gradient_masking,
                                 evaluate)

EPS = 8 / 255


# ----------------------------------------------------------------------------- helpers

class ThresholdModel(nn.Module):
    """Two classes: predicts 1 when pixel (0, 0, 1) exceeds 0.5."""

    def forward(self, x):
        s = 20 * (x[:, 0, 0, 1] - 0.5)
        return torch.stack([-s, s], dim=1)


class MarkerAttack(Attack):
    """Pushes pixel (0, 0, 1) up by eps on the examples whose marker pixel
    (0, 0, 0) is below 0.5 (``low=True``) or not (``low=False``)."""

    def __init__(self, eps, low):
        super().__init__(eps)
        self.low = low
        self.seen = []

    def perturb(self, model, x, y):
        self.seen.append(x.shape[0])
        chosen = (x[:, 0, 0, 0] < 0.5) == self.low
        delta = torch.zeros_like(x)
        delta[:, 0, 0, 1] = self.eps * chosen
        return (x + delta).clamp(0, 1)


def marker_data(n=8):
    x = torch.full((n, 1, 2, 2), 0.4)
    x[:, 0, 0, 0] = torch.tensor([0.25, 0.75] * (n // 2))
    return x, torch.zeros(n, dtype=torch.long)


# ----------------------------------------------------------------------------- evaluate

def test_worst_case_is_per_example_not_per_attack():
    model = ThresholdModel()
    data = marker_data()
    low, high = MarkerAttack(0.2, True), MarkerAttack(0.2, False)
    assert evaluate(model, data, [low], progress=False).robust_accuracy == 0.5
    assert evaluate(model, data, [high], progress=False).robust_accuracy == 0.5
    for sequential in (True, False):
        report = evaluate(model, data, {"low": low, "high": high}, progress=False, sequential=sequential)
        assert report.clean_accuracy == 1.0
        assert report.robust_accuracy == 0.0  # lower than under either attack alone
        assert report.per_attack["low"] == 0.5
        assert report.per_attack["high"] == (0.0 if sequential else 0.5)
        assert torch.equal(report.robust_correct, torch.zeros(8, dtype=torch.bool))
        assert torch.equal(report.per_attack_correct["low"], torch.tensor([False, True] * 4))


def test_sequential_attacks_only_examples_still_robust():
    model = ThresholdModel()
    x, y = marker_data(8)
    x[0, 0, 0, 1] = 0.9  # misclassified clean: never attacked
    first, second = MarkerAttack(0.2, True), MarkerAttack(0.2, False)
    report = evaluate(model, (x, y), [first, second], progress=False, batch_size=8)
    assert first.seen == [7] and second.seen == [4]
    assert report.clean_accuracy == 7 / 8 and report.robust_accuracy == 0.0
    assert list(report.per_attack) == ["MarkerAttack", "MarkerAttack-2"]
    first.seen.clear()
    second.seen.clear()
    evaluate(model, (x, y), [first, second], progress=False, batch_size=8, sequential=False)
    assert first.seen == [7] and second.seen == [7]


def test_suites():
    assert list(attack_suite("pgd20")) == ["PGD-20"]
    assert list(attack_suite("cw")) == ["CW-20"]
    assert list(attack_suite("autoattack")) == ["APGD-CE", "APGD-T"]
    full = attack_suite("full", eps=4 / 255)
    assert list(full) == ["PGD-20", "CW-20", "APGD-CE", "APGD-T"]
    pgd = full["PGD-20"]
    assert (pgd.steps, pgd.step_size, pgd.random_start, pgd.bn_mode) == (20, 1 / 255, True, "eval")
    assert full["CW-20"].loss == "margin"
    apgd_t = full["APGD-T"]
    assert (apgd_t.steps, apgd_t.loss, apgd_t.targeted, apgd_t.n_target_classes) == (100, "dlr", True, 9)
    with pytest.raises(ValueError, match="attacks must be one of"):
        attack_suite("pgd10")


def test_report_on_a_trained_model_and_batching_does_not_matter():
    model, (x, y) = trained_model()
    x, y = x[:40], y[:40]
    model.train()
    attack = PGD(EPS, steps=5, step_size=EPS / 4, random_start=False)  # deterministic
    one = evaluate(model, (x, y), [attack], batch_size=64, progress=False)
    many = evaluate(model, (x, y), [attack], batch_size=7, progress=False)
    assert model.training and all(m.training for m in model.modules())
    assert torch.equal(one.robust_correct, many.robust_correct)
    assert one.n_examples == 40
    assert 0.0 < one.robust_accuracy < one.clean_accuracy <= 1.0
    uint8 = (x * 255).round().to(torch.uint8)
    from_dataset = evaluate(model, ArrayDataset(uint8, y), [attack], progress=False, n_examples=30)
    from_uint8 = evaluate(model, (uint8, y), [attack], progress=False, n_examples=30)
    assert from_dataset.n_examples == 30
    assert torch.equal(from_dataset.robust_correct, from_uint8.robust_correct)
    summary = json.loads(json.dumps(one.to_dict()))
    assert summary["robust_accuracy"] == one.robust_accuracy and "PGD" in summary["per_attack"]
    text = str(one)
    assert "clean" in text and "PGD" in text and "worst case" in text and "40 examples" in text


def test_full_suite_runs_in_protocol_order_with_a_per_example_worst_case():
    model, (x, y) = trained_model()
    x, y = x[:8], y[:8]
    torch.manual_seed(0)
    # a large radius: PGD-20 breaks every example, so the later attacks have nothing left to attack
    report = evaluate(model, (x, y), "full", eps=0.25, progress=False)
    assert list(report.per_attack) == ["PGD-20", "CW-20", "APGD-CE", "APGD-T"]
    assert list(report.per_attack.values()) == [0.0] * 4 and report.robust_accuracy == 0.0
    assert report.clean_accuracy > 0.5 and report.eps == 0.25
    assert torch.equal(report.robust_correct, report.clean_correct & report.per_attack_correct["APGD-T"])


def test_evaluate_rejects_bad_input():
    model = ThresholdModel()
    x, y = marker_data()
    with pytest.raises(TypeError, match="Attack"):
        evaluate(model, (x, y), [lambda m, a, b: a], progress=False)
    with pytest.raises(ValueError, match="pixels in"):
        evaluate(model, (x * 3, y), "pgd20", progress=False)
    with pytest.raises(ValueError, match="logits"):
        evaluate(model, (x, y + 5), "pgd20", progress=False)
    with pytest.raises(ValueError, match="empty"):
        evaluate(model, (x, y), [], progress=False)


# ----------------------------------------------------------------------------- masking

class Quantized(nn.Module):
    """Rounds inputs to 8 levels before a linear classifier: zero input gradients."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, x):
        return self.inner(torch.round(x * 7) / 7)


class SoftmaxOutput(nn.Module):
    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, x):
        return self.inner(x).softmax(dim=1)


class Deceptive(nn.Module):
    """A two-class model around a fixed gray image (pixels 0.5) whose forward
    pass is piecewise constant and whose gradient comes from a surrogate
    (``forward(x).detach() + s(x) - s(x).detach()``), like a shattered-gradient
    defence. ``t = (x - 0.5) / eps`` is the perturbation in units of eps.

    ``kind="steps"``: misclassified when ``mean|t - 0.5|`` is in (0.08, 0.45);
    the surrogate pulls every t toward 0.5, where PGD oscillates with its step
    size: PGD-10 (step 0.25 eps) ends around 0.125 (fooled), PGD-50 (step 0.05
    eps) around 0.025 (not fooled). ``kind="noise"``: misclassified when
    ``mean|t| > 0.6`` (reached by some uniform draws on 4 pixels); the
    surrogate pulls t toward 0, so PGD never gets there.
    """

    def __init__(self, kind, eps=EPS):
        super().__init__()
        self.kind = kind
        self.eps = eps
        self.dummy = nn.Parameter(torch.zeros(()))

    def forward(self, x):
        t = ((x - 0.5) / self.eps).flatten(1)
        if self.kind == "steps":
            d = (t - 0.5).abs().mean(1)
            fooled = (d > 0.08) & (d < 0.45)
            surrogate = 0.5 * (t - 0.5).pow(2).sum(1)
        else:
            fooled = t.abs().mean(1) > 0.6
            surrogate = t.pow(2).sum(1)
        margin = torch.where(fooled, -2.0, 2.0) + self.dummy
        z = margin.detach() + surrogate - surrogate.detach()
        return torch.stack([z, -z], dim=1)


def checks(findings):
    return {f.check for f in findings}


def run_check(model, x, y, **kwargs):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        findings = check_gradient_masking(model, x, y, **kwargs)
    emitted = [w for w in caught if issubclass(w.category, GradientMaskingWarning)]
    assert len(emitted) == len(findings)
    assert all(isinstance(f, MaskingWarning) and f.message for f in findings)
    return findings


FAST = dict(steps=(3, 10), restarts=2, noise_samples=3, n_examples=48)


def test_normal_model_raises_no_masking_warning():
    model, (x, y) = trained_model()
    assert run_check(model, x, y, **FAST) == []


def test_zero_gradients_from_input_quantization():
    model, (x, y) = trained_model()
    findings = run_check(Quantized(model), x, y, **FAST)
    assert "zero_gradients" in checks(findings)
    finding = next(f for f in findings if f.check == "zero_gradients")
    assert finding.value == 1.0 and "quantization" in finding.message


def test_probability_outputs():
    model, (x, y) = trained_model()
    assert "probability_outputs" in checks(run_check(SoftmaxOutput(model), x, y, **FAST))


def test_more_steps_raising_accuracy():
    x = torch.full((16, 3, 8, 8), 0.5)
    y = torch.zeros(16, dtype=torch.long)
    findings = run_check(Deceptive("steps"), x, y, steps=(10, 50), restarts=2, noise_samples=2)
    assert "more_steps" in checks(findings)
    assert "noise_beats_attack" not in checks(findings)


def test_noise_beating_the_attack():
    x = torch.full((32, 1, 2, 2), 0.5)
    y = torch.zeros(32, dtype=torch.long)
    findings = run_check(Deceptive("noise"), x, y, steps=(5, 10), restarts=2, noise_samples=10)
    # (the clean image is also a stationary point of the surrogate: zero gradients there)
    assert checks(findings) == {"noise_beats_attack", "zero_gradients"}
    finding = next(f for f in findings if f.check == "noise_beats_attack")
    assert finding.value > 0.5


def test_masking_check_leaves_model_and_rng_alone():
    model, (x, y) = trained_model()
    model.train()
    state = torch.get_rng_state()
    run_check(model, x, y, **FAST)
    assert torch.equal(state, torch.get_rng_state())
    assert all(m.training for m in model.modules())
    assert all(p.grad is None for p in model.parameters())
    with pytest.raises(ValueError, match="steps"):
        check_gradient_masking(model, x, y, steps=(10, 10))
    with pytest.raises(ValueError, match="tolerance"):
        check_gradient_masking(model, x, y, tolerance=2.0)
