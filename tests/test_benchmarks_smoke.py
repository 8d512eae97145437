"""The epoch-time benchmark in ``benchmarks/`` (run on request only:
``python -m pytest benchmarks/``), checked in about a second: the pass
counter on passes known exactly, every registered method's cost model
against the passes its training step really makes, and the report's columns,
arithmetic and markers."""
from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # benchmarks/ is a top-level folder, not an installed package
    sys.path.insert(0, str(ROOT))

from advtrain import cli  # noqa: E402
from advtrain.methods import METHODS, Passes  # noqa: E402
from benchmarks.epoch_time import (  # noqa: E402
    BASELINE, COLUMNS, SIZES, Results, Row, markers, render, run, table_rows, write_report)
from benchmarks.passes import PassCounter  # noqa: E402

SINGLE_STEP = Passes(forward=2, input_backward=1, full_backward=1)


@pytest.fixture(scope="module")
def smoke() -> Results:
    """Every registered method and the baseline on SmallCNN(width=4): two
    batches of 8 per epoch, a counted warm-up epoch and two timed ones."""
    return run(dataclasses.replace(SIZES["smoke"], batch_size=8, examples=16, rounds=2))


# ------------------------------------------------------------------ counting
def test_pgd10_and_single_step_passes_are_counted_exactly(smoke):
    # PGD-10: ten attack steps (a forward and an input-only backward each),
    # then the training forward and its full backward.
    assert smoke.row("pgd").passes == Passes(forward=11, input_backward=10, full_backward=1)
    for name in ("fgsm", "fgsm-rs", "nfgsm", "atta", "apart"):
        assert smoke.row(name).passes == SINGLE_STEP, name
    # The reference loop's loss.backward() computes weight gradients in every attack step.
    assert smoke.row(BASELINE).passes == Passes(forward=11, input_backward=0, full_backward=11)


@pytest.mark.parametrize("name", list(METHODS))
def test_the_registry_cost_model_is_what_the_training_step_runs(smoke, name):
    # the epoch's geometry: LIET's once-per-li_every-steps pass is spread over an epoch's examples
    assert smoke.row(name).passes == METHODS[name].passes(batch_size=8, examples=16)


def test_every_registered_method_is_a_row_pgd_first_the_baseline_last(smoke):
    names = [row.name for row in smoke.rows]
    assert names[0] == "pgd" and names[-1] == BASELINE and set(names[1:-1]) == set(METHODS) - {"pgd"}
    assert all(len(row.times) == 2 and min(row.times) > 0 for row in smoke.rows)
    assert {row.name: row.steps_per_batch for row in smoke.rows}["free-at"] == METHODS["free-at"].build(
        torch.nn.Linear(1, 1), device="cpu").replays
    assert [cells[0] for cells in table_rows(smoke)] == names


def _tiny():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.Tanh(), torch.nn.Flatten(), torch.nn.Linear(64, 2))


def test_counter_tells_input_only_from_full_backward_passes():
    model, y = _tiny(), torch.tensor([0, 1, 0, 1, 1])
    x = torch.rand(5, 3, 6, 6)
    with PassCounter(model) as counter:
        delta = torch.zeros_like(x, requires_grad=True)
        torch.autograd.grad(F.cross_entropy(model(x + delta), y), [delta])  # 5 rows, input only
        F.cross_entropy(model(x[:3]), y[:3]).backward()  # 3 rows, full
        with torch.no_grad():
            model(x[:2])  # a forward without backward
        # one backward through two forwards (TRADES' loss): both full
        (F.cross_entropy(model(x), y) + model(x[:4]).square().mean()).backward()
    assert counter.passes(examples=1) == Passes(forward=5 + 3 + 2 + 5 + 4, input_backward=5, full_backward=3 + 5 + 4)
    assert model._forward_hooks == {} and counter.passes(examples=2).forward == 19 / 2  # hooks removed


