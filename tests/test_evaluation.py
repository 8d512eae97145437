"""Tests of :func:`advtrain.evaluation.evaluate` (suites, per-example worst
case, sequential attacking, the report; the guard rails: the model comes back
unchanged, every adversarial batch is checked against the threat model, the
cheap masking checks run by default for the AutoAttack suites and in
``advtrain eval``) and of the gradient-masking checks, each on a model built
to show its symptom and on a normal small model."""
from __future__ import annotations

import copy
import json
import warnings

import pytest
import torch
from torch import nn

from _helpers import trained_model
from _tiny_cifar import write_tiny_cifar10

from advtrain import cli
from advtrain.attacks.apgd import APGD
from advtrain.attacks.base import Attack
from advtrain.attacks.pgd import NFGSM, PGD
from advtrain.data import ArrayDataset
from advtrain.evaluation import (CHEAP_CHECKS, GradientMaskingWarning, MaskingWarning, ThreatModelError, attack_suite,
                                 check_gradient_masking, evaluate)
from advtrain.models import PreActResNet18
from advtrain.training import Trainer

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
    assert evaluate(model, data, [low], eps=0.2, progress=False).robust_accuracy == 0.5
    assert evaluate(model, data, [high], eps=0.2, progress=False).robust_accuracy == 0.5
    for sequential in (True, False):
        report = evaluate(model, data, {"low": low, "high": high}, eps=0.2, progress=False, sequential=sequential)
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
    report = evaluate(model, (x, y), [first, second], eps=0.2, progress=False, batch_size=8)
    assert first.seen == [7] and second.seen == [4]
    assert report.clean_accuracy == 7 / 8 and report.robust_accuracy == 0.0
    assert list(report.per_attack) == ["MarkerAttack", "MarkerAttack-2"]
    first.seen.clear()
    second.seen.clear()
    evaluate(model, (x, y), [first, second], eps=0.2, progress=False, batch_size=8, sequential=False)
    assert first.seen == [7] and second.seen == [7]


def test_suites():
    assert list(attack_suite("pgd20")) == ["PGD-20"]
    assert list(attack_suite("cw")) == ["CW-20"]
    assert list(attack_suite("autoattack")) == ["APGD-CE", "APGD-T"]
    full = attack_suite("full", eps=4 / 255)
    assert list(full) == ["PGD-20", "CW-20", "APGD-CE", "APGD-T", "FAB-T", "Square"]
    assert list(attack_suite("standard")) == ["APGD-CE", "APGD-T", "FAB-T", "Square"]
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
    assert list(report.per_attack) == ["PGD-20", "CW-20", "APGD-CE", "APGD-T", "FAB-T", "Square"]
    assert list(report.per_attack.values()) == [0.0] * 6 and report.robust_accuracy == 0.0
    assert report.clean_accuracy > 0.5 and report.eps == 0.25
    assert torch.equal(report.robust_correct, report.clean_correct & report.per_attack_correct["Square"])


# ----------------------------------------------------------------------------- evaluate: the model

class WritesTheModel(Attack):
    """Returns its input unchanged after overwriting every parameter (in
    place, and through ``.data``, which no version counter sees) and every
    floating buffer of the model: what no attack may do."""

    def perturb(self, model, x, y):
        with torch.no_grad():
            for param in model.parameters():
                param.zero_()
                param.data.add_(0.5)
            for buffer in model.buffers():
                if buffer.is_floating_point():
                    buffer.fill_(3.0)
        return x.clone()


