"""Tissue segmentation on a thumbnail: saturation + Otsu, morphology, hole filling, minimum area.

Tissue is coloured (stained), background is white or grey: the HSV saturation separates them. The
threshold is Otsu's on the blurred saturation, but never below ``min_saturation`` — on a slide
without tissue Otsu would split noise, and a silent "tissue everywhere" is as bad as none.
Sizes are in micrometres so the parameters mean the same at any thumbnail resolution.

Example:
    >>> import numpy as np
    >>> thumb = np.full((64, 64, 3), 240, np.uint8); thumb[16:48, 16:48] = (200, 120, 170)
    >>> mask = segment_tissue(thumb, mpp=8.0, params=TissueParams(min_area_um2=0))
    >>> bool(mask[20:44, 20:44].all()), bool(mask[:12].any())
    (True, False)
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
from scipy import ndimage

from needlework.io.geojson import feature_collection, polygon_feature, read_polygons


@dataclass
class TissueParams:
    """Segmentation parameters (all exposed on the command line as ``--seg-*``).

    Attributes:
        seg_mpp: thumbnail resolution in µm/px (longest side capped at ``max_side``).
        max_side: cap on the thumbnail's longest side, pixels.
        median_um: median filter width before thresholding (µm; 0 = none).
        threshold: fixed saturation threshold in [0, 1]; ``None`` = Otsu.
        min_saturation: lower bound on the threshold (keeps white/grey background out).
        dark_value: pixels whose max(R, G, B) is below this are not tissue (unscanned/black areas).
        close_um, open_um: radii of the morphological closing / opening (µm; 0 = none).
        fill_holes: fill holes in the tissue.
        max_hole_area_um2: fill only holes smaller than this (``None`` = all holes).
        min_area_um2: drop tissue pieces smaller than this.
    """

    seg_mpp: float = 4.0
    max_side: int = 4096
    median_um: float = 16.0
    threshold: float | None = None
    min_saturation: float = 0.05
    dark_value: int = 20
    close_um: float = 16.0
    open_um: float = 8.0
    fill_holes: bool = True
    max_hole_area_um2: float | None = None
    min_area_um2: float = 10_000.0

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _disk(radius: int) -> np.ndarray:
    y, x = np.mgrid[-radius : radius + 1, -radius : radius + 1]
    return x * x + y * y <= radius * radius


def saturation(rgb: np.ndarray) -> np.ndarray:
    """HSV saturation ``(max − min) / max`` in [0, 1] of an RGB uint8 image ``(H, W, 3)``."""
    rgb = rgb.astype(np.float32)
    mx, mn = rgb.max(axis=2), rgb.min(axis=2)
    return np.where(mx > 0, (mx - mn) / np.maximum(mx, 1e-6), 0.0).astype(np.float32)


def otsu_threshold(values: np.ndarray, bins: int = 256) -> float:
    """Otsu's threshold of ``values`` in [0, 1] (maximises the between-class variance)."""
    hist, edges = np.histogram(values.ravel(), bins=bins, range=(0.0, 1.0))
    hist = hist.astype(np.float64)
    centres = (edges[:-1] + edges[1:]) / 2
    w0 = np.cumsum(hist)
    w1 = w0[-1] - w0
    m0 = np.cumsum(hist * centres)
    mu0 = m0 / np.maximum(w0, 1)
    mu1 = (m0[-1] - m0) / np.maximum(w1, 1)
    between = w0 * w1 * (mu0 - mu1) ** 2
    return float(edges[int(np.argmax(between)) + 1])


