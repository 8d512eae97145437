"""APART against PGD-10 adversarial training: robust accuracy and wall time,
side by side (the APART paper's headline comparison).

    python examples/apart_vs_pgd.py --data ./data            # PreActResNet18, 30 epochs each (GPU, hours)
    python examples/apart_vs_pgd.py --data ./data --quick    # SmallCNN on 5,000 images, 3 epochs (2-core CPU)

Both methods train the same architecture from the same initial weights on
the same data, with the same learning-rate schedule (cyclic, peak 0.2) and
batch size, in this one process, their epochs interleaved (APART's first,
PGD-10's first, APART's second, ...), so their epoch times compare directly
even when the machine's load changes during the run. Each
model is then evaluated with the same PGD-20 attack (ε = 8/255, step 2/255,
BatchNorm in eval mode) on the same test images. For the protocol's stronger
evaluation (CW-∞ and AutoAttack-grade APGD), run
``advtrain eval runs/apart_vs_pgd/apart --data ./data --suite full`` afterwards.

With ``--quick`` the runs are 120 steps long instead of the reference's
11,730, so ``APARTTrainer`` scales its step-size learning rate up by
11,730 / 120 (its default ``step_lr_rule="scaled"``) to let its learned
step sizes grow within the run, and SmallCNN gets the step-size decay of
``advtrain train --scale cpu``, 400 (with the paper's 1200 its learned input
step settles near 0.4 ε). A quick run shows the cost ratio rather than the
robustness of a full run (measured numbers in docs/methods/apart.md).
"""
from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import torch

from advtrain import APARTTrainer, PGDTrainer, PreActResNet18, cifar10
from advtrain.evaluation import evaluate
from advtrain.models import SmallCNN


def parse_args(argv: Optional[Sequence[str]]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", required=True, help="directory holding cifar-10-batches-py/")
    p.add_argument("--quick", action="store_true", help="SmallCNN, 5,000 images, 3 epochs (CPU)")
    p.add_argument("--epochs", type=int, default=None, help="default: 30, or 3 with --quick")
    p.add_argument("--train-examples", type=int, default=None, help="default: all, or 5000 with --quick")
    p.add_argument("--eval-examples", type=int, default=None, help="default: 10000, or 500 with --quick")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--out", default="runs/apart_vs_pgd", help="parent of the two run directories")
    p.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (default: torch's); on a shared 2-core CPU, 1 times more steadily")
    return p.parse_args(argv)


def main(argv: Optional[Sequence[str]] = None) -> List[Dict[str, float]]:
    args = parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    epochs = args.epochs or (3 if args.quick else 30)
    train = cifar10(args.data, train=True)
    test = cifar10(args.data, train=False)
    n_train = args.train_examples or (5000 if args.quick else len(train))
    train = train.subset(min(n_train, len(train)))
    n_eval = min(args.eval_examples or (500 if args.quick else len(test)), len(test))

    torch.manual_seed(args.seed)
    model = SmallCNN() if args.quick else PreActResNet18()
    common = dict(epochs=epochs, batch_size=args.batch_size, lr=0.2, schedule="cyclic", device=args.device,
                  seed=args.seed, eval_every=0)  # evaluate once, below, with the same attack for both
    trainers = {
        "APART": APARTTrainer(copy.deepcopy(model), run_dir=Path(args.out) / "apart",
                              step_weight_decay=400.0 if args.quick else 1200.0, **common),
        "PGD-10": PGDTrainer(copy.deepcopy(model), steps=10, run_dir=Path(args.out) / "pgd10", **common),
    }

    # Interleaved epochs (APART's epoch e, then PGD-10's epoch e, ...): a change
    # in the machine's load mid-run hits both methods alike, so the ratio of
    # their epoch times stays meaningful on a shared CPU.
    print(f"--- training APART and PGD-10 interleaved, epoch by epoch ({epochs} epochs, {len(train)} images, "
          f"{type(model).__name__})", flush=True)
    for trainer in trainers.values():
        trainer.setup(train)
    epoch_seconds: Dict[str, List[float]] = {name: [] for name in trainers}
    for epoch in range(epochs):
        for name, trainer in trainers.items():
            record = trainer.train_epoch()
            trainer.history.append(record)  # metrics.jsonl of the run directory
            epoch_seconds[name].append(record["time"])
            print(f"epoch {epoch + 1}/{epochs} {name:<7} {record['time']:7.1f} s  training loss {record['train_loss']:.3f}",
                  flush=True)

    rows = []
    for name, trainer in trainers.items():
        trainer.save_checkpoint()  # for `advtrain eval` of the run directory
        report = evaluate(trainer.model, test, "pgd20", n_examples=n_eval, batch_size=256,
                          autocast_dtype=trainer.autocast_dtype, progress=False)
        seconds = sum(epoch_seconds[name])
        rows.append({"method": name, "train_seconds": seconds, "seconds_per_epoch": seconds / epochs,
                     "clean_acc": report.clean_accuracy, "pgd20_acc": report.robust_accuracy})

    pgd_time = rows[-1]["train_seconds"]
    per_epoch = sorted(a / p for a, p in zip(epoch_seconds["APART"], epoch_seconds["PGD-10"]))
    print(f"\n{type(model).__name__}, {len(train)} training images, {epochs} epochs, batch {args.batch_size}; "
          f"accuracies on {n_eval} test images, PGD-20 at eps 8/255")
    print(f"{'method':<8} {'train time (s)':>14} {'s / epoch':>10} {'vs PGD-10':>10} {'clean':>7} {'PGD-20':>7}")
    for r in rows:
        r["time_ratio"] = r["train_seconds"] / pgd_time
        print(f"{r['method']:<8} {r['train_seconds']:>14.1f} {r['seconds_per_epoch']:>10.2f} "
              f"{r['time_ratio']:>9.2f}x {r['clean_acc']:>7.3f} {r['pgd20_acc']:>7.3f}")
    print(f"APART / PGD-10 per epoch, interleaved: {per_epoch[0]:.2f}x to {per_epoch[-1]:.2f}x over {epochs} "
          "epochs; on a shared CPU wall times are noisy (run with --threads 1 and a quiet machine), on a GPU "
          "the ratio settles within a few epochs")
    sys.stdout.flush()
    return rows


if __name__ == "__main__":
    main()
