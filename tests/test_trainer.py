"""The Trainer: schedules, history, checkpoints and exact resume, bad input,
and an end-to-end check on real CIFAR-10."""
from __future__ import annotations

import json
import math
import os
import warnings

import pytest
import torch
from torch import nn

from advtrain import PGD, AttackPolicy, FastATTrainer, PGDTrainer, Trainer
from advtrain.attacks import FGSMRS
from advtrain.data import DeviceLoader, cifar10
from advtrain.models import ScaledDirection, SmallCNN
from advtrain.models.input_only import InputOnlyGradients
from advtrain.training import Callback, CheckpointError, History, load_checkpoint, triangular
from advtrain.training.output_check import check_model_outputs
from advtrain.training.schedules import cyclic_momentum, make_schedule, multistep

# These tests run APART for a few steps on purpose, with the reference
# step-size schedule: its short-run warning is expected here.
pytestmark = pytest.mark.filterwarnings("ignore:APART's step-size learning rate .* is tuned for")


def synthetic(n: int = 96, seed: int = 0):
    """Images whose class is readable from the mean brightness of a channel."""
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 3, (n,), generator=g)
    x = torch.randint(0, 120, (n, 3, 32, 32), generator=g, dtype=torch.uint8)
    x[torch.arange(n), y] += 120
    return x, y


def small_model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return SmallCNN(num_classes=3, width=8)


def params(model: nn.Module):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


class StopAt(Callback):
    """Simulates a crash: raises when epoch ``epoch`` (0-based) starts."""

    def __init__(self, epoch: int) -> None:
        self.epoch = epoch

    def on_epoch_start(self, trainer, epoch):
        if epoch == self.epoch:
            raise KeyboardInterrupt("simulated kill")


def make_trainer(run_dir, seed_model=0, **kw):
    defaults = dict(epochs=3, batch_size=32, lr=0.05, eval_every=1, eval_examples=32,
                    eval_attack=PGD(8 / 255, steps=2), progress=False, seed=0, run_dir=run_dir)
    defaults.update(kw)
    return Trainer(small_model(seed_model), AttackPolicy(FGSMRS(8 / 255, bn_mode="train")), **defaults)


# ------------------------------------------------------------------ schedules
def test_triangular_schedule_peaks_mid_run_and_returns_to_zero():
    s = triangular(0.2, 30)
    assert s(0) == 0.0 and s(30) == 0.0
    assert s(15) == pytest.approx(0.2)
    assert s(7.5) == pytest.approx(0.1)
    m = cyclic_momentum(30)
    assert m(0) == pytest.approx(0.9) and m(15) == pytest.approx(0.8) and m(30) == pytest.approx(0.9)


def test_piecewise_schedule_decays_at_milestones():
    s = multistep(0.1, 100)
    assert s(0) == pytest.approx(0.1) and s(49.9) == pytest.approx(0.1)
    assert s(50) == pytest.approx(0.01) and s(80) == pytest.approx(0.001)


def test_unknown_schedule_name_is_rejected():
    with pytest.raises(ValueError, match="schedule must be"):
        make_schedule("cosine-ish", 0.1, 10)


def test_lr_is_stepped_per_iteration():
    seen = []
    trainer = make_trainer(None, epochs=2, eval_every=0)
    step = trainer.train_step

    def spy(batch):
        seen.append(trainer.optimizer.param_groups[0]["lr"])
        return step(batch)

    trainer.train_step = spy
    trainer.fit(synthetic(64))
    expected = [triangular(0.05, 2)(e + i / 2) for e in range(2) for i in range(2)]
    assert seen == pytest.approx(expected)


# ---------------------------------------------------------- history and runs
def test_history_is_written_as_json_lines(tmp_path):
    trainer = make_trainer(tmp_path, epochs=2)
    history = trainer.fit(synthetic(), eval_data=synthetic(32, seed=1))
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line) for line in lines] == history.records
    assert [r["epoch"] for r in history] == [1, 2]
    for key in ("train_loss", "train_acc", "clean_acc", "robust_acc", "time", "lr"):
        assert key in history[-1]
    assert 0.0 <= history[-1]["robust_acc"] <= history[-1]["clean_acc"] <= 1.0
    assert History.read(tmp_path / "metrics.jsonl").records == history.records


