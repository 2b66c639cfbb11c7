"""Attention distributions and sampling from them (attention sampling, Katharopoulos & Fleuret 2019).

* :func:`attention_from_logits` — softmax over all positions with smoothing ``ε_s`` (bounds ``1/a``);
* :func:`sample` — ``n`` indices from each row of an attention distribution, with replacement
  (i.i.d. categorical) or without (Gumbel-top-k, returned **in sampling order**);
* :func:`entropy` / :func:`entropy_regulariser` — ``H(a) = −Σ a log(a + 1e-6)`` and the loss term
  ``−λ · mean_b H(a_b)`` (``λ > 0`` spreads the attention, METHODS §1.3).
"""

from __future__ import annotations

import torch

from needlework.checks import check_shape

__all__ = ["attention_from_logits", "entropy", "entropy_regulariser", "sample"]


def attention_from_logits(logits: torch.Tensor, smoothing: float = 0.0) -> torch.Tensor:
    """Attention over all positions of each sample: ``(1 − ε) · softmax(ℓ) + ε / N``.

    Args:
        logits: ``(B, *spatial)`` unnormalised scores, e.g. ``(B, h, w)`` or ``(B, 1, h, w)``
            (every dimension after the first is flattened).
        smoothing: ``ε`` in ``[0, 1)``; guarantees ``a_i ≥ ε / N``, which bounds the ``1/a`` factors
            of the estimators' attention gradients.

    Returns:
        ``(B, N)`` rows summing to 1.

    Example:
        >>> a = attention_from_logits(torch.zeros(2, 3, 4), smoothing=0.1)
        >>> a.shape, bool(torch.allclose(a.sum(1), torch.ones(2)))
        (torch.Size([2, 12]), True)
    """
    if not isinstance(logits, torch.Tensor) or logits.dim() < 2:
        raise ValueError(
            f"logits must be a tensor of shape (B, *spatial), got {getattr(logits, 'shape', logits)}"
        )
    if not 0.0 <= smoothing < 1.0:
        raise ValueError(f"smoothing must be in [0, 1), got {smoothing}")
    flat = logits.flatten(1)
    a = torch.softmax(flat, dim=1)
    if smoothing > 0:
        a = (1.0 - smoothing) * a + smoothing / flat.shape[1]
    return a


def _check_attention(attention: torch.Tensor) -> tuple[int, int]:
    sizes = check_shape(attention, ["B", "N"], "attention")
    if not attention.is_floating_point():
        raise TypeError(f"attention must be a floating-point tensor, got {attention.dtype}")
    return sizes["B"], sizes["N"]


def sample(
    attention: torch.Tensor,
    n: int,
    replace: bool,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Draw ``n`` positions per row of ``attention``.

    Without replacement the draw is Gumbel-top-k: ``topk(log a + G)`` with ``G ~ Gumbel(0, 1)``,
    sorted by perturbed value, which is distributed exactly as sequential sampling without replacement
    (each step renormalised over the positions not yet drawn). The order matters for
    :func:`~needlework.ats.expectation`; never re-sort the indices by position.

    Args:
        attention: ``(B, N)`` probabilities, each row summing to 1.
        n: number of positions per row; ``n ≤ N`` without replacement.
        replace: sample with replacement (i.i.d. categorical) or without (Gumbel-top-k).
        generator: optional ``torch.Generator`` (on the device of ``attention``) for reproducibility.

    Returns:
        ``idx`` ``(B, n)`` int64 in sampling order, and ``probs`` ``(B, n)`` = ``attention[b, idx]``
        (a differentiable gather).

    Example:
        >>> a = torch.tensor([[0.1, 0.2, 0.7], [0.5, 0.5, 0.0]])
        >>> idx, probs = sample(a, 2, replace=False)
        >>> idx.shape, bool((idx[1] != 2).all())
        (torch.Size([2, 2]), True)
    """
    _, N = _check_attention(attention)
    if not isinstance(n, int) or n < 1:
        raise ValueError(f"n must be a positive int, got {n!r}")
    if not replace and n > N:
        raise ValueError(f"cannot draw n={n} positions without replacement from N={N}; use replace=True")
    a = attention.detach()
    if replace:
        idx = torch.multinomial(a, n, replacement=True, generator=generator)
    else:
        # Gumbel noise -log(-log U), in float64 for float64 attention, else float32.
        work = a if a.dtype == torch.float64 else a.float()
        u = torch.rand(work.shape, dtype=work.dtype, device=work.device, generator=generator)
        gumbel = -torch.log(-torch.log(u.clamp_min(torch.finfo(work.dtype).tiny)))
        idx = torch.topk(torch.log(work) + gumbel, n, dim=1, sorted=True).indices
    return idx, attention.gather(1, idx)


def entropy(attention: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Per-sample entropy ``H(a) = −Σ_i a_i log(a_i + eps)``.

    Args:
        attention: ``(B, N)`` probabilities.

    Returns:
        ``(B,)``.

    Example:
        >>> round(float(entropy(torch.full((1, 4), 0.25))[0]), 4)
        1.3863
    """
    _check_attention(attention)
    return -(attention * torch.log(attention + eps)).sum(dim=1)


def entropy_regulariser(attention: torch.Tensor, weight: float) -> torch.Tensor:
    """The loss term ``−weight · mean_b H(a_b)``: with ``weight > 0`` minimising it *raises* entropy.

    Args:
        attention: ``(B, N)`` probabilities.
        weight: ``λ ≥ 0``.

    Returns:
        A scalar tensor.
    """
    if weight < 0:
        raise ValueError(f"entropy weight must be >= 0 (it maximises entropy), got {weight}")
    return -weight * entropy(attention).mean()