def state_of(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def same_state(model, before):
    return all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_evaluate_leaves_every_parameter_and_buffer_as_it_found_them():
    model, (x, y) = trained_model()
    x, y = x[:16], y[:16]
    before = state_of(model)
    train_mode = PGD(EPS, steps=2, step_size=EPS / 2, bn_mode="train")
    probe = copy.deepcopy(model)
    train_mode(probe, x, y)
    assert not same_state(probe, before)  # on its own the attack moves the BatchNorm statistics
    report = evaluate(model, (x, y), {"PGD-train": train_mode, "writer": WritesTheModel(EPS)}, progress=False,
                      sequential=False, masking_checks=True)
    assert same_state(model, before)
    # the writer's x_adv is x: judged by the model as given, it fools nothing
    assert torch.equal(report.per_attack_correct["writer"], report.clean_correct)
    assert report.clean_accuracy > 0.5


# ----------------------------------------------------------------------------- evaluate: the threat model

class Shift(Attack):
    """Adds ``amount`` to every pixel, clamped to [0, 1] unless ``clamp=False``."""

    def __init__(self, eps, amount, clamp=True):
        super().__init__(eps)
        self.amount, self.clamp = amount, clamp

    def perturb(self, model, x, y):
        out = x + self.amount
        return out.clamp(0, 1) if self.clamp else out


def test_attacks_that_leave_the_eps_ball_are_refused():
    model, (x, y) = trained_model()
    x, y = x[:8], y[:8]
    # N-FGSM's output lies up to 3·eps (noise 2·eps, then a step of eps) from x; PGD at 16/255 up to 16/255
    for name, attack in (("NFGSM", NFGSM(EPS)), ("PGD", PGD(16 / 255, steps=3))):
        with pytest.raises(ThreatModelError, match=f"attack '{name}' moved an example by .* in L∞"):
            evaluate(model, (x, y), [attack], progress=False, sequential=False)
    assert issubclass(ThreatModelError, ValueError)
    # the same attacks inside a declared radius that holds them are counted
    evaluate(model, (x, y), [NFGSM(EPS), PGD(16 / 255, steps=3)], eps=24 / 255, progress=False)


def test_threat_model_check_allows_float_rounding_and_nothing_more():
    model = ThresholdModel()
    x = torch.rand(64, 1, 4, 4, generator=torch.Generator().manual_seed(0))
    y = model(x).argmax(1)
    on_the_sphere = Shift(EPS, EPS)
    # float32 rounding puts some pixels a hair beyond eps: the tolerance is needed ...
    assert float((on_the_sphere(model, x, y) - x).abs().max()) > EPS
    report = evaluate(model, (x, y), [on_the_sphere], progress=False, sequential=False)
    assert report.clean_accuracy == 1.0
    # ... but 1e-4 relative beyond eps is refused, as is leaving [0, 1]
    with pytest.raises(ThreatModelError, match="moved an example"):
        evaluate(model, (x, y), [Shift(EPS, EPS * (1 + 1e-4))], progress=False, sequential=False)
    with pytest.raises(ThreatModelError, match=r"outside \[0, 1\]"):
        evaluate(model, (x, y), [Shift(EPS, EPS, clamp=False)], progress=False, sequential=False)


def test_l2_threat_model():
    model, (x, y) = trained_model()
    x, y = x[:8], y[:8]
    attack = APGD(0.5, norm="l2", steps=5)
    report = evaluate(model, (x, y), [attack], eps=0.5, norm="l2", progress=False)
    assert report.norm == "l2" and "L2 eps = 0.5" in str(report) and report.to_dict()["norm"] == "l2"
    with pytest.raises(ThreatModelError, match="in L2"):
        evaluate(model, (x, y), [attack], eps=0.25, norm="l2", progress=False)
    # a suite name runs its attacks in the threat model's norm
    suite = attack_suite("full", eps=0.5, norm="l2")
    assert {a.norm for a in suite.values()} == {"l2"} and {a.eps for a in suite.values()} == {0.5}
    l2 = evaluate(model, (x, y), "pgd20", eps=0.5, norm="l2", progress=False)
    assert l2.norm == "l2" and l2.eps == 0.5 and l2.robust_accuracy <= l2.clean_accuracy
    with pytest.raises(ValueError, match="norm"):
        evaluate(model, (x, y), [attack], norm="l1", progress=False)
    # An L2 radius above 1 is a legitimate threat model (below √(C·H·W)); an L∞ one is refused.
    wide = APGD(1.5, norm="l2", steps=2)
    assert evaluate(model, (x, y), [wide], eps=1.5, norm="l2", progress=False).eps == 1.5
    with pytest.raises(ValueError, match="did you mean"):
        evaluate(model, (x, y), [wide], eps=1.5, progress=False)


# ----------------------------------------------------------------------------- evaluate: masking checks

def test_autoattack_suites_run_the_cheap_masking_checks_by_default():
    model, (x, y) = trained_model()
    x, y = x[:4], y[:4]
    softmax = SoftmaxOutput(model)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        report = evaluate(softmax, (x, y), "autoattack", eps=0.25, progress=False)
    assert report.masking_checks == CHEAP_CHECKS
    assert [f.check for f in report.masking_findings] == ["probability_outputs"]
    assert [w for w in caught if issubclass(w.category, GradientMaskingWarning)]
    assert "probability_outputs: the model's outputs look like probabilities" in str(report)
    summary = report.to_dict()
    assert summary["masking_checks"] == list(CHEAP_CHECKS)
    assert summary["masking_findings"][0]["check"] == "probability_outputs"
    off = evaluate(softmax, (x, y), "autoattack", eps=0.25, progress=False, masking_checks=False)
    assert off.masking_checks == () and off.masking_findings == [] and "gradient-masking" not in str(off)
    assert evaluate(model, (x, y), "pgd20", progress=False).masking_checks == ()
    on = evaluate(model, (x, y), "pgd20", progress=False, masking_checks=True)
    assert on.masking_checks == CHEAP_CHECKS and on.masking_findings == []
    assert "gradient-masking checks (probability_outputs, zero_gradients, randomized_outputs): nothing found" \
        in str(on)
    with pytest.raises(TypeError, match="masking_checks"):
        evaluate(model, (x, y), "pgd20", progress=False, masking_checks="yes")


def test_eval_command_runs_the_cheap_masking_checks_unless_turned_off(tmp_path, capsys):
    data = write_tiny_cifar10(tmp_path / "cifar", n_train=5, n_test=4)
    torch.manual_seed(0)
    Trainer(PreActResNet18(width=4), None, run_dir=tmp_path / "run", progress=False, device="cpu").save_checkpoint()
    common = ["eval", str(tmp_path / "run"), "--data", str(data), "--n-examples", "4", "--no-progress"]
    assert cli.main([*common, "--out", str(tmp_path / "on.json")]) == 0
    assert "gradient-masking checks (" in capsys.readouterr().out
    assert json.loads((tmp_path / "on.json").read_text())["masking_checks"] == list(CHEAP_CHECKS)
    assert cli.main([*common, "--no-masking-checks", "--out", str(tmp_path / "off.json")]) == 0
    assert "gradient-masking" not in capsys.readouterr().out
    assert json.loads((tmp_path / "off.json").read_text())["masking_checks"] == []


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
    findings = run_check(SoftmaxOutput(model), x, y, **FAST)
    finding = next(f for f in findings if f.check == "probability_outputs")
    # the gradients of a softmax model do not vanish; what is wrong is the loss the attacks ascend
    assert "wrong loss" in finding.message and "logits" in finding.message and "vanish" not in finding.message


class RandomShiftFlip(nn.Module):
    """Flips each input horizontally with probability 1/2 and shifts the
    batch by up to 2 pixels, afresh on every forward pass (in eval mode too),
    like a random-transformation defence."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, x):
        flip = torch.rand(x.shape[0], 1, 1, 1, device=x.device) < 0.5
        x = torch.where(flip, x.flip(3), x)
        dy, dx = torch.randint(-2, 3, (2,)).tolist()
        return self.inner(torch.roll(x, (dy, dx), dims=(2, 3)))


def test_randomized_model_is_found_on_every_seed():
    model, (x, y) = trained_model()
    randomized = RandomShiftFlip(model)
    for seed in range(5):
        findings = run_check(randomized, x, y, seed=seed, **FAST)
        finding = next(f for f in findings if f.check == "randomized_outputs")
        assert "EOT" in finding.message and 0.5 < finding.value <= 1.0
    cheap = run_check(randomized, x, y, checks=CHEAP_CHECKS, **FAST)
    assert checks(cheap) == {"randomized_outputs"}
    # dropout is off in eval mode: a deterministic model
    assert "randomized_outputs" not in checks(run_check(nn.Sequential(model, nn.Dropout(0.5)), x, y, **FAST))


def test_more_steps_raising_accuracy():
    x = torch.full((16, 3, 8, 8), 0.5)
    y = torch.zeros(16, dtype=torch.long)
    findings = run_check(Deceptive("steps"), x, y, steps=(10, 50), restarts=2, noise_samples=2)
    assert "more_steps" in checks(findings)
    assert "noise_beats_attack" not in checks(findings)
    only = run_check(Deceptive("steps"), x, y, steps=(10, 50), restarts=2, noise_samples=2, checks=["more_restarts"])
    assert "more_steps" not in checks(only)


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
    with pytest.raises(ValueError, match="checks"):
        check_gradient_masking(model, x, y, checks=["more_steps", "bogus"])
    with pytest.raises(ValueError, match="repeats"):
        check_gradient_masking(model, x, y, repeats=1)