def test_progress_bar_and_epoch_summary_are_printed(capsys):
    trainer = make_trainer(None, epochs=1, progress=True)
    trainer.fit(synthetic(64), eval_data=synthetic(32, seed=1))
    captured = capsys.readouterr()
    assert "epoch 1/1 [" in captured.err and "2/2" in captured.err
    assert "robust_acc=" in captured.out


def test_training_learns_the_synthetic_task():
    trainer = Trainer(small_model(), None, epochs=4, batch_size=32, lr=0.1, eval_attack=None, progress=False,
                      seed=0, eval_examples=None)
    history = trainer.fit(synthetic(192), eval_data=synthetic(96, seed=1))
    assert history[-1]["clean_acc"] > 0.8


def test_training_leaves_no_parameter_gradients_from_the_attack():
    trainer = make_trainer(None, epochs=1, eval_every=0)
    seen = []
    original = trainer.policy.perturb

    def spy(model, batch):
        out = original(model, batch)
        seen.append(all(p.grad is None for p in trainer.model.parameters()))
        return out

    trainer.policy.perturb = spy
    trainer.fit(synthetic(64))
    assert seen and all(seen)


# --------------------------------------------------------------- checkpoints
def test_resume_after_a_kill_equals_an_uninterrupted_run(tmp_path):
    data, test = synthetic(), synthetic(32, seed=1)
    full = make_trainer(tmp_path / "full")
    full.fit(data, eval_data=test)

    killed = make_trainer(tmp_path / "killed", callbacks=[StopAt(2)])
    with pytest.raises(KeyboardInterrupt):
        killed.fit(data, eval_data=test)
    assert load_checkpoint(tmp_path / "killed" / "checkpoint.pt")["epoch"] == 2

    resumed = make_trainer(tmp_path / "killed", seed_model=123)  # different init: must be overwritten
    history = resumed.fit(data, eval_data=test, resume=True)

    want, got = params(full.model), params(resumed.model)
    assert want.keys() == got.keys()
    for k in want:
        assert torch.equal(want[k], got[k]), k
    assert [r["train_loss"] for r in history] == [r["train_loss"] for r in full.history]
    assert [r["robust_acc"] for r in history] == [r["robust_acc"] for r in full.history]
    lines = (tmp_path / "killed" / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 3


def test_resume_drops_metrics_recorded_after_the_checkpoint(tmp_path):
    trainer = make_trainer(tmp_path, epochs=2, checkpoint_every=1)
    trainer.fit(synthetic())
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write(json.dumps({"epoch": 3, "train_loss": 0.0}) + "\n")
    resumed = make_trainer(tmp_path, epochs=2)
    resumed.fit(synthetic(), resume=True)
    assert len((tmp_path / "metrics.jsonl").read_text().splitlines()) == 2


def test_checkpoint_is_written_atomically_and_loads_weights_only(tmp_path):
    trainer = make_trainer(tmp_path, epochs=1, eval_every=0)
    trainer.fit(synthetic(64))
    names = sorted(os.listdir(tmp_path))
    assert names == ["checkpoint.pt", "metrics.jsonl"]  # no temporary files left behind
    state = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    assert state["epoch"] == 1 and "model" in state and "optimizer" in state and "rng" in state


def test_corrupted_checkpoint_raises_a_clear_error(tmp_path):
    trainer = make_trainer(tmp_path, epochs=1, eval_every=0)
    trainer.fit(synthetic(64))
    path = tmp_path / "checkpoint.pt"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="corrupted"):
        make_trainer(tmp_path, epochs=2).fit(synthetic(64), resume=True)


