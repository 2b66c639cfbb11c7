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
# both passes (2**20 float32 = 4 MiB). Larger chunks buy no speed (randn and topk are per element) but
# make the step's peak memory grow with N until N alone fills a chunk (611k cells of a 100,000² slide).
_CHUNK_ELEMENTS = 2**20


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


def _sample_indices(scores: torch.Tensor, k: int, sigma: float, n_samples: int, seed: int) -> torch.Tensor:
    """Top-k indices ``(B, S, k)`` (sorted by position) of ``scores + σZ`` for each noise draw."""
    chunks = []
    for z in _noise_chunks(seed, (scores.shape[0], n_samples, scores.shape[1]), scores.device, scores.dtype):
        chunks.append(sorted_topk_indices(z.mul_(sigma).add_(scores.unsqueeze(1)), k))  # in place
    return torch.cat(chunks, dim=1)


def _scores_grad(g_at: torch.Tensor, idx: torch.Tensor, n: int, config: tuple) -> torch.Tensor:
    """``∂L/∂s (B, N)`` from ``g_at[b, s, j] = ∂L/∂Ŷ[b, j, idx[b, s, j]]`` (the only entries it needs)."""
    k, sigma, n_samples, seed, jacobian, dtype = config
    batch = idx.shape[0]
    grad = g_at.new_zeros(batch, n)
    start = 0
    for z in _noise_chunks(seed, (batch, n_samples, n), g_at.device, dtype):
        chunk_idx, chunk_g = idx[:, start : start + z.shape[1]], g_at[:, start : start + z.shape[1]]
        start += z.shape[1]
        if jacobian == "diagonal":
            # ZoomMIL / original JAX: only J[k, d, d]; grad[d] += g[k, d] Z[d] at d = idx[k]
            z_at = z.gather(2, chunk_idx)
            grad.scatter_add_(1, chunk_idx.reshape(batch, -1), (chunk_g * z_at).reshape(batch, -1))
        else:
            grad += torch.einsum("bc,bcn->bn", chunk_g.sum(-1), z)
    scale = 1.0 / (n_samples * sigma)
    if jacobian == "outer_times_k":
        scale *= k
    return grad * scale


class _PerturbedTopK(torch.autograd.Function):
    @staticmethod
    def forward(ctx, scores, k, sigma, n_samples, seed, jacobian):  # type: ignore[override]
        batch, n = scores.shape
        idx = _sample_indices(scores, k, sigma, n_samples, seed)  # (B, S, k)
        indicators = scores.new_zeros(batch, k, n)
        ones = indicators.new_full((batch, k, n_samples), 1.0 / n_samples)
        indicators.scatter_add_(2, idx.transpose(1, 2), ones)
        ctx.save_for_backward(idx)
        ctx.config = (k, sigma, n_samples, seed, jacobian, scores.dtype)
        return indicators

    @staticmethod
    def backward(ctx, grad_out):  # type: ignore[override]
        (idx,) = ctx.saved_tensors  # (B, S, k)
        grad_out = grad_out.to(ctx.config[-1])
        g_at = grad_out.gather(2, idx.transpose(1, 2)).transpose(1, 2)  # (B, S, k)
        return _scores_grad(g_at, idx, grad_out.shape[2], ctx.config), None, None, None, None, None


