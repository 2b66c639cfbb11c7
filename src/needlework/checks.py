"""Runtime shape checks with messages that name the argument and the expected layout."""

from __future__ import annotations

from collections.abc import Sequence

import torch


def check_shape(x: torch.Tensor, layout: Sequence[str], name: str = "input") -> dict[str, int]:
    """Check that ``x`` has ``len(layout)`` dimensions and return the sizes by name.

    Entries of ``layout`` that are digits must match exactly; names repeated in ``layout`` must
    agree; ``"*"`` matches anything.

    Example:
        >>> check_shape(torch.zeros(2, 3, 4), ["B", "N", "D"], "bag")
        {'B': 2, 'N': 3, 'D': 4}
    """
    # a lazy image with a shape (e.g. slides.patch_reader.SlidePixels) stands in for a tensor
    if not isinstance(x, torch.Tensor) and not hasattr(x, "read_patches"):
        raise TypeError(f"{name} must be a torch.Tensor of shape {tuple(layout)}, got {type(x).__name__}")
    if x.dim() != len(layout):
        raise ValueError(
            f"{name} must have shape ({', '.join(layout)}) ({len(layout)} dims), got {tuple(x.shape)}"
        )
    sizes: dict[str, int] = {}
    for dim, (key, size) in enumerate(zip(layout, x.shape)):
        if key == "*":
            continue
        if key.isdigit():
            if int(key) != size:
                raise ValueError(
                    f"{name} must have shape ({', '.join(layout)}): dim {dim} is {size}, expected {key}"
                )
            continue
        if key in sizes and sizes[key] != size:
            raise ValueError(f"{name} has inconsistent size for {key}: {sizes[key]} and {size}")
        sizes[key] = int(size)
    return sizes


def check_same(name_a: str, a: int, name_b: str, b: int) -> None:
    """Raise a ValueError naming both values when ``a != b``."""
    if a != b:
        raise ValueError(f"{name_a} ({a}) must equal {name_b} ({b})")
