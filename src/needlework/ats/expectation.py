"""Unbiased estimate of ``Σ_i a_i f_i`` from sampled positions, with unbiased gradients.

Given attention ``a`` ``(B, N)``, ``n`` positions ``q_1..q_n`` drawn from it (:func:`~needlework.ats.sample`)
and features ``f_{q_k}`` computed only there, :func:`expectation` returns an unbiased estimate ``F`` of
``Σ_i a_i f_i`` ``(B, D)`` whose vector-Jacobian products with respect to ``a`` and ``f`` are unbiased too
(METHODS §2.2–2.4). With weights ``w`` (default ``1/n``), ``π_k = 1 − Σ_{j<k} a_{q_j}`` the mass left
before step ``k`` and ``g`` the upstream gradient:

* with replacement: ``F = Σ_k w_k f_{q_k}``; ``∂/∂f_{q_k} = w_k g``;
  ``∂/∂a_{q_k} = w_k ⟨g, f_{q_k}⟩ / a_{q_k}``.
* without replacement (indices in sampling order): ``F = Σ_k w_k (Σ_{j<k} a_{q_j} f_{q_j} + π_k f_{q_k})``;
  ``∂/∂f_{q_k} = (w_k π_k + a_{q_k} Σ_{i>k} w_i) g``;
  ``∂/∂a_{q_k} = ⟨g, f_{q_k}⟩ (Σ_{i>k} w_i + w_k π_k / a_{q_k})``.

``estimator="reference_tf"`` reproduces the attention gradient of the TensorFlow reference code, which
is biased by 15–69 %; it exists only to reproduce that code and as a negative control in the tests.
"""

from __future__ import annotations

import torch
from torch.autograd.function import once_differentiable

from needlework.checks import check_shape

__all__ = ["ESTIMATORS", "expectation", "remaining_mass"]

ESTIMATORS = ("unbiased", "reference_tf")


def _exclusive_cumsum(x: torch.Tensor, dim: int = 1) -> torch.Tensor:
    return torch.cumsum(x, dim=dim) - x


def remaining_mass(attention: torch.Tensor, probs: torch.Tensor) -> torch.Tensor:
    """``π_k``: attention mass not yet drawn before step ``k`` of a without-replacement draw.

    Computed in float64 as ``Σ_i a_i − Σ_{j<k} a_{q_j}`` (an *exclusive* cumulative sum) and clamped
    to ``[a_{q_k}, ∞)`` — mathematically ``π_k ≥ a_{q_k}`` — so rounding never makes ``π`` vanish.

    Args:
        attention: ``(B, N)``; probs: ``(B, n)`` the attention at the drawn positions, in sampling order.

    Returns:
        ``(B, n)`` float64, without gradient.
    """
    a = attention.detach().double()
    p = probs.detach().double()
    pi = a.sum(dim=1, keepdim=True) - _exclusive_cumsum(p)
    return torch.maximum(pi, p).clamp_min(torch.finfo(torch.float64).tiny)


class _Expectation(torch.autograd.Function):
    """Inputs ``probs (B,n)``, ``features (B,n,D)``, ``pi (B,n)``, ``weights (B,n)`` (work dtype)."""

    @staticmethod
    def forward(ctx, probs, features, pi, weights, replace, estimator):  # type: ignore[override]
        if replace:
            coef = weights
            tail = None
        else:
            tail = weights.flip(1).cumsum(1).flip(1) - weights  # Σ_{i>k} w_i
            coef = weights * pi + probs * tail
        ctx.replace, ctx.estimator = replace, estimator
        ctx.save_for_backward(probs, features, pi, weights, coef, tail if tail is not None else weights)
        return torch.einsum("bn,bnd->bd", coef, features)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):  # type: ignore[override]
        probs, features, pi, weights, coef, tail = ctx.saved_tensors
        grad_probs = grad_features = None
        if ctx.needs_input_grad[1]:
            grad_features = coef.unsqueeze(-1) * grad.unsqueeze(1)
        if ctx.needs_input_grad[0]:
            inner = torch.einsum("bnd,bd->bn", features, grad)  # ⟨g, f_{q_k}⟩
            if ctx.replace:
                grad_probs = weights * inner / probs
            elif ctx.estimator == "unbiased":
                grad_probs = inner * (tail + weights * pi / probs)
            else:  # "reference_tf": w_i ⟨g, F_i/p_i + Σ_{j<i} f_{q_j} − i·f_{q_i}⟩, p_i = a_{q_i}/π_i
                per_step = _exclusive_cumsum(probs.unsqueeze(-1) * features) + pi.unsqueeze(-1) * features
                step = torch.arange(features.shape[1], device=features.device, dtype=features.dtype)
                term = (
                    per_step * (pi / probs).unsqueeze(-1)
                    + _exclusive_cumsum(features)
                    - step.view(1, -1, 1) * features
                )
                grad_probs = weights * torch.einsum("bnd,bd->bn", term, grad)
        return grad_probs, grad_features, None, None, None, None


