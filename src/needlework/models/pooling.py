"""Global pooling over instances or positions, with padding masks.

All poolings take ``x`` ``(B, N, D)`` (instances, or the positions of a feature map flattened with
:func:`flatten_map`) and an optional ``mask`` ``(B, N)`` (True = real) and return ``(pooled (B, D),
weights (B, N) | None)``. Padded positions never influence the result. ``weights`` are the attention
weights (attention pooling), the arg-max one-hot (max), uniform weights (mean) or the softmax weights of
log-sum-exp — they sum to 1 over real positions in every case except max, where they mark the winners.

Example:
    >>> pool = create_pooling("attention", dim=8)
    >>> pooled, weights = pool(torch.randn(2, 5, 8))
    >>> pooled.shape, weights.shape
    (torch.Size([2, 8]), torch.Size([2, 5]))
"""

from __future__ import annotations

import torch
from torch import nn

from needlework.checks import check_shape


def flatten_map(x: torch.Tensor) -> torch.Tensor:
    """``(B, C, h, w)`` feature map → ``(B, h*w, C)`` instances (row-major positions)."""
    check_shape(x, ["B", "C", "h", "w"], "feature map")
    return x.flatten(2).transpose(1, 2)


def _check(x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    b, n, _ = check_shape(x, ["B", "N", "D"], "x").values()
    if mask is None:
        return torch.ones(b, n, dtype=torch.bool, device=x.device)
    check_shape(mask, [str(b), str(n)], "mask")
    if not bool(mask.any(dim=1).all()):
        raise ValueError("mask has a bag with no real instance (all False): every bag needs at least one")
    return mask.bool()


# -- masked primitives over instances (shared by the pooling modules and the MIL zoo) -------------------
def masked_softmax(scores: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Softmax over the last axis, exactly 0 at padding.

    Args:
        scores: ``(B, N)`` or ``(B, C, N)`` logits.
        mask: ``(B, N)`` bool, True = real instance.
    """
    m = mask if scores.dim() == mask.dim() else mask.unsqueeze(1)
    return scores.masked_fill(~m, float("-inf")).softmax(dim=-1).masked_fill(~m, 0.0)


def masked_max(x: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Max over real instances of ``x`` ``(B, N, F)``: values ``(B, F)`` and arg-max ``(B, F)``."""
    return x.masked_fill(~mask.unsqueeze(-1), float("-inf")).max(dim=1)


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean over the real instances of ``x`` ``(B, N, F)`` → ``(B, F)``."""
    w = mask.unsqueeze(-1).to(x.dtype)
    return (x * w).sum(dim=1) / w.sum(dim=1)


def masked_logsumexp(
    x: torch.Tensor, mask: torch.Tensor, r: float = 1.0, normalise: bool = False
) -> torch.Tensor:
    """``(1/r) log Σ_n exp(r x_n)`` over real instances of ``x`` ``(B, N, F)`` → ``(B, F)``.

    ``normalise``: log-*mean*-exp (subtract ``log n``), which tends to the max as ``r → ∞`` and to the
    mean as ``r → 0`` whatever the bag size.
    """
    total = torch.logsumexp((r * x).masked_fill(~mask.unsqueeze(-1), float("-inf")), dim=1)
    if normalise:
        total = total - mask.sum(dim=1, keepdim=True).to(x.dtype).log()
    return total / r


class GatedAttention(nn.Module):
    """Attention scores of Ilse et al.: ``wᵀ tanh(V h)`` or, gated, ``wᵀ (tanh(V h) ⊙ sigmoid(U h))``.

    Maps ``h`` ``(B, N, L)`` to raw scores ``(B, N, heads)`` (apply :func:`masked_softmax` over N).
    """

    def __init__(
        self, in_dim: int, hidden_dim: int, heads: int = 1, gated: bool = True, dropout: float = 0.0
    ) -> None:
        super().__init__()
        self.tanh_branch = nn.Sequential(nn.Linear(in_dim, hidden_dim), nn.Tanh(), nn.Dropout(dropout))
        self.gate_branch = (
            nn.Sequential(nn.Linear(in_dim, hidden_dim), nn.Sigmoid(), nn.Dropout(dropout)) if gated else None
        )
        self.score = nn.Linear(hidden_dim, heads)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        a = self.tanh_branch(h)
        if self.gate_branch is not None:
            a = a * self.gate_branch(h)
        return self.score(a)


# -- pooling functions and modules -----------------------------------------------------------------------
def max_pool(x: torch.Tensor, mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-feature maximum ``e_d = max_n x_{n,d}``; weights: share of features won by each instance."""
    mask = _check(x, mask)
    pooled, winner = masked_max(x, mask)
    weights = torch.zeros(x.shape[:2], dtype=x.dtype, device=x.device)
    weights.scatter_add_(1, winner, torch.full_like(pooled, 1.0 / x.shape[-1]))
    return pooled, weights


def mean_pool(x: torch.Tensor, mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean over real instances."""
    mask = _check(x, mask)
    weights = mask.to(x.dtype) / mask.sum(dim=1, keepdim=True).to(x.dtype)
    return masked_mean(x, mask), weights


def logsumexp_pool(
    x: torch.Tensor, mask: torch.Tensor | None = None, r: float = 1.0, normalise: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(1/r) log Σ_n exp(r x_{n,d})`` (``normalise``: log-*mean*-exp, invariant to the bag size).

    With ``r = 1`` and ``normalise=False`` this is the plain LSE of the Needles paper; its scale grows
    with ``log N``. Weights: the mean over features of the softmax weights ``∂e_d/∂x_{n,d}``.
    """
    mask = _check(x, mask)
    weights = masked_softmax(r * x.transpose(1, 2), mask).mean(dim=1)
    return masked_logsumexp(x, mask, r, normalise), weights


class MaxPool(nn.Module):
    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None):
        return max_pool(x, mask)


class MeanPool(nn.Module):
    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None):
        return mean_pool(x, mask)


class LogSumExpPool(nn.Module):
    """Log-sum-exp pooling with temperature ``r`` (optionally log-mean-exp)."""

    def __init__(self, r: float = 1.0, normalise: bool = False) -> None:
        super().__init__()
        if r <= 0:
            raise ValueError(f"logsumexp temperature r must be positive, got {r}")
        self.r, self.normalise = r, normalise

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None):
        return logsumexp_pool(x, mask, self.r, self.normalise)