def test_missing_checkpoint_and_foreign_files_are_rejected(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        make_trainer(tmp_path, epochs=1).fit(synthetic(64), resume=True)
    torch.save({"weights": torch.zeros(1)}, tmp_path / "other.pt")
    with pytest.raises(CheckpointError, match="not an advtrain checkpoint"):
        make_trainer(tmp_path, epochs=1).fit(synthetic(64), resume=tmp_path / "other.pt")


def test_checkpoint_from_another_model_is_rejected(tmp_path):
    make_trainer(tmp_path, epochs=1, eval_every=0).fit(synthetic(64))
    torch.manual_seed(0)
    other = Trainer(SmallCNN(num_classes=3, width=4), epochs=2, batch_size=32, progress=False, run_dir=tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # refused: the error says it all, no "settings differ" warning first
        with pytest.raises(CheckpointError, match="different model"):
            other.fit(synthetic(64), resume=True)


def test_checkpoint_records_the_model_arguments_and_refuses_the_other_shortcut_variant(tmp_path):
    from advtrain.models import PreActResNet18

    def trainer(**model_kw):
        torch.manual_seed(0)
        model = PreActResNet18(3, width=2, **model_kw)
        return Trainer(model, epochs=2, batch_size=32, progress=False, eval_every=0, run_dir=tmp_path)

    trainer(shortcut="preact").fit(synthetic(32))
    recorded = load_checkpoint(tmp_path / "checkpoint.pt")["config"]["model_kwargs"]
    assert recorded == {"num_classes": 3, "width": 2, "shortcut": "preact", "normalize": True}
    # The two variants have the same weights: only the recorded arguments tell them apart.
    with pytest.raises(CheckpointError, match=r"other arguments .*'shortcut': \('preact', 'input'\)"):
        trainer().fit(synthetic(32), resume=True)
    trainer(shortcut="preact").fit(synthetic(32), resume=True)


def test_stop_training_from_a_callback_ends_the_run_with_a_checkpoint(tmp_path):
    class StopAfterFirst(Callback):
        def on_epoch_end(self, trainer, epoch, record):
            trainer.stop_training = True

    trainer = make_trainer(tmp_path, epochs=5, callbacks=[StopAfterFirst()], eval_every=0)
    history = trainer.fit(synthetic(64))
    assert len(history) == 1
    assert load_checkpoint(tmp_path / "checkpoint.pt")["epoch"] == 1


# ------------------------------------------------------------------ bad input
@pytest.mark.parametrize("kwargs, match", [
    (dict(epochs=0), "epochs must be >= 1"),
    (dict(batch_size=0), "batch_size must be >= 1"),
    (dict(lr=-0.1), "lr must be a finite number >= 0"),
    (dict(precision="fp8"), "precision must be one of"),
    (dict(schedule="nope"), "schedule must be"),
])
def test_bad_trainer_settings_are_rejected(kwargs, match):
    with pytest.raises(ValueError, match=match):
        Trainer(small_model(), **kwargs)


def test_bad_types_are_rejected():
    with pytest.raises(TypeError, match="model must be a torch.nn.Module"):
        Trainer("resnet")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="policy must be a PerturbationPolicy"):
        Trainer(small_model(), PGD(8 / 255))  # type: ignore[arg-type]


def test_training_data_outside_the_pixel_range_is_rejected():
    x = torch.rand(8, 3, 32, 32) * 2
    with pytest.raises(ValueError):
        make_trainer(None, epochs=1).fit((x, torch.zeros(8, dtype=torch.long)))


def test_missing_dataset_directory_is_reported(tmp_path):
    with pytest.raises(FileNotFoundError, match="cifar-10-batches-py"):
        cifar10(tmp_path / "nowhere")


def test_cli_reports_errors_in_one_line(tmp_path, capsys):
    from advtrain.cli import main

    code = main(["train", "--data", str(tmp_path / "nowhere"), "--epochs", "1"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.startswith("advtrain: error:") and "\n" not in err


def test_non_finite_loss_stops_with_a_clear_error():
    trainer = make_trainer(None, epochs=1, lr=1e30, eval_every=0)
    with pytest.raises(FloatingPointError, match="non-finite"):
        trainer.fit(synthetic(96))


@pytest.mark.parametrize("preset", ["FGSMTrainer", "FastATTrainer", "NFGSMTrainer", "PGDTrainer", "ATTATrainer",
                                    "APARTTrainer"])
def test_presets_refuse_an_eps_in_0_255_units(preset):
    import advtrain

    with pytest.raises(ValueError, match=r"eps is an L∞ radius in pixel units .* <= 1; got 8 \(did you mean 8/255"):
        getattr(advtrain, preset)(small_model(), eps=8, device="cpu")


def _tiny_trainer(model: nn.Module) -> Trainer:
    return Trainer(model, epochs=1, batch_size=8, eval_every=0, eval_attack=None, progress=False, device="cpu")


def _tiny_data(n: int = 16, max_label: int = 2):
    g = torch.Generator().manual_seed(0)
    labels = torch.arange(n) % (max_label + 1)
    return torch.randint(0, 256, (n, 3, 8, 8), generator=g, dtype=torch.uint8), labels


def test_labels_beyond_the_models_outputs_are_refused_before_any_step():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 5))
    before = params(model)
    with pytest.raises(ValueError, match=r"labels go up to 7, but the model returns 5 logits .*num_classes=8"):
        _tiny_trainer(model).fit(_tiny_data(max_label=7))
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


class _NoisyNet(nn.Module):
    """BatchNorm, dropout and a forward that draws random numbers even in eval mode."""

    def __init__(self, softmax: bool = False) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Dropout(0.5), nn.Flatten(),
                                  nn.Linear(4 * 6 * 6, 3))
        self.softmax = softmax

    def forward(self, x):
        out = self.body(x + 1e-3 * torch.rand_like(x))
        return out.softmax(dim=1) if self.softmax else out


