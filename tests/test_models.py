"""Tests of the models (Normalize, PreActResNet18, ResNet18, WideResNet,
SmallCNN), of the model registry (build_model, model_record) and of the
perturbation-site mechanism."""
from __future__ import annotations

import copy
import io
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from advtrain.models import (
    CIFAR10_MEAN,
    CIFAR10_STD,
    CIFAR100_MEAN,
    CIFAR100_STD,
    MODELS,
    Normalize,
    PreActResNet18,
    ResNet18,
    ScaledDirection,
    SiteModule,
    SmallCNN,
    WideResNet,
    attach_sites,
    build_model,
    capture_sites,
    find_sites,
    model_names,
    model_record,
    perturb_sites,
)
from advtrain.models.preact_resnet import PreActBlock
from advtrain.models.resnet import BasicBlock

PREACT_SITES = [f"layer{i}.{j}.site" for i in range(1, 5) for j in range(2)]


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


def images(n: int = 2) -> torch.Tensor:
    return torch.rand(n, 3, 32, 32)


def small_models() -> dict:
    return {
        "preact": PreActResNet18(width=8),
        "resnet18": ResNet18(width=8),
        "wrn": WideResNet(depth=10, widen=1),
        "small": SmallCNN(width=8),
    }


# ---------------------------------------------------------------- shapes, sizes


@pytest.mark.parametrize("num_classes", [10, 100])
def test_output_shapes(num_classes: int) -> None:
    x = images(3)
    for name, model in [
        ("preact", PreActResNet18(num_classes, width=8)),
        ("wrn", WideResNet(10, 2, num_classes)),
        ("small", SmallCNN(num_classes, width=8)),
    ]:
        assert model(x).shape == (3, num_classes), name


def test_parameter_counts() -> None:
    with torch.device("meta"):
        preact = PreActResNet18()
        preact_other = PreActResNet18(shortcut="preact")
        wrn28 = WideResNet(28, 10)
        wrn34 = WideResNet(34, 10)

    def count(m: nn.Module) -> int:
        return sum(p.numel() for p in m.parameters())

    # Wong et al. / APART pre-activation ResNet-18. The often-quoted
    # 11,173,962 is the post-activation ResNet-18: it has a BatchNorm after the
    # stem (64 ch) and on each of the 3 projection shortcuts (128, 256, 512 ch)
    # and bn1 on the block's output width, where the pre-activation net has
    # bn1 on the block's input width and one final BatchNorm (512 ch).
    bn_difference = 2 * (64 + 2 * 128 - 64 + 2 * 256 - 128 + 2 * 512 - 256 - 512)
    assert bn_difference == 1792
    assert count(preact) == count(preact_other) == 11_173_962 - bn_difference == 11_172_170
    assert count(wrn28) == 36_479_194
    assert count(wrn34) == 46_160_474


def test_small_cnn_is_small() -> None:
    assert sum(p.numel() for p in SmallCNN().parameters()) < 30_000


# ---------------------------------------------------------------- Normalize


def test_normalize_values() -> None:
    norm = Normalize(CIFAR10_MEAN, CIFAR10_STD)
    x = images(2)
    mean = torch.tensor(CIFAR10_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(CIFAR10_STD).view(1, 3, 1, 1)
    torch.testing.assert_close(norm(x), (x - mean) / std)
    # channel c of a constant image m_c maps to exactly 0
    const = mean.expand(1, 3, 4, 4).clone()
    assert torch.allclose(norm(const), torch.zeros_like(const), atol=1e-7)
    assert set(norm.state_dict()) == {"mean", "std"}
    assert norm.to(torch.float64).mean.dtype == torch.float64
    assert len(CIFAR100_MEAN) == len(CIFAR100_STD) == 3


def test_normalize_validation() -> None:
    with pytest.raises(ValueError, match="std"):
        Normalize((0.5, 0.5, 0.5), (0.2, 0.0, 0.2))
    with pytest.raises(ValueError, match="one value per channel"):
        Normalize((0.5, 0.5, 0.5), (0.2, 0.2))
    with pytest.raises(ValueError, match="finite"):
        Normalize((0.5, float("nan")), (0.2, 0.2))
    with pytest.raises(TypeError, match="mean"):
        Normalize(0.5, (0.2,))  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"\(N, 3, H, W\)"):
        Normalize(CIFAR10_MEAN, CIFAR10_STD)(torch.rand(2, 1, 8, 8))


