"""The ideal-heatmap generator G of MIST's lifting (paper eq. 6 and App. B).

``G({x_k})`` renders the heatmap a perfect detector would output for keypoints ``x_k = (x, y, s)``: a
single 1 at the keypoint's pixel (``"single_point"``, MNIST) or a Gaussian blob (``"gaussian"``, PASCAL).
With several scales the unit mass is split between the two nearest scales ``s_a ≤ s ≤ s_b`` with
``α s_a + (1 − α) s_b = s``, so the scale moment read by E_K equals ``s`` and, for single points on
distinct pixels farther apart than the NMS window, ``E_K(G({x_k})) = {x_k}`` (the lifting identity).

Example:
    >>> import torch
    >>> g = ideal_heatmap(torch.tensor([[[3.5, 1.5]]]), torch.tensor([[1.5]]), [1.0, 2.0], (4, 6))
    >>> g[0, :, 1, 3].tolist()
    [0.5, 0.5]
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from needlework.checks import check_shape


def scale_split(scales: torch.Tensor, levels: Sequence[float]) -> tuple[torch.Tensor, torch.Tensor]:
    """Indices ``(lower, upper)`` and the mass ``α`` on the lower level for each scale value.

    Returns ``(idx (…, 2) int64, mass (…, 2))``: mass ``α`` at ``idx[..., 0]`` and ``1 − α`` at
    ``idx[..., 1]``; scales outside ``[min, max]`` are clamped to the end level.
    """
    lv = torch.as_tensor(list(levels), dtype=scales.dtype, device=scales.device)
    if lv.numel() == 0 or bool((lv[1:] <= lv[:-1]).any()):
        raise ValueError(f"scales must be a non-empty strictly increasing list, got {list(levels)}")
    if lv.numel() == 1:
        idx = torch.zeros(*scales.shape, 2, dtype=torch.long, device=scales.device)
        mass = torch.stack([torch.ones_like(scales), torch.zeros_like(scales)], dim=-1)
        return idx, mass
    s = scales.clamp(lv[0], lv[-1])
    upper = torch.searchsorted(lv, s.contiguous(), right=False).clamp(1, lv.numel() - 1)
    lower = upper - 1
    alpha = (lv[upper] - s) / (lv[upper] - lv[lower])
    return torch.stack([lower, upper], dim=-1), torch.stack([alpha, 1 - alpha], dim=-1)


def ideal_heatmap(
    centres: torch.Tensor,
    scales: torch.Tensor,
    levels: Sequence[float],
    size: tuple[int, int],
    kind: str = "single_point",
    sigma: float | torch.Tensor = 2.5,
) -> torch.Tensor:
    """G: render ideal per-scale heatmaps for keypoints.

    Args:
        centres: ``(B, K, 2)`` keypoints ``(x, y)`` in continuous pixels (pixel ``(r, c)`` covers
            ``[c, c+1) × [r, r+1)``); rounded to the containing pixel, clamped to the image.
        scales: ``(B, K)`` keypoint scales (ignored with a single level).
        levels: the S heatmap scales, strictly increasing.
        size: ``(H, W)``.
        kind: ``"single_point"`` (value at the keypoint pixel, 0 elsewhere) or ``"gaussian"`` (a peak-1
            Gaussian of std ``sigma`` pixels centred on the keypoint pixel, times the scale mass).
        sigma: Gaussian std in pixels, a float or ``(B, K)`` (e.g. 0.125 × box size as the reference).

    Returns:
        ``(B, S, H, W)`` target heatmaps; overlapping keypoints combine by maximum, not sum.
    """
    b, k = check_shape(centres, ["B", "K", "2"], "centres").values()
    check_shape(scales, [str(b), str(k)], "scales")
    h, w = size
    s = len(levels)
    idx, mass = scale_split(scales.detach(), levels)  # (B, K, 2)
    cols = centres[..., 0].detach().floor().long().clamp(0, w - 1)
    rows = centres[..., 1].detach().floor().long().clamp(0, h - 1)
    out = torch.zeros(b, s, h * w, dtype=centres.dtype, device=centres.device)
    if kind == "single_point":
        flat = (rows * w + cols)[..., None].expand(-1, -1, 2)  # (B, K, 2)
        target = (idx * (h * w) + flat).reshape(b, -1)  # index into (S·H·W)
        out = out.reshape(b, -1).scatter_reduce(1, target, mass.reshape(b, -1), reduce="amax")
        return out.reshape(b, s, h, w)
    if kind != "gaussian":
        raise ValueError(f"kind must be 'single_point' or 'gaussian', got {kind!r}")
    sig = torch.as_tensor(sigma, dtype=centres.dtype, device=centres.device).expand(b, k)
    yy = torch.arange(h, dtype=centres.dtype, device=centres.device)
    xx = torch.arange(w, dtype=centres.dtype, device=centres.device)
    dy = (yy[None, None, :] - rows[..., None]) ** 2  # (B, K, H)
    dx = (xx[None, None, :] - cols[..., None]) ** 2  # (B, K, W)
    blob = torch.exp(-(dy[..., :, None] + dx[..., None, :]) / (2 * sig[..., None, None] ** 2))  # (B,K,H,W)
    per_scale = torch.zeros(b, k, s, dtype=centres.dtype, device=centres.device)
    per_scale.scatter_add_(2, idx, mass)
    return (per_scale[..., None, None] * blob[:, :, None]).amax(dim=1)