def test_output_check_leaves_parameters_buffers_flags_and_rng_as_they_were():
    torch.manual_seed(0)
    model = _NoisyNet().train()
    model.body[1].eval()  # a mix of flags, each restored as it was
    before, flags, rng = params(model), [m.training for m in model.modules()], torch.get_rng_state()
    check_model_outputs(model, _tiny_data()[0], max_label=2)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert [m.training for m in model.modules()] == flags
    assert torch.equal(torch.get_rng_state(), rng)
    assert all(p.grad is None for p in model.parameters())


def test_output_check_runs_a_float64_model_in_float64():
    model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 5)).double()
    check_model_outputs(model, _tiny_data()[0], max_label=4)  # float32 images would not fit float64 weights


def test_probability_outputs_warn_once_when_training_starts(recwarn):
    torch.manual_seed(0)
    _tiny_trainer(_NoisyNet(softmax=True)).fit(_tiny_data(n=32))
    found = [w for w in recwarn if "probabilities, not logits" in str(w.message)]
    assert len(found) == 1
    assert "assume logits" in str(found[0].message) and found[0].category is UserWarning
    assert found[0].filename == __file__  # attributed to the caller of fit

    recwarn.clear()
    _tiny_trainer(_NoisyNet()).fit(_tiny_data(n=32))
    assert not [w for w in recwarn if "probabilities" in str(w.message)]


# ----------------------------------------------------------------- real data
@pytest.mark.realdata
@pytest.mark.slow  # about a minute on 2 cores: run with the slow tests, keeping the README's command short
def test_pgd_training_is_more_robust_than_standard_training(cifar10_dir):
    train = cifar10(cifar10_dir, train=True).subset(4000)
    test = cifar10(cifar10_dir, train=False)
    common = dict(epochs=4, batch_size=128, lr=0.1, eval_every=4, eval_examples=500, progress=False, seed=0,
                  eval_attack=PGD(8 / 255, steps=10, step_size=2 / 255))

    torch.manual_seed(0)
    standard = Trainer(SmallCNN(width=16), **common).fit(train, eval_data=test)[-1]
    torch.manual_seed(0)
    robust = PGDTrainer(SmallCNN(width=16), steps=3, step_size=2.5 * (8 / 255) / 3, **common).fit(
        train, eval_data=test)[-1]
    print(f"standard: {standard}\nPGD-3: {robust}")
    assert standard["clean_acc"] > 0.3, "standard training did not learn: check the data"
    assert robust["robust_acc"] > standard["robust_acc"] + 0.08
    assert robust["robust_acc"] > 0.12