def test_model_normalize_option() -> None:
    with_norm = SmallCNN(width=8).eval()
    without = SmallCNN(width=8, normalize=False).eval()
    assert isinstance(without.normalize, nn.Identity)
    missing, unexpected = without.load_state_dict(with_norm.state_dict(), strict=False)
    assert missing == [] and sorted(unexpected) == ["normalize.mean", "normalize.std"]
    x = images(4)
    mean = torch.tensor(CIFAR10_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(CIFAR10_STD).view(1, 3, 1, 1)
    torch.testing.assert_close(with_norm(x), without((x - mean) / std))
    custom = Normalize(CIFAR100_MEAN, CIFAR100_STD)
    assert PreActResNet18(100, width=8, normalize=custom).normalize is custom
    assert isinstance(WideResNet(10, 1, normalize=None).normalize, nn.Identity)
    with pytest.raises(TypeError, match="normalize"):
        SmallCNN(normalize="cifar10")  # type: ignore[arg-type]


# ---------------------------------------------------------------- validation, factory


def test_constructor_validation() -> None:
    with pytest.raises(ValueError, match="depth"):
        WideResNet(depth=27)
    with pytest.raises(ValueError, match="depth"):
        WideResNet(depth=4)
    with pytest.raises(ValueError, match="dropout"):
        WideResNet(depth=10, widen=1, dropout=1.0)
    with pytest.raises(ValueError, match="width"):
        PreActResNet18(width=0)
    with pytest.raises(TypeError, match="num_classes"):
        SmallCNN(num_classes=10.0)  # type: ignore[arg-type]


def test_build_model() -> None:
    assert isinstance(build_model("preactresnet18", width=8), PreActResNet18)
    wrn = build_model("WideResNet", num_classes=100, depth=16, widen=1)
    assert isinstance(wrn, WideResNet) and len(wrn.block1) == 2 and wrn.fc.out_features == 100
    assert isinstance(build_model("smallcnn", 5, width=4), SmallCNN)
    with pytest.raises(ValueError, match=r"'resnet50'.*preactresnet18.*smallcnn.*wideresnet"):
        build_model("resnet50")
    with pytest.raises(TypeError):
        build_model("smallcnn", depth=3)


# ---------------------------------------------------------------- registry

#: Small constructor arguments for every registered model (each one differs from its default).
SMALL_ARGUMENTS = {
    "preactresnet18": dict(width=2, shortcut="preact", normalize=False),
    "resnet18": dict(width=2),
    "wideresnet": dict(depth=10, widen=1, dropout=0.3),
    "smallcnn": dict(width=4, normalize=False),
}


def test_registry_table_and_build_errors() -> None:
    assert model_names() == tuple(MODELS) == ("preactresnet18", "resnet18", "wideresnet", "smallcnn")
    assert set(SMALL_ARGUMENTS) == set(MODELS)
    for name, entry in MODELS.items():
        assert entry.name == name and "\n" not in entry.description and len(entry.description) > 20
        assert isinstance(build_model(name, **SMALL_ARGUMENTS[name]), entry.cls)
    assert dict(MODELS["resnet18"].defaults) == {"num_classes": 10, "normalize": True, "width": 64}
    assert MODELS["wideresnet"].defaults["depth"] == 28 and MODELS["preactresnet18"].defaults["shortcut"] == "input"
    with pytest.raises(TypeError, match=r"resnet18 takes no argument 'depth'; its arguments: num_classes, normalize"):
        build_model("resnet18", depth=3)
    with pytest.raises(TypeError, match="name must be a string"):
        build_model(None)  # type: ignore[arg-type]


@pytest.mark.parametrize("name", sorted(SMALL_ARGUMENTS))
def test_a_model_record_rebuilds_the_same_network(name) -> None:
    model = build_model(name, num_classes=7, **SMALL_ARGUMENTS[name]).eval()
    record = model_record(model)
    assert record.name == name
    assert record.kwargs == {**MODELS[name].defaults, "num_classes": 7, **SMALL_ARGUMENTS[name]}
    assert all(isinstance(v, (bool, int, float, str)) for v in record.kwargs.values())
    rebuilt = build_model(record.name, **record.kwargs)
    rebuilt.load_state_dict(model.state_dict())
    x = images(2)
    torch.testing.assert_close(rebuilt.eval()(x), model(x), rtol=0, atol=0)
    assert model_record(rebuilt) == record


def test_models_outside_the_registry_have_no_record() -> None:
    class Custom(SmallCNN):  # a subclass may compute something else
        pass

    assert model_record(Custom(width=4)) == (None, {})
    assert model_record(nn.Sequential(nn.Flatten(), nn.Linear(3, 2))) == (None, {})
    # a normalize module that is not a Normalize cannot be written down as a plain value
    assert model_record(SmallCNN(width=4, normalize=nn.BatchNorm2d(3))) == (None, {})
    # a Normalize is: its statistics are buffers, which the rebuilt model loads
    cifar100 = SmallCNN(100, width=4, normalize=Normalize(CIFAR100_MEAN, CIFAR100_STD)).eval()
    record = model_record(cifar100)
    assert record == ("smallcnn", {"num_classes": 100, "width": 4, "normalize": True})
    rebuilt = build_model(record.name, **record.kwargs)
    rebuilt.load_state_dict(cifar100.state_dict())
    x = images(2)
    torch.testing.assert_close(rebuilt.eval()(x), cifar100(x), rtol=0, atol=0)


# ---------------------------------------------------------------- ResNet18


def test_resnet18_parameter_count_and_benchmark_names() -> None:
    with torch.device("meta"):
        model = ResNet18()
    assert sum(p.numel() for p in model.parameters()) == 11_173_962
    keys = set(ResNet18(width=2, normalize=False).state_dict())
    # the FastAT Benchmark's ResNet18 names: stem bn1, shortcut = (conv, BatchNorm), linear
    assert {"conv1.weight", "bn1.running_var", "layer2.0.shortcut.0.weight", "layer2.0.shortcut.1.running_mean",
            "layer4.1.bn2.weight", "linear.bias"} <= keys
    assert not any("site" in k or "normalize" in k for k in keys)
    assert len([k for k in keys if k.endswith("num_batches_tracked")]) == 1 + 2 * 8 + 3
    assert {"normalize.mean", "normalize.std"} <= set(ResNet18(width=2).state_dict())


@pytest.mark.parametrize("num_classes", [10, 100])
def test_resnet18_forward_backward_shapes(num_classes) -> None:
    model = ResNet18(num_classes, width=2)
    x = images(3).requires_grad_(True)
    out = model(x)
    assert out.shape == (3, num_classes)
    out.sum().backward()
    assert x.grad is not None and x.grad.shape == x.shape
    assert all(p.grad is not None and p.grad.shape == p.shape for p in model.parameters())
    assert list(find_sites(model)) == PREACT_SITES
    with capture_sites(model) as acts:
        model(images(2))
    w = 2
    assert [tuple(a.shape[1:]) for a in acts.values()] == [
        (w, 32, 32), (w, 32, 32), (w, 32, 32), (2 * w, 16, 16),
        (2 * w, 16, 16), (4 * w, 8, 8), (4 * w, 8, 8), (8 * w, 4, 4)]
    with pytest.raises(ValueError, match="width"):
        ResNet18(width=0)


@pytest.mark.parametrize("in_planes, planes, stride", [(4, 8, 2), (4, 4, 1)])
def test_resnet18_block_site_is_on_the_residual_branch_only(in_planes, planes, stride) -> None:
    """A BasicBlock written out with its weights: the site perturbation
    enters conv1 alone; the shortcut (identity, or 1×1 conv + BatchNorm)
    reads the unperturbed block input."""
    block = BasicBlock(in_planes, planes, stride).double().train()
    assert (block.shortcut is None) == (stride == 1 and in_planes == planes)
    model = nn.Sequential(block)
    x = torch.randn(3, in_planes, 8, 8, dtype=torch.float64, requires_grad=True)
    delta = torch.randn(3, in_planes, 8, 8, dtype=torch.float64, requires_grad=True)
    with perturb_sites(model, {"0.site": delta}):
        out = model(x)
    branch = F.relu(_bn(block.bn1, F.conv2d(x + delta, block.conv1.weight, stride=stride, padding=1)))
    branch = _bn(block.bn2, F.conv2d(branch, block.conv2.weight, padding=1))
    if block.shortcut is None:
        shortcut = x
    else:
        shortcut = _bn(block.shortcut[1], F.conv2d(x, block.shortcut[0].weight, stride=stride))
    expected = F.relu(branch + shortcut)
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)
    read_out = torch.randn_like(out)
    got = torch.autograd.grad((out * read_out).sum(), [x, delta])
    want = torch.autograd.grad((expected * read_out).sum(), [x, delta])
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_wide_resnet_dropout_active_only_in_training() -> None:
    model = WideResNet(depth=10, widen=1, dropout=0.5)
    x = images(2)
    model.eval()
    assert torch.equal(model(x), model(x))
    model.train()
    assert not torch.equal(model(x), model(x))


