"""Smoke tests of the benchmark machinery in ``benchmarks/`` (the benchmarks
themselves run only on request: ``python -m pytest benchmarks/``).

The pass counter is checked on cases whose counts are known exactly from the
algorithms and the cost model (forward = input-only backward = F, full
backward = 2F), through the same Trainer code path the
benchmarks time; the report writer is checked for its columns, its
arithmetic and for keeping hand-written text outside its markers.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # benchmarks/ is a top-level folder, not an installed package
    sys.path.insert(0, str(ROOT))

from benchmarks.harness import (  # noqa: E402
    BASELINE,
    PassCounter,
    PeakMemory,
    bf16_peak_tflops,
    make_data,
    make_runner,
    make_size,
    method_names,
    pass_flops,
)
from benchmarks.report import (  # noqa: E402
    ATTACK_COLUMNS,
    TRAINING_COLUMNS,
    AttackResult,
    BenchResults,
    TrainingResult,
    cost_units,
    main,
    render_section,
    write_report,
)


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def smoke():
    size = make_size("smoke", batches=1)
    images, labels, _ = make_data(size)
    return size, images, labels


def _passes(name, smoke):
    size, images, labels = smoke
    runner = make_runner(name, size, images, labels)
    return runner, runner.warmup(1)


# ------------------------------------------------------------------ counting
@pytest.mark.parametrize(
    "method, expected",
    [
        # PGD-10: 10 attack steps (forward + input-only backward), then the
        # training forward and its full backward.
        (
            "PGD-10",
            dict(forward=11, backward_input_only=10, backward_full=1, backward_reaching_input=10),
        ),
        (
            "FGSM",
            dict(forward=2, backward_input_only=1, backward_full=1, backward_reaching_input=1),
        ),
        (
            "N-FGSM",
            dict(forward=2, backward_input_only=1, backward_full=1, backward_reaching_input=1),
        ),
        (
            "ATTA-1",
            dict(forward=2, backward_input_only=1, backward_full=1, backward_reaching_input=1),
        ),
        # APART: pass 1's backward goes to the input and the sites only; pass 2's
        # full backward also reaches the input (∇x₁ updates the initialization ω).
        (
            "APART",
            dict(forward=2, backward_input_only=1, backward_full=1, backward_reaching_input=2),
        ),
        # The reference scripts' loss.backward() in every attack step computes
        # weight gradients each time.
        (
            BASELINE,
            dict(forward=11, backward_input_only=0, backward_full=11, backward_reaching_input=10),
        ),
    ],
)
def test_pass_counts_per_example(method, expected, smoke):
    _, passes = _passes(method, smoke)
    assert passes == expected


def test_cost_model_from_counted_passes(smoke):
    _, pgd = _passes("PGD-10", smoke)
    _, apart = _passes("APART", smoke)
    assert cost_units(pgd) == 23 and cost_units(apart) == 5  # 11F + 10F + 2F and 2F + 1F + 2F


def test_counter_distinguishes_input_only_from_full_backward():
    model = torch.nn.Sequential(
        torch.nn.Conv2d(3, 4, 3), torch.nn.Flatten(), torch.nn.LazyLinear(2)
    )
    x, y = torch.rand(5, 3, 6, 6), torch.tensor([0, 1, 0, 1, 1])
    model(x)  # materialize the lazy layer
    with PassCounter(model) as counter:
        delta = torch.zeros_like(x, requires_grad=True)
        torch.autograd.grad(F.cross_entropy(model(x + delta), y), [delta])  # input only
        F.cross_entropy(model(x), y).backward()  # full, input not reached
        with torch.no_grad():
            model(x[:2])  # a forward with no backward
        counter.examples = 5
    assert counter.totals() == dict(
        forward=12, backward_input_only=5, backward_full=5, backward_reaching_input=5
    )
    assert counter.per_example()["forward"] == pytest.approx(12 / 5)
    assert model._forward_hooks == {} and model._forward_pre_hooks == {}  # hooks removed


def test_counter_needs_examples():
    model = torch.nn.Linear(2, 2)
    with PassCounter(model) as counter:
        model(torch.zeros(1, 2))
    with pytest.raises(ValueError, match="examples"):
        counter.per_example()


def test_pass_flops_match_the_convolution_arithmetic():
    # SmallCNN(width=4) at batch 16: count by hand what FlopCounterMode should
    # see, from the layer shapes (2 FLOPs per multiply-add).
    size = make_size("smoke")
    flops = pass_flops(size)
    from benchmarks.harness import make_model

    model = make_model(size)
    macs, hw = 0, 32
    shapes = []

    def record(module, inputs, output):
        shapes.append((module, output.shape))

    handles = [
        m.register_forward_hook(record)
        for m in model.modules()
        if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))
    ]
    with torch.no_grad():
        model(torch.rand(1, 3, hw, hw))
    for h in handles:
        h.remove()
    for module, shape in shapes:
        if isinstance(module, torch.nn.Conv2d):
            k = module.in_channels // module.groups * module.kernel_size[0] * module.kernel_size[1]
            macs += shape.numel() * k
        else:
            macs += module.in_features * module.out_features
    assert flops["forward"] == pytest.approx(2 * macs)
    # The input gradient costs a forward except for the first layer's
    # (its input is the image: the same shape, so the same count); the full
    # backward adds the weight gradients (one forward's worth) but skips the
    # first layer's input gradient.
    first = shapes[0][0]
    first_macs = shapes[0][1].numel() * first.in_channels * first.kernel_size[0] * first.kernel_size[1]
    assert flops["backward_input_only"] == pytest.approx(2 * macs)
    assert flops["backward_full"] == pytest.approx(2 * (2 * macs - first_macs))


def test_peak_is_unknown_on_a_cpu():
    peak, why = bf16_peak_tflops(make_size("smoke"))
    assert peak is None and "CPU" in why


def test_epoch_timing_and_memory(smoke):
    size = smoke[0]
    meter = PeakMemory(torch.device(size.device)).start()
    runner, _ = _passes("FGSM-RS", smoke)
    runner.epoch()
    runner.epoch()
    reading = meter.stop()
    assert len(runner.times) == 2 and all(t > 0 for t in runner.times)
    assert runner.trainer.epoch == 2 and runner.trainer.global_step == 2  # one batch per epoch
    assert reading.peak_mib >= 0 and reading.kind


def test_method_list_starts_with_the_reference():
    size = make_size("smoke", pgd_steps=(5, 10))
    names = method_names(size)
    assert names[0] == "PGD-10"
    assert set(names) == {"PGD-10", "PGD-5", "FGSM", "FGSM-RS", "N-FGSM", "ATTA-1", "APART"}


# ------------------------------------------------------------------- report
def _results() -> BenchResults:
    single = dict(
        forward=2.0, backward_input_only=1.0, backward_full=1.0, backward_reaching_input=1.0
    )
    r = BenchResults(
        size="cpu",
        command="python -m pytest benchmarks/ --bench-size cpu",
        machine={"date": "2026-11-25", "cpu": "test CPU", "torch": torch.__version__},
        config={"model": "M", "batch_size": 128, "examples per epoch": 512, "batches per epoch": 4},
        data="synthetic",
    )
    r.add_training(
        TrainingResult(
            "PGD-10",
            [2.0, 2.2, 2.1],
            dict(
                forward=11.0,
                backward_input_only=10.0,
                backward_full=1.0,
                backward_reaching_input=10.0,
            ),
            100.0,
            "peak RSS",
        )
    )
    r.add_training(TrainingResult("APART", [0.44, 0.5, 0.46], single, 50.0, "peak RSS"))
    r.add_training(TrainingResult("FGSM-RS", [0.6, 0.7], single, 40.0, "peak RSS"))
    r.add_training(
        TrainingResult(
            BASELINE,
            [3.0, 3.1],
            dict(
                forward=11.0,
                backward_input_only=0.0,
                backward_full=11.0,
                backward_reaching_input=10.0,
            ),
        )
    )
    r.add_attack(
        AttackResult(
            "PGD-20",
            [0.5, 0.4],
            128,
            dict(forward=20.0, backward_input_only=20.0, backward_full=0.0),
        )
    )
    return r


def _table(text: str, first_column: str):
    lines = [ln for ln in text.splitlines() if ln.startswith("| ")]
    start = next(i for i, ln in enumerate(lines) if ln.startswith(f"| {first_column} |"))
    header = [c.strip() for c in lines[start].strip("|").split("|")]
    rows = []
    for ln in lines[start + 1 :]:
        cells = [c.strip() for c in ln.strip("|").split("|")]
        if len(cells) != len(header):
            break
        rows.append(dict(zip(header, cells)))
    return header, rows


def test_report_table_columns_and_values():
    text = render_section(_results())
    header, rows = _table(text, "Method")
    assert tuple(header) == TRAINING_COLUMNS
    for column in (
        "Method",
        "Ratio to PGD-10",
        "Forward / example",
        "Input-only backward / example",
        "Full backward / example",
        "Peak memory (MiB)",
    ):
        assert column in header
    by_method = {r["Method"]: r for r in rows}
    assert list(by_method)[0] == "PGD-10" and list(by_method)[-1] == BASELINE
    assert by_method["APART"]["Ratio to PGD-10"] == "0.22"  # 0.44 / 2.0, minima
    assert by_method["APART"]["Cost-model ratio"] == "0.217"  # 5 / 23
    assert by_method["PGD-10"]["Forward / example"] == "11"
    assert by_method[BASELINE]["Full backward / example"] == "11"
    assert by_method[BASELINE]["Peak memory (MiB)"] == "n/a"
    attack_header, attack_rows = _table(text, "Attack")
    assert tuple(attack_header) == ATTACK_COLUMNS
    assert attack_rows[0]["Images / s"] == "320.0"  # 128 / 0.4
    assert "2026-11-25" in text and "test CPU" in text and torch.__version__ in text
    _, targets = _table(text, "Target")
    met = {t["Target"]: t["Met"] for t in targets}
    assert met["APART epoch / PGD-10 epoch"] == "yes"
    assert met["FGSM-RS epoch / PGD-10 epoch"] == "**no**"  # 0.6 / 2.0 = 0.3
    assert met["N-FGSM epoch / PGD-10 epoch"] == "n/a"  # not measured: no verdict
    assert met[f"advtrain PGD-10 vs {BASELINE}"] == "yes"  # 3.0 / 2.0 = 1.5 ≥ 1.3
    assert by_method["PGD-10"]["Model TFLOP/s"] == "n/a"  # no FLOPs counted in this run


def test_report_model_flops_and_fraction_of_peak():
    results = _results()
    results.size = "gpu"
    results.config["examples per epoch"] = 50_000
    results.pass_flops = dict(forward=1e9, backward_input_only=1e9, backward_full=2e9)
    results.peak_tflops, results.peak_source = 1000.0, "test GPU"
    # PGD-10: 23 GFLOP per example (11 F + 10 F + 2 F) × 50,000 / 2.0 s = 575 TFLOP/s.
    assert results.model_tflops("PGD-10") == pytest.approx(575.0)
    assert results.peak_fraction("PGD-10") == pytest.approx(0.575)
    # The reference loop's 11 full backward passes cost 2 F each: 33 GFLOP per example.
    assert results.model_tflops(BASELINE) == pytest.approx(33e9 * 50_000 / 3.0 / 1e12)
    text = render_section(results)
    _, rows = _table(text, "Method")
    by_method = {r["Method"]: r for r in rows}
    assert by_method["PGD-10"]["Model TFLOP/s"] == "575"
    assert by_method["PGD-10"]["Fraction of bf16 peak"] == "57.5%"
    _, targets = _table(text, "Target")
    measured = {t["Target"]: t["Measured"] for t in targets}
    assert measured["PGD-10: fraction of the bf16 peak (1000 TFLOP/s)"] == "57.5%"
    assert measured["PGD-10 epoch time (s), full 50,000-image epoch"] == "2.000"


def test_write_report_keeps_text_outside_its_markers(tmp_path):
    path = tmp_path / "benchmarks.md"
    path.write_text("# Benchmarks\n\nHand-written analysis.\n")
    results = _results()
    write_report(path, results)
    first = path.read_text()
    assert (
        "Hand-written analysis." in first
        and first.count("<!-- benchmark-results:cpu:begin -->") == 1
    )
    path.write_text(first + "\nMore notes after the section.\n")
    results.training[0].times = [4.0]
    write_report(path, results)
    second = path.read_text()
    assert second.count("<!-- benchmark-results:cpu:begin -->") == 1
    assert "Hand-written analysis." in second and "More notes after the section." in second
    _, rows = _table(second, "Method")
    assert {r["Method"]: r for r in rows}["APART"]["Ratio to PGD-10"] == "0.11"  # 0.44 / 4.0


def test_report_cli_renders_saved_json(tmp_path, capsys):
    saved = tmp_path / "results.json"
    saved.write_text(json.dumps(_results().to_json()))
    out = tmp_path / "doc.md"
    assert main([str(saved), "--out", str(out)]) == 0
    header, _ = _table(out.read_text(), "Method")
    assert tuple(header) == TRAINING_COLUMNS