def test_fast_at_preset_uses_papers_defaults():
    t = FastATTrainer(small_model(), progress=False)
    assert t.epochs == 15 and t.lr == 0.2
    attack = t.policy.attack
    assert attack.step_size == pytest.approx(1.25 * 8 / 255) and attack.random_start and attack.bn_mode == "train"


def test_device_loader_is_used_as_given():
    x, y = synthetic(64)
    loader = DeviceLoader((x, y), 16, seed=3)
    trainer = make_trainer(None, epochs=1, eval_every=0)
    trainer.fit(loader)
    assert trainer.loader is loader and trainer.global_step == 4


@pytest.mark.parametrize("preset, fill", [("FGSMTrainer", 0.0), ("FastATTrainer", 0.0), ("NFGSMTrainer", 0.0),
                                           ("PGDTrainer", 0.0), ("ATTATrainer", 0.5), ("APARTTrainer", 0.5)])
def test_presets_pad_crops_as_their_papers_code_does(preset, fill):
    import advtrain

    trainer = getattr(advtrain, preset)(small_model(), progress=False, device="cpu")
    assert trainer.pad_fill == fill and trainer.config()["pad_fill"] == fill
    assert getattr(advtrain, preset)(small_model(), pad_fill=0.25, progress=False).pad_fill == 0.25
    assert Trainer(small_model()).pad_fill == 0.0


def test_pad_fill_reaches_the_loader_and_the_checkpoint(tmp_path):
    x, y = synthetic(64)
    trainer = make_trainer(tmp_path, epochs=1, eval_every=0, pad_fill=0.5)
    trainer.fit((x, y))
    assert trainer.loader.pad_fill == 0.5
    state = load_checkpoint(tmp_path / "checkpoint.pt")
    assert state["config"]["pad_fill"] == 0.5 and state["loader"]["pad_fill"] == 0.5
    batch = next(iter(trainer.loader))
    i = int(batch.aug.top.argmin())  # the top rows of this crop lie in the padded border
    rows = batch.aug.padding - int(batch.aug.top[i])
    assert rows > 0 and bool((batch.x[i, :, :rows] == 0.5).all())
    # a DeviceLoader given to fit keeps its own fill, and the config records that one
    given = make_trainer(None, epochs=1, eval_every=0, pad_fill=0.5)
    given.fit(DeviceLoader((x, y), 32, device="cpu"))
    assert given.config()["pad_fill"] == 0.0
    with pytest.raises(ValueError, match="pad_fill"):
        Trainer(small_model(), pad_fill=2)


def test_resume_with_a_grey_fill_equals_an_uninterrupted_run(tmp_path):
    data = synthetic(64)
    full = make_trainer(tmp_path / "full", epochs=2, eval_every=0, pad_fill=0.5)
    full.fit(data)
    killed = make_trainer(tmp_path / "killed", epochs=2, eval_every=0, pad_fill=0.5, callbacks=[StopAt(1)])
    with pytest.raises(KeyboardInterrupt):
        killed.fit(data)
    resumed = make_trainer(tmp_path / "killed", seed_model=123, epochs=2, eval_every=0, pad_fill=0.5)
    resumed.fit(data, resume=True)
    want, got = params(full.model), params(resumed.model)
    for k in want:
        assert torch.equal(want[k], got[k]), k
    black = make_trainer(None, epochs=2, eval_every=0)
    black.fit(data)
    assert any(not torch.equal(want[k], v) for k, v in params(black.model).items())  # the fill matters
    # resuming with another fill would not reproduce the run: refused
    other = make_trainer(tmp_path / "killed", epochs=3, eval_every=0)
    with pytest.raises(ValueError, match="pad_fill=0.5"):
        other.fit(data, resume=True)