# ---------------------------------------------------------------- declared sites


def test_declared_site_names() -> None:
    assert list(find_sites(PreActResNet18(width=8))) == PREACT_SITES
    wrn = WideResNet(depth=16, widen=1)
    assert list(find_sites(wrn)) == [f"block{i}.{j}.site" for i in range(1, 4) for j in range(2)]
    assert list(find_sites(SmallCNN(width=8))) == ["site1", "site2"]


def test_sites_are_identity_without_perturbation() -> None:
    for name, model in small_models().items():
        model.eval()
        x = images(2)
        clean = model(x)
        sites = find_sites(model)
        zeros = {}
        with capture_sites(model) as acts:
            model(x)
        for site in sites:
            zeros[site] = torch.zeros_like(acts[site])
        with perturb_sites(model, zeros):
            assert torch.equal(model(x), clean), name
        with perturb_sites(model, {}):
            assert torch.equal(model(x), clean), name
        assert torch.equal(model(x), clean), name
        assert all(s.delta is None for s in sites.values())


def test_preact_site_perturbation_changes_output_and_is_removed_after() -> None:
    model = PreActResNet18(width=8).eval()
    x = images(2)
    clean = model(x)
    for name in PREACT_SITES:
        with capture_sites(model, [name]) as acts:
            model(x)
        delta = torch.randn(1, *acts[name].shape[1:])
        with perturb_sites(model, {name: delta}):
            perturbed = model(x)
        assert not torch.allclose(perturbed, clean), name
        assert torch.equal(model(x), clean), name


