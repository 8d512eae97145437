"""APART on a model of your own: perturbation sites attached by module name.

    python examples/custom_model.py --data ./data --quick         # your own nn.Module, sized for a 2-core CPU
    python examples/custom_model.py --data ./data                 # the same at full size (GPU)
    python examples/custom_model.py --data ./data --timm resnet18 # a timm model, if timm is installed
    python examples/custom_model.py --data ./data --input-only    # APART without layer perturbations

advtrain's own models declare where APART perturbs intermediate activations.
Any other ``nn.Module`` works too: name the submodules whose *outputs* should
be perturbed with ``APARTTrainer(model, sites=[...])`` (any name from
``model.named_modules()``), or pass ``layerwise=False`` to perturb the input
only. Two conventions to keep: the model takes pixels in [0, 1] (put the
normalization inside it, e.g. ``advtrain.Normalize``), and ε is in pixel
units.
"""
from __future__ import annotations

import argparse
from typing import List, Optional, Sequence, Tuple

import torch
from torch import nn

from advtrain import APARTTrainer, Normalize, cifar10
from advtrain.models import CIFAR10_MEAN, CIFAR10_STD


class ConvNet(nn.Module):
    """A plain VGG-style network: nothing advtrain-specific inside."""

    def __init__(self, num_classes: int = 10, width: int = 32) -> None:
        super().__init__()
        self.normalize = Normalize(CIFAR10_MEAN, CIFAR10_STD)  # pixels in [0, 1] -> normalized
        self.block1 = nn.Sequential(nn.Conv2d(3, width, 3, padding=1, bias=False), nn.BatchNorm2d(width),
                                    nn.ReLU(), nn.MaxPool2d(2))
        self.block2 = nn.Sequential(nn.Conv2d(width, 2 * width, 3, padding=1, bias=False),
                                    nn.BatchNorm2d(2 * width), nn.ReLU(), nn.MaxPool2d(2))
        self.block3 = nn.Sequential(nn.Conv2d(2 * width, 4 * width, 3, padding=1, bias=False),
                                    nn.BatchNorm2d(4 * width), nn.ReLU(), nn.AdaptiveAvgPool2d(1))
        self.head = nn.Linear(4 * width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.block3(self.block2(self.block1(self.normalize(x)))).flatten(1))


def timm_model(name: str, num_classes: int = 10) -> Tuple[nn.Module, List[str]]:
    """A timm model behind a Normalize layer, and site names for it: the
    outputs of its top-level stages (``layer1``... for ResNets, ``stages.N``
    for most others)."""
    import timm  # optional: pip install timm

    net = timm.create_model(name, pretrained=False, num_classes=num_classes)
    model = nn.Sequential(Normalize(CIFAR10_MEAN, CIFAR10_STD), net)  # net is submodule "1"
    stages = [n for n, _ in net.named_children() if n.startswith("layer")] or \
             [f"stages.{i}" for i, _ in enumerate(getattr(net, "stages", []))]
    return model, [f"1.{n}" for n in stages[:-1]]  # not the last stage, right before the classifier


def main(argv: Optional[Sequence[str]] = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", required=True, help="directory holding cifar-10-batches-py/")
    p.add_argument("--quick", action="store_true", help="narrow model, 2,000 images, 2 epochs (CPU)")
    p.add_argument("--timm", default=None, metavar="NAME", help="use timm.create_model(NAME) instead of ConvNet")
    p.add_argument("--input-only", action="store_true", help="layerwise=False: no layer perturbations")
    p.add_argument("--epochs", type=int, default=None, help="default: 30, or 2 with --quick")
    p.add_argument("--train-examples", type=int, default=None, help="default: all, or 2000 with --quick")
    p.add_argument("--eval-examples", type=int, default=None, help="default: 1000, or 200 with --quick")
    p.add_argument("--out", default="runs/custom_model")
    p.add_argument("--device", default=None)
    args = p.parse_args(argv)

    torch.manual_seed(0)
    if args.timm:
        model, sites = timm_model(args.timm)
    else:
        model, sites = ConvNet(width=16 if args.quick else 64), ["block1", "block2"]
    # Every module name is a candidate site; print them to choose your own:
    #   print([name for name, _ in model.named_modules()])
    site_args = dict(layerwise=False) if args.input_only else dict(sites=sites)

    train, test = cifar10(args.data, train=True), cifar10(args.data, train=False)
    if args.quick or args.train_examples:
        train = train.subset(min(args.train_examples or 2000, len(train)))
    epochs = args.epochs or (2 if args.quick else 30)
    trainer = APARTTrainer(model, epochs=epochs, run_dir=args.out, device=args.device,
                           eval_examples=args.eval_examples or (200 if args.quick else 1000),
                           **site_args)
    history = trainer.fit(train, eval_data=test)

    last = history[-1]
    print(f"{args.timm or 'ConvNet'} with APART ({'input only' if args.input_only else 'sites ' + ', '.join(sites)}): "
          f"clean accuracy {last['clean_acc']:.3f}, PGD-20 robust accuracy {last['robust_acc']:.3f}")
    for name, step in zip(trainer.policy.site_names, last.get("apart_alpha_sites", [])):
        print(f"  learned step size at site {name}: {step:.2e}")
    return last


if __name__ == "__main__":
    main()