def expectation(
    attention: torch.Tensor,
    idx: torch.Tensor,
    features: torch.Tensor,
    replace: bool,
    weights: torch.Tensor | None = None,
    estimator: str = "unbiased",
) -> torch.Tensor:
    """Unbiased estimate of ``Σ_i a_i f_i`` from features at sampled positions (custom backward).

    Args:
        attention: ``(B, N)`` the distribution the positions were drawn from (rows sum to 1).
        idx: ``(B, n)`` int64 positions from :func:`~needlework.ats.sample` with the same ``replace``;
            without replacement they must be distinct and **in sampling order**.
        features: ``(B, n, D)`` features computed at ``idx``.
        replace: how ``idx`` was drawn.
        weights: optional ``(n,)`` or ``(B, n)`` weights of the per-sample estimates, summing to 1
            (default uniform ``1/n``); any such weights keep the estimator unbiased.
        estimator: ``"unbiased"`` (default) or ``"reference_tf"`` (the biased attention gradient of the
            TensorFlow reference code; without replacement only; for reproduction and tests).

    Returns:
        ``(B, D)`` in the promoted dtype of ``attention`` and ``features``. Gradients flow to
        ``attention`` (through a gather: repeated indices accumulate) and to ``features``.

    Example:
        >>> from needlework.ats import sample
        >>> a = torch.softmax(torch.randn(2, 10), 1).requires_grad_()
        >>> idx, _ = sample(a, 4, replace=False)
        >>> f = torch.randn(2, 4, 3, requires_grad=True)
        >>> F = expectation(a, idx, f, replace=False)
        >>> F.shape
        torch.Size([2, 3])
        >>> F.sum().backward(); a.grad.shape
        torch.Size([2, 10])
    """
    B, N = check_shape(attention, ["B", "N"], "attention").values()
    sizes = check_shape(idx, [str(B), "n"], "idx")
    n = sizes["n"]
    D = check_shape(features, [str(B), str(n), "D"], "features")["D"]
    del D
    if idx.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"idx must be an integer tensor (int64), got {idx.dtype}")
    if estimator not in ESTIMATORS:
        raise ValueError(f"estimator must be one of {ESTIMATORS}, got {estimator!r}")
    if estimator == "reference_tf" and replace:
        raise ValueError("estimator='reference_tf' exists only without replacement (replace=False)")
    if not replace and n > N:
        raise ValueError(f"idx has n={n} positions but attention only N={N}: impossible without replacement")
    work = torch.promote_types(torch.promote_types(attention.dtype, features.dtype), torch.float32)
    probs = attention.gather(1, idx.long())
    if weights is None:
        w = torch.full((B, n), 1.0 / n, dtype=work, device=attention.device)
    else:
        if weights.dim() == 1:
            check_shape(weights, [str(n)], "weights")
        else:
            check_shape(weights, [str(B), str(n)], "weights")
        w = weights.detach().to(work).expand(B, n)
    pi = remaining_mass(attention, probs).to(work) if not replace else torch.ones_like(w)
    out = _Expectation.apply(probs.to(work), features.to(work), pi, w, bool(replace), estimator)
    return out.to(torch.promote_types(attention.dtype, features.dtype))
