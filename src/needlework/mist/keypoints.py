"""Heatmap operators of MIST: local spatial softmax, pooling over scales, NMS and top-K (E_K).

Coordinates are continuous pixels: heatmap pixel ``(row r, col c)`` covers ``[c, c+1) × [r, r+1)``, so a
keypoint picked at that pixel is ``(x, y) = (c + 0.5, r + 0.5)``. Every window size is honoured (the
reference code ignores its configured ones, METHODS.md §8.4).

Example:
    >>> h = torch.zeros(1, 1, 8, 8); h[0, 0, 2, 5] = 1.0; h[0, 0, 6, 1] = 0.5
    >>> kp = extract_keypoints(h, k=2, scales=[1.0], nms_window=3)
    >>> kp.centres.tolist()
    [[[5.5, 2.5], [1.5, 6.5]]]
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from needlework.checks import check_shape

EPS = 1e-6


def _check_window(window: int, name: str) -> None:
    if not isinstance(window, int) or window < 1 or window % 2 == 0:
        raise ValueError(f"{name} must be an odd positive int (a centred window), got {window!r}")


def local_spatial_softmax(
    scores: torch.Tensor, window: int = 15, beta: float = 10.0, padding: str = "reflect"
) -> torch.Tensor:
    """Softmax of ``β·scores`` normalised over the ``window × window`` neighbourhood of each pixel.

    ``p(x) = exp(β(h(x) − m)) / Σ_{y ∈ W(x)} exp(β(h(y) − m))`` with ``m`` the per-map maximum (for
    stability; it cancels). A pixel that is the only non-negligible one in its window gets ≈ 1, so peaks
    of an ideal single-point heatmap are reachable.

    Args:
        scores: ``(B, C, H, W)`` raw scores, one map per channel.
        window: odd side of the normalisation window (15 in the reference).
        beta: inverse temperature (10 in the reference).
        padding: how windows reaching past the border are filled. ``"reflect"`` (default) mirrors the
            map, so a constant map gives ``1/window²`` everywhere; ``"zeros"`` counts out-of-image
            neighbours as 0, which favours the border: a flat region scores up to ``window²/(r+1)²``
            times higher in a corner than inside (r = window // 2), and in training the top-K then piles
            keypoints into the corner (observed on MNIST-hard). Falls back to ``"replicate"`` for maps
            smaller than the window.

    Returns:
        ``(B, C, H, W)`` values in [0, 1].
    """
    check_shape(scores, ["B", "C", "H", "W"], "scores")
    _check_window(window, "window")
    if padding not in ("reflect", "zeros"):
        raise ValueError(f"padding must be 'reflect' or 'zeros', got {padding!r}")
    z = beta * scores
    m = z.amax(dim=(-2, -1), keepdim=True).detach()
    e = torch.exp(z - m)
    r = window // 2
    if padding == "zeros":
        den = F.avg_pool2d(e, window, stride=1, padding=r, count_include_pad=True) * window**2
    else:
        mode = "reflect" if min(e.shape[-2:]) > r else "replicate"
        den = F.avg_pool2d(F.pad(e, [r, r, r, r], mode=mode), window, stride=1) * window**2
    return e / den.clamp_min(torch.finfo(e.dtype).tiny)


def pool_scales(heatmaps: torch.Tensor, eps: float = EPS) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax pooling over scales (paper App. B) and the per-scale weights.

    ``w_s = h_s / Σ_s' (h_s' + ε)`` and ``h = Σ_s w_s h_s`` — the heatmaps weight themselves, without
    exponentiation.

    Args:
        heatmaps: ``(B, S, H, W)`` non-negative per-scale heatmaps.

    Returns:
        ``(pooled (B, H, W), weights (B, S, H, W))``.
    """
    check_shape(heatmaps, ["B", "S", "H", "W"], "heatmaps")
    weights = heatmaps / (heatmaps + eps).sum(dim=1, keepdim=True)
    return (weights * heatmaps).sum(dim=1), weights


def nms(heatmap: torch.Tensor, window: int = 5) -> torch.Tensor:
    """Non-maximum suppression: keep ``h(x)`` where it equals the max of its ``window²`` neighbourhood.

    Ties are all kept (``h == maxpool(h)``, as the reference). Works on ``(B, H, W)`` or ``(B, C, H, W)``.
    """
    if heatmap.dim() not in (3, 4):
        raise ValueError(f"heatmap must have shape (B, H, W) or (B, C, H, W), got {tuple(heatmap.shape)}")
    _check_window(window, "nms window")
    x = heatmap if heatmap.dim() == 4 else heatmap[:, None]
    peak = F.max_pool2d(x, window, stride=1, padding=window // 2)
    out = torch.where(x == peak, x, torch.zeros_like(x))
    return out if heatmap.dim() == 4 else out[:, 0]


@dataclass
class Keypoints:
    """Output of :func:`extract_keypoints` (E_K): ``centres (B, K, 2)`` ``(x, y)`` float pixels,
    ``scales (B, K)``, ``scores (B, K)`` (pooled heatmap value), ``indices (B, K)`` (flat ``r·W + c``)."""

    centres: torch.Tensor
    scales: torch.Tensor
    scores: torch.Tensor
    indices: torch.Tensor

    def detach(self) -> Keypoints:
        return Keypoints(self.centres.detach(), self.scales.detach(), self.scores.detach(), self.indices)


def topk_pixels(heatmap: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Values and flat indices ``(B, K)`` of the ``k`` largest pixels of ``(B, H, W)``, descending."""
    check_shape(heatmap, ["B", "H", "W"], "heatmap")
    if not 1 <= k <= heatmap.shape[1] * heatmap.shape[2]:
        raise ValueError(f"k must be in [1, H·W = {heatmap.shape[1] * heatmap.shape[2]}], got {k}")
    return heatmap.flatten(1).topk(k, dim=1, sorted=True)


def extract_keypoints(
    heatmaps: torch.Tensor,
    k: int,
    scales: Sequence[float],
    nms_window: int = 5,
    eps: float = EPS,
    tie_noise: float | torch.Tensor = 0.0,
) -> Keypoints:
    """E_K: pool the per-scale heatmaps, suppress non-maxima, take the top-K, read scales off moments.

    The scale of a keypoint is the first moment of the scale weights at its pixel,
    ``s_k = Σ_s w_s(x_k) s / Σ_s w_s(x_k)`` (the mean scale where all weights vanish).

    Args:
        heatmaps: ``(B, S, H, W)`` non-negative per-scale heatmaps (after local softmax).
        k: number of keypoints K.
        scales: the S scales, one per channel.
        nms_window: odd NMS window side.
        tie_noise: a float: amplitude of fresh uniform noise added to the pooled map before NMS and
            top-K; or a tensor broadcastable to ``(B, H, W)``, added as is (a fixed pattern gives
            deterministic tie-breaking at evaluation). Flat regions (a constant background gives exactly
            equal scores) otherwise resolve their ties by position, always towards the top-left pixels,
            and training then reinforces those junk keypoints; a tiny noise (1e-6) breaks ties and leaves
            distinct values ordered. Scores are returned without the noise.

    Returns:
        :class:`Keypoints` (no gradient flows through the selection; centres are pixel centres).
    """
    _, s, _, w = check_shape(heatmaps, ["B", "S", "H", "W"], "heatmaps").values()
    if len(scales) != s:
        raise ValueError(f"heatmaps have {s} scale channels but {len(scales)} scales were given")
    pooled, weights = pool_scales(heatmaps, eps)
    if isinstance(tie_noise, torch.Tensor):
        ranked = pooled + tie_noise.to(pooled)
    else:
        ranked = pooled + tie_noise * torch.rand_like(pooled) if tie_noise > 0 else pooled
    kept, idx = topk_pixels(nms(ranked, nms_window), k)
    # the score is the pooled value without noise; pixels taken after the NMS survivors ran out score 0
    values = torch.where(kept > 0, pooled.flatten(1).gather(1, idx), torch.zeros_like(kept))
    rows, cols = idx // w, idx % w
    centres = torch.stack([cols, rows], dim=-1).to(heatmaps.dtype) + 0.5
    wk = weights.flatten(2).gather(2, idx[:, None, :].expand(-1, s, -1))  # (B, S, K)
    sc = torch.as_tensor(list(scales), dtype=heatmaps.dtype, device=heatmaps.device)
    total = wk.sum(dim=1)
    moment = (wk * sc[None, :, None]).sum(dim=1)
    scale_k = torch.where(total > 0, moment / total.clamp_min(torch.finfo(heatmaps.dtype).tiny), sc.mean())
    return Keypoints(centres, scale_k, values, idx)
