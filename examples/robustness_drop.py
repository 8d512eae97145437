"""The robustness drop, watched: FGSM, FGSM-RS and APART adversarial training
side by side, each with a RobustnessDropMonitor measuring PGD robust accuracy
after every epoch (the APART paper's Figure 1 setting).

    python examples/robustness_drop.py --data ./data --quick   # SmallCNN, 3,000 images, 5 epochs (2-core CPU)
    python examples/robustness_drop.py --data ./data           # PreActResNet18, 50,000 images, 30 epochs (GPU)

Every method trains the same architecture from the same initial weights on
the same images with the same cyclic learning rate. After each epoch the
monitor measures robust accuracy on held-out test images (PGD-10, step ε/4,
random start, BatchNorm in eval mode), warns when it drops by more than 20
points or collapses to 5% or less (catastrophic overfitting), and keeps the
best-robust checkpoint as ``<out>/<method>/best.pt``. At the end each final
model is evaluated with PGD-20 and the accuracy curves are drawn to
``<out>/accuracy_curves.png``; the numbers go to ``<out>/summary.json``.

APART runs when :class:`advtrain.training.APARTTrainer` imports. With
``--quick`` its step-size learning rate is scaled up by the ratio of the
reference run's 11,730 optimizer steps to this run's, so that its learned step
sizes can grow within the short run.
"""
from __future__ import annotations

import argparse
import copy
import json
import time
from fractions import Fraction
from pathlib import Path
from typing import Any, Dict, Optional, Sequence

import torch

from advtrain.data import cifar10
from advtrain.diagnostics import RobustnessDropMonitor, plot_accuracy_curves
from advtrain.evaluation import evaluate
from advtrain.models import PreActResNet18, SmallCNN
from advtrain.training import FastATTrainer, FGSMTrainer

try:
    from advtrain.training import APARTTrainer
except ImportError:  # an advtrain without APART: the other two methods still run
    APARTTrainer = None

REFERENCE_STEPS = 30 * 391
"""Optimizer steps of the reference APART run (30 epochs of 50,000 / 128)."""
REFERENCE_STEP_LR = 5e-8


def parse_eps(text: str) -> float:
    """A radius in pixel units: ``0.031`` or ``8/255``."""
    return float(Fraction(text)) if "/" in text else float(text)


def parse_args(argv: Optional[Sequence[str]]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", required=True, help="directory holding cifar-10-batches-py/")
    p.add_argument("--out", default="runs/robustness_drop", help="output directory")
    p.add_argument("--quick", action="store_true", help="SmallCNN, 3,000 images, 5 epochs, 300 test images (CPU)")
    p.add_argument("--epochs", type=int, default=None, help="default: 30, or 5 with --quick")
    p.add_argument("--train-examples", type=int, default=None, help="default: all, or 3000 with --quick")
    p.add_argument("--eval-examples", type=int, default=None, help="default: 1000, or 300 with --quick")
    p.add_argument("--eps", type=parse_eps, default=8 / 255, help="training and evaluation radius (default 8/255)")
    p.add_argument("--methods", default="fgsm,fgsm-rs,apart", help="comma-separated subset of fgsm,fgsm-rs,apart")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def main(argv: Optional[Sequence[str]] = None) -> Dict[str, Any]:
    args = parse_args(argv)
    epochs = args.epochs or (5 if args.quick else 30)
    train = cifar10(args.data, train=True)
    test = cifar10(args.data, train=False)
    train = train.subset(min(args.train_examples or (3000 if args.quick else len(train)), len(train)))
    n_eval = min(args.eval_examples or (300 if args.quick else 1000), len(test))
    held_out = test.subset(n_eval)
    out = Path(args.out)

    torch.manual_seed(args.seed)
    model = SmallCNN() if args.quick else PreActResNet18()
    steps = epochs * -(-len(train) // args.batch_size)
    common = dict(epochs=epochs, batch_size=args.batch_size, lr=0.2, schedule="cyclic", device=args.device,
                  seed=args.seed, eval_attack=None, eval_examples=n_eval)  # clean accuracy each epoch
    makers = {
        "fgsm": ("FGSM", lambda m, d: FGSMTrainer(m, eps=args.eps, run_dir=d, **common)),
        "fgsm-rs": ("FGSM-RS", lambda m, d: FastATTrainer(m, eps=args.eps, run_dir=d, **common)),
    }
    if APARTTrainer is not None:
        step_lr = REFERENCE_STEP_LR * max(1.0, REFERENCE_STEPS / steps)
        makers["apart"] = ("APART", lambda m, d: APARTTrainer(m, eps=args.eps, step_lr=step_lr, run_dir=d, **common))
    chosen = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = [m for m in chosen if m not in ("fgsm", "fgsm-rs", "apart")]
    if unknown:
        raise SystemExit(f"unknown methods {unknown}; choose from fgsm, fgsm-rs, apart")
    if "apart" in chosen and "apart" not in makers:
        print("advtrain.training.APARTTrainer is not available: skipping APART")

    histories: Dict[str, Any] = {}
    summary: Dict[str, Any] = {"model": type(model).__name__, "train_examples": len(train), "eval_examples": n_eval,
                               "epochs": epochs, "eps": args.eps, "device": args.device or "auto", "runs": {}}
    start = time.perf_counter()
    for key in chosen:
        if key not in makers:
            continue
        name, make = makers[key]
        monitor = RobustnessDropMonitor(held_out, eps=args.eps, steps=10, n_examples=n_eval)
        trainer = make(copy.deepcopy(model), out / key)
        trainer.callbacks.append(monitor)
        print(f"--- {name}: {epochs} epochs on {len(train)} images, {type(model).__name__}", flush=True)
        history = trainer.fit(train, held_out)  # the monitor warns (RobustnessDropWarning) on a drop
        report = evaluate(trainer.model, held_out, "pgd20", eps=args.eps, progress=False,
                          autocast_dtype=trainer.autocast_dtype)
        histories[name] = history
        summary["runs"][name] = {
            "epoch_seconds": [r["time"] for r in history],
            "clean_acc": history.column("clean_acc"),
            "monitor_pgd10_acc": history.column("monitor_robust_acc"),
            "flags": [[e, k] for e, k, _ in monitor.events],
            "best_epoch": monitor.best_epoch,
            "best_pgd10_acc": monitor.best,
            "final_clean_acc": report.clean_accuracy,
            "final_pgd20_acc": report.robust_accuracy,
        }
        print(f"    final: clean {report.clean_accuracy:.3f}, PGD-20 {report.robust_accuracy:.3f}; "
              f"best PGD-10 {monitor.best:.3f} at epoch {monitor.best_epoch}", flush=True)
    summary["total_seconds"] = time.perf_counter() - start

    figure = plot_accuracy_curves(histories, out / "accuracy_curves.png", robust_key="monitor_robust_acc",
                                  figsize=(9, 3.4), dpi=90,
                                  title=f"{type(model).__name__}, {len(train)} CIFAR-10 images, "
                                        f"eps {args.eps * 255:.3g}/255 (robust: PGD-10 on {n_eval} test images)")
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(f"wrote {figure} and {out / 'summary.json'} ({summary['total_seconds']:.0f} s)")
    return summary


if __name__ == "__main__":
    main()
