"""Tissue segmentation on a thumbnail: saturation against the background, morphology, hole filling,
minimum area.

Tissue is coloured (stained), background is white or grey: the HSV saturation separates them. The default
threshold (``method="background"``) is set against the glass, not between stains: the background is the
lowest-saturation peak of the blurred saturation's histogram, its spread is measured on that peak's low
side (tissue only adds to the high side), and the threshold is the peak plus ``background_sigmas`` spreads
(at least ``background_margin``). Otsu's threshold (``method="otsu"``) splits the histogram in two, which on
IHC slides splits brown DAB from the pale haematoxylin-only tissue and drops the latter (58–94 % of the
tissue found on real IHC texture). Either way the threshold is never below ``min_saturation`` — on a slide
without tissue a threshold inside the noise would give a silent "tissue everywhere". When the final mask
covers less than ``coverage_warning`` of the area that stands out from the background, a warning says so.
Sizes are in micrometres so the parameters mean the same at any thumbnail resolution.

The image operations are OpenCV's (median blur, morphology, connected components, contours): importing
scipy and scikit-image for them costs more than segmenting a slide, and tiling is meant to start fast.
They reproduce the scipy.ndimage definitions exactly, border handling included (the median filter through
8-bit images: the median commutes with Otsu's binning and with the threshold, both monotone).

Example:
    >>> import numpy as np
    >>> thumb = np.full((64, 64, 3), 240, np.uint8); thumb[16:48, 16:48] = (200, 120, 170)
    >>> mask = segment_tissue(thumb, mpp=8.0, params=TissueParams(min_area_um2=0))
    >>> bool(mask[20:44, 20:44].all()), bool(mask[:12].any())
    (True, False)
"""

from __future__ import annotations

import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

import cv2
import numpy as np

from needlework.io.geojson import feature_collection, polygon_feature, read_polygons


@dataclass
class TissueParams:
    """Segmentation parameters (on the command line ``--tissue.<name>``, e.g. ``--tissue.seg_mpp 2``).

    Attributes:
        seg_mpp: thumbnail resolution in µm/px (longest side capped at ``max_side``).
        max_side: cap on the thumbnail's longest side, pixels.
        median_um: median filter width before thresholding (µm; 0 = none).
        threshold: fixed saturation threshold in [0, 1]; ``None`` = chosen by ``method``.
        method: ``"background"`` (tissue against the glass, default) or ``"otsu"`` (the old default).
        background_sigmas: background threshold = background peak + this many spreads of the peak.
        background_margin: ... and at least this far above the peak (saturation units).
        max_background_saturation: the background peak is searched below this saturation.
        coverage_warning: warn when the mask covers less than this fraction of the non-background area.
        min_saturation: lower bound on the threshold (keeps white/grey background out).
        dark_value: pixels whose max(R, G, B) is below this are not tissue (unscanned/black areas).
        close_um: radius of the morphological closing (µm; 0 = none).
        open_um: radius of the morphological opening (µm; 0 = none).
        fill_holes: fill holes in the tissue.
        max_hole_area_um2: fill only holes smaller than this (``None`` = all holes).
        min_area_um2: drop tissue pieces smaller than this.
    """

    seg_mpp: float = 4.0
    max_side: int = 4096
    median_um: float = 16.0
    threshold: float | None = None
    method: Literal["background", "otsu"] = "background"
    background_sigmas: float = 4.0
    background_margin: float = 0.02
    max_background_saturation: float = 0.15
    coverage_warning: float = 0.5
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
    """Structuring element: the pixels within ``radius`` of the centre, ``(2r+1, 2r+1)`` uint8."""
    y, x = np.mgrid[-radius : radius + 1, -radius : radius + 1]
    return (x * x + y * y <= radius * radius).astype(np.uint8)


_CROSS = cv2.getStructuringElement(cv2.MORPH_CROSS, (3, 3))


def _erode(mask: np.ndarray, kernel: np.ndarray) -> np.ndarray:
    """Binary erosion, outside the image = background (``scipy.ndimage.binary_erosion``)."""
    return cv2.erode(mask, kernel, borderType=cv2.BORDER_CONSTANT, borderValue=0)