class AttentionPool(nn.Module):
    """Attention pooling of Ilse et al. (2018): ``a = softmax_n(wᵀ tanh(V x_n))``, ``e = Σ a_n x_n``.

    With ``gated=True``: ``a = softmax_n(wᵀ (tanh(V x_n) ⊙ sigm(U x_n)))``.

    Args:
        dim: instance feature size D.
        hidden: size of the attention MLP (paper: 128).
        gated: use the gated variant.
        dropout: dropout on the attention hidden layers.
    """

    def __init__(self, dim: int, hidden: int = 128, gated: bool = False, dropout: float = 0.0) -> None:
        super().__init__()
        self.dim = dim
        self.attention = GatedAttention(dim, hidden, heads=1, gated=gated, dropout=dropout)

    def scores(self, x: torch.Tensor) -> torch.Tensor:
        """Unnormalised attention scores ``(B, N)``."""
        return self.attention(x).squeeze(-1)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None):
        mask = _check(x, mask)
        if x.shape[-1] != self.dim:
            raise ValueError(f"attention pooling built for D={self.dim}, got x with D={x.shape[-1]}")
        weights = masked_softmax(self.scores(x), mask)
        return torch.einsum("bn,bnd->bd", weights, x), weights


POOLINGS = ("max", "mean", "logsumexp", "lme", "attention", "gated_attention")


def create_pooling(name: str, dim: int | None = None, **kwargs) -> nn.Module:
    """Build a pooling by name: ``max``, ``mean``, ``logsumexp`` (``lme`` = normalised), ``attention``,
    ``gated_attention`` (the last two need ``dim``)."""
    if name == "max":
        return MaxPool()
    if name == "mean":
        return MeanPool()
    if name in ("logsumexp", "lme"):
        return LogSumExpPool(normalise=name == "lme", **kwargs)
    if name in ("attention", "gated_attention"):
        if dim is None:
            raise ValueError(f"pooling {name!r} needs the feature size dim")
        return AttentionPool(dim, gated=name == "gated_attention", **kwargs)
    raise ValueError(f"unknown pooling {name!r}; choose one of {POOLINGS}")

