"""The examples run: each with --quick and an even smaller setting, against
the real CIFAR-10 subset (skipped when ADVTRAIN_CIFAR10_DIR is unset)."""
from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path
from types import ModuleType, SimpleNamespace

import pytest
from torch import nn

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
TINY = ["--quick", "--train-examples", "256", "--epochs", "1", "--eval-examples", "32"]

pytestmark = pytest.mark.realdata


def load(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(f"example_{name}", EXAMPLES / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_quickstart_runs_as_a_script(cifar10_dir, tmp_path):
    out = tmp_path / "run"
    result = subprocess.run([sys.executable, str(EXAMPLES / "quickstart.py"), "--data", str(cifar10_dir), *TINY,
                             "--out", str(out)], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "APART, 1 epochs on 256 images" in result.stdout
    record = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])
    assert 0.0 <= record["robust_acc"] <= record["clean_acc"] <= 1.0
    assert len(record["apart_alpha_sites"]) == 8  # PreActResNet18's declared sites
    assert (out / "checkpoint.pt").is_file()


def test_apart_vs_pgd_prints_the_comparison_table(cifar10_dir, tmp_path, capsys):
    rows = load("apart_vs_pgd").main(["--data", str(cifar10_dir), *TINY, "--batch-size", "64",
                                      "--out", str(tmp_path)])
    table = capsys.readouterr().out
    assert [r["method"] for r in rows] == ["APART", "PGD-10"]
    for r in rows:
        assert 0.0 <= r["pgd20_acc"] <= r["clean_acc"] <= 1.0 and r["train_seconds"] > 0
    assert rows[1]["time_ratio"] == 1.0
    assert rows[0]["time_ratio"] < 1.0  # ~5 passes against PGD-10's ~23: a wide margin for timing noise
    assert "method" in table and "PGD-20" in table and "vs PGD-10" in table
    assert (tmp_path / "apart" / "metrics.jsonl").is_file() and (tmp_path / "pgd10" / "checkpoint.pt").is_file()


@pytest.mark.parametrize("variant", [[], ["--input-only"]], ids=["named-sites", "input-only"])
def test_custom_model(cifar10_dir, tmp_path, capsys, variant):
    module = load("custom_model")
    record = module.main(["--data", str(cifar10_dir), *TINY, "--out", str(tmp_path), *variant])
    out = capsys.readouterr().out
    assert 0.0 <= record["robust_acc"] <= record["clean_acc"] <= 1.0
    if variant:
        assert "apart_alpha_sites" not in record and "input only" in out
    else:
        assert len(record["apart_alpha_sites"]) == 2
        assert "learned step size at site block1" in out and "site block2" in out


def test_custom_model_with_timm(cifar10_dir, tmp_path):
    pytest.importorskip("timm")
    record = load("custom_model").main(["--data", str(cifar10_dir), *TINY, "--timm", "resnet18",
                                        "--out", str(tmp_path)])
    assert len(record["apart_alpha_sites"]) == 3  # layer1..layer3 of the timm ResNet


class _TinyTimmNet(nn.Module):
    """Shaped like a timm ResNet: a stem, ``layer1``..``layer3``, a head."""

    def __init__(self, num_classes: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, stride=2, padding=1)
        self.layer1 = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.layer2 = nn.Sequential(nn.Conv2d(8, 16, 3, stride=2, padding=1), nn.BatchNorm2d(16), nn.ReLU())
        self.layer3 = nn.Sequential(nn.Conv2d(16, 16, 3, stride=2, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1))
        self.fc = nn.Linear(16, num_classes)

    def forward(self, x):
        return self.fc(self.layer3(self.layer2(self.layer1(self.conv1(x)))).flatten(1))


def test_custom_model_timm_wiring(cifar10_dir, tmp_path, monkeypatch):
    """The --timm path with a stand-in timm module: sites on all stages but the last."""
    fake = SimpleNamespace(create_model=lambda name, pretrained, num_classes: _TinyTimmNet(num_classes))
    monkeypatch.setitem(sys.modules, "timm", fake)
    module = load("custom_model")
    record = module.main(["--data", str(cifar10_dir), *TINY, "--timm", "tiny", "--out", str(tmp_path)])
    assert len(record["apart_alpha_sites"]) == 2
    model, sites = module.timm_model("tiny")
    assert sites == ["1.layer1", "1.layer2"]