def _dilate(mask: np.ndarray, kernel: np.ndarray) -> np.ndarray:
    """Binary dilation, outside the image = background (``scipy.ndimage.binary_dilation``)."""
    return cv2.dilate(mask, kernel, borderType=cv2.BORDER_CONSTANT, borderValue=0)


ROW_BLOCK = 256  # rows per block of the per-pixel steps: their float / int64 temporaries stay small


def saturation(rgb: np.ndarray) -> np.ndarray:
    """HSV saturation ``(max − min) / max`` in [0, 1] of an RGB uint8 image ``(H, W, 3)``, float32.

    Computed ``ROW_BLOCK`` rows at a time (the same arithmetic per pixel), so a large view costs its
    float32 result and not five float32 copies of itself.
    """
    out = np.empty(rgb.shape[:2], np.float32)
    for r0 in range(0, rgb.shape[0], ROW_BLOCK):
        block = rgb[r0 : r0 + ROW_BLOCK]
        r, g, b = block[..., 0], block[..., 1], block[..., 2]
        mx = np.maximum(np.maximum(r, g), b).astype(np.float32)
        mn = np.minimum(np.minimum(r, g), b).astype(np.float32)
        out[r0 : r0 + ROW_BLOCK] = np.where(mx > 0, (mx - mn) / np.maximum(mx, 1e-6), 0.0)
    return out


