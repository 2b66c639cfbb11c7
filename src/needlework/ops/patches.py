"""Vectorised patch extraction at integer corners, with zeros outside the image (METHODS §1.1).

Every patch row is copied as one contiguous run by a single ``index_select`` on an overlapping strided
view of the image's storage: no padding, no copy of the image, no Python loop, a fixed number of kernels
whatever the number of patches. Rows of patches that cross the border are read from the neighbouring
storage and their outside elements zeroed with a mask. Inputs that require gradients use per-element
advanced indexing with clamped indices and an in-bounds mask (differentiable). Any dtype and device.

``images`` may also be a *patch source*: any object with a ``shape`` ``(B, C, *S)`` and a method
``read_patches(offsets, size) -> (B, n, C, *size)`` (e.g. :class:`needlework.slides.patch_reader.SlidePixels`,
a whole-slide image read on demand); the call is delegated to it, so selection models work on images
that never fit in memory.

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


def _gather_indexed(
    images: torch.Tensor, batch: torch.Tensor, corners: torch.Tensor, size: tuple[int, ...]
) -> torch.Tensor:
    """General path: advanced indexing with clamped indices and an in-bounds mask.

    ``batch`` ``(M,)`` image of each patch, ``corners`` ``(M, d)`` in axis order → ``(M, C, *size)``.
    Differentiable with respect to ``images``; one index computation per output element.
    """
    C, *spatial = images.shape[1:]
    d = len(spatial)
    M = batch.shape[0]
    dev = images.device
    index: list[torch.Tensor] = [
        batch.view(M, 1, *([1] * d)),
        torch.arange(C, device=dev).view(1, C, *([1] * d)),
    ]
    inside = torch.ones((), dtype=torch.bool, device=dev)
    for axis in range(d):
        shape = [1] * d
        shape[axis] = size[axis]
        pos = corners[:, axis].view(M, 1, *([1] * d)) + torch.arange(size[axis], device=dev).view(
            1, 1, *shape
        )
        inside = inside & (pos >= 0) & (pos < spatial[axis])
        index.append(pos.clamp(0, spatial[axis] - 1))
    return torch.where(inside, images[tuple(index)], torch.zeros((), dtype=images.dtype, device=dev))


def _row_starts(images: torch.Tensor, corners: torch.Tensor, size: tuple[int, ...]) -> torch.Tensor:
    """Storage offset of the first element of every patch row: ``(B, n, C, *size[:-1])`` int64.

    Computed from the true (possibly out-of-image) corners; a row whose corner leaves the image along the
    last axis simply starts before or after the row in storage (its outside elements are masked later).
    """
    B, C, *_ = images.shape
    d = corners.shape[-1]
    dev = images.device
    st = images.stride()
    ones = [1] * (d - 1)
    # Per patch one scalar (its corner's storage offset), then one broadcast add per leading axis: the
    # full-size work is a single pass over the output's row count, not one per term.
    base = (corners * torch.tensor(st[2:], device=dev)).sum(-1)
    base = base + (torch.arange(B, device=dev) * st[0])[:, None]
    start = (images.storage_offset() + base).view(B, -1, 1, *ones)
    start = start + (torch.arange(C, device=dev) * st[1]).view(1, 1, C, *ones)
    for axis in range(d - 1):
        shape = [1] * (d - 1)
        shape[axis] = size[axis]
        start = start + (torch.arange(size[axis], device=dev) * st[2 + axis]).view(1, 1, 1, *shape)
    return start


def _gather_rows(
    images: torch.Tensor, corners: torch.Tensor, size: tuple[int, ...], mask_all: bool | None = None
) -> torch.Tensor:
    """Every patch by one ``index_select`` of whole rows from an overlapping strided view; zeros outside.

    ``rows`` has one row of ``size[-1]`` elements per storage position, so a patch row is one contiguous
    (or evenly strided) run, copied without a per-element index: the whole extraction is a single gather,
    about a dozen kernels whatever the number of patches (no Python loop, no padded copy of the image).
    Patches that cross the border read clamped rows and get their outside elements zeroed with a mask
    (only those patches on CPU; the whole output on CUDA, which avoids a host sync). A row whose clamped
    start moved (possible only at the very first or last row of the storage) is redone elementwise.
    ``corners`` ``(B, n, d)`` in axis order → ``(B, n, C, *size)``; ``mask_all`` forces the CUDA
    variant (True) or the CPU one (False) on any device (tests run both on CPU).
    """
    B, C, *spatial = images.shape
    n = corners.shape[1]
    dev = images.device
    s_last = images.stride()[-1]
    w = size[-1]
    last = images.storage_offset() + sum((e - 1) * st for e, st in zip(images.shape, images.stride()))
    n_rows = last - (w - 1) * s_last + 1  # row starts whose whole run stays inside the storage
    rows = images.as_strided((n_rows, w), (1, s_last), 0)
    start = _row_starts(images, corners, size)
    limit = torch.tensor([e - s for e, s in zip(spatial, size)], device=dev)
    border = ((corners < 0) | (corners > limit)).any(-1)  # (B, n): patch not wholly inside
    on_cpu = dev.type == "cpu" if mask_all is None else not mask_all
    if on_cpu:
        return _gather_rows_cpu(images, rows, start, corners, border, size)
    clamped = start.clamp(0, n_rows - 1)
    out = rows.index_select(0, clamped.reshape(-1)).view(B, n, C, *size)
    # Mask the whole output: no host sync for the border test.
    inside = _inside_mask(corners, spatial, size)  # (B, n, 1, *size)
    out = out.masked_fill_(~inside, 0)
    moved = ((clamped != start) & inside.any(-1)).flatten(2).any(-1)  # (B, n)
    if not bool(moved.any()):  # the one host sync
        return out
    mb, mk = moved.nonzero(as_tuple=True)
    out[mb, mk] = _gather_indexed(images, mb, corners[mb, mk], size)
    return out


_BITS = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def _axis_inside(corners: torch.Tensor, spatial: Sequence[int], size: tuple[int, ...]) -> list[torch.Tensor]:
    """``corners`` ``(M, d)`` → per axis a bool ``(M, size[a])``: which positions along it are inside.

    A patch element is inside exactly when it is inside along every axis, so these ``d`` small masks
    stand for the full ``(M, *size)`` mask without building it.
    """
    pos = [corners[:, a, None] + torch.arange(size[a], device=corners.device) for a in range(len(size))]
    return [(p >= 0) & (p < e) for p, e in zip(pos, spatial)]


def _zero_outside(x: torch.Tensor, axis_inside: list[torch.Tensor]) -> torch.Tensor:
    """Zero, in place, the elements of ``x`` ``(M, C, *size)`` outside the image along any axis.

    On CPU ``masked_fill_`` costs about 30× a plain pass over the same bytes, so real floating and
    integer tensors are instead ANDed bit-wise, one axis at a time, with an all-ones / all-zeros word
    broadcast over the others: an exact 0 (never ``NaN * 0``) at a fraction of the cost. Other dtypes
    (complex, bool) fall back to ``masked_fill_``.
    """
    M, _, *size = x.shape
    d = len(size)

    def along(a: int, m: torch.Tensor) -> torch.Tensor:  # (M, size[a]) → broadcastable to x
        shape = [M, 1] + [1] * d
        shape[2 + a] = size[a]
        return m.view(shape)

    bits = _BITS.get(x.element_size())
    if bits is None or x.is_complex() or x.dtype == torch.bool:
        inside = torch.ones((), dtype=torch.bool, device=x.device)
        for a, m in enumerate(axis_inside):
            inside = inside & along(a, m)
        return x.masked_fill_(~inside, 0)
    words = x.view(bits)
    for a, m in enumerate(axis_inside):
        word = m.to(bits)
        words.bitwise_and_(along(a, word.mul_(255) if bits == torch.uint8 else word.neg_()))  # True: all ones
    return x


def _gather_rows_cpu(
    images: torch.Tensor,
    rows: torch.Tensor,
    start: torch.Tensor,
    corners: torch.Tensor,
    border: torch.Tensor,
    size: tuple[int, ...],
) -> torch.Tensor:
    """CPU variant of :func:`_gather_rows`: host syncs are free, so work only on the border patches.

    The border patches (usually a few percent) are picked by a flat index, masked and written back with
    ``index_select`` / ``index_copy_`` on the contiguous output (a memcpy per patch, not one index
    computation per element); rows whose clamped start moved are looked for only when some start left
    the storage at all.
    """
    B, C, *spatial = images.shape
    n = corners.shape[1]
    n_rows = rows.shape[0]
    flat = start.view(-1)
    if not bool(border.any()):
        return rows.index_select(0, flat).view(B, n, C, *size)
    idx = border.view(-1).nonzero().squeeze(1)  # (M,) flat patch index
    # Only a patch that crosses the border can have a row start outside the storage: check those alone.
    starts_b = start.view(B * n, C, -1).index_select(0, idx)  # (M, C, prod(size[:-1]))
    moved_rows = (starts_b < 0) | (starts_b >= n_rows)
    off_storage = bool(moved_rows.any())
    if off_storage:  # ``start`` is ours (freshly computed): clamp those patches' rows in place
        start.view(B * n, -1).index_copy_(0, idx, starts_b.clamp(0, n_rows - 1).view(len(idx), -1))
    out = rows.index_select(0, flat).view(B * n, C, *size)
    axis_inside = _axis_inside(corners.view(B * n, -1).index_select(0, idx), spatial, size)
    out.index_copy_(0, idx, _zero_outside(out.index_select(0, idx), axis_inside))
    out = out.view(B, n, C, *size)
    if off_storage:  # a row inside the image whose start was clamped: its elements would be shifted
        # a row holds an inside element when its leading positions are inside and the last axis overlaps
        has_inside = axis_inside[-1].any(-1).view(-1, *([1] * (len(size) - 1)))
        for a, m in enumerate(axis_inside[:-1]):
            shape = [len(idx)] + [1] * (len(size) - 1)
            shape[1 + a] = size[a]
            has_inside = has_inside & m.view(shape)
        moved = idx[(moved_rows & has_inside.view(len(idx), 1, -1)).flatten(1).any(1)]
        if len(moved):
            mb, mk = moved // n, moved % n
            out[mb, mk] = _gather_indexed(images, mb, corners[mb, mk], size)
    return out


def _inside_mask(corners: torch.Tensor, spatial: Sequence[int], size: tuple[int, ...]) -> torch.Tensor:
    """``corners`` ``(M, k, d)`` → bool ``(M, k, 1, *size)``: which patch elements lie inside the image."""
    m, k, d = corners.shape
    inside = torch.ones((), dtype=torch.bool, device=corners.device)
    for axis in range(d):
        shape = [1] * d
        shape[axis] = size[axis]
        pos = corners[:, :, axis].view(m, k, 1, *([1] * d)) + torch.arange(
            size[axis], device=corners.device
        ).view(1, 1, 1, *shape)
        inside = inside & (pos >= 0) & (pos < spatial[axis])
    return inside


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
    if not isinstance(images, torch.Tensor) and hasattr(images, "read_patches"):
        d = len(images.shape) - 2
        check_shape(offsets, [str(images.shape[0]), "n", str(d)], "offsets")
        if offsets.is_floating_point():
            raise TypeError(f"offsets must be an integer tensor (int64), got {offsets.dtype}")
        return images.read_patches(offsets.long(), _as_size(size, d))
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
    corners = offsets.long().flip(-1)  # (x, y, z) → axis order
    if (
        images.requires_grad
        or images.numel() == 0
        or B * n == 0
        or any(s > e for e, s in zip(spatial, size_t))
    ):
        batch = torch.arange(B, device=images.device).repeat_interleave(n)
        return _gather_indexed(images, batch, corners.reshape(B * n, d), size_t).view(B, n, C, *size_t)
    return _gather_rows(images, corners, size_t)


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


def extract_patches_1d(
    signals: torch.Tensor, offsets: torch.Tensor, size: int | Sequence[int]
) -> torch.Tensor:
    """Windows of 1-D signals: ``signals (B, C, L)``, ``offsets (B, n, 1)`` → ``(B, n, C, size)``."""
    check_shape(signals, ["B", "C", "L"], "signals")
    return extract_patches_nd(signals, offsets, size)


def extract_patches_3d(
    volumes: torch.Tensor, offsets: torch.Tensor, size: int | Sequence[int]
) -> torch.Tensor:
    """Cubes of volumes: ``volumes (B, C, D, H, W)``, ``offsets (B, n, 3)`` as ``(x, y, z)``,
    ``size`` ``P`` or ``(d, h, w)`` → ``(B, n, C, d, h, w)``."""
    check_shape(volumes, ["B", "C", "D", "H", "W"], "volumes")
    return extract_patches_nd(volumes, offsets, size)
