"""Differentiable top-K selection by perturbed optimisers, and patch extraction from indicators.

``perturbed_topk(scores, k, sigma, n_samples)`` returns soft indicators ``(B, k, N)`` whose backward is
the correct outer-product Jacobian ``E[Y Zᵀ]/σ`` computed from the sampled indices only
(METHODS.md §4); :class:`PerturbedTopK` is the module form with σ schedules.
"""

from needlework.ops.grids import cell_coords, grid_coords
from needlework.ops.patches import extract_patches
from needlework.topk.indicator_patches import hard_patches, soft_patches, support_indices, support_patches
from needlework.topk.module import SCHEDULES, PerturbedTopK, scheduled_sigma
from needlework.topk.perturbed import (
    JACOBIANS,
    hard_topk,
    normalize_scores,
    perturbed_topk,
    perturbed_topk_support,
    sorted_topk_indices,
)

__all__ = [
    "JACOBIANS",
    "SCHEDULES",
    "PerturbedTopK",
    "cell_coords",
    "extract_patches",
    "grid_coords",
    "hard_patches",
    "hard_topk",
    "normalize_scores",
    "perturbed_topk",
    "perturbed_topk_support",
    "scheduled_sigma",
    "soft_patches",
    "sorted_topk_indices",
    "support_indices",
    "support_patches",
]
