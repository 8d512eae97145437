"""The bottom layer, advtrain.utils: modes, devices, pixels, precision, the
batched evaluation loop and the progress bars."""
from __future__ import annotations

import io

import pytest
import torch
from torch import nn
from tqdm.std import tqdm as console_tqdm

from _helpers import NoHostSync
from advtrain.models import SmallCNN
from advtrain.policies import PerExampleStore
from advtrain.training import Trainer
from advtrain.utils import (active_autocast_dtype, batched_correctness, device_batches, mixed_precision, model_device,
                            model_mode, progress_bar, resolve_device, to_pixels)
from advtrain.utils.progress import BAR_FORMAT, LOG_LINES


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def tiny_model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(),
                         nn.Linear(4 * 8 * 8, 5))


def tiny_data(n: int = 21, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, 3, 8, 8), generator=g, dtype=torch.uint8), torch.randint(0, 5, (n,), generator=g)


# ------------------------------------------------------------------ modes
def test_model_mode_sets_the_mode_and_restores_every_submodule_flag_even_on_error():
    model = tiny_model()
    model[1].eval()  # a mixed state: only the BatchNorm in eval mode
    with pytest.raises(RuntimeError), model_mode(model, "train"):
        assert all(m.training for m in model.modules())
        raise RuntimeError
    assert [m.training for m in model.modules()] == [True, True, False, True, True, True]
    with model_mode(model, "keep"):
        assert not model[1].training and model[0].training


# ---------------------------------------------------------------- devices
def test_model_device_and_resolve_device():
    assert model_device(tiny_model()) == torch.device("cpu")
    assert model_device(nn.Identity()) == torch.device("cpu")
    bn_only = nn.BatchNorm2d(3, affine=False)  # buffers, no parameters
    assert model_device(bn_only) == bn_only.running_mean.device
    assert resolve_device("cpu", tiny_model()) == torch.device("cpu")
    assert resolve_device(None, tiny_model()) == torch.device("cpu")
    with pytest.raises(TypeError, match="device"):
        resolve_device(3.0, tiny_model())  # type: ignore[arg-type]


# ----------------------------------------------------------------- pixels
def test_to_pixels_divides_uint8_by_255_and_keeps_float_pixels():
    levels = torch.arange(256, dtype=torch.uint8).view(1, 1, 16, 16)
    pixels = to_pixels(levels)
    assert pixels.dtype == torch.float32 and pixels[0, 0, 0, 0] == 0 and pixels[0, 0, -1, -1] == 1
    assert torch.equal(pixels * 255, torch.arange(256, dtype=torch.float32).view(1, 1, 16, 16))
    assert to_pixels(levels, torch.float64).dtype == torch.float64
    x = torch.rand(2, 3, 4, 4)
    assert to_pixels(x) is x
    assert to_pixels(x.double()).dtype == torch.float32
    with pytest.raises(TypeError, match="images"):
        to_pixels(torch.zeros(1, 3, 2, 2, dtype=torch.int32))
    with pytest.raises(TypeError, match="dtype"):
        to_pixels(levels, torch.int64)


# -------------------------------------------------------------- precision
def test_mixed_precision_enters_autocast_or_switches_an_enclosing_one_off():
    assert active_autocast_dtype("cpu") is None
    with mixed_precision("cpu", torch.bfloat16):
        assert active_autocast_dtype("cpu") == torch.bfloat16
        assert torch.mm(torch.ones(2, 2), torch.ones(2, 2)).dtype == torch.bfloat16
        with mixed_precision(torch.device("cpu"), None):
            assert active_autocast_dtype("cpu") is None
            assert torch.mm(torch.ones(2, 2), torch.ones(2, 2)).dtype == torch.float32
        assert active_autocast_dtype("cpu") == torch.bfloat16
    with mixed_precision("cpu", None):
        assert active_autocast_dtype("cpu") is None


# ---------------------------------------------------------------- batches
def test_device_batches_cover_every_example_in_order_as_pixels():
    images, labels = tiny_data(21)
    batches = list(device_batches(images, labels, 8, torch.device("cpu")))
    assert [rows for rows, _, _ in batches] == [slice(0, 8), slice(8, 16), slice(16, 24)]
    assert torch.equal(torch.cat([x for _, x, _ in batches]), images.float() / 255)
    assert torch.equal(torch.cat([y for _, _, y in batches]), labels)
    with pytest.raises(ValueError, match="batch_size"):
        device_batches(images, labels, 0, torch.device("cpu"))
    with pytest.raises(ValueError, match="differ in length"):
        device_batches(images, labels[:3], 8, torch.device("cpu"))


def test_batched_correctness_matches_a_whole_batch_forward_without_host_syncs():
    model, (images, labels) = tiny_model(), tiny_data(21)
    model.train()
    with NoHostSync():
        correct = batched_correctness(model, images, labels, batch_size=8)
    assert model.training  # flags restored
    model.eval()
    with torch.no_grad():
        expected = model(images.float() / 255).argmax(1) == labels
    assert correct.dtype == torch.bool and torch.equal(correct, expected)
    assert batched_correctness(model, images[:0], labels[:0]).shape == (0,)


