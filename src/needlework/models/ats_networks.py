"""The ATS paper's Megapixel MNIST networks (METHODS §2.5), shared by ATS, the dense CNN and attention MIL.

Attention: Conv 8@3×3 tanh, Conv 8@3×3 tanh, Conv 1@3×3, ``same`` padding (the last layer zero-initialised
so training starts from uniform attention). Features: Conv 32@7×7, 3 × Conv 32@3×3, ReLU, valid padding,
global max pool, L2-normalised.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["MegapixelMNISTAttention", "MegapixelMNISTFeatures"]

_ACTIVATIONS = {"tanh": nn.Tanh, "relu": nn.ReLU}


class MegapixelMNISTAttention(nn.Sequential):
    """Attention network: ``(B, C, h, w) → (B, 1, h, w)`` logits (``same`` padding, RF border 0)."""

    def __init__(self, in_channels: int = 1, channels: int = 8, activation: str = "tanh") -> None:
        if activation not in _ACTIVATIONS:
            raise ValueError(f"activation must be one of {sorted(_ACTIVATIONS)}, got {activation!r}")
        act = _ACTIVATIONS[activation]
        last = nn.Conv2d(channels, 1, 3, padding=1)
        nn.init.zeros_(last.weight)  # uniform attention at initialisation
        nn.init.zeros_(last.bias)
        super().__init__(
            nn.Conv2d(in_channels, channels, 3, padding=1),
            act(),
            nn.Conv2d(channels, channels, 3, padding=1),
            act(),
            last,
        )


class MegapixelMNISTFeatures(nn.Module):
    """Feature network: ``(B, C, P, P) → (B, channels)``, L2-normalised.

    Conv ``channels``@7×7 then 3 × Conv ``channels``@3×3, ReLU, valid padding (50² → 38²), global max
    pool. Runs on any input at least 13 px wide, so the dense baseline uses it on the whole image.
    """

    def __init__(self, in_channels: int = 1, channels: int = 32, normalise: bool = True) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(in_channels, channels, 7),
            nn.ReLU(),
            nn.Conv2d(channels, channels, 3),
            nn.ReLU(),
            nn.Conv2d(channels, channels, 3),
            nn.ReLU(),
            nn.Conv2d(channels, channels, 3),
            nn.ReLU(),
        )
        self.out_dim = channels
        self.normalise = normalise

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.amax(self.body(x), dim=(-2, -1))
        return F.normalize(h, dim=-1) if self.normalise else h