def test_accuracy_works_for_a_model_without_parameters():
    from advtrain.evaluation import accuracy

    model = nn.Sequential(nn.Flatten(), nn.Identity())
    x = torch.zeros(4, 1, 1, 3)
    x[torch.arange(4), 0, 0, torch.tensor([0, 1, 2, 0])] = 1.0
    assert accuracy(model, x, torch.tensor([0, 1, 2, 1])) == 0.75


def test_pad_last_gives_full_batches_that_still_cover_every_example():
    x, y = synthetic(70)
    loader = DeviceLoader((x, y), 32, pad_last=True, seed=1, device="cpu")
    batches = list(loader)
    assert len(batches) == 3 and all(len(b) == 32 for b in batches)
    seen = torch.cat([b.index for b in batches])
    assert set(seen.tolist()) == set(range(70))
    assert all(len(set(b.index.tolist())) == 32 for b in batches)  # no example twice within a batch
    with pytest.raises(ValueError, match="exclude each other"):
        DeviceLoader((x, y), 32, pad_last=True, drop_last=True)


class _GraphCount(Callback):
    """Records dynamo's compiled-graph and graph-break counts after each epoch."""

    def __init__(self) -> None:
        self.graphs, self.breaks = [], []

    def on_epoch_end(self, trainer, epoch, record):
        from torch._dynamo.utils import counters

        self.graphs.append(counters["stats"]["unique_graphs"])
        self.breaks.append(sum(counters["graph_break"].values()))


@pytest.mark.slow
@pytest.mark.parametrize("method", ["FGSM-RS", "PGD-2", "ATTA-1", "APART"])
def test_compiled_training_does_not_recompile_across_steps_epochs_or_the_last_batch(method):
    from torch._dynamo.utils import counters

    from advtrain import APARTTrainer, ATTATrainer

    build = {
        "FGSM-RS": lambda m, **kw: FastATTrainer(m, **kw),
        "PGD-2": lambda m, **kw: PGDTrainer(m, steps=2, **kw),
        "ATTA-1": lambda m, **kw: ATTATrainer(m, steps=1, **kw),
        "APART": lambda m, **kw: APARTTrainer(m, **kw),  # SmallCNN: two layer sites
    }[method]
    torch._dynamo.reset()
    counters.clear()
    count = _GraphCount()
    trainer = build(small_model(), epochs=2, batch_size=32, eval_every=0, progress=False, seed=0,
                    compile=True, callbacks=[count])
    trainer.fit(synthetic(80))  # 80 = 2 full batches + a partial one, filled up
    # One graph for the attack's forward (input requires grad), one for the
    # training forward, both compiled in the first steps; nothing new in later
    # steps, in the filled-up last batch or in the next epoch. APART's site
    # perturbations (probes in pass 1, α_l·sign(g_l) in pass 2) stay inside them.
    assert count.graphs == [2, 2]
    assert count.breaks == [0, 0]
    # the attack graph is the one without weight gradients (tests/test_input_only.py)
    assert isinstance(trainer.forward_model._orig_mod, InputOnlyGradients)


def _site_dtypes(delta):
    """(scale dtype, direction dtype) of a ScaledDirection, (dtype, dtype) of a tensor."""
    if isinstance(delta, ScaledDirection):
        return delta.scale.dtype, delta.direction.dtype
    return delta.dtype, delta.dtype


class _PerturbationSpy(Callback):
    """Wraps the policy's ``perturb`` to record what each batch's perturbation
    looked like: input dtype and distance from the clean batch, site dtypes."""

    def __init__(self) -> None:
        self.seen = []

    def on_fit_start(self, trainer):
        policy = trainer.policy
        perturb = policy.perturb

        def spy(model, batch):
            pert = perturb(model, batch)
            self.seen.append((pert.x.dtype, (pert.x - batch.x).abs().max().item(),
                              [_site_dtypes(d) for d in pert.sites.values()], torch.is_autocast_enabled("cpu")))
            return pert

        policy.perturb = spy