def _bn(bn: nn.BatchNorm2d, h: torch.Tensor) -> torch.Tensor:
    """BatchNorm with batch statistics (train mode), running statistics untouched."""
    return F.batch_norm(h, None, None, bn.weight, bn.bias, training=True, eps=bn.eps)


def hand_written_preact_block(block: PreActBlock, x, delta, stride: int, shortcut: str):
    """The pre-activation block written out with the block's weights: ``delta``
    is added on the residual branch only; a projection shortcut reads the
    block input (``"input"``) or the unperturbed pre-activation (``"preact"``)."""
    pre = F.relu(_bn(block.bn1, x))
    branch = pre if delta is None else pre + delta
    out = F.conv2d(branch, block.conv1.weight, stride=stride, padding=1)
    out = F.conv2d(F.relu(_bn(block.bn2, out)), block.conv2.weight, padding=1)
    if block.shortcut is None:
        return out + x
    source = x if shortcut == "input" else pre
    return out + F.conv2d(source, block.shortcut[0].weight, stride=stride)


@pytest.mark.parametrize("shortcut", ["preact", "input"])
@pytest.mark.parametrize("in_planes, planes, stride", [(4, 8, 2), (4, 4, 1)])
def test_preact_block_matches_a_hand_written_block(shortcut, in_planes, planes, stride) -> None:
    block = PreActBlock(in_planes, planes, stride, shortcut=shortcut).double().train()
    assert (block.shortcut is None) == (stride == 1 and in_planes == planes)
    for m in (block.bn1, block.bn2):  # non-trivial affine BatchNorm parameters
        nn.init.uniform_(m.weight, 0.5, 1.5)
        nn.init.uniform_(m.bias, -0.5, 0.5)
    model = nn.Sequential(block)
    x = torch.randn(3, in_planes, 8, 8, dtype=torch.float64)
    weights = torch.randn(3, planes, 8 // stride, 8 // stride, dtype=torch.float64)
    for delta in (None, torch.randn(3, in_planes, 8, 8, dtype=torch.float64)):
        results = []
        for written_out in (False, True):
            xi = x.clone().requires_grad_(True)
            di = None if delta is None else delta.clone().requires_grad_(True)
            if written_out:
                out = hand_written_preact_block(block, xi, di, stride, shortcut)
            else:
                with perturb_sites(model, {} if di is None else {"0.site": di}):
                    out = model(xi)
            # gradients of a fixed linear read-out: the one of delta (the site
            # gradient) passes conv1 alone, as it only enters the branch
            results.append((out, *torch.autograd.grad((out * weights).sum(), [xi] + ([] if di is None else [di]))))
        for a, b in zip(*results):
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_preact_variants_differ_only_where_a_projection_shortcut_is() -> None:
    a = PreActResNet18(width=4, normalize=False, shortcut="preact")
    b = PreActResNet18(width=4, normalize=False)  # the default: the Fast-AT and APART reference network
    assert list(a.state_dict()) == list(b.state_dict())
    assert not any("site" in k for k in a.state_dict())
    b.load_state_dict(a.state_dict())
    a.eval(), b.eval()
    x = images(2)
    assert not torch.allclose(a(x), b(x))
    projections = [f"layer{i}.0" for i in (2, 3, 4)]
    blocks = {n: m for n, m in a.named_modules() if isinstance(m, PreActBlock)}
    assert [n for n, m in blocks.items() if m.shortcut is not None] == projections
    assert all(m.shortcut_from_input for m in b.modules() if isinstance(m, PreActBlock))
    assert not any(m.shortcut_from_input for m in a.modules() if isinstance(m, PreActBlock))
    assert build_model("preactresnet18", width=4).layer2[0].shortcut_from_input
    assert not build_model("preactresnet18", width=4, shortcut="preact").layer2[0].shortcut_from_input
    for bad in ("x", None, "INPUT"):
        with pytest.raises(ValueError, match="shortcut"):
            PreActResNet18(width=4, shortcut=bad)  # type: ignore[arg-type]
        with pytest.raises(ValueError, match="shortcut"):
            PreActBlock(4, 8, 2, shortcut=bad)  # type: ignore[arg-type]


@pytest.mark.parametrize("variant", ["preact", "input", "wrn", "resnet18"])
def test_a_site_perturbation_never_reaches_the_shortcut(variant) -> None:
    if variant == "wrn":
        model = WideResNet(depth=10, widen=2).eval()  # block1.0 projects too (16 → 32 channels)
    elif variant == "resnet18":
        model = ResNet18(width=4).eval()
    else:
        model = PreActResNet18(width=4, shortcut=variant).eval()
    x = images(2)
    clean = model(x)
    blocks = {n: m for n, m in model.named_modules() if getattr(m, "shortcut", None) is not None}
    assert len(blocks) == 3
    for name, block in blocks.items():
        seen = []
        handle = block.shortcut.register_forward_hook(lambda _m, _i, out: seen.append(out.detach()))
        with capture_sites(model, [f"{name}.site"]) as acts:
            model(x)
        delta = torch.randn_like(acts[f"{name}.site"])
        with perturb_sites(model, {f"{name}.site": delta}):
            perturbed = model(x)
        handle.remove()
        assert len(seen) == 2
        assert torch.equal(seen[0], seen[1]), name
        assert not torch.allclose(perturbed, clean), name  # the perturbation does act, on the branch


def test_wide_block_matches_a_hand_written_block() -> None:
    model = WideResNet(depth=10, widen=2).double().train()
    block = model.block2[0]
    assert block.shortcut is not None
    x = torch.randn(2, 32, 8, 8, dtype=torch.float64)
    delta = torch.randn(2, 32, 8, 8, dtype=torch.float64)
    with perturb_sites(model, {"block2.0.site": delta}):
        out = block(x)
    pre = F.relu(_bn(block.bn1, x))
    branch = F.relu(_bn(block.bn2, F.conv2d(pre + delta, block.conv1.weight, stride=2, padding=1)))
    expected = F.conv2d(branch, block.conv2.weight, padding=1) + F.conv2d(pre, block.shortcut.weight, stride=2)
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)


