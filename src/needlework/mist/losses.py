"""Task losses of MIST, per image (paper eq. 8 and 9).

Example:
    >>> probs = torch.tensor([[[1.0, 0.0], [0.0, 1.0]]])       # two patches, one of each class
    >>> histogram_loss(probs, torch.tensor([[1, 1]]))
    tensor([0.])
"""

from __future__ import annotations

import torch

from needlework.checks import check_shape


def class_histogram(counts: torch.Tensor) -> torch.Tensor:
    """Normalised label histogram ``(B, C)`` from per-class counts ``(B, C)`` (the image's multiset)."""
    counts = counts.to(torch.get_default_dtype()) if not counts.is_floating_point() else counts
    total = counts.sum(dim=1, keepdim=True)
    if bool((total <= 0).any()):
        raise ValueError("every image needs at least one labelled instance (a row of counts sums to 0)")
    return counts / total


def histogram_loss(probs: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """Multi-instance classification loss per image, ``½ Σ_c (h_c − (1/K) Σ_k p̂_kc)²``.

    Args:
        probs: ``(B, K, C)`` class probabilities of the K patches.
        counts: ``(B, C)`` number of instances of each class in the image (``label`` of MNIST-hard).

    Returns:
        ``(B,)`` losses (the reference halves the squared distance and sums over classes).
    """
    b, _, c = check_shape(probs, ["B", "K", "C"], "probs").values()
    check_shape(counts, [str(b), str(c)], "counts")
    target = class_histogram(counts).to(probs.dtype)
    return 0.5 * (target - probs.mean(dim=1)).pow(2).sum(dim=1)


def histogram_kl_loss(probs: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """KL divergence of the predicted class histogram from the label histogram, per image:
    ``Σ_c h_c log(h_c / ((1/K) Σ_k p̂_kc))`` (learning-from-label-proportions style; not the paper's eq. 9).

    Same arguments as :func:`histogram_loss`; returns ``(B,)``, 0 for a perfect histogram. Its gradients do
    not vanish when the predictions are near uniform, so a classifier starts discriminating sooner.
    """
    b, _, c = check_shape(probs, ["B", "K", "C"], "probs").values()
    check_shape(counts, [str(b), str(c)], "counts")
    target = class_histogram(counts).to(probs.dtype)
    log_ratio = target.clamp_min(1e-12).log() - probs.mean(dim=1).clamp_min(1e-8).log()
    return (target * log_ratio).sum(dim=1)


def reconstruction_loss(reconstruction: torch.Tensor, image: torch.Tensor) -> torch.Tensor:
    """Per-image mean squared error ``(B,)`` between the re-synthesised and the input image (eq. 8)."""
    if reconstruction.shape != image.shape:
        raise ValueError(
            f"reconstruction {tuple(reconstruction.shape)} and image {tuple(image.shape)} must match"
        )
    return (reconstruction - image).pow(2).flatten(1).mean(1)
