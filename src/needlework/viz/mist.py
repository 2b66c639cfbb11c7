"""PNG of detections: predicted boxes and labels over the images, ground truth dashed.

Example:
    >>> import tempfile, os
    >>> img = torch.zeros(1, 1, 40, 40); box = torch.tensor([[[5.0, 5, 25, 25]]])
    >>> path = os.path.join(tempfile.mkdtemp(), "det.png")
    >>> draw_detections(img, box, torch.tensor([[3]]), path, gt_boxes=box)  # doctest: +ELLIPSIS
    '...det.png'
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import torch


def draw_detections(
    images: torch.Tensor,
    boxes: torch.Tensor,
    labels: torch.Tensor | None,
    path: str | os.PathLike,
    gt_boxes: torch.Tensor | None = None,
    gt_labels: torch.Tensor | None = None,
    scores: torch.Tensor | None = None,
    columns: int = 4,
    title: str | None = None,
) -> str:
    """Write a grid of images with predicted boxes (red, label in the corner) and ground truth (green).

    Args:
        images: ``(N, C, H, W)`` in [0, 1] (C = 1 or 3).
        boxes: ``(N, K, 4)`` predicted ``xyxy`` boxes; ``labels`` ``(N, K)`` predicted classes or None.
        path: output ``.png``; written atomically (temporary file, then rename).
        gt_boxes, gt_labels: optional ``(N, L, 4)`` / ``(N, L)`` ground truth (label −1 = padding).
        scores: optional ``(N, K)`` scores shown as line width.
        columns: images per row.

    Returns:
        The path written, as a string.
    """
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt
    from matplotlib.patches import Rectangle

    n = images.shape[0]
    if n == 0:
        raise ValueError("draw_detections needs at least one image")
    cols = min(columns, n)
    rows = math.ceil(n / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(2.6 * cols, 2.6 * rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for i in range(n):
        ax = axes.flat[i]
        img = images[i].detach().float().cpu()
        pixels = img[0] if img.shape[0] == 1 else img.permute(1, 2, 0).clamp(0, 1)
        ax.imshow(pixels.numpy(), cmap="gray", vmin=0, vmax=1)
        if gt_boxes is not None:
            for j, (x0, y0, x1, y1) in enumerate(gt_boxes[i].tolist()):
                if gt_labels is not None and int(gt_labels[i, j]) < 0:
                    continue
                ax.add_patch(
                    Rectangle((x0 - 0.5, y0 - 0.5), x1 - x0, y1 - y0, fill=False, ec="lime", lw=0.8, ls="--")
                )
        for j, (x0, y0, x1, y1) in enumerate(boxes[i].tolist()):
            lw = 0.6 + 1.4 * float(scores[i, j].clamp(0, 1)) if scores is not None else 1.2
            ax.add_patch(Rectangle((x0 - 0.5, y0 - 0.5), x1 - x0, y1 - y0, fill=False, ec="red", lw=lw))
            if labels is not None:
                ax.text(
                    x0,
                    y0,
                    str(int(labels[i, j])),
                    color="yellow",
                    fontsize=7,
                    va="top",
                    ha="left",
                    bbox={"facecolor": "black", "alpha": 0.5, "pad": 0.5, "lw": 0},
                )
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.{os.getpid()}.tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, path)
    return str(path)
