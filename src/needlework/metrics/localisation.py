"""Weak-localisation average precision (Oquab et al. 2015 protocol, as used by Needles in Haystacks).

Each image yields one detection: a point and a confidence. A detection is a true positive when the image
contains a needle and the point falls inside one of its boxes; every other detection is a false positive
(a mis-localised needle is both a false positive and a missed object). AP is the area under the
precision–recall curve, non-interpolated (``Σ_n (R_n − R_{n−1}) P_n``, as scikit-learn's
``average_precision_score``), with recall relative to the number of needles.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def point_in_boxes(point: torch.Tensor, boxes: torch.Tensor) -> bool:
    """Whether ``point`` ``(2,)`` as ``(x, y)`` lies inside any ``(n, 4)`` xyxy box (edges included)."""
    if boxes.numel() == 0:
        return False
    x, y = float(point[0]), float(point[1])
    inside = (boxes[:, 0] <= x) & (x <= boxes[:, 2]) & (boxes[:, 1] <= y) & (y <= boxes[:, 3])
    return bool(inside.any())


def localisation_hits(points: torch.Tensor, boxes: Sequence[torch.Tensor]) -> torch.Tensor:
    """``(B,)`` bool: detection ``i`` hits a box of image ``i``."""
    if len(points) != len(boxes):
        raise ValueError(f"got {len(points)} points but {len(boxes)} box lists")
    return torch.tensor([point_in_boxes(p, b) for p, b in zip(points, boxes)], dtype=torch.bool)


def localisation_ap(scores: torch.Tensor, points: torch.Tensor, boxes: Sequence[torch.Tensor]) -> float:
    """Localisation AP of one detection per image.

    Args:
        scores: ``(B,)`` detection confidences (e.g. the saliency maximum).
        points: ``(B, 2)`` detected ``(x, y)`` locations.
        boxes: per image, ``(n_i, 4)`` xyxy needle boxes (``n_i = 0`` for negatives).

    Returns:
        AP in [0, 1]; ``nan`` when no image holds a needle.
    """
    n_objects = sum(int(len(b) > 0) for b in boxes)
    if n_objects == 0:
        return float("nan")
    hits = localisation_hits(points, boxes).float()
    order = torch.argsort(scores.detach().float().cpu(), descending=True, stable=True)
    hits = hits[order]
    tp = hits.cumsum(0)
    precision = tp / torch.arange(1, len(hits) + 1, dtype=torch.float32)
    return float((precision * hits).sum() / n_objects)


def attention_peaks(
    out: dict[str, torch.Tensor], image_hw: tuple[int, int], patch_size: int | None = None
) -> torch.Tensor:
    """Where a model points: ``(B, 2)`` ``(x, y)`` image pixels of its attention maximum.

    * ``attention_map (B, gh, gw)`` (ATS, patch-grid MIL, attention MIL): the centre of the top cell, the
      map's cells tiling the image;
    * ``selected_coords (B, k, 2)`` patch corners with ``attention (B, N)`` and ``selected_idx (B, k)``
      (IPS, DPS): the centre (``patch_size``) of the selected patch with the highest attention.

    Raises ``KeyError`` for outputs with neither (dense models: use :mod:`needlework.saliency`).
    """
    h, w = image_hw
    if "attention_map" in out:
        amap = out["attention_map"].detach()
        b, gh, gw = amap.shape[0], amap.shape[-2], amap.shape[-1]
        flat = amap.reshape(b, -1).argmax(-1)
        rows, cols = flat // gw, flat % gw
        return torch.stack([(cols.float() + 0.5) * w / gw, (rows.float() + 0.5) * h / gh], -1)
    if "selected_coords" in out and "selected_idx" in out and "attention" in out:
        if patch_size is None:
            raise ValueError("attention_peaks needs patch_size for outputs with selected_coords")
        att = out["attention"].detach().gather(1, out["selected_idx"])  # (B, k)
        best = att.argmax(-1)
        corner = out["selected_coords"][torch.arange(len(best)), best].float()
        return corner + patch_size / 2
    raise KeyError(f"no attention_map or selected patches in the model output (keys: {sorted(out)})")
