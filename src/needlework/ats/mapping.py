"""From attention-map cells to high-resolution patch corners (receptive-field aware, METHODS §2.1).

The attention network sees the low-resolution view of size ``low`` and outputs a map of size ``att``;
with a border of ``RF`` low-resolution pixels lost to valid convolutions (0 for ``same`` padding), the
map covers ``low − RF`` pixels starting at ``RF/2``. With ``r = high / low``, ``space = (low − RF)·r`` and
``step = space / att``, cell ``c`` maps to the centre ``RF/2·r + c·step + step/2`` of its high-resolution
region and the patch of side ``P`` is centred there: corner ``round(centre − P/2)``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from needlework.checks import check_shape

__all__ = ["cells_to_offsets", "unravel_index"]


def _per_axis(value: float | Sequence[float], d: int, name: str) -> tuple[float, ...]:
    out = (value,) * d if isinstance(value, (int, float)) else tuple(value)
    if len(out) != d:
        raise ValueError(f"{name} must be a number or a sequence of {d} numbers, got {value!r}")
    return tuple(float(v) for v in out)


def unravel_index(idx: torch.Tensor, shape: Sequence[int]) -> list[torch.Tensor]:
    """Flat (row-major) indices → one coordinate tensor per axis, in axis order."""
    coords = []
    rem = idx
    for extent in reversed(list(shape)):
        coords.append(rem % extent)
        rem = torch.div(rem, extent, rounding_mode="floor")
    return coords[::-1]


def cells_to_offsets(
    idx: torch.Tensor,
    attention_shape: Sequence[int],
    low_shape: Sequence[int],
    high_shape: Sequence[int],
    patch_size: int | Sequence[int],
    receptive_field: float | Sequence[float] = 0,
) -> torch.Tensor:
    """Top-left corners in the high-resolution image of the patches centred on attention cells.

    Args:
        idx: ``(B, n)`` flat (row-major) indices into the attention map.
        attention_shape: spatial shape of the attention map, e.g. ``(h_a, w_a)``.
        low_shape: spatial shape of the low-resolution view the attention network saw.
        high_shape: spatial shape of the high-resolution image.
        patch_size: ``P`` or per-axis sizes in axis order.
        receptive_field: border (in low-resolution pixels, per axis or one number) lost by the attention
            network's valid convolutions; 0 for ``same`` padding.

    Returns:
        ``(B, n, d)`` int64 corners in coordinate order ``(x, y[, z])`` (last axis first), ready for
        :func:`~needlework.ats.extract_patches`. Corners may lie outside the image.

    Example:
        >>> cells_to_offsets(torch.tensor([[0, 5]]), (2, 3), (2, 3), (20, 30), 10)
        tensor([[[ 0,  0],
                 [20, 10]]])
    """
    check_shape(idx, ["B", "n"], "idx")
    d = len(attention_shape)
    if not (len(low_shape) == len(high_shape) == d):
        raise ValueError(
            f"attention_shape {tuple(attention_shape)}, low_shape {tuple(low_shape)} and high_shape "
            f"{tuple(high_shape)} must have the same number of axes"
        )
    size = _per_axis(patch_size, d, "patch_size")
    rf = _per_axis(receptive_field, d, "receptive_field")
    corners = []
    for axis, cell in enumerate(unravel_index(idx.long(), attention_shape)):
        r = high_shape[axis] / low_shape[axis]
        step = (low_shape[axis] - rf[axis]) * r / attention_shape[axis]
        centre = rf[axis] / 2 * r + cell.double() * step + step / 2
        corners.append(torch.round(centre - size[axis] / 2).long())
    return torch.stack(corners[::-1], dim=-1)
