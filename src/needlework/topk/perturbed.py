"""Differentiable top-K by perturbed optimisers (Berthet et al. 2020; Cordonnier et al. 2021).

Forward: ``Ŷ = E[Y(s + σZ)]``, ``Z ~ N(0, I)``, where ``Y(·) ∈ {0,1}^{K×N}`` is the indicator matrix of
the top-K indices, rows sorted by ascending position (slot k = the k-th selected index from the
top-left). Backward: the outer-product Jacobian ``J[k, d, e] = E[Y[k, d] Z[e]] / σ`` (METHODS.md §4.2)
evaluated in its sampled-index form (§4.3)::

    grad_s = 1/(S σ) Σ_n c_n Z_n ,    c_n = Σ_k g[k, idx_n[k]]

Only the sampled indices ``idx (B, S, K)`` are stored; the noise is regenerated in backward from a
private seed, so the memory kept for backward is O(B·S·K) and no ``(B, K, N, N)`` Jacobian or
``(B, S, K, N)`` one-hot tensor ever exists. Noise is drawn in chunks of samples so the transient
memory is bounded as well.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

from needlework.checks import check_shape

JACOBIANS = ("outer", "diagonal", "outer_times_k")

# Largest number of noise values drawn at once (B · chunk · N); bounds the transient memory of
# both passes (2**22 float32 = 16 MiB).
_CHUNK_ELEMENTS = 2**22


def _chunk_sizes(batch: int, n_samples: int, n: int) -> list[int]:
    per_chunk = max(1, _CHUNK_ELEMENTS // max(1, batch * n))
    return [min(per_chunk, n_samples - start) for start in range(0, n_samples, per_chunk)]


def _noise_chunks(
    seed: int, shape: tuple[int, int, int], device: torch.device, dtype: torch.dtype
) -> Iterator[torch.Tensor]:
    """Yield the noise ``Z (B, S, N)`` in chunks along S; the same ``seed`` gives the same chunks."""
    batch, n_samples, n = shape
    gen = torch.Generator(device=device)
    gen.manual_seed(seed)
    for size in _chunk_sizes(batch, n_samples, n):
        yield torch.randn((batch, size, n), generator=gen, device=device, dtype=dtype)


def draw_noise(
    seed: int, shape: tuple[int, int, int], device: torch.device, dtype: torch.dtype
) -> torch.Tensor:
    """The full noise tensor ``Z (B, S, N)`` that :func:`perturbed_topk` uses for ``seed`` (for tests)."""
    return torch.cat(list(_noise_chunks(seed, shape, device, dtype)), dim=1)


def noise_seed(generator: torch.Generator | None) -> int:
    """One 62-bit seed drawn from ``generator`` (or the global RNG), which fixes all the noise."""
    device = generator.device if generator is not None else "cpu"
    return int(torch.randint(0, 2**62, (1,), generator=generator, device=device).item())


def sorted_topk_indices(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Indices ``(..., k)`` of the ``k`` largest entries along the last dim, sorted by position."""
    return scores.topk(k, dim=-1, sorted=False).indices.sort(dim=-1).values