def test_counter_counts_a_double_backward_through_a_gradient_penalty():
    model, y = _tiny(), torch.tensor([0, 1, 0, 1])
    x = torch.rand(4, 3, 6, 6, requires_grad=True)
    with PassCounter(model) as counter:
        (grad,) = torch.autograd.grad(F.cross_entropy(model(x), y), [x], create_graph=True)  # input only
        grad.square().sum().backward()  # back through that input-gradient pass, then its forward: two full
    assert counter.passes(examples=4) == Passes(forward=1, input_backward=1, full_backward=2)


def test_counter_needs_examples():
    with PassCounter(_tiny()) as counter, pytest.raises(ValueError, match="examples"):
        counter.passes(examples=0)


# ------------------------------------------------------------------- report
def _results() -> Results:
    rows = [Row("pgd", [2.0, 2.4, 2.2], Passes(11, 10, 1), 100.0), Row("apart", [0.5, 0.44, 0.6], SINGLE_STEP, 50.0),
            Row("gradalign", [1.0, 1.2], None, 80.0), Row("free-at", [2.1], Passes(1, 0, 1), 60.0, steps_per_batch=8),
            Row(BASELINE, [3.1, 3.0], Passes(11, 0, 11), 120.0)]
    return Results(SIZES["cpu"], rows, "synthetic", "python -m pytest benchmarks/ --bench-size cpu",
                   {"date": "2026-12-02 10:00 UTC", "code": "abc1234", "machine": "test CPU", "software": "torch"})


def _table(text: str):
    lines = [line for line in text.splitlines() if line.startswith("| ")]
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    return header, {cells[0]: dict(zip(header, cells)) for cells in
                    ([c.strip() for c in line.strip("|").split("|")] for line in lines[1:])}


def test_report_columns_and_arithmetic():
    text = render(_results())
    header, rows = _table(text)
    assert tuple(header) == COLUMNS and list(rows) == ["pgd", "apart", "gradalign", "free-at", BASELINE]
    assert rows["apart"]["Epoch (s), min"] == "0.44" and rows["apart"]["Epoch (s), median"] == "0.5"
    assert rows["apart"]["Ratio to PGD-10"] == "0.22"  # 0.44 / 2.0, the minima
    assert rows["apart"]["Cost-model ratio"] == "0.217"  # 5F / 23F
    assert rows[BASELINE]["Ratio to PGD-10"] == "1.5" and rows[BASELINE]["Cost-model ratio"] == "1.43"  # 33F / 23F
    assert rows["pgd"]["Forward / example"] == "11" and rows[BASELINE]["Full backward / example"] == "11"
    assert rows["gradalign"]["Forward / example"] == "n/a" == rows["gradalign"]["Cost-model ratio"]  # not counted
    # Free-AT: 3F per optimizer step, 8 steps per batch: 24F an epoch's batch against PGD-10's 23F.
    assert rows["free-at"]["Steps / batch"] == "8" and rows["free-at"]["Cost-model ratio"] == "1.04"
    assert rows["pgd"]["Peak memory (MiB)"] == "100"
    assert "2026-12-02" in text and "abc1234" in text and "test CPU" in text and "--bench-size cpu" in text


def test_write_report_keeps_the_text_outside_its_markers(tmp_path):
    path = tmp_path / "benchmarks.md"
    path.write_text("# Benchmarks\n\nHand-written analysis.\n")
    results = _results()
    write_report(path, results)  # no markers yet: appended
    begin, end = markers("cpu")
    path.write_text(path.read_text().replace(end, end + "\n\nNotes after the table."))
    results.rows[0].times = [4.0]
    write_report(path, results)  # replaced in place
    text = path.read_text()
    assert text.count(begin) == 1 and text.index("Hand-written analysis.") < text.index(begin)
    assert text.index(end) < text.index("Notes after the table.")
    assert _table(text)[1]["apart"]["Ratio to PGD-10"] == "0.11"  # 0.44 / 4.0


def test_bench_command_selects_registered_methods(capsys):
    cmd = cli.bench_command(ROOT / "benchmarks", "cpu", None, methods=["trades", "mart"])
    assert cmd[cmd.index("--bench-methods") + 1] == "trades,mart"
    assert cli.main(["bench", "--methods", "pgd,nope"]) == 2
    assert "nope: not a registered method" in capsys.readouterr().err
