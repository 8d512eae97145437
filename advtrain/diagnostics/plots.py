"""Figures for the robustness-drop diagnostics (PNG, via matplotlib's Agg
canvas).

matplotlib is optional (``pip install advtrain[plot]``) and imported only when
a plot is drawn. Figures are drawn on their own Agg canvas, so no global
backend is switched and no window opens. Every function writes one PNG whose
size in pixels is ``figsize × dpi`` (inches × dots per inch) and returns its
path.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING, Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union

from torch import Tensor

from ..training.history import History
from ..utils.pixels import to_pixels
from .strength import StrengthResult

if TYPE_CHECKING:
    from matplotlib.figure import Figure

PathLike = Union[str, Path]
HistoryLike = Union[History, Sequence[Mapping[str, Any]], PathLike]
"""A run's per-epoch records: a :class:`~advtrain.training.History`, a list of
record dicts, or the path of a ``metrics.jsonl`` file."""


def _figure(figsize: Tuple[float, float], dpi: int) -> "Figure":
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as exc:
        raise ImportError("plotting needs matplotlib: pip install advtrain[plot] (or pip install matplotlib)") from exc
    if len(figsize) != 2 or not all(isinstance(v, (int, float)) and v > 0 for v in figsize):
        raise ValueError(f"figsize must be (width, height) in inches, both > 0; got {figsize!r}")
    if isinstance(dpi, bool) or not isinstance(dpi, int) or dpi <= 0:
        raise ValueError(f"dpi must be a positive int, got {dpi!r}")
    fig = Figure(figsize=figsize, dpi=dpi)
    FigureCanvasAgg(fig)
    return fig


def _save(fig: "Figure", path: PathLike, dpi: int) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi, format="png")
    return path


def _records(history: HistoryLike) -> List[Mapping[str, Any]]:
    if isinstance(history, (str, Path)):
        return list(History.read(history))
    return list(history)


def plot_accuracy_curves(
    histories: Mapping[str, HistoryLike],
    path: PathLike,
    *,
    clean_key: str = "clean_acc",
    robust_key: str = "robust_acc",
    figsize: Tuple[float, float] = (9.0, 3.5),
    dpi: int = 100,
    title: Optional[str] = None,
) -> Path:
    """Clean (left) and robust (right) accuracy per epoch, one line per run.

    Epochs flagged by :class:`~advtrain.diagnostics.RobustnessDropMonitor`
    (``overfitting_flag``) are marked with a red cross on the robust panel.

    Args:
        histories: run name -> its records (a ``History``, a list of records
            or a ``metrics.jsonl`` path).
        path: PNG file to write.
        clean_key, robust_key: record keys of the two accuracies (fractions;
            e.g. ``robust_key="monitor_robust_acc"`` for the monitor's); say
            which attack the robust accuracy is under in ``title``.
        figsize: (width, height) in inches; dpi: dots per inch.
        title: figure title.
    """
    if not histories:
        raise ValueError("histories is empty: give at least one run")
    fig = _figure(figsize, dpi)
    from matplotlib.ticker import MaxNLocator

    axes = fig.subplots(1, 2)
    flagged_label = "flagged by the monitor"
    for name, history in histories.items():
        records = _records(history)
        for ax, key in zip(axes, (clean_key, robust_key)):
            points = [(r.get("epoch", i + 1), r.get(key)) for i, r in enumerate(records)]
            points = [(e, 100 * v) for e, v in points if v is not None and math.isfinite(v)]
            if points:
                ax.plot(*zip(*points), marker="o", markersize=3, label=name)
        flags = [(r.get("epoch", i + 1), 100 * r[robust_key]) for i, r in enumerate(records)
                 if r.get("overfitting_flag") and r.get(robust_key) is not None]
        if flags:
            axes[1].scatter(*zip(*flags), marker="x", color="red", s=60, zorder=3, label=flagged_label)
            flagged_label = "_nolegend_"
    for ax, name in zip(axes, ("clean accuracy (%)", "robust accuracy (%)")):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel("epoch")
        ax.set_ylabel(name)
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return _save(fig, path, dpi)


def plot_strength_curves(
    result: StrengthResult,
    path: PathLike,
    *,
    figsize: Tuple[float, float] = (6.0, 4.0),
    dpi: int = 100,
    title: Optional[str] = None,
    label: str = "training perturbation",
) -> Path:
    """The reference model's accuracy under each epoch's perturbations and
    under random noise of the same radius (and its clean accuracy).

    Args:
        result: a :class:`~advtrain.diagnostics.StrengthResult`.
        path: PNG file to write.
        figsize: (width, height) in inches; dpi: dots per inch.
        title: axes title.
        label: legend name of the perturbation curve.
    """
    fig = _figure(figsize, dpi)
    from matplotlib.ticker import MaxNLocator

    ax = fig.subplots()
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.plot(result.epochs, 100 * result.perturbation_accuracy, marker="o", label=label)
    ax.plot(result.epochs, 100 * result.noise_accuracy, marker="s", linestyle="--",
            label=f"{result.noise} noise, eps={result.eps * 255:.3g}/255")
    ax.axhline(100 * result.clean_accuracy, color="gray", linestyle=":", label="clean")
    ax.set_xlabel("training epoch of the perturbation")
    ax.set_ylabel("reference model accuracy (%)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    if title:
        ax.set_title(title)
    fig.tight_layout()
    return _save(fig, path, dpi)


def plot_perturbation_grid(
    images: Tensor,
    perturbations_by_epoch: Mapping[int, Tensor],
    path: PathLike,
    *,
    amplify: Optional[float] = None,
    n_images: int = 4,
    epochs: Optional[Sequence[int]] = None,
    figsize: Optional[Tuple[float, float]] = None,
    dpi: int = 100,
) -> Path:
    """A grid: one row per image, the clean image then its perturbation at
    each epoch, shown as ``0.5 + amplify · δ`` (mid-gray is zero).

    Args:
        images: uint8 0..255 or float pixels in [0, 1], (n, C, H, W), C = 1 or 3.
        perturbations_by_epoch: epoch -> δ for those images (pixel units).
        path: PNG file to write.
        amplify: gain applied to δ; default ``0.5 / max|δ|`` over the epochs
            shown, so the strongest perturbation spans the full range.
        n_images: rows (the first images).
        epochs: which epochs to show (default: all, in order).
        figsize: (width, height) in inches; default 1.1 inch per cell.
        dpi: dots per inch.
    """
    if not perturbations_by_epoch:
        raise ValueError("perturbations_by_epoch is empty")
    shown = sorted(perturbations_by_epoch) if epochs is None else list(epochs)
    missing = [e for e in shown if e not in perturbations_by_epoch]
    if missing:
        raise ValueError(f"no perturbations for epochs {missing}")
    rows = min(int(n_images), images.shape[0])
    if rows < 1:
        raise ValueError("n_images must be >= 1 and images non-empty")
    x = to_pixels(images[:rows].detach().cpu())
    deltas: Dict[int, Tensor] = {e: perturbations_by_epoch[e][:rows].detach().cpu().float() for e in shown}
    for e, d in deltas.items():
        if d.shape != x.shape:
            raise ValueError(f"perturbations of epoch {e} have shape {tuple(d.shape)}, images {tuple(x.shape)}")
    if amplify is None:
        peak = max(float(d.abs().max()) for d in deltas.values())
        amplify = 0.5 / peak if peak > 0 else 1.0
    cols = 1 + len(shown)
    fig = _figure(figsize or (1.1 * cols, 1.1 * rows + 0.3), dpi)
    axes = fig.subplots(rows, cols, squeeze=False)

    def show(ax: Any, t: Tensor) -> None:
        img = t.clamp(0, 1).permute(1, 2, 0).numpy()
        ax.imshow(img[..., 0] if img.shape[2] == 1 else img, cmap="gray" if img.shape[2] == 1 else None,
                  vmin=0, vmax=1, interpolation="nearest")
        ax.set_xticks([])
        ax.set_yticks([])

    for i in range(rows):
        show(axes[i][0], x[i])
        for j, e in enumerate(shown, start=1):
            show(axes[i][j], 0.5 + amplify * deltas[e][i])
    axes[0][0].set_title("image", fontsize="small")
    for j, e in enumerate(shown, start=1):
        axes[0][j].set_title(f"epoch {e}", fontsize="small")
    fig.suptitle(f"perturbations x{amplify:.3g} (gray = 0)", fontsize="small")
    fig.subplots_adjust(left=0.02, right=0.98, bottom=0.02, top=1 - 0.45 / fig.get_figheight(), wspace=0.05,
                        hspace=0.05)
    return _save(fig, path, dpi)


__all__ = ["plot_accuracy_curves", "plot_strength_curves", "plot_perturbation_grid", "HistoryLike"]
