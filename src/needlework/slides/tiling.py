"""Tile grids at a target magnification or µm/px, kept where the tissue fraction passes a threshold.

Coordinates are level-0 top-left ``(x, y)``; the footprint travels as ``patch_size_level0``
(CONVENTIONS.md §2): ``patch_size_level0 = round(patch_size · target_mpp / mpp_level0)`` and the
stride ``round((patch_size − overlap) · target_mpp / mpp_level0)``.

Example:
    >>> cfg = TilingConfig(target_magnification=20, patch_size=256)
    >>> tile_geometry(0.25, cfg)  # a 40× slide tiled at 20×
    (512, 512)
    >>> grid_coords(1200, 600, 512, 512).tolist()
    [[0, 0], [512, 0]]
"""

from __future__ import annotations

import json
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from needlework.slides.mpp import magnification_to_mpp, mpp_to_magnification
from needlework.slides.provenance import stamp
from needlework.slides.reader import SlideReader
from needlework.slides.tissue import TissueParams, mask_from_geojson, segment_tissue

SEGMENTER = "saturation-background"


@dataclass
class TilingConfig:
    """Where and how to cut tiles. Give ``target_magnification`` or ``target_mpp`` (mpp wins if both).

    Attributes:
        target_magnification: target magnification (µm/px ≈ 10 / magnification).
        target_mpp: target µm/px (overrides ``target_magnification``).
        patch_size: tile side in pixels at the target resolution.
        overlap: overlap of neighbouring tiles in pixels at the target resolution.
        min_tissue_fraction: fraction of a tile's area that must be tissue for the tile to be kept.
    """

    target_magnification: float | None = 20.0
    target_mpp: float | None = None
    patch_size: int = 256
    overlap: int = 0
    min_tissue_fraction: float = 0.25

    def __post_init__(self) -> None:
        # 20 and 20.0 are the same setting: keep one spelling so the config hash (resume) agrees.
        if self.target_magnification is not None:
            self.target_magnification = float(self.target_magnification)
        if self.target_mpp is not None:
            self.target_mpp = float(self.target_mpp)
        if self.target_mpp is None and self.target_magnification is None:
            raise ValueError("give target_magnification or target_mpp")
        if self.patch_size <= 0 or not 0 <= self.overlap < self.patch_size:
            raise ValueError(
                f"need patch_size > 0 and 0 <= overlap < patch_size, got {self.patch_size}, {self.overlap}"
            )
        if not 0.0 <= self.min_tissue_fraction <= 1.0:
            raise ValueError(f"min_tissue_fraction must be in [0, 1], got {self.min_tissue_fraction}")

    @property
    def mpp(self) -> float:
        """Target µm/px."""
        if self.target_mpp is not None:
            return float(self.target_mpp)
        return magnification_to_mpp(float(self.target_magnification))  # type: ignore[arg-type]

    @property
    def magnification(self) -> float:
        if self.target_mpp is not None:
            return mpp_to_magnification(float(self.target_mpp))
        return float(self.target_magnification)  # type: ignore[arg-type]

    def dir_name(self) -> str:
        """TRIDENT-style folder name, e.g. ``20x_256px_0px_overlap``."""
        return f"{round(self.magnification, 3):g}x_{self.patch_size}px_{self.overlap}px_overlap"


@dataclass
class TilingResult:
    """Kept tiles and the segmentation they came from."""

    coords: np.ndarray  # (N, 2) int64 level-0 (x, y)
    tissue_fraction: np.ndarray  # (N,) float32
    attrs: dict[str, Any]
    thumb: np.ndarray  # (h, w, 3) uint8
    mask: np.ndarray  # (h, w) bool
    downsample: tuple[float, float]  # thumbnail → level-0 per axis
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def patch_size_level0(self) -> int:
        return int(self.attrs["patch_size_level0"])


def tile_geometry(mpp_level0: float, config: TilingConfig) -> tuple[int, int]:
    """``(patch_size_level0, stride_level0)`` in level-0 pixels."""
    scale = config.mpp / mpp_level0
    ps0 = max(1, round(config.patch_size * scale))
    stride0 = max(1, round((config.patch_size - config.overlap) * scale))
    return ps0, stride0


def grid_coords(width: int, height: int, patch_size_level0: int, stride_level0: int) -> np.ndarray:
    """Top-left corners ``(M, 2)`` int64 of all full tiles of a ``width × height`` level-0 image,
    row-major (y, then x), starting at ``(0, 0)``."""
    xs = np.arange(0, width - patch_size_level0 + 1, stride_level0, dtype=np.int64)
    ys = np.arange(0, height - patch_size_level0 + 1, stride_level0, dtype=np.int64)
    yy, xx = np.meshgrid(ys, xs, indexing="ij")
    return np.stack([xx.ravel(), yy.ravel()], axis=1)