@pytest.mark.parametrize("method", ["FGSM", "FGSM-RS", "N-FGSM", "PGD-2", "ATTA-1", "APART"])
def test_every_method_trains_under_bf16_autocast_with_fp32_perturbations(method):
    # precision="bf16" is the CUDA default; on the CPU it runs the same code
    # path with CPU autocast: the model computes in bf16, the perturbations
    # and their projection stay fp32; layer perturbations are added in the
    # activation's dtype.
    from advtrain import APARTTrainer, ATTATrainer, FGSMTrainer, NFGSMTrainer

    eps = 8 / 255
    build = {
        "FGSM": lambda m, **kw: FGSMTrainer(m, eps=eps, **kw),
        "FGSM-RS": lambda m, **kw: FastATTrainer(m, eps=eps, **kw),
        "N-FGSM": lambda m, **kw: NFGSMTrainer(m, eps=eps, **kw),
        "PGD-2": lambda m, **kw: PGDTrainer(m, eps=eps, steps=2, **kw),
        "ATTA-1": lambda m, **kw: ATTATrainer(m, eps=eps, steps=1, **kw),
        "APART": lambda m, **kw: APARTTrainer(m, eps=eps, step_lr=1e-3, **kw),
    }[method]
    model = small_model()
    logits_dtypes = []
    # training-mode forwards only (APART's setup measures its sites once in eval mode, in fp32)
    model.register_forward_hook(lambda m, _i, out: logits_dtypes.append(out.dtype) if m.training else None)
    before = params(model)
    spy = _PerturbationSpy()
    trainer = build(model, epochs=2, batch_size=32, lr=0.05, eval_every=0, progress=False, seed=0,
                    device="cpu", precision="bf16", callbacks=[spy])
    history = trainer.fit(synthetic(64))
    assert len(logits_dtypes) >= 4 and set(logits_dtypes) == {torch.bfloat16}  # all training passes in bf16
    assert len(spy.seen) == 4
    for x_dtype, dist, site_dtypes, autocast_on in spy.seen:
        assert autocast_on and x_dtype == torch.float32
        # N-FGSM does not project back to the ε-ball (its noise reaches 2ε)
        assert dist <= (3 if method == "N-FGSM" else 1) * eps + 1e-6
        # APART's learned α_l stay fp32; sign(g_l) comes in the activation's dtype
        assert all(scale == torch.float32 and direction == torch.bfloat16 for scale, direction in site_dtypes)
    assert all(math.isfinite(r["train_loss"]) for r in history.records)
    assert any(not torch.equal(before[k], v) for k, v in model.state_dict().items())
    if method == "APART":
        assert len(spy.seen[0][2]) == 2  # SmallCNN's two layer sites were perturbed
        metrics = history.records[-1]
        assert metrics["apart_alpha"] != pytest.approx(1e-4, rel=1e-6)  # the step sizes learned
        assert all(math.isfinite(a) for a in metrics["apart_alpha_sites"])


# ------------------------------------------------------- the policy's contract
class _CountingPolicy(AttackPolicy):
    """FGSM-RS whose loss is 2·CE and which records every call, replaying
    each batch ``replays`` times."""

    def __init__(self, replays: int = 1, compilable: bool = True) -> None:
        super().__init__(FGSMRS(8 / 255, bn_mode="train"))
        self.replays, self.compilable = replays, compilable
        self.calls = []

    def perturb(self, model, batch):
        self.calls.append(("perturb", batch.index[0].item()))
        return super().perturb(model, batch)

    def loss(self, context, batch, perturbation):
        out = super().loss(context, batch, perturbation)
        return type(out)(2 * out.loss, out.logits)

    def after_step(self, model, batch, perturbation):
        self.calls.append(("after_step", batch.index[0].item()))


