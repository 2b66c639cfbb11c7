"""Figures of attention sampling: the image with its sampled patches, the attention map, the patches.

:func:`plot_attention_sampling` draws one image; :func:`plot_batch` draws the first items of a model's
output for a batch (any model whose output has ``attention_map``; ``selected_coords`` and ``patches``
are drawn when present). PNGs are written atomically. Needs matplotlib (Agg backend).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

__all__ = ["plot_attention_sampling", "plot_batch"]


def _np(x: Any) -> np.ndarray:
    return x.detach().float().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)


def _image(x: torch.Tensor) -> np.ndarray:
    """(C, H, W) → (H, W) or (H, W, 3) for imshow."""
    a = _np(x)
    return a[0] if a.shape[0] == 1 else np.clip(np.moveaxis(a[:3], 0, -1), 0, 1)


def _save(fig, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fig.savefig(tmp, format="png", dpi=100, bbox_inches="tight")
    os.replace(tmp, path)


def plot_attention_sampling(
    x_high: torch.Tensor,
    attention_map: torch.Tensor,
    path: str | Path,
    offsets: torch.Tensor | None = None,
    patch_size: int | Sequence[int] | None = None,
    patches: torch.Tensor | None = None,
    boxes: torch.Tensor | None = None,
    title: str | None = None,
) -> Path:
    """Draw one image and write it to ``path`` (PNG).

    Args:
        x_high: ``(C, H, W)`` the high-resolution image.
        attention_map: ``(h, w)`` attention (drawn stretched over the image's extent).
        path: output file.
        offsets: ``(n, 2)`` sampled patch corners ``(x, y)`` (red squares; darker = sampled earlier).
        patch_size: ``P`` or ``(h, w)`` (default: from ``patches``).
        patches: ``(n, C, h, w)`` the sampled patches (shown in a strip).
        boxes: ``(m, 4)`` ground-truth boxes ``xyxy`` (green).
        title: figure title.

    Returns:
        The path written.
    """
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt
    from matplotlib.patches import Rectangle

    H, W = x_high.shape[-2:]
    n = 0 if patches is None else patches.shape[0]
    strip = min(n, 10)
    fig = plt.figure(figsize=(10, 5.6 if strip else 5))
    grid = fig.add_gridspec(2 if strip else 1, max(strip, 2), height_ratios=[4, 1] if strip else [1])
    half = max(strip, 2) // 2
    ax_img = fig.add_subplot(grid[0, :half])
    ax_att = fig.add_subplot(grid[0, half:])
    ax_img.imshow(_image(x_high), cmap="gray", vmin=0, vmax=1)
    ax_img.set_title("x_high, sampled patches (red), objects (green)", fontsize=8)
    if patch_size is None and patches is not None:
        patch_size = tuple(patches.shape[-2:])
    if offsets is not None and patch_size is not None:
        ph, pw = (patch_size, patch_size) if isinstance(patch_size, int) else patch_size
        for k, (x, y) in enumerate(_np(offsets).astype(int)):
            shade = 1.0 - 0.6 * k / max(len(offsets) - 1, 1)
            ax_img.add_patch(Rectangle((x - 0.5, y - 0.5), pw, ph, fill=False, lw=1.2, ec=(shade, 0, 0)))
    if boxes is not None:
        for x0, y0, x1, y1 in _np(boxes):
            ax_img.add_patch(Rectangle((x0 - 0.5, y0 - 0.5), x1 - x0, y1 - y0, fill=False, lw=1, ec="lime"))
    att = _np(attention_map)
    im = ax_att.imshow(att, cmap="viridis", extent=(-0.5, W - 0.5, H - 0.5, -0.5))
    ax_att.set_title(f"attention (max {att.max():.3g}, uniform {1 / att.size:.3g})", fontsize=8)
    fig.colorbar(im, ax=ax_att, fraction=0.046, pad=0.04)
    for ax in (ax_img, ax_att):
        ax.set_xticks([])
        ax.set_yticks([])
    for k in range(strip):
        ax = fig.add_subplot(grid[1, k])
        ax.imshow(_image(patches[k]), cmap="gray", vmin=0, vmax=1)
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_title(str(k), fontsize=7)
    if title:
        fig.suptitle(title, fontsize=9)
    path = Path(path)
    try:
        _save(fig, path)
    finally:
        plt.close(fig)
    return path


def plot_batch(
    output: dict[str, Any],
    batch: dict[str, Any],
    out_dir: str | Path,
    prefix: str = "sample",
    max_items: int = 4,
    label_key: str = "label",
) -> list[Path]:
    """Draw the first ``max_items`` items of a batch and the model's output on it.

    Needs ``batch["x_high"]`` (or ``batch["image"]``) and ``output["attention_map"]``; uses
    ``output["selected_coords"]``, ``output["patches"]``, ``batch["boxes"]``, the label and the
    prediction when present. Files: ``<out_dir>/<prefix>_<i>.png``.
    """
    image = batch.get("x_high", batch.get("image"))
    if image is None or "attention_map" not in output:
        raise KeyError("plot_batch needs batch['x_high'] (or 'image') and output['attention_map']")
    logits = output.get("logits")
    labels = batch.get(label_key)
    paths = []
    for i in range(min(max_items, image.shape[0])):
        title = []
        if isinstance(labels, torch.Tensor) and labels.dim() == 1:
            title.append(f"label {int(labels[i])}")
        if isinstance(logits, torch.Tensor):
            title.append(f"predicted {int(logits[i].argmax())}")
        boxes = batch.get("boxes")
        paths.append(
            plot_attention_sampling(
                image[i],
                output["attention_map"][i],
                Path(out_dir) / f"{prefix}_{i}.png",
                offsets=output["selected_coords"][i] if "selected_coords" in output else None,
                patches=output["patches"][i] if "patches" in output else None,
                boxes=boxes[i] if isinstance(boxes, torch.Tensor) else None,
                title=", ".join(title) or None,
            )
        )
    return paths
