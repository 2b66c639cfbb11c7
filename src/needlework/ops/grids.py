"""Candidate grids of patches: top-left ``(x, y)`` = (column, row) corners, ``(N, 2)`` int64, row-major.

* :func:`grid_coords` — regular sliding grid (IPS: non-overlapping ``P × P`` patches, stride P).
* :func:`cell_coords` — one patch centred on each cell of a ``(gh, gw)`` grid (DPS).
"""

from __future__ import annotations

import torch

__all__ = ["cell_coords", "grid_coords"]


def _pair(size: int | tuple[int, int] | list[int], name: str) -> tuple[int, int]:
    pair = (size, size) if isinstance(size, int) else tuple(size)
    if len(pair) != 2 or any(not isinstance(v, int) or v < 1 for v in pair):
        raise ValueError(f"{name} must be a positive int or a pair of positive ints, got {size!r}")
    return int(pair[0]), int(pair[1])


def grid_coords(
    image_hw: tuple[int, int],
    patch_size: int | tuple[int, int],
    stride: int | tuple[int, int] | None = None,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Top-left ``(x, y)`` of every patch of a sliding grid that lies inside the image, ``(N, 2)``.

    Example:
        >>> grid_coords((100, 150), 50).tolist()
        [[0, 0], [50, 0], [100, 0], [0, 50], [50, 50], [100, 50]]
    """
    ph, pw = _pair(patch_size, "patch_size")
    sh, sw = _pair(stride if stride is not None else (ph, pw), "stride")
    h, w = image_hw
    if h < ph or w < pw:
        raise ValueError(f"image of size {(h, w)} is smaller than patch_size {(ph, pw)}")
    ys = torch.arange(0, h - ph + 1, sh, device=device)
    xs = torch.arange(0, w - pw + 1, sw, device=device)
    yy, xx = torch.meshgrid(ys, xs, indexing="ij")
    return torch.stack([xx.reshape(-1), yy.reshape(-1)], dim=1)


def cell_coords(
    image_hw: tuple[int, int],
    grid_hw: tuple[int, int],
    patch_size: int | tuple[int, int],
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Top-left ``(x, y)`` of a patch centred on each cell of a ``grid_hw`` grid, ``(gh·gw, 2)``.

    Cell ``(i, j)`` has stride ``s = H // gh`` and the patch starts at ``i·s − (P − s) // 2`` (may be
    negative: the part outside the image is zero), as in the DPS reference.

    Example:
        >>> cell_coords((100, 100), (2, 2), 60).tolist()
        [[-5, -5], [45, -5], [-5, 45], [45, 45]]
    """
    ph, pw = _pair(patch_size, "patch_size")
    gh, gw = _pair(tuple(grid_hw), "grid_hw")
    sh, sw = image_hw[0] // gh, image_hw[1] // gw
    if sh < 1 or sw < 1:
        raise ValueError(f"grid {grid_hw} is finer than the image {tuple(image_hw)}")
    ys = torch.arange(gh, device=device) * sh - (ph - sh) // 2
    xs = torch.arange(gw, device=device) * sw - (pw - sw) // 2
    yy, xx = torch.meshgrid(ys, xs, indexing="ij")
    return torch.stack([xx.reshape(-1), yy.reshape(-1)], dim=1)
