"""Geometry of the synthetic slides: elliptical outlines, their rasterisation and dilation."""

from __future__ import annotations

import numpy as np
from skimage.draw import polygon as draw_polygon

__all__ = ["dilate", "ellipse_ring", "rasterise"]


def ellipse_ring(cx: float, cy: float, rx: float, ry: float, angle: float, n: int = 48) -> np.ndarray:
    """``(n, 2)`` ``(x, y)`` outline of an ellipse, semi-axes ``rx``, ``ry``, rotated by ``angle``."""
    t = np.linspace(0, 2 * np.pi, n, endpoint=False)
    x, y = rx * np.cos(t), ry * np.sin(t)
    c, s = np.cos(angle), np.sin(angle)
    return np.stack([cx + c * x - s * y, cy + s * x + c * y], axis=1)


def rasterise(ring: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Boolean ``shape`` mask of the pixels inside polygon ``ring`` ``(P, 2)`` ``(x, y)``."""
    mask = np.zeros(shape, bool)
    # Pixel (r, c) is inside when its centre (c + 0.5, r + 0.5) is inside the ring.
    rr, cc = draw_polygon(ring[:, 1] - 0.5, ring[:, 0] - 0.5, shape)
    mask[rr, cc] = True
    return mask


def dilate(mask: np.ndarray, radius: int) -> np.ndarray:
    """``mask`` grown by ``radius`` pixels (4-connected steps)."""
    from scipy import ndimage

    return ndimage.binary_dilation(mask, iterations=radius)
