"""Dense reference formulation of the perturbed top-K (for tests and benchmarks only).

This is the textbook formulation of METHODS.md §4.2 with explicit noise: it materialises the
``(B, S, k, N)`` one-hot tensor in forward and the ``(B, k, N, N)`` Jacobian in backward. It exists to
check :func:`needlework.topk.perturbed_topk` (same noise → same forward and VJP) and to measure how much
memory the sampled-index form saves. Do not use it in models.
"""

from __future__ import annotations

import torch

from needlework.topk.perturbed import JACOBIANS, sorted_topk_indices


class _DensePerturbedTopK(torch.autograd.Function):
    @staticmethod
    def forward(ctx, scores, noise, k, sigma, jacobian):  # type: ignore[override]
        idx = sorted_topk_indices(scores.unsqueeze(1) + sigma * noise, k)  # (B, S, k)
        batch, n_samples, n = noise.shape
        onehot = scores.new_zeros(batch, n_samples, k, n).scatter_(3, idx.unsqueeze(-1), 1.0)
        ctx.save_for_backward(onehot, noise)
        ctx.config = (k, sigma, jacobian)
        return onehot.mean(dim=1)

    @staticmethod
    def backward(ctx, grad_out):  # type: ignore[override]
        onehot, noise = ctx.saved_tensors
        k, sigma, jacobian = ctx.config
        n_samples = noise.shape[1]
        # J[b, k, d, e] = E[Y[b, s, k, d] Z[b, s, e]] / σ
        jac = torch.einsum("bskd,bse->bkde", onehot, noise) / (n_samples * sigma)
        if jacobian == "diagonal":
            jac = torch.diagonal(jac, dim1=2, dim2=3).diag_embed()
        elif jacobian == "outer_times_k":
            jac = jac * k
        return torch.einsum("bkd,bkde->be", grad_out, jac), None, None, None, None


def perturbed_topk_dense(
    scores: torch.Tensor, k: int, sigma: float, noise: torch.Tensor, jacobian: str = "outer"
) -> torch.Tensor:
    """Perturbed top-K ``(B, k, N)`` with explicit ``noise (B, S, N)`` and a dense Jacobian.

    Example:
        >>> s = torch.rand(2, 6)
        >>> perturbed_topk_dense(s, 2, 0.1, torch.randn(2, 50, 6)).shape
        torch.Size([2, 2, 6])
    """
    if jacobian not in JACOBIANS:
        raise ValueError(f"jacobian must be one of {JACOBIANS}, got {jacobian!r}")
    if noise.dim() != 3 or noise.shape[0] != scores.shape[0] or noise.shape[2] != scores.shape[1]:
        raise ValueError(
            f"noise must have shape (B, S, N) = ({scores.shape[0]}, S, {scores.shape[1]}), "
            f"got {tuple(noise.shape)}"
        )
    return _DensePerturbedTopK.apply(scores, noise, k, float(sigma), jacobian)
