"""Shared pieces of the MIL model zoo: the MIL base class, input checks and masked pooling.

Every MIL model takes ``bag`` ``(B, N, D)``, optional ``coords`` ``(B, N, 2)`` (level-0 top-left
``(x, y)`` pixels) and optional ``mask`` ``(B, N)`` (bool, True = real instance) and returns a dict
with ``logits`` ``(B, C)`` and ``attention`` ``(B, N)`` or ``(B, C, N)`` — exactly 0 at padded positions
and summing to 1 over the real ones. Masking rules (METHODS.md §10): attention logits at padded positions
are −∞ before the softmax, max pooling ignores padded positions, means divide by the true count, and every
bag must hold at least one real instance.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from needlework.checks import check_shape
from needlework.models.base import NeedleworkModel
from needlework.models.pooling import (  # noqa: F401  (re-exported: the MIL zoo's shared primitives)
    GatedAttention,
    masked_logsumexp,
    masked_max,
    masked_mean,
    masked_softmax,
)
from needlework.registry import register_model

_MIL_MODELS: list[str] = []


def register_mil_model(name: str) -> Callable[[Any], Any]:
    """``register_model`` that also records ``name`` as a MIL model (bag in, logits out)."""

    def decorator(factory: Any) -> Any:
        if name not in _MIL_MODELS:
            _MIL_MODELS.append(name)
        return register_model(name)(factory)

    return decorator


def list_mil_models() -> list[str]:
    """Names of every registered MIL model taking feature bags ``(B, N, D)``.

    Complete once ``needlework.models`` is imported, which importing this module already did (Python
    imports a package's ``__init__`` before its submodules)."""
    return sorted(_MIL_MODELS)


def check_bag(
    bag: torch.Tensor,
    coords: torch.Tensor | None = None,
    mask: torch.Tensor | None = None,
    in_dim: int | None = None,
) -> torch.Tensor:
    """Validate a padded batch of bags and return its mask ``(B, N)`` bool (all True when omitted).

    Raises ValueError naming the argument when a shape is wrong, when ``in_dim`` differs from the
    feature width, or when a bag has no real instance.
    """
    sizes = check_shape(bag, ["B", "N", "D"], "bag")
    if in_dim is not None and sizes["D"] != in_dim:
        raise ValueError(
            f"bag has feature dimension {sizes['D']} but the model was built with in_dim={in_dim}; "
            "rebuild the model with the width of your features"
        )
    if coords is not None:
        check_shape(coords, [str(sizes["B"]), str(sizes["N"]), "2"], "coords")
    if mask is None:
        return torch.ones(sizes["B"], sizes["N"], dtype=torch.bool, device=bag.device)
    check_shape(mask, [str(sizes["B"]), str(sizes["N"])], "mask")
    mask = mask.bool()
    empty = (~mask.any(dim=1)).nonzero().flatten()
    if len(empty):
        raise ValueError(
            f"mask marks no real instance in bag(s) {empty.tolist()}; every bag needs at least one "
            "(mask is True at real instances)"
        )
    return mask


def uniform_attention(mask: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``1 / n_b`` at the real instances of each bag, 0 at padding: ``(B, N)``."""
    w = mask.to(dtype)
    return w / w.sum(dim=1, keepdim=True)


def feature_projector(in_dim: int, out_dim: int | None, dropout: float = 0.0) -> nn.Module:
    """``Linear(in_dim → out_dim) → ReLU → Dropout`` (identity when ``out_dim`` is None)."""
    if out_dim is None:
        return nn.Identity()
    return nn.Sequential(nn.Linear(in_dim, out_dim), nn.ReLU(), nn.Dropout(dropout))


class MILModel(NeedleworkModel):
    """Base of the MIL zoo: stores ``in_dim`` / ``num_classes`` and validates inputs.

    ``permutation_invariant`` says whether reordering the instances (with their coordinates) leaves
    the output unchanged; the test suite checks it for every model that claims it.
    """

    permutation_invariant: bool = True

    def __init__(self, in_dim: int, num_classes: int) -> None:
        super().__init__()
        if in_dim < 1 or num_classes < 1:
            raise ValueError(f"in_dim ({in_dim}) and num_classes ({num_classes}) must be positive")
        self.in_dim = in_dim
        self.num_classes = num_classes

    def _check(
        self, bag: torch.Tensor, coords: torch.Tensor | None, mask: torch.Tensor | None
    ) -> torch.Tensor:
        return check_bag(bag, coords, mask, self.in_dim)


class MaskedStandardize(nn.Module):
    """Per-feature standardisation of the real instances of a padded batch (``BatchNorm1d`` without affine
    parameters, statistics over ``x[mask]`` only; padded rows come out as 0).

    Tile features such as ``color_stats`` sit in ``[0, 1]`` with tiny spread around large means; models
    that dilute a few tiles' signal in a mean (SparseConvMIL's global pooling, ZoomMIL's low-magnification
    level) then barely move from the constant prediction. Standardising the inputs rescales that signal.
    Training uses the batch statistics and updates running ones; evaluation uses the running ones.

    ``x`` ``(B, N, D)``, ``mask`` ``(B, N)`` bool → ``(B, N, D)``.
    """

    def __init__(self, dim: int, momentum: float = 0.1, eps: float = 1e-5) -> None:
        super().__init__()
        self.norm = nn.BatchNorm1d(dim, eps=eps, momentum=momentum, affine=False)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        rows = x[mask]
        norm = self.norm
        # one real instance has no variance: use the running statistics instead of failing
        batch_stats = self.training and rows.shape[0] > 1
        normed = torch.nn.functional.batch_norm(
            rows,
            norm.running_mean,
            norm.running_var,
            training=batch_stats,
            momentum=norm.momentum,
            eps=norm.eps,
        )
        return x.new_zeros(x.shape).masked_scatter(mask[..., None], normed)