def test_the_policys_loss_is_what_the_trainer_minimizes():
    x, y = synthetic(32)
    batch_x = x.float() / 255
    from advtrain.data.batch import Batch

    batch = Batch(batch_x, y, torch.arange(32), None)
    twice, once = _CountingPolicy(), AttackPolicy(FGSMRS(8 / 255, bn_mode="train"))
    runs = []
    for policy in (twice, once):
        torch.manual_seed(0)
        trainer = Trainer(small_model(), policy, epochs=1, lr=0.1, momentum=0.0, weight_decay=0.0, progress=False,
                          channels_last=False, device="cpu")
        trainer.optimizer.param_groups[0]["lr"] = 0.1
        before = params(trainer.model)
        torch.manual_seed(1)
        loss, _ = trainer.train_step(batch)
        runs.append((loss, {k: v - before[k] for k, v in params(trainer.model).items()}))
    (loss2, step2), (loss1, step1) = runs
    torch.testing.assert_close(loss2, 2 * loss1)
    for k in step1:
        if step1[k].is_floating_point() and "running" not in k:
            torch.testing.assert_close(step2[k], 2 * step1[k], rtol=1e-4, atol=1e-6)  # SGD step of 2·CE


def test_label_smoothing_is_applied_to_the_default_loss():
    x, y = synthetic(32)
    from advtrain.data.batch import Batch
    from advtrain.policies import CleanPolicy

    batch = Batch(x.float() / 255, y, torch.arange(32), None)
    torch.manual_seed(0)
    trainer = Trainer(small_model(), CleanPolicy(), label_smoothing=0.4, progress=False, channels_last=False,
                      device="cpu")
    model_copy = small_model()
    model_copy.load_state_dict(trainer.model.state_dict())
    model_copy.train()
    expected = torch.nn.functional.cross_entropy(model_copy(batch.x), y, label_smoothing=0.4)
    loss, _ = trainer.train_step(batch)
    torch.testing.assert_close(loss, expected)
    assert trainer.config()["label_smoothing"] == 0.4
    for bad in (-0.1, 1.0, "0.1"):
        with pytest.raises(ValueError, match="label_smoothing"):
            Trainer(small_model(), label_smoothing=bad)


def test_a_replaying_policy_gets_that_many_optimizer_steps_per_batch():
    policy = _CountingPolicy(replays=3)
    seen_lrs = []
    trainer = Trainer(small_model(), policy, epochs=1, batch_size=16, progress=False, eval_every=0, seed=0)
    original = trainer._set_hyperparameters
    trainer._set_hyperparameters = lambda progress: seen_lrs.append(progress) or original(progress)
    trainer.fit(synthetic(32))  # 2 batches × 3 replays
    assert trainer.global_step == 6
    assert [c[0] for c in policy.calls] == ["perturb", "after_step"] * 6
    assert policy.calls[0][1] == policy.calls[4][1] and policy.calls[6][1] == policy.calls[10][1]  # same batch
    assert seen_lrs == pytest.approx([k / 6 for k in range(6)])  # every replay is an iteration of the schedule


def test_compile_refuses_a_policy_that_cannot_be_compiled():
    with pytest.raises(ValueError, match="_CountingPolicy cannot train under torch.compile"):
        Trainer(small_model(), _CountingPolicy(compilable=False), compile=True, device="cpu")


def test_setup_and_train_epoch_drive_the_same_run_as_fit():
    data = synthetic(64)
    fitted = make_trainer(None, epochs=2, eval_every=0)
    fitted.fit(data)
    driven = make_trainer(None, epochs=2, eval_every=0)
    with pytest.raises(RuntimeError, match="setup"):
        driven.train_epoch()
    driven.setup(data)
    records = [driven.train_epoch(), driven.train_epoch()]
    assert driven.epoch == 2 and [r["epoch"] for r in records] == [1, 2]
    assert records[-1]["train_loss"] == pytest.approx(fitted.history[-1]["train_loss"])
    want, got = params(fitted.model), params(driven.model)
    assert all(torch.equal(want[k], got[k]) for k in want)
