"""Quick start: adversarially train a CIFAR-10 classifier with APART.

    python examples/quickstart.py --data ./data            # the paper's run: PreActResNet18, 30 epochs (GPU)
    python examples/quickstart.py --data ./data --quick    # width-16 PreActResNet18, 2,000 images, 2 epochs (CPU)

``--data`` is a directory holding the official ``cifar-10-batches-py/``
folder. The run directory (``--out``) receives ``metrics.jsonl`` (one record
per epoch) and ``checkpoint.pt``. Evaluate and plot it afterwards with

    advtrain eval runs/quickstart --data ./data --suite full
    advtrain plot runs/quickstart --out curves.png
"""
from __future__ import annotations

import argparse
from typing import Any, Dict, Optional, Sequence

from advtrain import APARTTrainer, PreActResNet18, cifar10


def main(argv: Optional[Sequence[str]] = None) -> Dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", required=True, help="directory holding cifar-10-batches-py/")
    p.add_argument("--quick", action="store_true", help="narrow model, 2,000 images, 2 epochs (a 2-core CPU)")
    p.add_argument("--epochs", type=int, default=None, help="default: 30, or 2 with --quick")
    p.add_argument("--train-examples", type=int, default=None, help="default: all, or 2000 with --quick")
    p.add_argument("--eval-examples", type=int, default=None, help="default: 1000, or 200 with --quick")
    p.add_argument("--out", default="runs/quickstart", help="run directory")
    p.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    args = p.parse_args(argv)
    epochs = args.epochs or (2 if args.quick else 30)
    n_train = args.train_examples or (2000 if args.quick else None)
    n_eval = args.eval_examples or (200 if args.quick else 1000)

    # ---- APART from Python ------------------------------------------------------
    train = cifar10(args.data, train=True)
    test = cifar10(args.data, train=False)
    if n_train:
        train = train.subset(min(n_train, len(train)))
    model = PreActResNet18(width=16) if args.quick else PreActResNet18()
    trainer = APARTTrainer(model, epochs=epochs, run_dir=args.out, device=args.device, eval_examples=n_eval)
    history = trainer.fit(train, eval_data=test)
    last = history[-1]
    print(f"APART, {len(history)} epochs on {len(train)} images: clean accuracy {last['clean_acc']:.3f}, "
          f"PGD-20 robust accuracy {last['robust_acc']:.3f} on {min(n_eval, len(test))} test images")
    # -----------------------------------------------------------------------------
    return last


if __name__ == "__main__":
    main()