def segment_tissue(thumb: np.ndarray, mpp: float, params: TissueParams | None = None) -> np.ndarray:
    """Boolean tissue mask ``(H, W)`` of an RGB uint8 thumbnail ``(H, W, 3)`` at ``mpp`` µm/px."""
    p = params or TissueParams()
    if thumb.ndim != 3 or thumb.shape[2] != 3 or thumb.dtype != np.uint8:
        raise ValueError(f"thumb must be (H, W, 3) uint8, got {thumb.shape} {thumb.dtype}")
    sat = saturation(thumb)
    width = round(p.median_um / mpp)
    if width >= 2:
        sat = ndimage.median_filter(sat, size=width | 1)
    thr = p.threshold if p.threshold is not None else max(otsu_threshold(sat), p.min_saturation)
    mask = (sat > thr) & (thumb.max(axis=2) >= p.dark_value)
    r_close, r_open = round(p.close_um / mpp), round(p.open_um / mpp)
    if r_close > 0:
        # Pad so that closing does not erode tissue touching the border.
        padded = np.pad(mask, r_close, mode="edge")
        mask = ndimage.binary_closing(padded, _disk(r_close))[r_close:-r_close, r_close:-r_close]
    if r_open > 0:
        mask = ndimage.binary_opening(mask, _disk(r_open))
    px_area = mpp * mpp
    if p.fill_holes:
        filled = ndimage.binary_fill_holes(mask)
        if p.max_hole_area_um2 is None:
            mask = filled
        else:
            holes, n = ndimage.label(filled & ~mask)
            sizes = np.bincount(holes.ravel(), minlength=n + 1) * px_area
            small = sizes < p.max_hole_area_um2
            small[0] = False
            mask = mask | small[holes]
    if p.min_area_um2 > 0:
        labels, n = ndimage.label(mask, structure=np.ones((3, 3)))
        sizes = np.bincount(labels.ravel(), minlength=n + 1) * px_area
        keep = sizes >= p.min_area_um2
        keep[0] = False
        mask = keep[labels]
    return mask


def mask_to_geojson(
    mask: np.ndarray, downsample: tuple[float, float], tolerance: float = 1.0
) -> dict[str, Any]:
    """Tissue contours as QuPath ``annotation`` polygons in level-0 pixels.

    Outer boundaries and hole boundaries are written as separate polygons; re-import with
    :func:`mask_from_geojson`, which fills them even-odd so holes stay holes.
    """
    from skimage.measure import approximate_polygon, find_contours

    dx, dy = downsample
    padded = np.pad(mask.astype(np.float32), 1)
    feats = []
    for contour in find_contours(padded, 0.5):
        contour = approximate_polygon(contour, tolerance)
        if len(contour) < 3:
            continue
        # contour is (row, col) of the padded array; pixel (r, c) covers level-0 [c·dx, (c+1)·dx).
        ring = [[(c - 1 + 0.5) * dx, (r - 1 + 0.5) * dy] for r, c in contour]
        feats.append(polygon_feature([ring], "annotation", "Tissue", (0, 160, 0)))
    return feature_collection(feats)


def mask_from_geojson(
    path: str | Path, shape: tuple[int, int], downsample: tuple[float, float]
) -> np.ndarray:
    """Rasterise the polygons of a GeoJSON file (e.g. contours edited in QuPath) onto a thumbnail grid
    of ``shape`` ``(H, W)`` with level-0 ``downsample`` ``(dx, dy)``; even-odd fill (holes stay holes)."""
    from skimage.draw import polygon as draw_polygon

    mask = np.zeros(shape, bool)
    dx, dy = downsample
    for rings in read_polygons(path):
        for ring in rings:
            part = np.zeros(shape, bool)
            rr, cc = draw_polygon(ring[:, 1] / dy - 0.5, ring[:, 0] / dx - 0.5, shape)
            part[rr, cc] = True
            mask ^= part
    return mask


def qc_image(
    thumb: np.ndarray,
    mask: np.ndarray,
    boxes: np.ndarray | None = None,
    downsample: tuple[float, float] = (1, 1),
) -> np.ndarray:
    """Thumbnail with the tissue contour (green) and optional tile boxes (blue, level-0 xyxy)."""
    out = thumb.copy()
    edge = mask & ~ndimage.binary_erosion(mask, iterations=1)
    out[ndimage.binary_dilation(edge)] = (0, 170, 0)
    if boxes is not None and len(boxes):
        dx, dy = downsample
        h, w = mask.shape
        for x0, y0, x1, y1 in np.asarray(boxes, dtype=np.float64):
            c0, c1 = int(x0 / dx), min(int(np.ceil(x1 / dx)) - 1, w - 1)
            r0, r1 = int(y0 / dy), min(int(np.ceil(y1 / dy)) - 1, h - 1)
            out[r0, c0 : c1 + 1] = out[r1, c0 : c1 + 1] = (40, 60, 220)
            out[r0 : r1 + 1, c0] = out[r0 : r1 + 1, c1] = (40, 60, 220)
    return out
