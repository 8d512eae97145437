"""APART's and ATTA's knobs on the command line and in config files, APART's
step-size LR rule for short runs, and ``--threads``."""
from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

from advtrain import cli
from advtrain.cli_methods import method_kwargs, parse_names
from advtrain.config import ConfigError, resolve_config
from advtrain.policies import APARTPolicy
from advtrain.policies.apart import REFERENCE_STEPS, scaled_step_lr
from advtrain.policies.base import PolicyContext
from advtrain.training.presets import APARTTrainer


def _context(epochs: int, steps_per_epoch: int) -> PolicyContext:
    return PolicyContext(num_examples=8, image_shape=(3, 8, 8), padding=0, epochs=epochs,
                         steps_per_epoch=steps_per_epoch, device=torch.device("cpu"))


def _linear() -> nn.Module:
    return nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 10))


def _args(*extra: str):
    return cli.make_parser().parse_args(["train", "--data", "unused", "--model", "smallcnn", "--device", "cpu",
                                         *extra])


def test_reference_steps_are_30_epochs_of_391_batches():
    assert REFERENCE_STEPS == 11_730


@pytest.mark.parametrize("steps, factor", [(11_730, 1.0), (2 * 11_730, 1.0), (1_173, 10.0), (160, 11_730 / 160),
                                          (2, 11_730 / 2)])
def test_scaled_rule_multiplies_by_reference_over_run_steps_for_shorter_runs(steps, factor):
    assert scaled_step_lr(5e-8, steps) == pytest.approx(5e-8 * factor, rel=1e-12)
    assert scaled_step_lr(5e-8, steps, "reference") == 5e-8


@pytest.mark.parametrize("rule, steps", [("linear", 10), ("scaled", 0), ("scaled", 2.5), ("scaled", True)])
def test_scaled_rule_rejects_bad_arguments(rule, steps):
    with pytest.raises(ValueError, match="lr_rule" if rule != "scaled" else "total_steps"):
        scaled_step_lr(5e-8, steps, rule)


def test_policy_rejects_an_unknown_rule():
    with pytest.raises(ValueError, match="lr_rule"):
        APARTPolicy(layerwise=False, lr_rule="linear")


def test_preset_scales_step_lr_to_the_run_by_default():
    trainer = APARTTrainer(_linear(), layerwise=False, epochs=2, device="cpu")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the scaled rule never warns
        trainer.policy.setup(trainer.model, _context(epochs=2, steps_per_epoch=5))
    assert trainer.policy.lr_rule == "scaled"
    assert trainer.policy.run_lr == pytest.approx(5e-8 * 11_730 / 10)
    assert "lr_rule='scaled'" in trainer.config()["policy"]  # recorded in checkpoints


def test_reference_rule_warns_once_on_a_run_under_a_quarter_of_the_reference():
    policy = APARTPolicy(layerwise=False, lr=5e-8, lr_rule="reference")
    with pytest.warns(UserWarning, match="11730 optimizer steps; this run has 10") as record:
        policy.setup(_linear(), _context(epochs=2, steps_per_epoch=5))
        policy.setup(_linear(), _context(epochs=2, steps_per_epoch=5))
    assert len([w for w in record if "optimizer steps" in str(w.message)]) == 1
    assert policy.run_lr == 5e-8


def test_reference_rule_is_silent_from_a_quarter_of_the_reference_length():
    policy = APARTPolicy(layerwise=False, lr_rule="reference")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        policy.setup(_linear(), _context(epochs=1, steps_per_epoch=-(-11_730 // 4)))


def test_step_lr_rule_flag_reaches_the_preset():
    args = _args("--method", "apart", "--step-lr-rule", "reference", "--step-lr", "1e-6")
    assert method_kwargs(args) == {"step_lr_rule": "reference", "step_lr": 1e-6}
    trainer = cli.build_trainer(args, num_classes=10)
    assert trainer.policy.lr_rule == "reference" and trainer.policy.lr == 1e-6
    assert _args("--method", "apart").step_lr_rule is None  # None: the preset's own "scaled"
    with pytest.raises(SystemExit):
        _args("--method", "apart", "--step-lr-rule", "linear")


def test_apart_knobs_parse_to_preset_keywords():
    args = _args("--method", "apart", "--step-weight-decay", "400", "--init-step", "0.002", "--init-scale", "0.003",
                 "--sites", "block1, block2", "--store-dtype", "bfloat16", "--layerwise")
    assert method_kwargs(args) == {"step_weight_decay": 400.0, "init_step": 0.002, "init_scale": 0.003,
                                   "sites": ["block1", "block2"], "store_dtype": "bfloat16", "layerwise": True}
    assert method_kwargs(_args("--method", "apart", "--no-layerwise")) == {"layerwise": False}
    with pytest.raises(SystemExit):
        _args("--method", "apart", "--store-dtype", "int8")


def test_atta_knobs_parse_and_apart_only_knobs_are_refused_for_atta():
    args = _args("--method", "atta", "--reset-every", "5", "--store-dtype", "float16")
    assert method_kwargs(args) == {"reset_every": 5, "store_dtype": "float16"}
    trainer = cli.build_trainer(args, num_classes=10)
    assert trainer.policy.reset_every == 5 and trainer.policy.store_dtype == torch.float16
    with pytest.raises(ValueError, match="--sites applies to apart, not atta"):
        method_kwargs(_args("--method", "atta", "--sites", "block1"))
    with pytest.raises(ValueError, match="--reset-every applies to atta, .*not apart"):
        method_kwargs(_args("--method", "apart", "--reset-every", "5"))


def test_sites_parser_rejects_empty_names():
    assert parse_names("a,b") == ["a", "b"]
    with pytest.raises(Exception, match="comma list"):
        parse_names("a,,b")


def test_config_accepts_the_knobs_and_a_list_of_sites():
    train = cli._subparser(cli.make_parser(), "train")
    resolved = resolve_config(train, {"method": "apart", "step_lr_rule": "reference", "sites": ["block1", "block2"],
                                      "layerwise": True, "store_dtype": "float16", "step_lr": 1e-6,
                                      "reset_every": 3, "threads": 1})
    assert resolved["sites"] == ["block1", "block2"] and resolved["step_lr_rule"] == "reference"
    assert resolved["layerwise"] is True and resolved["reset_every"] == 3 and resolved["threads"] == 1
    assert resolve_config(train, {"sites": "block1,block2"})["sites"] == ["block1", "block2"]
    for bad in ({"step_lr_rule": "linear"}, {"sites": []}, {"sites": [1]}, {"layerwise": "yes"},
                {"store_dtype": "int8"}, {"threads": 0}):
        with pytest.raises(ConfigError, match=next(iter(bad))):
            resolve_config(train, bad)


def test_threads_flag_sets_torchs_thread_count():
    before = torch.get_num_threads()
    try:
        cli._set_threads(_args("--threads", "1"))
        assert torch.get_num_threads() == 1
        cli._set_threads(_args())  # not given: left as it is
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)
    for command in (["train", "--data", "unused"], ["eval", "runs/x", "--data", "unused"]):
        assert cli.make_parser().parse_args([*command, "--threads", "2"]).threads == 2
        with pytest.raises(SystemExit):
            cli.make_parser().parse_args([*command, "--threads", "0"])
