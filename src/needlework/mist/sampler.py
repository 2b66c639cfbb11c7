"""Differentiable bilinear patch sampler S and its inverse S⁻¹ (MIST's spatial transformer).

Coordinates are continuous pixels: pixel ``(row r, col c)`` covers ``[c, c+1) × [r, r+1)``, its centre is
``(c + 0.5, r + 0.5)``. A box is ``(centre (x, y), size (w, h))``. Sampling matches
``F.grid_sample(mode="bilinear", padding_mode="zeros", align_corners=False)`` with the normalisation
``u = 2x / W − 1`` (METHODS.md §1.1) and is differentiable with respect to the image (or feature map),
the centres and the sizes.

Example:
    >>> img = torch.arange(16.0).reshape(1, 1, 4, 4)
    >>> sample_patches(img, torch.tensor([[[2.0, 2.0]]]), torch.tensor([[2.0]]), 2)[0, 0, 0]
    tensor([[ 5.,  6.],
            [ 9., 10.]])
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from needlework.checks import check_shape

IMPLS = ("grid_sample", "gather")


def bilinear_sample(image: torch.Tensor, points: torch.Tensor) -> torch.Tensor:
    """Bilinear values of ``image`` at continuous points; neighbours outside the image count as 0.

    Args:
        image: ``(B, C, H, W)`` image or feature map.
        points: ``(B, N, 2)`` points ``(x, y)`` in continuous pixels.

    Returns:
        ``(B, N, C)``.
    """
    b, c, h, w = check_shape(image, ["B", "C", "H", "W"], "image").values()
    check_shape(points, [str(b), "N", "2"], "points")
    px = points[..., 0] - 0.5  # pixel-centre coordinates: pixel c has centre c
    py = points[..., 1] - 0.5
    x0, y0 = px.floor(), py.floor()
    wx1, wy1 = px - x0, py - y0  # differentiable in the points
    x0, y0 = x0.long(), y0.long()
    flat = image.reshape(b, c, h * w)
    out = 0
    for dy, wy in ((0, 1 - wy1), (1, wy1)):
        for dx, wx in ((0, 1 - wx1), (1, wx1)):
            xi, yi = x0 + dx, y0 + dy
            inside = ((xi >= 0) & (xi < w) & (yi >= 0) & (yi < h)).to(image.dtype)
            idx = (yi.clamp(0, h - 1) * w + xi.clamp(0, w - 1))[:, None, :].expand(-1, c, -1)
            vals = flat.gather(2, idx)  # (B, C, N)
            out = out + vals * (wx * wy * inside)[:, None, :]
    return out.transpose(1, 2)


def sample_points(image: torch.Tensor, points: torch.Tensor, impl: str = "grid_sample") -> torch.Tensor:
    """Bilinear values ``(B, N, C)`` of ``image (B, C, H, W)`` at continuous ``points (B, N, 2)``.

    ``impl="grid_sample"`` (default, fastest on CPU) calls ``F.grid_sample`` with ``u = 2x / W − 1``;
    ``impl="gather"`` is :func:`bilinear_sample` (explicit four-neighbour gather). Both give the same values.
    """
    if impl == "gather":
        return bilinear_sample(image, points)
    if impl != "grid_sample":
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    b, _, h, w = check_shape(image, ["B", "C", "H", "W"], "image").values()
    check_shape(points, [str(b), "N", "2"], "points")
    scale = torch.tensor([2.0 / w, 2.0 / h], dtype=image.dtype, device=image.device)
    grid = (points.to(image.dtype) * scale - 1.0)[:, None]  # (B, 1, N, 2)
    out = F.grid_sample(image, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    return out[:, :, 0].transpose(1, 2)


def _sizes_wh(sizes: torch.Tensor, b: int, k: int) -> torch.Tensor:
    if sizes.dim() == 2:
        check_shape(sizes, [str(b), str(k)], "sizes")
        return sizes[..., None].expand(b, k, 2)
    check_shape(sizes, [str(b), str(k), "2"], "sizes")
    return sizes


def _pair(p: int | tuple[int, int], name: str) -> tuple[int, int]:
    ph, pw = (p, p) if isinstance(p, int) else (int(p[0]), int(p[1]))
    if ph < 1 or pw < 1:
        raise ValueError(f"{name} must be positive, got {p}")
    return ph, pw


def patch_grid(centres: torch.Tensor, sizes: torch.Tensor, patch_size: int | tuple[int, int]) -> torch.Tensor:
    """Continuous image points of every patch pixel centre: ``(B, K, ph, pw, 2)`` ``(x, y)``.

    Patch pixel ``(i, j)`` of a box ``(cx, cy, w, h)`` samples ``(cx − w/2 + (j + ½)·w/pw,
    cy − h/2 + (i + ½)·h/ph)``.
    """
    b, k = check_shape(centres, ["B", "K", "2"], "centres").values()
    wh = _sizes_wh(sizes, b, k).to(centres.dtype)
    ph, pw = _pair(patch_size, "patch_size")
    fj = (torch.arange(pw, dtype=centres.dtype, device=centres.device) + 0.5) / pw - 0.5  # in [-½, ½)
    fi = (torch.arange(ph, dtype=centres.dtype, device=centres.device) + 0.5) / ph - 0.5
    gx = centres[..., 0, None, None] + fj[None, None, None, :] * wh[..., 0, None, None]
    gy = centres[..., 1, None, None] + fi[None, None, :, None] * wh[..., 1, None, None]
    return torch.stack(torch.broadcast_tensors(gx, gy), dim=-1)


def sample_patches(
    image: torch.Tensor,
    centres: torch.Tensor,
    sizes: torch.Tensor,
    patch_size: int | tuple[int, int],
    impl: str = "grid_sample",
) -> torch.Tensor:
    """S: crop and resample one ``patch_size`` patch per box (bilinear, zeros outside the image).

    Args:
        image: ``(B, C, H, W)`` image or feature map (same pixel units as the boxes).
        centres: ``(B, K, 2)`` box centres ``(x, y)``.
        sizes: ``(B, K)`` square sides or ``(B, K, 2)`` ``(w, h)`` in pixels.
        patch_size: output side ``P`` or ``(ph, pw)``.
        impl: ``"grid_sample"`` or ``"gather"`` (see :func:`sample_points`).

    Returns:
        ``(B, K, C, ph, pw)``, differentiable w.r.t. ``image``, ``centres`` and ``sizes``.
    """
    b, c, _, _ = check_shape(image, ["B", "C", "H", "W"], "image").values()
    grid = patch_grid(centres.to(image.dtype), sizes, patch_size)  # (B, K, ph, pw, 2)
    _, k, ph, pw, _ = grid.shape
    vals = sample_points(image, grid.reshape(b, k * ph * pw, 2), impl)  # (B, K·ph·pw, C)
    return vals.reshape(b, k, ph, pw, c).permute(0, 1, 4, 2, 3)


def paste_patches(
    patches: torch.Tensor,
    centres: torch.Tensor,
    sizes: torch.Tensor,
    image_size: tuple[int, int],
    reduce: str = "sum",
    impl: str = "grid_sample",
) -> torch.Tensor:
    """S⁻¹: place each patch back into an image at its box (bilinear, zero outside the box).

    Image pixel centre ``(x, y)`` reads the patch at ``((x − cx + w/2)·pw/w, (y − cy + h/2)·ph/h)``, so
    ``paste_patches(sample_patches(I, …), …)`` reproduces ``I`` inside the boxes when ``P`` equals the box
    side in pixels and the boxes lie on the pixel grid.

    Args:
        patches: ``(B, K, C, ph, pw)``.
        centres, sizes: boxes as in :func:`sample_patches`.
        image_size: ``(H, W)`` of the output.
        reduce: ``"sum"`` → ``(B, C, H, W)``; ``"none"`` → ``(B, K, C, H, W)`` per-patch layers.
        impl: ``"grid_sample"`` or ``"gather"`` (see :func:`sample_points`).
    """
    b, k, c, ph, pw = check_shape(patches, ["B", "K", "C", "PH", "PW"], "patches").values()
    check_shape(centres, [str(b), str(k), "2"], "centres")
    wh = _sizes_wh(sizes, b, k).to(patches.dtype)
    h, w = image_size
    xs = torch.arange(w, dtype=patches.dtype, device=patches.device) + 0.5
    ys = torch.arange(h, dtype=patches.dtype, device=patches.device) + 0.5
    cx, cy = centres[..., 0].to(patches.dtype), centres[..., 1].to(patches.dtype)
    u = (xs[None, None, :] - cx[..., None] + wh[..., 0, None] / 2) * (pw / wh[..., 0, None])  # (B, K, W)
    v = (ys[None, None, :] - cy[..., None] + wh[..., 1, None] / 2) * (ph / wh[..., 1, None])  # (B, K, H)
    pts = torch.stack(torch.broadcast_tensors(u[..., None, :], v[..., :, None]), dim=-1)  # (B, K, H, W, 2)
    layers = sample_points(patches.reshape(b * k, c, ph, pw), pts.reshape(b * k, h * w, 2), impl)
    layers = layers.reshape(b, k, h, w, c).permute(0, 1, 4, 2, 3)
    if reduce == "sum":
        return layers.sum(dim=1)
    if reduce == "none":
        return layers
    raise ValueError(f"reduce must be 'sum' or 'none', got {reduce!r}")


def boxes_xyxy(centres: torch.Tensor, sizes: torch.Tensor) -> torch.Tensor:
    """``(B, K, 4)`` ``xyxy`` boxes from centres ``(B, K, 2)`` and sizes ``(B, K)`` or ``(B, K, 2)``."""
    b, k = check_shape(centres, ["B", "K", "2"], "centres").values()
    half = _sizes_wh(sizes, b, k).to(centres.dtype) / 2
    return torch.cat([centres - half, centres + half], dim=-1)