# ---------------------------------------------------------------- perturb / capture semantics


def linear_model() -> nn.Sequential:
    return nn.Sequential(nn.Linear(3, 4), SiteModule(), nn.Linear(4, 2))


def test_perturb_equals_manual_addition() -> None:
    model = linear_model()
    x = torch.randn(5, 3)
    for delta in (torch.randn(5, 4), torch.randn(1, 4)):
        with perturb_sites(model, {"1": delta}):
            out = model(x)
        torch.testing.assert_close(out, model[2](model[0](x) + delta))
    assert torch.equal(model(x), model[2](model[0](x)))


def test_perturbation_removed_after_exception_and_nesting_restores() -> None:
    model = linear_model()
    x = torch.randn(2, 3)
    clean = model(x)
    with pytest.raises(RuntimeError, match="boom"):
        with perturb_sites(model, {"1": torch.ones(1, 4)}):
            raise RuntimeError("boom")
    assert torch.equal(model(x), clean)
    outer, inner = torch.ones(1, 4), 2 * torch.ones(1, 4)
    with perturb_sites(model, {"1": outer}):
        with perturb_sites(model, {"1": inner}):
            torch.testing.assert_close(model(x), model[2](model[0](x) + inner))
        torch.testing.assert_close(model(x), model[2](model[0](x) + outer))
    assert torch.equal(model(x), clean)