def saturation_bins(rgb: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """:func:`saturation` and the uint8 index of its histogram bin (256 bins on [0, 1]), in one pass.

    ``floor(256 · s)`` is exact in float32 (a power-of-two scale), so it is the bin ``searchsorted`` finds
    on the bin edges ``k / 256``; saturation 1 goes to the last, closed bin as in ``np.histogram``.
    """
    sat = np.empty(rgb.shape[:2], np.float32)
    bins = np.empty(rgb.shape[:2], np.uint8)
    for r0 in range(0, rgb.shape[0], ROW_BLOCK):
        block = rgb[r0 : r0 + ROW_BLOCK]
        r, g, b = block[..., 0], block[..., 1], block[..., 2]
        mx8 = np.maximum(np.maximum(r, g), b)
        d = (mx8 - np.minimum(np.minimum(r, g), b)).astype(np.float32)
        mx = mx8.astype(np.float32)
        s = sat[r0 : r0 + ROW_BLOCK]
        np.divide(d, mx, out=s, where=mx > 0)
        s[mx8 == 0] = 0.0
        np.minimum(s * 256, 255, out=d)
        bins[r0 : r0 + ROW_BLOCK] = d  # truncation: floor of a non-negative float
    return sat, bins


def _fill_holes(mask: np.ndarray) -> np.ndarray:
    """``mask`` (uint8 0/1) with every hole filled: background not 4-connected to the image border.

    One flood fill from a one-pixel background frame, instead of labelling every background piece.
    """
    framed = np.zeros((mask.shape[0] + 2, mask.shape[1] + 2), np.uint8)
    framed[1:-1, 1:-1] = mask
    cv2.floodFill(framed, None, (0, 0), 2, flags=4)  # the border's background (value 0) → 2
    return (framed[1:-1, 1:-1] != 2).astype(np.uint8)


def _above(sat: np.ndarray, t: float, size: int) -> np.ndarray:
    """``median(sat) > t`` with a ``size × size`` median (0: none), as the median of ``sat > t``."""
    if size == 0:
        return sat > t
    return _median_u8((sat > t).astype(np.uint8), size).astype(bool)


def _histogram_u8(values: np.ndarray) -> np.ndarray:
    """Counts ``(256,)`` of a uint8 image, by row blocks (``bincount`` casts its input to int64)."""
    hist = np.zeros(256, np.int64)
    for r0 in range(0, values.shape[0], ROW_BLOCK):
        hist += np.bincount(values[r0 : r0 + ROW_BLOCK].ravel(), minlength=256)
    return hist


def otsu_threshold(values: np.ndarray, bins: int = 256) -> float:
    """Otsu's threshold of ``values`` in [0, 1] (maximises the between-class variance)."""
    hist, edges = np.histogram(values.ravel(), bins=bins, range=(0.0, 1.0))
    return _otsu(hist, edges)


def _otsu(hist: np.ndarray, edges: np.ndarray) -> float:
    hist = hist.astype(np.float64)
    centres = (edges[:-1] + edges[1:]) / 2
    w0 = np.cumsum(hist)
    w1 = w0[-1] - w0
    m0 = np.cumsum(hist * centres)
    mu0 = m0 / np.maximum(w0, 1)
    mu1 = (m0[-1] - m0) / np.maximum(w1, 1)
    between = w0 * w1 * (mu0 - mu1) ** 2
    return float(edges[int(np.argmax(between)) + 1])


def _median_u8(values: np.ndarray, size: int) -> np.ndarray:
    """``size × size`` median (odd ``size``) of a uint8 image, mirrored at the border (scipy's
    ``median_filter`` mode ``reflect``)."""
    half = size // 2
    padded = np.pad(values, half, mode="symmetric")
    return cv2.medianBlur(padded, size)[half : half + values.shape[0], half : half + values.shape[1]]


def _components(mask: np.ndarray, connectivity: int) -> tuple[np.ndarray, np.ndarray]:
    """Labels ``(H, W)`` (0 = outside ``mask``) and the pixel count of each label.

    Labels are uint16 (half the memory of int32 on a large view) unless there are 65,536 components or
    more, which OpenCV reports as an error; then int32.
    """
    try:
        _, labels, stats, _ = cv2.connectedComponentsWithStats(
            mask.view(np.uint8), connectivity=connectivity, ltype=cv2.CV_16U
        )
    except cv2.error:  # too many components for 16-bit labels
        _, labels, stats, _ = cv2.connectedComponentsWithStats(
            mask.view(np.uint8), connectivity=connectivity, ltype=cv2.CV_32S
        )
    sizes = stats[:, cv2.CC_STAT_AREA].astype(np.int64)
    sizes[0] = 0
    return labels, sizes


def segment_tissue(thumb: np.ndarray, mpp: float, params: TissueParams | None = None) -> np.ndarray:
    """Boolean tissue mask ``(H, W)`` of an RGB uint8 thumbnail ``(H, W, 3)`` at ``mpp`` µm/px."""
    p = params or TissueParams()
    if thumb.ndim != 3 or thumb.shape[2] != 3 or thumb.dtype != np.uint8:
        raise ValueError(f"thumb must be (H, W, 3) uint8, got {thumb.shape} {thumb.dtype}")
    if p.method not in ("background", "otsu"):
        raise ValueError(f"tissue method must be 'background' or 'otsu', got {p.method!r}")
    sat, bins = saturation_bins(thumb)
    width = round(p.median_um / mpp)
    edges = np.linspace(0.0, 1.0, 257)
    if width >= 2:
        # The median commutes with monotone maps, so the float median is never needed: the histogram is
        # that of the median of the bin indices, and median(sat) > thr is the median of (sat > thr).
        size = width | 1
        hist = _histogram_u8(_median_u8(bins, size))
    else:
        size = 0  # no median
        hist = _histogram_u8(bins)
    del bins

    background = _background_threshold(hist, edges, p)
    if p.threshold is not None:
        thr = p.threshold
    elif p.method == "otsu":
        thr = max(_otsu(hist, edges), p.min_saturation)
    else:
        thr = background
    above = _above(sat, thr, size)
    # What stands out from the background at all, to check the final mask against.
    not_background = above if thr == background else _above(sat, background, size)
    del sat  # a float32 copy of the view: free it before the morphology (peak memory on large views)
    lit = np.maximum(np.maximum(thumb[..., 0], thumb[..., 1]), thumb[..., 2]) >= p.dark_value
    mask = (above & lit).astype(np.uint8)
    standout = not_background & lit  # what the final mask is checked against; one array instead of three
    del above, not_background, lit
    r_close, r_open = round(p.close_um / mpp), round(p.open_um / mpp)
    if r_close > 0:
        # Pad so that closing does not erode tissue touching the border.
        disk = _disk(r_close)
        padded = np.pad(mask, r_close, mode="edge")
        mask = _erode(_dilate(padded, disk), disk)[r_close:-r_close, r_close:-r_close]
    if r_open > 0:
        disk = _disk(r_open)
        mask = _dilate(_erode(mask, disk), disk)
    px_area = mpp * mpp
    if p.fill_holes and p.max_hole_area_um2 is None:
        mask = _fill_holes(mask)
    elif p.fill_holes:
        # Holes: background pieces (4-connected) that do not touch the border.
        labels, sizes = _components(1 - mask, 4)
        hole = np.ones(len(sizes), bool)
        hole[0] = False
        hole[np.unique(np.concatenate([labels[0], labels[-1], labels[:, 0], labels[:, -1]]))] = False
        if p.max_hole_area_um2 is not None:
            hole &= sizes * px_area < p.max_hole_area_um2
        mask = mask | hole[labels]
        del labels  # int32, 4 bytes a pixel: not alive together with the next labelling
    if p.min_area_um2 > 0:
        labels, sizes = _components(mask.astype(np.uint8), 8)
        keep = sizes * px_area >= p.min_area_um2
        keep[0] = False
        mask = keep[labels]
    mask = mask.astype(bool)
    _check_coverage(mask, standout, thr, background, p)
    return mask


def _background_threshold(hist: np.ndarray, edges: np.ndarray, p: TissueParams) -> float:
    """Saturation threshold just above the background peak of ``hist`` (see the module docstring)."""
    hist = hist.astype(np.float64)
    centres = (edges[:-1] + edges[1:]) / 2
    low = centres < p.max_background_saturation
    if not hist[low].any():  # no background at all (tissue everywhere): fall back to the floor
        return p.min_saturation
    mode = int(np.argmax(np.where(low, hist, -1.0)))
    side = hist[: mode + 1]
    spread = float(np.sqrt((side * (centres[: mode + 1] - centres[mode]) ** 2).sum() / max(side.sum(), 1.0)))
    spread = max(spread, float(edges[1] - edges[0]))  # at least one bin: the histogram's resolution
    threshold = float(centres[mode]) + max(p.background_sigmas * spread, p.background_margin)
    return max(threshold, p.min_saturation)


def _check_coverage(
    mask: np.ndarray, not_background: np.ndarray, thr: float, background: float, p: TissueParams
) -> None:
    """Warn when the mask misses much of what differs from the background (pale tissue dropped)."""
    area = int(not_background.sum())
    if area < 0.01 * not_background.size or p.coverage_warning <= 0:
        return
    covered = float((mask & not_background).sum()) / area
    if covered < p.coverage_warning:
        warnings.warn(
            f"the tissue mask covers only {100 * covered:.0f} % of the area that stands out from the "
            f"background (threshold {thr:.3f}, background threshold {background:.3f}): pale tissue may be "
            "missing. Check the QC picture; --tissue.method background or a lower --tissue.threshold "
            "keeps it",
            stacklevel=3,
        )


def _dedupe(ring: np.ndarray) -> np.ndarray:
    keep = np.any(ring != np.roll(ring, 1, axis=0), axis=1)
    return ring[keep] if keep.any() else ring[:1]


def mask_to_geojson(
    mask: np.ndarray, downsample: tuple[float, float], tolerance: float = 1.0
) -> dict[str, Any]:
    """Tissue contours as QuPath ``annotation`` polygons in level-0 pixels.

    The polygons follow the pixel edges (pixel ``(r, c)`` covers level-0 ``[c·dx, (c+1)·dx)``), simplified
    by Douglas-Peucker with ``tolerance`` thumbnail pixels. Outer boundaries and hole boundaries are
    written as separate polygons; re-import with :func:`mask_from_geojson`, which fills them even-odd so
    holes stay holes (exactly the input mask when ``tolerance=0``).
    """
    dx, dy = downsample
    # Contours of the mask doubled in size run through the first/last half of each border pixel; the
    # half-pixel index i maps to the pixel corner (i + 1) // 2. The 1-pixel pad closes border contours.
    padded = np.pad(mask.astype(np.uint8), 1)
    up = np.repeat(np.repeat(padded, 2, axis=0), 2, axis=1)
    contours, _ = cv2.findContours(up, cv2.RETR_LIST, cv2.CHAIN_APPROX_SIMPLE)
    feats = []
    for contour in contours:
        ring = _dedupe((contour.reshape(-1, 2) + 1) // 2 - 1)  # (x, y) pixel corners of the mask
        if tolerance > 0 and len(ring) >= 3:
            ring = cv2.approxPolyDP(ring.astype(np.float32).reshape(-1, 1, 2), tolerance, True).reshape(-1, 2)
        if len(ring) < 3:
            continue
        feats.append(
            polygon_feature([(ring * [dx, dy]).tolist()], "annotation", "Tissue", (0, 160, 0))
        )
    return feature_collection(feats)


def rasterise_rings(
    rings: list[np.ndarray], shape: tuple[int, int], downsample: tuple[float, float] = (1.0, 1.0)
) -> np.ndarray:
    """Even-odd fill of polygon rings (``(P, 2)`` level-0 ``(x, y)``) on a grid ``shape`` ``(H, W)`` with
    level-0 ``downsample`` ``(dx, dy)``: a pixel is inside when its centre is (holes stay holes, and a
    ring drawn twice cancels)."""
    h, w = shape
    dx, dy = downsample
    toggles = np.zeros((h, w + 1), np.uint8)  # parity is all that counts: uint8 wrap-around is fine
    for ring in rings:
        ring = np.asarray(ring, dtype=np.float64).reshape(-1, 2)
        if len(ring) < 2:
            continue
        x0, y0 = ring[:, 0] / dx, ring[:, 1] / dy
        x1, y1 = np.roll(x0, -1), np.roll(y0, -1)
        # Edge e crosses the centre line y = r + 0.5 of rows min(y) <= r + 0.5 < max(y) (half-open).
        first = np.clip(np.ceil(np.minimum(y0, y1) - 0.5), 0, h).astype(np.int64)
        stop = np.clip(np.ceil(np.maximum(y0, y1) - 0.5), 0, h).astype(np.int64)
        count = np.where(y0 != y1, stop - first, 0)
        if not count.sum():
            continue
        edge = np.repeat(np.arange(len(ring)), count)
        rows = first[edge] + (np.arange(len(edge)) - np.repeat(np.cumsum(count) - count, count))
        t = (rows + 0.5 - y0[edge]) / (y1[edge] - y0[edge])
        xs = x0[edge] + t * (x1[edge] - x0[edge])
        cols = np.clip(np.ceil(xs - 0.5), 0, w).astype(np.int64)  # first pixel whose centre is past x
        np.add.at(toggles, (rows, cols), 1)
    return (np.cumsum(toggles, axis=1, dtype=np.uint8)[:, :w] & 1).astype(bool)


def mask_from_geojson(
    path: str | Path, shape: tuple[int, int], downsample: tuple[float, float]
) -> np.ndarray:
    """Rasterise the polygons of a GeoJSON file (e.g. contours edited in QuPath) onto a thumbnail grid
    of ``shape`` ``(H, W)`` with level-0 ``downsample`` ``(dx, dy)``; even-odd fill (holes stay holes)."""
    return rasterise_rings([ring for rings in read_polygons(path) for ring in rings], shape, downsample)


def qc_image(
    thumb: np.ndarray,
    mask: np.ndarray,
    boxes: np.ndarray | None = None,
    downsample: tuple[float, float] = (1, 1),
) -> np.ndarray:
    """Thumbnail with the tissue contour (green) and optional tile boxes (blue, level-0 xyxy)."""
    out = thumb.copy()
    m = mask.astype(np.uint8)
    edge = m & (1 - _erode(m, _CROSS))
    out[_dilate(edge, _CROSS).astype(bool)] = (0, 170, 0)
    if boxes is not None and len(boxes):
        dx, dy = downsample
        h, w = mask.shape
        for x0, y0, x1, y1 in np.asarray(boxes, dtype=np.float64):
            c0, c1 = int(x0 / dx), min(int(np.ceil(x1 / dx)) - 1, w - 1)
            r0, r1 = int(y0 / dy), min(int(np.ceil(y1 / dy)) - 1, h - 1)
            out[r0, c0 : c1 + 1] = out[r1, c0 : c1 + 1] = (40, 60, 220)
            out[r0 : r1 + 1, c0] = out[r0 : r1 + 1, c1] = (40, 60, 220)
    return out
