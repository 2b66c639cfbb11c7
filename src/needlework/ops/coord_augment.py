"""Spatial augmentation of bag coordinates (SparseConvMIL, METHODS.md §9.1).

Per bag: a random translation, a rotation about the bag's centroid (angle in **radians**, uniform in
``[−π, π)`` or, with ``rotation="right_angles"``, an exact multiple of π/2), random flips of each axis and
an independent scale per axis. Only the real instances (``mask``) define the centroid; padded rows are
transformed too but stay meaningless. Coordinates are ``(x, y)``.

Example:
    >>> import torch
    >>> coords = torch.tensor([[[0, 0], [256, 0], [0, 256]]])
    >>> out = augment_coords(coords, rotation="right_angles", flip=False, scale=None,
    ...                      generator=torch.Generator().manual_seed(0))
    >>> out.shape, out.dtype
    (torch.Size([1, 3, 2]), torch.float32)
"""

from __future__ import annotations

import math

import torch

from needlework.checks import check_shape

ROTATIONS = ("none", "uniform", "right_angles")
# exact rotation matrices by k·π/2 (counter-clockwise in (x, y))
_RIGHT_ANGLES = torch.tensor([[[1, 0], [0, 1]], [[0, -1], [1, 0]], [[-1, 0], [0, -1]], [[0, 1], [-1, 0]]])


def _uniform(b: int, lo: float, hi: float, generator: torch.Generator | None, device) -> torch.Tensor:
    return lo + (hi - lo) * torch.rand(b, generator=generator, device=device)


def augment_coords(
    coords: torch.Tensor,
    mask: torch.Tensor | None = None,
    *,
    flip: bool = True,
    rotation: str = "uniform",
    scale: tuple[float, float] | None = (0.7, 1.3),
    translate: float = 0.0,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Randomly transform each bag's coordinates ``(B, N, 2)`` → float32 ``(B, N, 2)``.

    Args:
        coords: ``(B, N, 2)`` ``(x, y)``.
        mask: ``(B, N)`` bool, True = real (centroid over real instances only).
        flip: flip x and y each with probability 1/2.
        rotation: ``"none"``, ``"uniform"`` (θ ∼ U(−π, π) radians) or ``"right_angles"`` (θ = k·π/2 exactly).
        scale: per-axis scale drawn from ``U(lo, hi)``; None = no scaling.
        translate: shift drawn from ``U(0, translate)`` per axis (e.g. the site size, so tiles land on
            different sites between epochs).
        generator: random generator (on the device of ``coords``); None = the global one.
    """
    check_shape(coords, ["B", "N", "2"], "coords")
    b, n = coords.shape[:2]
    if rotation not in ROTATIONS:
        raise ValueError(f"rotation must be one of {ROTATIONS}, got {rotation!r}")
    device = coords.device
    x = coords.float()
    w = torch.ones(b, n, 1, device=device) if mask is None else mask[..., None].float()
    # rounded centroid: right-angle rotations and flips of integer coordinates stay exact
    centre = ((x * w).sum(dim=1, keepdim=True) / w.sum(dim=1, keepdim=True)).round()
    x = x - centre
    matrix = torch.eye(2, device=device).expand(b, 2, 2)
    if rotation == "uniform":
        theta = _uniform(b, -math.pi, math.pi, generator, device)
        cos, sin = theta.cos(), theta.sin()
        matrix = torch.stack([torch.stack([cos, -sin], -1), torch.stack([sin, cos], -1)], -2)
    elif rotation == "right_angles":
        k = torch.randint(0, 4, (b,), generator=generator, device=device)
        matrix = _RIGHT_ANGLES.to(device=device, dtype=torch.float32)[k]
    if flip:
        signs = torch.randint(0, 2, (b, 2), generator=generator, device=device).float() * 2 - 1
        matrix = signs[:, :, None] * matrix
    if scale is not None:
        lo, hi = scale
        factors = torch.stack([_uniform(b, lo, hi, generator, device) for _ in range(2)], dim=1)
        matrix = factors[:, :, None] * matrix
    x = torch.einsum("bij,bnj->bni", matrix, x) + centre
    if translate > 0:
        x = x + translate * torch.rand(b, 1, 2, generator=generator, device=device)
    return x
