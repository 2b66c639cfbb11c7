"""Saliency maps and weak localisation (Needles in Haystacks, App. C.4).

``saliency = |∂ logit_c / ∂ image|`` (maximum over colour channels); the detected location is the
arg-max of the saliency map and its value the detection confidence.

Example:
    >>> from needlework import create_model
    >>> model = create_model("bagnet.rf9", width=0.25, blocks=(1, 1, 1, 1)).eval()
    >>> sal = saliency_map(model, torch.rand(2, 1, 64, 64))
    >>> sal.shape
    torch.Size([2, 64, 64])
    >>> locations, confidences = saliency_peaks(sal)
    >>> locations.shape, confidences.shape
    (torch.Size([2, 2]), torch.Size([2]))
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from needlework.checks import check_shape


def saliency_map(
    model: nn.Module, image: torch.Tensor, target_class: int = 1, input_key: str = "image", **extra: Any
) -> torch.Tensor:
    """``|∂ logit_target / ∂ image|`` per pixel.

    Args:
        model: returns a dict with ``logits (B, K)`` from ``model(**{input_key: image})``.
        image: ``(B, C, H, W)``.
        target_class: the logit to differentiate (1 = "needle present").

    Returns:
        ``(B, H, W)`` non-negative saliency (max over channels). Each image's map depends only on that
        image (the model is put in eval mode so normalisation uses no batch statistics).
    """
    check_shape(image, ["B", "C", "H", "W"], "image")
    was_training = model.training
    model.eval()
    try:
        x = image.detach().clone().requires_grad_(True)
        with torch.enable_grad():
            logits = model(**{input_key: x}, **extra)["logits"]
            if not 0 <= target_class < logits.shape[-1]:
                raise ValueError(
                    f"target_class {target_class} is not a class of a {logits.shape[-1]}-way model"
                )
            (grad,) = torch.autograd.grad(logits[:, target_class].sum(), x)
    finally:
        model.train(was_training)
    return grad.abs().amax(dim=1)


def saliency_peaks(saliency: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Arg-max location ``(B, 2)`` as ``(x, y)`` pixel coordinates and its value ``(B,)``."""
    check_shape(saliency, ["B", "H", "W"], "saliency")
    value, flat = saliency.flatten(1).max(dim=1)
    width = saliency.shape[-1]
    return torch.stack([flat % width, flat // width], dim=1), value