def test_perturbation_gradient_flows_to_delta() -> None:
    first, last = nn.Linear(3, 4), nn.Linear(4, 2)
    model = nn.Sequential(first, SiteModule(), last)
    x = torch.randn(2, 3)
    scale = torch.tensor(0.5, requires_grad=True)
    direction = torch.randn(1, 4)
    with perturb_sites(model, {"1": scale * direction}):
        loss = model(x).sum()
    (g,) = torch.autograd.grad(loss, [scale])
    expected = (direction @ last.weight.t()).sum() * x.shape[0]
    torch.testing.assert_close(g, expected)


def _site_net(dtype: torch.dtype = torch.float32) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), SiteModule(), nn.Tanh(),
                         nn.Conv2d(4, 2, 3, padding=1)).to(dtype)


@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "broadcast"])
def test_scaled_direction_matches_the_plain_tensor_in_value_and_gradients(layout) -> None:
    # float64: the fused op's gradients must equal the unfused ones to rounding
    model = _site_net(torch.float64)
    x = torch.randn(5, 3, 6, 6, dtype=torch.float64)
    direction = torch.randn(1 if layout == "broadcast" else 5, 4, 6, 6, dtype=torch.float64)
    if layout == "channels_last":
        model = model.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
        direction = direction.contiguous(memory_format=torch.channels_last)
    results = []
    for fused in (True, False):
        scale = torch.tensor(0.3, dtype=torch.float64, requires_grad=True)
        d = direction.clone().requires_grad_(True)
        xi = x.clone().requires_grad_(True)
        delta = ScaledDirection(scale, d) if fused else scale * d
        with perturb_sites(model, {"1": delta}):
            out = model(xi)
        loss = (out * torch.linspace(-1, 1, out.numel(), dtype=torch.float64).view_as(out)).sum()
        results.append((out, *torch.autograd.grad(loss, [scale, d, xi])))
    for a, b in zip(*results):
        torch.testing.assert_close(a, b)
    assert results[0][2].shape == direction.shape


def test_scaled_direction_gradcheck_and_bf16() -> None:
    model = _site_net(torch.float64)
    x = torch.randn(2, 3, 4, 4, dtype=torch.float64)
    direction = torch.randn(2, 4, 4, 4, dtype=torch.float64)

    def f(scale, d):
        with perturb_sites(model, {"1": ScaledDirection(scale, d)}):
            return model(x)

    scale = torch.tensor(0.7, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(f, (scale, direction.clone().requires_grad_(True)))
    # under bf16 the sum over the direction is accumulated in fp32: the scale's
    # gradient is that of the fp32 product rounded once, not a bf16 sum
    model32 = _site_net()
    x32, d32 = x.float(), torch.randn(2, 4, 4, 4).sign()
    grads = []
    for fused in (True, False):
        s = torch.tensor(0.01, requires_grad=True)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            delta = ScaledDirection(s, d32) if fused else s * d32
            with perturb_sites(model32, {"1": delta}):
                out = model32(x32)
        assert out.dtype == torch.bfloat16
        (g,) = torch.autograd.grad(out.float().sum(), [s])
        grads.append(g)
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-5, atol=0)


def test_scaled_direction_errors() -> None:
    model = linear_model()
    with pytest.raises(TypeError, match="one-element"):
        with perturb_sites(model, {"1": ScaledDirection(torch.ones(2), torch.zeros(1, 4))}):
            pass
    with pytest.raises(TypeError, match="floating"):
        with perturb_sites(model, {"1": ScaledDirection(torch.ones(()), torch.zeros(1, 4, dtype=torch.long))}):
            pass
    with perturb_sites(model, {"1": ScaledDirection(torch.ones(()), torch.zeros(4, 5))}):
        with pytest.raises(ValueError, match="'1'"):
            model(torch.randn(4, 3))


