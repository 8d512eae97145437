"""The study's perturbation-strength part: the APART paper's evidence for
*perturbation underfitting*. Each recorded method's training perturbations
of a fixed probe set (one per epoch, kept in its checkpoint by a
:class:`~advtrain.diagnostics.PerturbationRecorder`) are applied to one fixed
reference model, the study's final PGD-10 model, next to uniform random
noise of the same radius. A method whose curve rises to the noise curve
makes perturbations no stronger than noise.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, Optional

from .runner import Study
from .spec import REFERENCE_METHOD, STRENGTH_METHODS

RECORDER = "PerturbationRecorder"


def strength_results(study: Study) -> Optional[Dict[str, Any]]:
    """Per recorded method, :meth:`StrengthResult.to_dict` of its epochs'
    perturbations on the reference model; None until the reference (PGD-10)
    is finished or when the study records no perturbations."""
    from ..diagnostics import PerturbationStrengthStudy
    from ..models import build_model
    from ..training import evaluation_weights, load_checkpoint

    spec, out = study.spec, study.out
    if not spec.strength or study.result(REFERENCE_METHOD) is None:
        return None
    reference = build_model(spec.model, num_classes=study.num_classes, **dict(spec.model_kwargs))
    reference.load_state_dict(evaluation_weights(load_checkpoint(out / REFERENCE_METHOD / "checkpoint.pt"), "raw")[0])
    reference.eval()
    probe = study.test.subset(min(spec.strength_examples, len(study.test)))
    measure = PerturbationStrengthStudy(reference, probe.images, probe.labels, spec.eps, seed=spec.seed)
    results: Dict[str, Any] = {}
    for name in (n for n in STRENGTH_METHODS if n in spec.methods):
        path = out / name / "checkpoint.pt"
        if not path.is_file():
            continue
        recorded = load_checkpoint(path).get("callbacks", {}).get(RECORDER, {}).get("perturbations")
        if recorded:
            results[name] = measure.run({int(k): v.float() for k, v in recorded.items()}).to_dict()
    return {"reference": REFERENCE_METHOD, "probe_examples": len(probe), "methods": results} if results else None


def plot_strength(strength: Dict[str, Any], path: Path) -> Optional[Path]:
    """Reference accuracy under each method's perturbations per epoch, and
    under noise; None when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    from ..methods import get_method

    fig, ax = plt.subplots(figsize=(6.5, 4.0), dpi=100)
    noise_drawn = False
    for name, result in strength["methods"].items():
        epochs = result["epochs"]
        ax.plot(epochs, [100 * a for a in result["perturbation_accuracy"]], marker="o",
                label=f"{get_method(name).title} training perturbation")
        if not noise_drawn:
            ax.plot(epochs, [100 * a for a in result["noise_accuracy"]], linestyle="--", color="gray",
                    label=f"uniform noise, eps={result['eps'] * 255:.3g}/255")
            ax.axhline(100 * result["clean_accuracy"], color="gray", linestyle=":", label="clean")
            noise_drawn = True
    ax.set_xlabel("training epoch of the perturbation")
    ax.set_ylabel("PGD-10 reference model accuracy (%)")
    ax.set_title("perturbation strength on a fixed PGD-10 model")
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path


__all__ = ["plot_strength", "strength_results"]