def hard_topk(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Hard top-K indicators ``(B, k, N)``: row j is one-hot at the j-th selected index by position.

    Example:
        >>> hard_topk(torch.tensor([[0.1, 0.9, 0.5, 0.7]]), 2)
        tensor([[[0., 1., 0., 0.],
                 [0., 0., 0., 1.]]])
    """
    idx = sorted_topk_indices(scores, k)
    out = scores.new_zeros(scores.shape[0], k, scores.shape[1])
    return out.scatter_(2, idx.unsqueeze(-1), 1.0)


def normalize_scores(scores: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """Min-max normalise each row of ``scores (B, N)`` to [0, 1] as in DPS, so σ is relative.

    ``(s − min s) / (max s − min s + eps)``; differentiable (gradients flow through min and max).
    """
    lo = scores.min(dim=-1, keepdim=True).values
    hi = scores.max(dim=-1, keepdim=True).values
    return (scores - lo) / (hi - lo + eps)


class _PerturbedTopK(torch.autograd.Function):
    @staticmethod
    def forward(ctx, scores, k, sigma, n_samples, seed, jacobian):  # type: ignore[override]
        batch, n = scores.shape
        indicators = scores.new_zeros(batch, k, n)
        idx_chunks = []
        for z in _noise_chunks(seed, (batch, n_samples, n), scores.device, scores.dtype):
            idx = sorted_topk_indices(scores.unsqueeze(1) + sigma * z, k)  # (B, c, k)
            idx_chunks.append(idx)
            ones = indicators.new_full(idx.shape, 1.0 / n_samples).transpose(1, 2)
            indicators.scatter_add_(2, idx.transpose(1, 2), ones)
        ctx.save_for_backward(torch.cat(idx_chunks, dim=1))
        ctx.config = (k, sigma, n_samples, seed, jacobian, scores.dtype)
        return indicators

    @staticmethod
    def backward(ctx, grad_out):  # type: ignore[override]
        (idx,) = ctx.saved_tensors  # (B, S, k)
        k, sigma, n_samples, seed, jacobian, dtype = ctx.config
        batch, _, n = grad_out.shape
        grad_out = grad_out.to(dtype)
        grad = grad_out.new_zeros(batch, n)
        start = 0
        for z in _noise_chunks(seed, (batch, n_samples, n), grad_out.device, dtype):
            chunk_idx = idx[:, start : start + z.shape[1]]  # (B, c, k)
            start += z.shape[1]
            # g[b, k, idx[b, s, k]] for every sample s: (B, k, c) -> (B, c, k)
            g_at = grad_out.gather(2, chunk_idx.transpose(1, 2)).transpose(1, 2)
            if jacobian == "diagonal":
                # ZoomMIL / original JAX: only J[k, d, d]; grad[d] += g[k, d] Z[d] at d = idx[k]
                z_at = z.gather(2, chunk_idx)
                grad.scatter_add_(1, chunk_idx.reshape(batch, -1), (g_at * z_at).reshape(batch, -1))
            else:
                grad += torch.einsum("bc,bcn->bn", g_at.sum(-1), z)
        scale = 1.0 / (n_samples * sigma)
        if jacobian == "outer_times_k":
            scale *= k
        return grad * scale, None, None, None, None, None


def perturbed_topk(
    scores: torch.Tensor,
    k: int,
    sigma: float,
    n_samples: int,
    generator: torch.Generator | None = None,
    *,
    training: bool = True,
    normalize: bool = False,
    jacobian: str = "outer",
) -> torch.Tensor:
    """Soft top-K indicators ``(B, k, N)`` with the perturbed-optimiser gradient.

    Args:
        scores: ``(B, N)`` scores (higher = more likely selected).
        k: number of selected entries, ``1 ≤ k ≤ N``.
        sigma: noise scale σ ≥ 0. ``sigma == 0`` (or ``training=False``) returns hard top-K.
        n_samples: number of noise draws S.
        generator: optional ``torch.Generator`` (fixes the noise; one seed is drawn from it).
        training: if False, return hard top-K indicators (no gradient), as DPS does at evaluation.
        normalize: min-max normalise the scores per row first (DPS), so σ is relative to [0, 1].
        jacobian: ``"outer"`` (correct, default); ``"diagonal"`` reproduces ZoomMIL and the original JAX
            code (only ``J[k, d, d]``, biased); ``"outer_times_k"`` reproduces benbergner/dps (k× too large).

    Returns:
        ``(B, k, N)``: row j is the average over noise draws of the one-hot of the j-th selected index
        (sorted by position); rows sum to 1, columns to ≤ 1.

    Example:
        >>> s = torch.tensor([[0.1, 0.9, 0.5, 0.7]], requires_grad=True)
        >>> y = perturbed_topk(s, 2, sigma=0.05, n_samples=100, generator=torch.Generator().manual_seed(0))
        >>> y.shape, torch.allclose(y.sum(-1), torch.ones(1, 2))
        (torch.Size([1, 2, 4]), True)
        >>> (y * torch.randn(1, 2, 4)).sum().backward(); s.grad.shape
        torch.Size([1, 4])
    """
    sizes = check_shape(scores, ["B", "N"], "scores")
    if not scores.is_floating_point():
        raise TypeError(f"scores must be a floating-point tensor, got {scores.dtype}")
    if not isinstance(k, int) or not 1 <= k <= sizes["N"]:
        raise ValueError(f"k must be an int in [1, N={sizes['N']}], got {k!r}")
    sigma = float(sigma)
    if sigma < 0:
        raise ValueError(f"sigma must be >= 0, got {sigma}")
    if not isinstance(n_samples, int) or n_samples < 1:
        raise ValueError(f"n_samples must be a positive int, got {n_samples!r}")
    if jacobian not in JACOBIANS:
        raise ValueError(f"jacobian must be one of {JACOBIANS}, got {jacobian!r}")
    if normalize:
        scores = normalize_scores(scores)
    if not training or sigma == 0.0:
        return hard_topk(scores.detach(), k)
    return _PerturbedTopK.apply(scores, k, sigma, n_samples, noise_seed(generator), jacobian)