def tissue_fractions(
    mask: np.ndarray, downsample: tuple[float, float], coords: np.ndarray, patch_size_level0: int
) -> np.ndarray:
    """Exact area fraction of each tile covered by the (piecewise-constant) thumbnail ``mask``.

    The integral of the mask over ``[0, y] × [0, x]`` is the bilinear interpolation of its summed-area
    table, so box sums at fractional thumbnail positions are exact.
    """
    h, w = mask.shape
    # OpenCV's summed-area table: (h + 1, w + 1) with a zero first row and column, exact integer counts.
    table = cv2.integral(np.ascontiguousarray(mask, dtype=np.uint8), sdepth=cv2.CV_64F)
    dx, dy = downsample

    def integral(y: np.ndarray, x: np.ndarray) -> np.ndarray:
        y, x = np.clip(y, 0, h), np.clip(x, 0, w)
        y0, x0 = (
            np.minimum(np.floor(y).astype(np.int64), h - 1),
            np.minimum(np.floor(x).astype(np.int64), w - 1),
        )
        a, b = y - y0, x - x0
        return (
            (1 - a) * (1 - b) * table[y0, x0]
            + a * (1 - b) * table[y0 + 1, x0]
            + (1 - a) * b * table[y0, x0 + 1]
            + a * b * table[y0 + 1, x0 + 1]
        )

    coords = np.asarray(coords, dtype=np.float64).reshape(-1, 2)
    x0, y0 = coords[:, 0] / dx, coords[:, 1] / dy
    x1, y1 = (coords[:, 0] + patch_size_level0) / dx, (coords[:, 1] + patch_size_level0) / dy
    area = (np.clip(x1, 0, w) - np.clip(x0, 0, w)) * (np.clip(y1, 0, h) - np.clip(y0, 0, h))
    inside = integral(y1, x1) - integral(y0, x1) - integral(y1, x0) + integral(y0, x0)
    return np.where(area > 0, inside / np.maximum(area, 1e-12), 0.0).astype(np.float32)


def tiling_run_config(
    config: TilingConfig, tissue: TissueParams, segmenter: str = SEGMENTER
) -> dict[str, Any]:
    """The settings that determine a patch file (hashed into its ``config_hash``)."""
    return {"tiling": asdict(config), "tissue": tissue.as_dict(), "segmenter": segmenter}


def tile_slide(
    slide: SlideReader,
    config: TilingConfig,
    tissue: TissueParams | None = None,
    tissue_mask: np.ndarray | str | Path | None = None,
) -> TilingResult:
    """Segment the tissue of ``slide`` and keep the grid tiles with enough tissue.

    Args:
        slide: an open reader (its MPP must be known).
        config: target resolution, patch size, overlap, tissue threshold.
        tissue: segmentation parameters.
        tissue_mask: optional tissue instead of the segmentation: a GeoJSON file of tissue polygons in
            level-0 pixels (e.g. contours edited in QuPath), or a boolean mask of the thumbnail's shape.
    """
    tissue = tissue or TissueParams()
    mpp0 = slide.mpp
    if mpp0 > config.mpp * 1.01:
        warnings.warn(
            f"{slide.path.name}: level 0 is {mpp0:g} µm/px, coarser than the requested {config.mpp:g}; "
            "tiles will be upsampled",
            stacklevel=2,
        )
    thumb, ds = slide.thumbnail_at_mpp(tissue.seg_mpp, tissue.max_side)
    thumb_mpp = mpp0 * (ds[0] + ds[1]) / 2
    if tissue_mask is None:
        mask = segment_tissue(thumb, thumb_mpp, tissue)
    elif isinstance(tissue_mask, (str, Path)):
        mask = mask_from_geojson(tissue_mask, thumb.shape[:2], ds)
    else:
        if tissue_mask.shape != thumb.shape[:2]:
            raise ValueError(f"tissue_mask shape {tissue_mask.shape} != thumbnail shape {thumb.shape[:2]}")
        mask = tissue_mask.astype(bool)
    ps0, stride0 = tile_geometry(mpp0, config)
    width, height = slide.dimensions
    grid = grid_coords(width, height, ps0, stride0)
    frac = tissue_fractions(mask, ds, grid, ps0)
    # A tile with min_tissue_fraction 0 still needs some tissue; tiny float error must not drop a full tile.
    keep = frac >= config.min_tissue_fraction - 1e-6 if config.min_tissue_fraction > 0 else frac > 0
    segmenter = (
        SEGMENTER if tissue_mask is None else "geojson" if isinstance(tissue_mask, (str, Path)) else "mask"
    )
    run_config = tiling_run_config(config, tissue, segmenter)
    attrs: dict[str, Any] = {
        "patch_size": int(config.patch_size),
        "patch_size_level0": int(ps0),
        "stride_level0": int(stride0),
        "overlap": int(config.overlap),
        "level0_magnification": float(slide.magnification),
        "target_magnification": float(config.magnification),
        "target_mpp": float(config.mpp),
        "mpp_level0": float(mpp0),
        "mpp_source": slide.mpp_info.source,
        "level0_width": int(width),
        "level0_height": int(height),
        "name": slide.slide_id,
        "min_tissue_fraction": float(config.min_tissue_fraction),
        "reader": slide.backend,
        "reader_version": slide.backend_version,
        "segmenter": segmenter,
        "segmenter_params": json.dumps(tissue.as_dict(), sort_keys=True),
        "tissue_area_mm2": float(mask.sum() * thumb_mpp * thumb_mpp / 1e6),
        **stamp(run_config),
    }
    return TilingResult(grid[keep], frac[keep], attrs, thumb, mask, ds)
