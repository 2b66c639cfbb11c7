"""Patches from top-K indicators: integer gathers and soft patch mixtures (grids live in ``ops.grids``).

Coordinates are top-left ``(x, y)`` = (column, row) in the pixels of the image they are cut from;
pixels outside the image read as zero. A candidate grid is an ``(N, 2)`` int64 tensor; candidate
``n`` of an ``(gh, gw)`` grid is cell ``(n // gw, n % gw)`` (row-major).

* :func:`extract_patches` — ``(B, K, C, Ph, Pw)`` at integer coordinates (re-exported from ``ats``).
* :func:`support_patches` — the same from indicators given on their support only.
* :func:`soft_patches` — DPS patches ``X_k = Σ_n Ŷ[k, n] · patch_n`` computed on the support of the
  indicators only (METHODS.md §5.2): the patches of cells that no noise draw selected are never cut.
"""

from __future__ import annotations

import torch

from needlework.checks import check_shape
from needlework.ops.patches import extract_patches


def support_indices(indicators: torch.Tensor) -> torch.Tensor:
    """Candidate indices ``(B, U)`` covering every column where ``indicators (B, k, N)`` is non-zero.

    ``U`` is the largest support size in the batch; shorter rows are filled with columns whose
    indicators are all zero, so they contribute nothing.
    """
    used = (indicators.detach() != 0).any(dim=1)  # (B, N)
    size = int(used.sum(dim=1).max())
    order = torch.sort(used.to(torch.int8), dim=1, descending=True, stable=True).indices
    return order[:, : max(size, 1)]


def soft_patches(
    image: torch.Tensor,
    indicators: torch.Tensor,
    candidates: torch.Tensor,
    patch_size: int | tuple[int, int],
) -> torch.Tensor:
    """Soft patch mixture ``X_k = Σ_n Ŷ[k, n] · patch_n`` ``(B, k, C, Ph, Pw)``, cut on the support only.

    Args:
        image: ``(B, C, H, W)``.
        indicators: ``(B, k, N)`` soft indicators (e.g. from :func:`perturbed_topk`).
        candidates: ``(N, 2)`` top-left ``(x, y)`` of the N candidate patches.
        patch_size: patch side(s).

    The gradient with respect to ``Ŷ[k, n]`` is ``⟨∂L/∂X_k, patch_n⟩`` on the support and zero elsewhere —
    the only entries the perturbed top-K backward reads. Memory is O(|support| · C · Ph · Pw).

    Example:
        >>> from needlework.ops.grids import cell_coords
        >>> img = torch.rand(2, 1, 40, 40)
        >>> y = torch.zeros(2, 1, 16); y[:, 0, 5] = 0.75; y[:, 0, 6] = 0.25
        >>> cand = cell_coords((40, 40), (4, 4), 10)
        >>> x = soft_patches(img, y, cand, 10)
        >>> torch.allclose(x[:, 0], 0.75 * img[:, :, 10:20, 10:20] + 0.25 * img[:, :, 10:20, 20:30])
        True
    """
    sizes = check_shape(indicators, ["B", "k", "N"], "indicators")
    check_shape(candidates, [str(sizes["N"]), "2"], "candidates")
    support = support_indices(indicators)  # (B, U)
    weights = indicators.gather(2, support.unsqueeze(1).expand(-1, sizes["k"], -1))  # (B, k, U)
    return support_patches(image, support, weights, candidates, patch_size)


def support_patches(
    image: torch.Tensor,
    support: torch.Tensor,
    weights: torch.Tensor,
    candidates: torch.Tensor,
    patch_size: int | tuple[int, int],
) -> torch.Tensor:
    """``X_k = Σ_u weights[k, u] · patch_{support[u]}`` ``(B, k, C, Ph, Pw)``: :func:`soft_patches` for
    indicators given on their support (:func:`~needlework.topk.perturbed.perturbed_topk_support`).

    Args:
        image: ``(B, C, H, W)`` (or a lazy slide raster that :func:`extract_patches` reads).
        support: ``(B, U)`` candidate indices; weights: ``(B, k, U)``; candidates: ``(N, 2)`` top-left
            ``(x, y)``.
    """
    sizes = check_shape(support, ["B", "U"], "support")
    check_shape(weights, [str(sizes["B"]), "k", str(sizes["U"])], "weights")
    check_shape(candidates, ["N", "2"], "candidates")
    patches = extract_patches(image, candidates.to(support.device)[support], patch_size)  # (B, U, C, Ph, Pw)
    return torch.einsum("bku,bu...->bk...", weights.to(patches.dtype), patches)


def hard_patches(
    image: torch.Tensor, idx: torch.Tensor, candidates: torch.Tensor, patch_size: int | tuple[int, int]
) -> torch.Tensor:
    """Patches ``(B, K, C, Ph, Pw)`` of the candidates ``idx (B, K)`` (inference path)."""
    check_shape(idx, ["B", "K"], "idx")
    return extract_patches(image, candidates.to(image.device)[idx], patch_size)
