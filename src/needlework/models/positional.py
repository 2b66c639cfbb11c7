"""Fixed sinusoidal positional encodings (Vaswani et al.) of 1-D indices and 2-D grid positions."""

from __future__ import annotations

import math

import torch


def sinusoidal_1d(positions: torch.Tensor, dim: int, base: float = 10000.0) -> torch.Tensor:
    """Encodings ``(..., dim)`` of ``positions (...)``: sin on even features, cos on odd ones.

    Example:
        >>> sinusoidal_1d(torch.arange(3), 4)[0].tolist()
        [0.0, 1.0, 0.0, 1.0]
    """
    if dim < 2 or dim % 2:
        raise ValueError(f"dim must be an even number >= 2, got {dim}")
    freqs = torch.exp(
        torch.arange(0, dim, 2, device=positions.device, dtype=torch.float32) * (-math.log(base) / dim)
    )
    angles = positions.to(torch.float32).unsqueeze(-1) * freqs
    return torch.stack([angles.sin(), angles.cos()], dim=-1).flatten(-2)


def sinusoidal_2d(xy: torch.Tensor, dim: int, base: float = 10000.0) -> torch.Tensor:
    """Encodings ``(..., dim)`` of 2-D positions ``xy (..., 2)``: half the features for x, half for y.

    Example:
        >>> sinusoidal_2d(torch.tensor([[0, 0], [3, 1]]), 8).shape
        torch.Size([2, 8])
    """
    if dim < 4 or dim % 4:
        raise ValueError(f"dim must be a multiple of 4, got {dim}")
    return torch.cat(
        [sinusoidal_1d(xy[..., 0], dim // 2, base), sinusoidal_1d(xy[..., 1], dim // 2, base)], -1
    )