def test_capture_gradient_matches_manual_and_finite_difference() -> None:
    model = nn.Sequential(nn.Linear(3, 4), SiteModule(), nn.Tanh(), nn.Linear(4, 2)).double()
    x = torch.randn(3, 3, dtype=torch.float64)
    y = torch.tensor([0, 1, 1])
    with capture_sites(model) as acts:
        loss = F.cross_entropy(model(x), y, reduction="sum")
    assert list(acts) == ["1"]
    h = acts["1"]
    torch.testing.assert_close(h, model[0](x))
    (g,) = torch.autograd.grad(loss, [h])
    # manual: dL/dh = (softmax(z) - onehot(y)) W2 * tanh'(h)
    z = model(x)
    dz = z.softmax(1) - F.one_hot(y, 2).double()
    manual = (dz @ model[3].weight) * (1 - torch.tanh(h) ** 2)
    torch.testing.assert_close(g, manual)
    # finite differences through perturb_sites
    step = 1e-6
    fd = torch.zeros_like(h)
    with torch.no_grad():
        for i in range(h.shape[0]):
            for j in range(h.shape[1]):
                e = torch.zeros_like(h)
                e[i, j] = step
                with perturb_sites(model, {"1": e}):
                    up = F.cross_entropy(model(x), y, reduction="sum")
                with perturb_sites(model, {"1": -e}):
                    down = F.cross_entropy(model(x), y, reduction="sum")
                fd[i, j] = (up - down) / (2 * step)
    torch.testing.assert_close(g, fd, rtol=1e-5, atol=1e-7)


def test_capture_preact_shapes_and_gradients() -> None:
    w = 8
    model = PreActResNet18(width=w)
    x = images(2)
    y = torch.tensor([1, 7])
    with capture_sites(model) as acts:
        loss = F.cross_entropy(model(x), y)
    expected = {
        "layer1.0.site": (w, 32), "layer1.1.site": (w, 32),
        "layer2.0.site": (w, 32), "layer2.1.site": (2 * w, 16),
        "layer3.0.site": (2 * w, 16), "layer3.1.site": (4 * w, 8),
        "layer4.0.site": (4 * w, 8), "layer4.1.site": (8 * w, 4),
    }  # fmt: skip
    assert list(acts) == PREACT_SITES
    for name, (c, s) in expected.items():
        assert acts[name].shape == (2, c, s, s), name
    grads = torch.autograd.grad(loss, list(acts.values()))
    for name, g in zip(acts, grads):
        assert g.shape == acts[name].shape and g.abs().sum() > 0, name
    assert all(not s.capturing and s.activation is None for s in find_sites(model).values())


def test_capture_subset_and_unknown_names() -> None:
    model = PreActResNet18(width=8)
    with capture_sites(model, ["layer3.1.site"]) as acts:
        model(images(2))
    assert list(acts) == ["layer3.1.site"]
    with pytest.raises(ValueError, match="layer9.0.site"):
        with capture_sites(model, ["layer9.0.site"]):
            pass
    with pytest.raises(ValueError, match="layer1.0.sit"):
        with perturb_sites(model, {"layer1.0.sit": torch.zeros(1)}):
            pass


def test_perturbation_shape_and_type_errors() -> None:
    model = linear_model()
    x = torch.randn(4, 3)
    for bad in (torch.zeros(4, 5), torch.zeros(3, 4), torch.zeros(4), torch.zeros(1, 1, 4)):
        with perturb_sites(model, {"1": bad}):
            with pytest.raises(ValueError, match="'1'"):
                model(x)
    with pytest.raises(TypeError, match="tensor"):
        with perturb_sites(model, {"1": 0.5}):  # type: ignore[dict-item]
            pass
    with pytest.raises(TypeError, match="floating"):
        with perturb_sites(model, {"1": torch.zeros(1, 4, dtype=torch.long)}):
            pass


# ---------------------------------------------------------------- attached sites


def mlp() -> nn.Sequential:
    return nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))