class _PerturbedTopKSupport(torch.autograd.Function):
    """The same operator, returning the indicators only on the candidates some draw selected."""

    @staticmethod
    def forward(ctx, scores, k, sigma, n_samples, seed, jacobian):  # type: ignore[override]
        batch, n = scores.shape
        idx = _sample_indices(scores, k, sigma, n_samples, seed)  # (B, S, k)
        rows = [torch.unique(idx[b]) for b in range(batch)]  # sorted
        size = max(len(r) for r in rows)
        # shorter rows repeat their last index: searchsorted (left) still finds the first, real one
        support = torch.stack([torch.cat([r, r[-1:].expand(size - len(r))]) for r in rows])
        pos = torch.searchsorted(support, idx.reshape(batch, -1)).view_as(idx)  # (B, S, k) into support
        weights = scores.new_zeros(batch, k, size)
        ones = weights.new_full((batch, k, n_samples), 1.0 / n_samples)
        weights.scatter_add_(2, pos.transpose(1, 2), ones)
        ctx.save_for_backward(idx, pos)
        ctx.config = (k, sigma, n_samples, seed, jacobian, scores.dtype)
        ctx.n = n
        ctx.mark_non_differentiable(support)
        return support, weights

    @staticmethod
    def backward(ctx, grad_support, grad_weights):  # type: ignore[override]
        idx, pos = ctx.saved_tensors
        grad_weights = grad_weights.to(ctx.config[-1])
        g_at = grad_weights.gather(2, pos.transpose(1, 2)).transpose(1, 2)  # (B, S, k)
        return _scores_grad(g_at, idx, ctx.n, ctx.config), None, None, None, None, None


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
    scores = _checked(scores, k, sigma, n_samples, jacobian, normalize)
    if not training or sigma == 0.0:
        return hard_topk(scores.detach(), k)
    return _PerturbedTopK.apply(scores, k, float(sigma), n_samples, noise_seed(generator), jacobian)


def perturbed_topk_support(
    scores: torch.Tensor,
    k: int,
    sigma: float,
    n_samples: int,
    generator: torch.Generator | None = None,
    *,
    training: bool = True,
    normalize: bool = False,
    jacobian: str = "outer",
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`perturbed_topk` on its support: ``support (B, U)`` candidate indices (sorted) and
    ``weights (B, k, U)`` with ``weights[b, j, u] = Ŷ[b, j, support[b, u]]``; the same noise, values and
    gradient, without the dense ``(B, k, N)`` tensors (20 MB each for k = 8 over the 611k cells of a
    100,000² slide). ``U`` is at most ``S·k``; a row with fewer candidates repeats its last one with
    weight 0. Hard top-K (eval, σ = 0) gives ``support`` = the top-k and ``weights`` = the identity.

    Example:
        >>> s = torch.tensor([[0.1, 0.9, 0.5, 0.7]], requires_grad=True)
        >>> support, w = perturbed_topk_support(s, 2, 0.05, 100, torch.Generator().manual_seed(0))
        >>> dense = perturbed_topk(s, 2, 0.05, 100, torch.Generator().manual_seed(0))
        >>> torch.equal(dense[:, :, support[0]], w), support.tolist()
        (True, [[1, 3]])
    """
    scores = _checked(scores, k, sigma, n_samples, jacobian, normalize)
    if not training or sigma == 0.0:
        support = sorted_topk_indices(scores.detach(), k)
        eye = torch.eye(k, dtype=scores.dtype, device=scores.device)
        return support, eye.expand(scores.shape[0], k, k)
    return _PerturbedTopKSupport.apply(scores, k, float(sigma), n_samples, noise_seed(generator), jacobian)


def _checked(
    scores: torch.Tensor, k: int, sigma: float, n_samples: int, jacobian: str, normalize: bool
) -> torch.Tensor:
    """Validated (and, with ``normalize``, min-max normalised) scores."""
    sizes = check_shape(scores, ["B", "N"], "scores")
    if not scores.is_floating_point():
        raise TypeError(f"scores must be a floating-point tensor, got {scores.dtype}")
    if not isinstance(k, int) or not 1 <= k <= sizes["N"]:
        raise ValueError(f"k must be an int in [1, N={sizes['N']}], got {k!r}")
    if float(sigma) < 0:
        raise ValueError(f"sigma must be >= 0, got {float(sigma)}")
    if not isinstance(n_samples, int) or n_samples < 1:
        raise ValueError(f"n_samples must be a positive int, got {n_samples!r}")
    if jacobian not in JACOBIANS:
        raise ValueError(f"jacobian must be one of {JACOBIANS}, got {jacobian!r}")
    return normalize_scores(scores) if normalize else scores
