"""Are FGSM's training perturbations still stronger than random noise? The
APART paper's perturbation-strength study (Li et al. 2020, §3).

    python examples/perturbation_strength.py --data ./data --quick     # SmallCNN, 3,000 images (2-core CPU)
    python examples/perturbation_strength.py --data ./data             # PreActResNet18, 50,000 images (GPU)
    python examples/perturbation_strength.py --data ./data --reference runs/pgd10/checkpoint.pt

1. A fixed *reference* model: loaded from ``--reference`` (an advtrain
   checkpoint of the same architecture) or trained here with PGD adversarial
   training (PGD-10, step ε/4; ``--quick``: PGD-3, step ε/2) and saved under
   ``<out>/reference/``.
2. An FGSM adversarial-training run from fresh weights. At the end of every
   epoch a :class:`~advtrain.diagnostics.PerturbationRecorder` asks FGSM for
   the perturbation of a fixed probe set (the first test images), and a
   :class:`~advtrain.diagnostics.RobustnessDropMonitor` measures the run's
   own PGD-10 robust accuracy, to see whether it collapsed.
3. :class:`~advtrain.diagnostics.PerturbationStrengthStudy` measures the
   reference model's accuracy on ``x + δ_epoch`` and under uniform noise in
   the same ε-box. Where FGSM's perturbations decay to noise the two curves
   meet.

Writes ``<out>/strength_curves.png``, ``<out>/perturbation_grid.png`` and
``<out>/strength.json``.
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
from advtrain.diagnostics import (PerturbationRecorder, PerturbationStrengthStudy, RobustnessDropMonitor,
                                  plot_perturbation_grid, plot_strength_curves)
from advtrain.models import PreActResNet18, SmallCNN
from advtrain.training import FGSMTrainer, PGDTrainer, load_checkpoint


def parse_eps(text: str) -> float:
    """A radius in pixel units: ``0.031`` or ``8/255``."""
    return float(Fraction(text)) if "/" in text else float(text)


def parse_args(argv: Optional[Sequence[str]]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", required=True, help="directory holding cifar-10-batches-py/")
    p.add_argument("--out", default="runs/perturbation_strength", help="output directory")
    p.add_argument("--quick", action="store_true", help="SmallCNN, 3,000 images, 5 epochs, 300 probes (CPU)")
    p.add_argument("--reference", default=None, help="checkpoint of a trained reference model (default: train one)")
    p.add_argument("--epochs", type=int, default=None, help="FGSM epochs (default: 30, or 5 with --quick)")
    p.add_argument("--reference-epochs", type=int, default=None, help="default: 30, or 5 with --quick")
    p.add_argument("--train-examples", type=int, default=None, help="default: all, or 3000 with --quick")
    p.add_argument("--probe-examples", type=int, default=None, help="default: 1000, or 300 with --quick")
    p.add_argument("--eps", type=parse_eps, default=8 / 255, help="radius (default 8/255)")
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
    probe = test.subset(min(args.probe_examples or (300 if args.quick else 1000), len(test)))
    out = Path(args.out)
    common = dict(batch_size=args.batch_size, lr=0.2, schedule="cyclic", device=args.device, seed=args.seed)
    start = time.perf_counter()

    def architecture() -> torch.nn.Module:
        return SmallCNN() if args.quick else PreActResNet18()

    torch.manual_seed(args.seed + 1)
    reference = architecture()
    if args.reference:
        reference.load_state_dict(load_checkpoint(args.reference)["model"])
        print(f"--- reference model loaded from {args.reference}")
    else:
        steps, step = (3, args.eps / 2) if args.quick else (10, args.eps / 4)
        ref_epochs = args.reference_epochs or (5 if args.quick else 30)
        print(f"--- reference: PGD-{steps} adversarial training, {ref_epochs} epochs on {len(train)} images",
              flush=True)
        trainer = PGDTrainer(reference, eps=args.eps, steps=steps, step_size=step, epochs=ref_epochs,
                             eval_every=0, run_dir=out / "reference", **common)
        trainer.fit(train)
        reference = trainer.model
    reference.eval()

    torch.manual_seed(args.seed)
    recorder = PerturbationRecorder(probe.images, probe.labels)
    monitor = RobustnessDropMonitor(probe, eps=args.eps, steps=10, n_examples=len(probe), best_checkpoint=False)
    print(f"--- FGSM adversarial training, {epochs} epochs on {len(train)} images, "
          f"recording the perturbations of {len(probe)} probe images", flush=True)
    fgsm = FGSMTrainer(architecture(), eps=args.eps, epochs=epochs, eval_attack=None, eval_examples=len(probe),
                       callbacks=[recorder, monitor], **common)
    history = fgsm.fit(train, probe)

    study = PerturbationStrengthStudy(copy.deepcopy(reference), probe.images, probe.labels, args.eps)
    result = study.run(recorder)
    title = f"{type(reference).__name__} reference, FGSM on {len(train)} images, eps {args.eps * 255:.3g}/255"
    curves = plot_strength_curves(result, out / "strength_curves.png", figsize=(6, 3.6), dpi=90, title=title,
                                  label="FGSM training perturbation")
    shown = list(result.epochs)
    if len(shown) > 6:
        shown = [shown[round(i * (len(shown) - 1) / 5)] for i in range(6)]
    grid = plot_perturbation_grid(probe.images, recorder.perturbations, out / "perturbation_grid.png",
                                  n_images=4, epochs=shown, dpi=80)
    summary = {
        "reference": args.reference or f"trained here ({out / 'reference' / 'checkpoint.pt'})",
        "train_examples": len(train), "probe_examples": len(probe), "epochs": epochs, "eps": args.eps,
        "study": result.to_dict(),
        "fgsm_run": {"clean_acc": history.column("clean_acc"), "pgd10_acc": history.column("monitor_robust_acc"),
                     "flags": [[e, k] for e, k, _ in monitor.events]},
        "total_seconds": time.perf_counter() - start,
    }
    (out / "strength.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(f"reference clean accuracy on the probes: {result.clean_accuracy:.3f}")
    print(f"{'epoch':>5} {'under FGSM delta':>17} {'under noise':>12} {'FGSM run PGD-10':>16}")
    for e, p, n in zip(result.epochs, result.perturbation_accuracy, result.noise_accuracy):
        own = summary["fgsm_run"]["pgd10_acc"][int(e) - 1]
        print(f"{int(e):>5} {p:>17.3f} {n:>12.3f} {own:>16.3f}")
    print(f"wrote {curves}, {grid} and {out / 'strength.json'} ({summary['total_seconds']:.0f} s)")
    return summary


if __name__ == "__main__":
    main()
