"""Nested attention sampling over more than two resolutions.

With resolutions ``x_0 < x_1 < … < x_L``, level ``l`` has an attention distribution over the positions
of each patch drawn at level ``l − 1`` (level 0 over the whole lowest-resolution image). The quantity of
interest is the nested expectation ``Σ_i a⁰_i Σ_j a¹_{ij} … f_{ij…}``; estimating each level with
:func:`~needlework.ats.expectation` from the innermost outwards keeps it unbiased, and so are the
gradients with respect to every level's attention and the features, because draws at different levels
are independent and each estimator is linear in its features.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from needlework.ats.expectation import expectation
from needlework.checks import check_shape

__all__ = ["nested_expectation"]


def nested_expectation(
    attentions: Sequence[torch.Tensor],
    indices: Sequence[torch.Tensor],
    features: torch.Tensor,
    replace: bool | Sequence[bool],
    estimator: str = "unbiased",
) -> torch.Tensor:
    """Unbiased estimate of the nested expectation of ``features`` over ``L`` levels of sampling.

    Rows of level ``l`` are the samples of all previous levels in row-major order: level 0 has ``B`` rows,
    level 1 has ``B·n_0`` rows (sample ``k`` of image ``b`` is row ``b·n_0 + k``), and so on.

    Args:
        attentions: ``L`` tensors; ``attentions[l]`` is ``(B·n_0·…·n_{l−1}, N_l)``.
        indices: ``L`` tensors; ``indices[l]`` is ``(B·n_0·…·n_{l−1}, n_l)`` drawn from ``attentions[l]``.
        features: ``(B, n_0·n_1·…·n_{L−1}, D)`` features of the finest patches, row-major over levels.
        replace: one flag for all levels or one per level.
        estimator: passed to :func:`~needlework.ats.expectation`.

    Returns:
        ``(B, D)``.

    Example:
        >>> a0 = torch.full((2, 4), 0.25); i0 = torch.tensor([[0, 1], [2, 3]])
        >>> a1 = torch.full((4, 3), 1 / 3); i1 = torch.zeros(4, 1, dtype=torch.long)
        >>> nested_expectation([a0, a1], [i0, i1], torch.ones(2, 2, 5), replace=True).shape
        torch.Size([2, 5])
    """
    L = len(attentions)
    if L == 0 or len(indices) != L:
        raise ValueError(
            f"attentions ({L}) and indices ({len(indices)}) must be non-empty and of equal length"
        )
    flags = [bool(replace)] * L if isinstance(replace, bool) else [bool(r) for r in replace]
    if len(flags) != L:
        raise ValueError(f"replace has {len(flags)} flags for {L} levels")
    rows = check_shape(attentions[0], ["B", "N"], "attentions[0]")["B"]
    counts = []
    for level in range(L):
        check_shape(attentions[level], [str(rows), "N"], f"attentions[{level}]")
        sizes = check_shape(indices[level], [str(rows), "n"], f"indices[{level}]")
        counts.append(sizes["n"])
        rows *= sizes["n"]
    B = attentions[0].shape[0]
    total = rows // B
    D = check_shape(features, [str(B), str(total), "D"], "features")["D"]
    est = features.reshape(-1, counts[-1], D)
    for level in reversed(range(L)):
        est = expectation(attentions[level], indices[level], est, flags[level], estimator=estimator)
        if level > 0:
            est = est.reshape(-1, counts[level - 1], D)
    return est