def test_batched_correctness_applies_delta_clipped_and_then_the_perturbation():
    model, (images, labels) = tiny_model(), tiny_data(10)
    delta = torch.full(images.shape, 0.75)
    seen = []

    def perturb(m, x, y):
        seen.append(x.clone())
        return 1 - x

    correct = batched_correctness(model, images, labels, perturb, batch_size=4, delta=delta)
    shifted = (images.float() / 255 + 0.75).clamp(0, 1)
    assert torch.equal(torch.cat(seen), shifted)
    model.eval()
    with torch.no_grad():
        assert torch.equal(correct, model(1 - shifted).argmax(1) == labels)
    with pytest.raises(ValueError, match="delta"):
        batched_correctness(model, images, labels, delta=delta[:2])


def test_batched_correctness_runs_model_and_attack_under_the_requested_autocast():
    dtypes = []

    def perturb(m, x, y):
        dtypes.append(active_autocast_dtype("cpu"))
        return x

    model, (images, labels) = tiny_model(), tiny_data(4)
    batched_correctness(model, images, labels, perturb, autocast_dtype=torch.bfloat16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        batched_correctness(model, images, labels, perturb)
    assert dtypes == [torch.bfloat16, None]


# ------------------------------------------------------------------- store
def test_store_preserved_puts_the_rows_back_even_on_error_and_follows_the_shard():
    store = PerExampleStore(9, (1, 2, 2), 1, torch.device("cpu"), shard=1, num_shards=2)  # examples 1, 3, 5, 7
    store.data.normal_()
    before = store.data.clone()
    index = torch.tensor([3, 7])
    with pytest.raises(RuntimeError), store.preserved(index):
        store.write(index, None, torch.ones(2, 1, 2, 2))
        assert torch.equal(store.read(index, None), torch.ones(2, 1, 2, 2))
        raise RuntimeError
    assert torch.equal(store.data, before)
    assert store.num_examples == 9


# --------------------------------------------------------------- progress
@pytest.mark.parametrize("total, step", [(1000, 1), (7, 1), (95, 5), (3, 3), (1, 1)])
def test_a_bar_off_a_terminal_writes_a_bounded_number_of_whole_lines(total, step):
    log = io.StringIO()
    bar = progress_bar(total, "epoch 1/1", file=log)
    for done in range(0, total, step):
        bar.set_postfix({"loss": "2.3", "acc": "0.5"}, refresh=False)
        bar.update(min(step, total - done))
    bar.close()
    text = log.getvalue()
    lines = text.splitlines()
    assert "\r" not in text and text.endswith("\n")
    assert 2 <= len(lines) <= LOG_LINES + 1
    assert all(line.startswith("epoch 1/1 [") for line in lines)
    assert f"{total}/{total}" in lines[-1] and lines[-1].endswith("loss=2.3, acc=0.5")
    assert len(set(lines)) == len(lines)


def test_a_log_bar_below_one_left_open_writes_plain_lines():
    first, second = io.StringIO(), io.StringIO()
    left_open = progress_bar(10, "epoch 1/2", file=first)
    left_open.update(5)
    with progress_bar(4, "epoch 2/2", file=second) as bar:
        bar.update(4)
    lines = second.getvalue().splitlines()
    assert lines and all(line.startswith("epoch 2/2 [") for line in lines) and "\x1b" not in second.getvalue()
    left_open.close()


def test_a_bar_on_a_terminal_redraws_one_line_and_a_disabled_bar_writes_nothing():
    terminal = Terminal()
    with progress_bar(4, "evaluate", file=terminal, unit="batch") as bar:
        bar.update(4)
    assert terminal.getvalue().startswith("\revaluate [") and "4/4" in terminal.getvalue()
    assert terminal.getvalue().count("\n") == 1
    quiet = io.StringIO()
    with progress_bar(4, "x", file=quiet, enabled=False) as bar:
        bar.update(4)
    assert quiet.getvalue() == ""


def test_a_slow_bar_shows_seconds_per_step():
    line = console_tqdm.format_meter(n=2, total=10, elapsed=5.0, unit="step", bar_format=BAR_FORMAT, prefix="epoch")
    assert "2.50s/step" in line and line.startswith("epoch [")
    fast = console_tqdm.format_meter(n=8, total=10, elapsed=2.0, unit="step", bar_format=BAR_FORMAT)
    assert "4.00step/s" in fast


def test_the_trainer_bar_in_a_log_stays_short_and_shows_loss_acc_and_lr(capsys):
    g = torch.Generator().manual_seed(0)
    data = (torch.randint(0, 256, (80, 3, 8, 8), generator=g, dtype=torch.uint8), torch.randint(0, 3, (80,), generator=g))
    torch.manual_seed(0)
    trainer = Trainer(SmallCNN(num_classes=3, width=4), epochs=1, batch_size=2, eval_every=0, seed=0, device="cpu")
    trainer.fit(data)
    lines = capsys.readouterr().err.splitlines()
    assert 2 <= len(lines) <= LOG_LINES + 1  # for 40 steps
    assert all(line.startswith("epoch 1/1 [") for line in lines)
    assert "40/40" in lines[-1] and all(key in lines[-1] for key in ("loss=", "acc=", "lr="))
