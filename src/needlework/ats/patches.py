"""Vectorised patch extraction at integer corners, with zeros outside the image (METHODS §1.1).

One gather for all patches of all images: per spatial axis, the indices ``start + arange(size)`` are
clamped into the image and an in-bounds mask zeroes the pixels that fall outside, so the image is never
padded or copied. Works for any dtype and device; gradients flow to the image when it requires them.

Corners are given in image coordinates ``(x, y[, z])`` = (column, row[, slice]) — the reverse of the
tensor's axis order — while patch sizes follow the output's axis order ``(h, w)`` / ``(d, h, w)``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from needlework.checks import check_shape

__all__ = ["extract_patches", "extract_patches_1d", "extract_patches_3d", "extract_patches_nd"]


def _as_size(size: int | Sequence[int], d: int) -> tuple[int, ...]:
    out = (size,) * d if isinstance(size, int) else tuple(int(s) for s in size)
    if len(out) != d or any(s < 1 for s in out):
        raise ValueError(f"size must be a positive int or a sequence of {d} positive ints, got {size!r}")
    return out


def extract_patches_nd(
    images: torch.Tensor, offsets: torch.Tensor, size: int | Sequence[int]
) -> torch.Tensor:
    """Patches of ``size`` at integer corners ``offsets`` from ``images`` with ``d`` spatial axes.

    Args:
        images: ``(B, C, *S)`` with ``d = len(S)`` spatial axes.
        offsets: ``(B, n, d)`` integer corners in coordinate order (``x`` first, i.e. the *last*
            spatial axis first). Corners may lie outside the image; outside pixels are zero.
        size: patch extent per spatial axis in axis order (an int for a cube).

    Returns:
        ``(B, n, C, *size)`` with the dtype and device of ``images``.
    """
    if not isinstance(images, torch.Tensor) or images.dim() < 3:
        raise ValueError(
            f"images must be a tensor of shape (B, C, *spatial), got {getattr(images, 'shape', images)}"
        )
    B, C, *spatial = images.shape
    d = len(spatial)
    n = check_shape(offsets, [str(B), "n", str(d)], "offsets")["n"]
    if offsets.is_floating_point() or offsets.is_complex() or offsets.dtype == torch.bool:
        raise TypeError(
            f"offsets must be an integer tensor (int64), got {offsets.dtype}; round real-valued corners "
            "first or use a bilinear (grid_sample) extraction"
        )
    if offsets.device != images.device:
        raise ValueError(f"offsets are on {offsets.device} but images on {images.device}")
    size_t = _as_size(size, d)
    dev = images.device
    offsets = offsets.long()
    # Broadcast layout of the result: (B, n, C, s_0, ..., s_{d-1}).
    index: list[torch.Tensor] = [
        torch.arange(B, device=dev).view(B, 1, 1, *([1] * d)),
        torch.arange(C, device=dev).view(1, 1, C, *([1] * d)),
    ]
    inside: torch.Tensor | None = None
    for axis in range(d):
        shape = [1] * d
        shape[axis] = size_t[axis]
        start = offsets[:, :, d - 1 - axis].reshape(B, n, 1, *([1] * d))
        pos = start + torch.arange(size_t[axis], device=dev).view(1, 1, 1, *shape)
        ok = (pos >= 0) & (pos < spatial[axis])
        inside = ok if inside is None else inside & ok
        index.append(pos.clamp(0, spatial[axis] - 1))
    patches = images[tuple(index)]
    assert inside is not None
    return torch.where(inside, patches, torch.zeros((), dtype=images.dtype, device=dev))


def extract_patches(images: torch.Tensor, offsets: torch.Tensor, size: int | Sequence[int]) -> torch.Tensor:
    """Patches at integer top-left corners of 2-D images; zeros where a patch leaves the image.

    Args:
        images: ``(B, C, H, W)``, any dtype, CPU or CUDA.
        offsets: ``(B, n, 2)`` integer top-left corners ``(x, y)`` = (column, row).
        size: ``P`` or ``(h, w)``.

    Returns:
        ``(B, n, C, h, w)``.

    Example:
        >>> img = torch.arange(16.).view(1, 1, 4, 4)
        >>> extract_patches(img, torch.tensor([[[1, 0], [3, 3]]]), 2)[0, :, 0]
        tensor([[[ 1.,  2.],
                 [ 5.,  6.]],
        <BLANKLINE>
                [[15.,  0.],
                 [ 0.,  0.]]])
    """
    check_shape(images, ["B", "C", "H", "W"], "images")
    return extract_patches_nd(images, offsets, size)


def extract_patches_1d(signals: torch.Tensor, offsets: torch.Tensor, size: int | Sequence[int]) -> torch.Tensor:
    """Windows of 1-D signals: ``signals (B, C, L)``, ``offsets (B, n, 1)`` → ``(B, n, C, size)``."""
    check_shape(signals, ["B", "C", "L"], "signals")
    return extract_patches_nd(signals, offsets, size)


def extract_patches_3d(volumes: torch.Tensor, offsets: torch.Tensor, size: int | Sequence[int]) -> torch.Tensor:
    """Cubes of volumes: ``volumes (B, C, D, H, W)``, ``offsets (B, n, 3)`` as ``(x, y, z)``,
    ``size`` ``P`` or ``(d, h, w)`` → ``(B, n, C, d, h, w)``."""
    check_shape(volumes, ["B", "C", "D", "H", "W"], "volumes")
    return extract_patches_nd(volumes, offsets, size)
