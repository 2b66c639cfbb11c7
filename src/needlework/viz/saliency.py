"""Figures for reports: image grids with saliency overlays, boxes and detected points (matplotlib, Agg)."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch


def _pyplot():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, path: str | Path, dpi: int = 120) -> None:
    """Save atomically (temporary file, then rename) and close the figure."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.{os.getpid()}.tmp{path.suffix}")
    fig.savefig(tmp, dpi=dpi, bbox_inches="tight")
    os.replace(tmp, path)
    _pyplot().close(fig)


def saliency_grid(
    images: torch.Tensor,
    saliency: torch.Tensor,
    boxes: Sequence[torch.Tensor],
    points: torch.Tensor,
    titles: Sequence[str],
    path: str | Path,
    columns: int = 4,
) -> None:
    """Grid of ``images`` ``(B, 1, H, W)`` with ``saliency`` ``(B, H, W)`` overlaid, ground-truth ``boxes``
    (xyxy, green) and detected ``points`` ``(B, 2)`` (red cross)."""
    plt = _pyplot()
    from matplotlib.patches import Rectangle

    n = len(images)
    rows = (n + columns - 1) // columns
    fig, axes = plt.subplots(rows, columns, figsize=(3 * columns, 3.2 * rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for i, ax in enumerate(axes.flat[:n]):
        ax.imshow(images[i, 0].cpu().numpy(), cmap="gray", vmin=0, vmax=1)
        sal = saliency[i].cpu().numpy()
        sal = sal / (sal.max() + 1e-12)
        ax.imshow(np.ma.masked_less(sal, 0.15), cmap="inferno", alpha=0.6, vmin=0, vmax=1)
        for x0, y0, x1, y1 in boxes[i].tolist():
            ax.add_patch(Rectangle((x0, y0), x1 - x0, y1 - y0, fill=False, edgecolor="lime", linewidth=1.5))
        ax.plot(*points[i].tolist(), marker="x", color="red", markersize=9, markeredgewidth=2)
        ax.set_title(titles[i], fontsize=9)
    fig.suptitle("saliency |∂logit/∂x| (hot), needle box (green), saliency maximum (red ×)", fontsize=10)
    save_figure(fig, path)


def selection_grid(
    images: torch.Tensor,
    boxes: Sequence[torch.Tensor],
    selected: torch.Tensor,
    patch_size: int,
    titles: Sequence[str],
    path: str | Path,
    weights: torch.Tensor | None = None,
    columns: int = 4,
) -> None:
    """Grid of ``images`` ``(B, 1, H, W)`` with the patches a selection model read: ``selected (B, k, 2)``
    top-left corners of ``patch_size`` squares (orange; line width by ``weights (B, k)`` when given) and
    the ground-truth needle ``boxes`` (xyxy, green)."""
    plt = _pyplot()
    from matplotlib.patches import Rectangle

    n = len(images)
    rows = (n + columns - 1) // columns
    fig, axes = plt.subplots(rows, columns, figsize=(3.4 * columns, 3.6 * rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for i, ax in enumerate(axes.flat[:n]):
        ax.imshow(images[i, 0].cpu().numpy(), cmap="gray", vmin=0, vmax=1)
        w = weights[i] / (weights[i].max() + 1e-12) if weights is not None else torch.ones(len(selected[i]))
        for (x, y), wi in zip(selected[i].tolist(), w.tolist()):
            ax.add_patch(Rectangle((x, y), patch_size, patch_size, fill=False, edgecolor="orange",
                                   linewidth=0.8 + 2.2 * wi))  # fmt: skip
        for x0, y0, x1, y1 in boxes[i].tolist():
            ax.add_patch(Rectangle((x0, y0), x1 - x0, y1 - y0, fill=False, edgecolor="lime", linewidth=1.5))
        ax.set_title(titles[i], fontsize=9)
    fig.suptitle("patches the model read (orange, thicker = more attention), needle box (green)", fontsize=10)
    save_figure(fig, path)