def test_attach_sites_output_and_input() -> None:
    first, last = nn.Linear(3, 4), nn.Linear(4, 2)
    model = nn.Sequential(first, nn.ReLU(), last)
    x = torch.randn(5, 3)
    clean = model(x)
    assert attach_sites(model, ["0"]) == ["0"]
    assert attach_sites(model, ["2"], where="input") == ["2"]
    assert list(find_sites(model)) == ["0", "2"]
    assert torch.equal(model(x), clean)

    def lin0(v: torch.Tensor) -> torch.Tensor:  # first layer without its hook
        return F.linear(v, first.weight, first.bias)

    def lin2(v: torch.Tensor) -> torch.Tensor:  # last layer without its hook
        return F.linear(v, last.weight, last.bias)

    d_out, d_in = torch.randn(1, 4), torch.randn(5, 4)
    with perturb_sites(model, {"0": d_out}):
        torch.testing.assert_close(model(x), lin2(torch.relu(lin0(x) + d_out)))
    with perturb_sites(model, {"2": d_in}):
        torch.testing.assert_close(model(x), lin2(torch.relu(lin0(x)) + d_in))
    with capture_sites(model) as acts:
        model(x)
    torch.testing.assert_close(acts["0"], lin0(x))
    torch.testing.assert_close(acts["2"], torch.relu(lin0(x)))
    assert torch.equal(model(x), clean)


def test_attach_sites_errors() -> None:
    model = mlp()
    with pytest.raises(ValueError, match="'fc'"):
        attach_sites(model, ["fc"])
    with pytest.raises(ValueError, match="where"):
        attach_sites(model, ["0"], where="middle")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="already attached"):
        attach_sites(model, ["0", "0"])
    attach_sites(model, ["0"])
    with pytest.raises(ValueError, match="already attached"):
        attach_sites(model, ["0"], where="input")
    with pytest.raises(ValueError, match="'1'"):
        with perturb_sites(model, {"1": torch.zeros(1, 4)}):
            pass


def test_attached_sites_on_nested_model_and_alongside_declared_sites() -> None:
    model = SmallCNN(width=4)
    attach_sites(model, ["stage3.0"])
    assert list(find_sites(model)) == ["site1", "site2", "stage3.0"]
    outer = nn.Sequential(model)
    assert list(find_sites(outer)) == ["0.site1", "0.site2", "0.stage3.0"]


def test_attached_sites_survive_deepcopy_and_pickling() -> None:
    model = mlp()
    attach_sites(model, ["0"])
    x = torch.randn(2, 3)
    delta = torch.full((1, 4), 3.0)
    clone = copy.deepcopy(model)
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    for m in (clone, loaded):
        expected = m[2](torch.relu(m[0](x) + delta))
        with perturb_sites(m, {"0": delta}):
            torch.testing.assert_close(m(x), expected)
        with perturb_sites(model, {"0": delta}):
            assert torch.equal(m(x), m[2](torch.relu(m[0](x))))


# ---------------------------------------------------------------- precision, memory format


def test_channels_last_and_bf16_autocast() -> None:
    x = images(4).contiguous(memory_format=torch.channels_last)
    y = torch.tensor([0, 1, 2, 3])
    for name, model in small_models().items():
        model = model.to(memory_format=torch.channels_last)
        ref = model.eval()(x.contiguous())
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(x)
        assert out.shape == (4, 10) and torch.isfinite(out).all(), name
        assert (out.float() - ref).abs().max() < 0.1 * ref.abs().max() + 0.05, name
        model.train()
        x_in = x.clone().requires_grad_(True)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            with capture_sites(model) as acts:
                loss = F.cross_entropy(model(x_in), y)
        grads = torch.autograd.grad(loss, [x_in, *acts.values()])
        assert all(torch.isfinite(g).all() for g in grads), name
        site = next(iter(acts))
        delta = torch.randn(1, *acts[site].shape[1:], requires_grad=True)
        with torch.autocast("cpu", dtype=torch.bfloat16), perturb_sites(model, {site: delta}):
            loss = F.cross_entropy(model(x), y)
        (g,) = torch.autograd.grad(loss, [delta])
        assert g.dtype == torch.float32 and g.abs().sum() > 0, name


# ---------------------------------------------------------------- training sanity


def test_small_cnn_overfits_tiny_batch() -> None:
    model = SmallCNN(width=8)
    x = images(16)
    y = torch.arange(16) % 4
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(40):
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[0] > 0.8 * math.log(4)
    assert losses[-1] < 0.25 * losses[0]
