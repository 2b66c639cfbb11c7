"""Summaries of attention distributions: spread, mass on the objects, distance between two maps.

Used by the attention-sampling ablations (``benchmarks/ats_ablations.py``) to follow what a model attends
to over training. Every function takes attention as probabilities (rows summing to 1, non-negative) and
works in float64, so distances between nearly equal maps do not drown in rounding.

* :func:`attention_entropy` — ``H(a) = −Σ a_i log a_i`` (nats; ``0 log 0 = 0``), optionally divided by
  ``log N`` so 1 means uniform and 0 a single cell.
* :func:`object_mass` — the attention mass inside the objects' boxes: each cell covers a rectangle of the
  image and contributes its mass times the fraction of its pixels inside the union of the boxes (attention
  spread uniformly inside its cell).
* :func:`total_variation` — ``½ Σ |p − q|`` ∈ [0, 1].
* :func:`js_distance` — ``√JSD(p, q)`` with base-2 logarithms ∈ [0, 1] (a metric, unlike the divergence).
* :func:`pool_attention` — sum attention over blocks of cells, to compare maps of different resolutions.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from needlework.checks import check_shape

__all__ = ["attention_entropy", "js_distance", "object_mass", "pool_attention", "total_variation"]


def _flat(attention: torch.Tensor, name: str) -> torch.Tensor:
    """``(B, N)`` or ``(B, *spatial)`` → ``(B, N)`` float64."""
    if attention.dim() < 2:
        raise ValueError(f"{name} must be (B, N) or (B, h, w), got shape {tuple(attention.shape)}")
    return attention.detach().reshape(attention.shape[0], -1).double()


def attention_entropy(attention: torch.Tensor, normalised: bool = False) -> torch.Tensor:
    """Entropy of each row's attention distribution.

    Args:
        attention: ``(B, N)`` or ``(B, h, w)`` probabilities per image.
        normalised: divide by ``log N`` (1 = uniform, 0 = one cell); ``N = 1`` gives 0.

    Returns:
        ``(B,)`` float64, in nats unless ``normalised``.

    Example:
        >>> attention_entropy(torch.tensor([[0.5, 0.5, 0.0, 0.0]])).item() == math.log(2)
        True
    """
    a = _flat(attention, "attention")
    h = -torch.where(a > 0, a * torch.log(a.clamp_min(1e-300)), torch.zeros_like(a)).sum(1)
    if normalised:
        n = a.shape[1]
        h = h / math.log(n) if n > 1 else torch.zeros_like(h)
    return h


def _box_mask(boxes: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """``(H, W)`` float mask of the union of ``(n, 4)`` xyxy boxes (pixel ``(r, c)`` covers
    ``[c, c+1) × [r, r+1)``; fractional edges are rounded to the nearest pixel boundary)."""
    mask = torch.zeros(height, width, dtype=torch.float64)
    for x0, y0, x1, y1 in boxes.detach().double().reshape(-1, 4).tolist():
        c0, c1 = max(0, round(x0)), min(width, round(x1))
        r0, r1 = max(0, round(y0)), min(height, round(y1))
        if c1 > c0 and r1 > r0:
            mask[r0:r1, c0:c1] = 1.0
    return mask


def object_mass(
    attention_map: torch.Tensor, boxes: Sequence[torch.Tensor], image_hw: tuple[int, int]
) -> torch.Tensor:
    """Attention mass inside the objects' boxes, per image.

    The map's cells tile the image (cell ``(i, j)`` covers the adaptive-pooling bin ``i`` of ``h`` along the
    rows and ``j`` of ``w`` along the columns: exact blocks when ``h`` divides ``H``); a cell contributes its
    attention times the fraction of its pixels inside the union of the image's boxes.

    Args:
        attention_map: ``(B, h, w)`` attention over cells (rows sum to 1).
        boxes: per image, ``(n_i, 4)`` xyxy boxes in image pixels (``n_i = 0`` gives 0).
        image_hw: ``(H, W)`` of the image the boxes refer to.

    Returns:
        ``(B,)`` float64 in [0, 1].

    Example:
        >>> a = torch.tensor([[[0.4, 0.1], [0.2, 0.3]]])  # 2×2 cells of a 4×4 image
        >>> object_mass(a, [torch.tensor([[0.0, 0.0, 2.0, 2.0]])], (4, 4)).item().__round__(6)
        0.4
    """
    B, h, w = check_shape(attention_map, ["B", "h", "w"], "attention_map").values()
    if len(boxes) != B:
        raise ValueError(f"object_mass: got {len(boxes)} box lists for {B} attention maps")
    H, W = int(image_hw[0]), int(image_hw[1])
    if h > H or w > W:
        raise ValueError(f"object_mass: image {(H, W)} is smaller than the attention map {(h, w)}")
    masks = torch.stack([_box_mask(b, H, W) for b in boxes])  # (B, H, W)
    cover = F.adaptive_avg_pool2d(masks[:, None], (h, w))[:, 0]  # fraction of each cell inside a box
    return (attention_map.detach().double() * cover).flatten(1).sum(1)


def _check_pair(p: torch.Tensor, q: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    a, b = _flat(p, "p"), _flat(q, "q")
    if a.shape != b.shape:
        raise ValueError(f"the two attention maps differ in shape: {tuple(p.shape)} vs {tuple(q.shape)}")
    return a, b


def total_variation(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """Total-variation distance ``½ Σ_i |p_i − q_i|`` per row, in [0, 1].

    Args:
        p, q: ``(B, N)`` or ``(B, h, w)`` distributions of the same shape.

    Returns:
        ``(B,)`` float64.
    """
    a, b = _check_pair(p, q)
    return 0.5 * (a - b).abs().sum(1)


def js_distance(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """Jensen–Shannon distance ``√(½ KL(p‖m) + ½ KL(q‖m))``, ``m = (p + q)/2``, base-2 logs, in [0, 1].

    Args:
        p, q: ``(B, N)`` or ``(B, h, w)`` distributions of the same shape.

    Returns:
        ``(B,)`` float64 (0 for equal maps, 1 for disjoint supports).
    """
    a, b = _check_pair(p, q)
    m = 0.5 * (a + b)

    def kl(x: torch.Tensor) -> torch.Tensor:
        ratio = torch.where(x > 0, x / m.clamp_min(1e-300), torch.ones_like(x))
        return (x * torch.log2(ratio)).sum(1)

    return (0.5 * kl(a) + 0.5 * kl(b)).clamp_min(0.0).sqrt()


def pool_attention(attention_map: torch.Tensor, shape: tuple[int, int]) -> torch.Tensor:
    """Sum attention over blocks of cells: ``(B, h, w)`` → ``(B, *shape)``; ``shape`` must divide ``(h, w)``.

    Mass is preserved, so a fine ATS attention map (e.g. 60² cells) can be compared with the coarse grid of
    an attention-MIL model (10² patches) covering the same image.
    """
    B, h, w = check_shape(attention_map, ["B", "h", "w"], "attention_map").values()
    gh, gw = int(shape[0]), int(shape[1])
    if gh < 1 or gw < 1 or h % gh or w % gw:
        raise ValueError(f"pool_attention: target grid {shape} must divide the attention map {(h, w)}")
    blocks = attention_map.reshape(B, gh, h // gh, gw, w // gw)
    return blocks.sum(dim=(2, 4))
