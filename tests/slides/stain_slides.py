"""IHC-like and H&E-like test slides with a known tissue mask (for the tissue-segmentation tests).

Glass is near-white with noise and a mild illumination gradient. IHC tissue is pale blue-grey
haematoxylin with brown DAB patches covering part of it; H&E tissue is pink eosin with purple nuclei. A
third of the tissue is paler still (thin sections, fat-adjacent stroma): the case a stain-against-stain
threshold drops.
"""

from __future__ import annotations

import numpy as np


def _blobs(rng, h, w, n, rmin, rmax) -> np.ndarray:
    yy, xx = np.mgrid[:h, :w]
    mask = np.zeros((h, w), bool)
    for _ in range(n):
        cy, cx = rng.uniform(0.2 * h, 0.8 * h), rng.uniform(0.2 * w, 0.8 * w)
        ry, rx = rng.uniform(rmin, rmax, 2)
        angle = rng.uniform(0, np.pi)
        c, s = np.cos(angle), np.sin(angle)
        u, v = (xx - cx) * c + (yy - cy) * s, -(xx - cx) * s + (yy - cy) * c
        mask |= (u / rx) ** 2 + (v / ry) ** 2 <= 1
    return mask


def stain_slide(
    kind: str, size: tuple[int, int] = (192, 256), seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """``(image (H, W, 3) uint8, tissue mask (H, W) bool)``; ``kind`` is ``"ihc"`` or ``"he"``."""
    rng = np.random.default_rng(seed)
    h, w = size
    tissue = _blobs(rng, h, w, 4, 0.12 * min(h, w), 0.3 * min(h, w))
    img = np.empty((h, w, 3), np.float64)
    img[:] = (236.0, 236.0, 239.0)
    img -= np.linspace(0, 8, w)[None, :, None]  # illumination falls off across the slide
    if kind == "ihc":
        base, pale, stain = (196.0, 198.0, 218.0), (212.0, 212.0, 226.0), (150.0, 105.0, 65.0)
        stain_mask = tissue & _blobs(rng, h, w, 5, 0.08 * min(h, w), 0.18 * min(h, w))
    elif kind == "he":
        base, pale, stain = (228.0, 170.0, 205.0), (232.0, 200.0, 222.0), (125.0, 75.0, 160.0)
        stain_mask = tissue & (rng.random((h, w)) < 0.15)  # nuclei
    else:
        raise ValueError(kind)
    pale_mask = tissue & ~stain_mask & _blobs(rng, h, w, 3, 0.1 * min(h, w), 0.25 * min(h, w))
    img[tissue] = base
    img[pale_mask] = pale
    img[stain_mask] = stain
    img += rng.normal(0, 3.0, img.shape)
    return np.clip(img, 0, 255).astype(np.uint8), tissue


def recall_precision(pred: np.ndarray, truth: np.ndarray) -> tuple[float, float]:
    tp = float((pred & truth).sum())
    return tp / max(float(truth.sum()), 1.0), tp / max(float(pred.sum()), 1.0)
