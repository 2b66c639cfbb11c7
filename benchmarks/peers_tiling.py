"""Tiling side by side with CLAM's steps written with OpenCV (issue 16, items 1 and 5).

CLAM (``create_patches_fp.py``) is not on the package registry, so its steps are written here from its
paper and documentation, with OpenCV, as the reference a user of CLAM gets (single process):

1. read the whole pyramid level closest to a downsample of 64 (``read_region`` + RGB);
2. RGB → HSV, median blur of the saturation (7 px), fixed threshold (8 of 255), morphological close (4 × 4);
3. contours of tissue and holes (``findContours``, two-level hierarchy); tissue pieces smaller than 100
   reference patches of 512² (level 0) and holes smaller than 16 are dropped, at most 8 holes a piece;
4. the level-0 grid of 256² patches (step 256) over each piece's bounding box, a patch kept when one of the
   four points half-way between its centre and its corners lies in the piece (``pointPolygonTest``) and its
   centre in none of the piece's holes.

needlework's side is :func:`needlework.slides.tiling.tile_slide` (thumbnail, segmentation, grid, tissue
fraction ≥ 0.25), at its default 4 µm/px thumbnail and at CLAM's resolution. Tile reading: CLAM's loop
(``read_region`` + ``convert("RGB")`` per tile, the same tiles) against needlework's ``TileDataset`` in a
``DataLoader`` with 0 and 2 workers (worker start-up included: a job pays it once per slide).
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import cv2
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from peers_cases import try_import
from startup import build_slide, cache_dir  # the 16,384² JPEG BigTIFF of the cold-start benchmark

Step = Callable[[], Any]


def bench_slide(size: int) -> Path:
    """The synthetic pyramidal slide of ``benchmarks/startup.py`` (built once, then cached)."""
    path = cache_dir() / f"s{size}" / "slide.tif"
    if not path.is_file():
        print(f"building {path} ...", file=sys.stderr, flush=True)
        build_slide(size, path)
    return path


# -- CLAM's steps, with OpenCV ------------------------------------------------------------------------
def clam_segment(rgb: np.ndarray, sthresh: int = 8, mthresh: int = 7, close: int = 4) -> np.ndarray:
    """Binary tissue mask (uint8 0/255) of an RGB thumbnail: saturation, median blur, threshold, close."""
    sat = cv2.cvtColor(rgb, cv2.COLOR_RGB2HSV)[..., 1]
    sat = cv2.medianBlur(sat, mthresh)
    _, mask = cv2.threshold(sat, sthresh, 255, cv2.THRESH_BINARY)
    if close > 0:
        mask = cv2.morphologyEx(mask, cv2.MORPH_CLOSE, np.ones((close, close), np.uint8))
    return mask


def clam_contours(
    mask: np.ndarray, downsample: float, a_t: float = 100, a_h: float = 16, max_holes: int = 8
) -> list[tuple[np.ndarray, list[np.ndarray]]]:
    """Tissue pieces with their holes, in level-0 pixels, after the area filters (areas in 512² patches)."""
    contours, hierarchy = cv2.findContours(mask, cv2.RETR_CCOMP, cv2.CHAIN_APPROX_NONE)
    if hierarchy is None:
        return []
    hierarchy = hierarchy[0]
    ref_area = 512**2 / downsample**2  # one 512² level-0 patch, in thumbnail pixels
    pieces = []
    for i in np.flatnonzero(hierarchy[:, 3] == -1):  # outer contours: no parent
        holes = list(np.flatnonzero(hierarchy[:, 3] == i))
        hole_areas = [cv2.contourArea(contours[j]) for j in holes]
        if cv2.contourArea(contours[i]) - sum(hole_areas) < a_t * ref_area:
            continue
        kept = sorted((a, j) for a, j in zip(hole_areas, holes) if a > a_h * ref_area)[::-1][:max_holes]
        scale = lambda c: (c * downsample).astype(np.int32)  # noqa: E731
        pieces.append((scale(contours[i]), [scale(contours[j]) for _, j in kept]))
    return pieces


def clam_grid(pieces: list[tuple[np.ndarray, list[np.ndarray]]], patch: int = 256) -> np.ndarray:
    """Level-0 top-left corners ``(N, 2)`` of the patches kept by the four-point test."""
    shift = patch // 4  # half-way from the centre to the corners
    out = []
    for contour, holes in pieces:
        x0, y0, w, h = cv2.boundingRect(contour)
        for y in range(y0, y0 + h, patch):
            for x in range(x0, x0 + w, patch):
                cx, cy = x + patch // 2, y + patch // 2
                points = ((cx - shift, cy - shift), (cx + shift, cy - shift),
                          (cx - shift, cy + shift), (cx + shift, cy + shift))  # fmt: skip
                if not any(cv2.pointPolygonTest(contour, (float(px), float(py)), False) >= 0
                           for px, py in points):  # fmt: skip
                    continue
                if any(cv2.pointPolygonTest(hole, (float(cx), float(cy)), False) > 0 for hole in holes):
                    continue
                out.append((x, y))
    return np.asarray(out, np.int64).reshape(-1, 2)


def clam_tiling(slide: Any, downsample: float = 64, patch: int = 256, a_t: float = 100) -> np.ndarray:
    """CLAM's segmentation + patching on an open ``openslide.OpenSlide``: level-0 patch corners."""
    level = slide.get_best_level_for_downsample(downsample)
    ds = slide.level_downsamples[level]
    rgb = np.asarray(slide.read_region((0, 0), level, slide.level_dimensions[level]).convert("RGB"))
    return clam_grid(clam_contours(clam_segment(rgb), ds, a_t=a_t), patch)


# -- the cases ----------------------------------------------------------------------------------------
def tile_overlap(a: np.ndarray, b: np.ndarray, patch: int = 256, cell: int = 16) -> float:
    """Intersection over union of the areas two sets of ``patch``² tiles cover (level-0 corners ``(N, 2)``),
    rasterised on ``cell``-px cells (corners need not lie on the same grid: CLAM's start at each piece)."""
    if len(a) == 0 and len(b) == 0:
        return 1.0
    corners = np.concatenate([a, b]).reshape(-1, 2)
    side = (corners.max(0) + patch) // cell + 1
    masks = []
    for tiles in (a, b):
        mask = np.zeros((int(side[1]), int(side[0])), bool)
        for x, y in (np.asarray(tiles).reshape(-1, 2) // cell).tolist():
            mask[y : y + patch // cell, x : x + patch // cell] = True
        masks.append(mask)
    return float((masks[0] & masks[1]).sum() / max(1, (masks[0] | masks[1]).sum()))


def tiling_case(
    step: str, size: int = 16384, seg_um: float = 4.0, workers: int = 0
) -> tuple[Step, Step | None, dict[str, Any]]:
    """``step="segment"``: segmentation + grid; ``"read"``: reading needlework's kept tiles.

    Both sides read the same OpenSlide file; without ``openslide-python`` the peer is skipped and our side
    is timed through tiffslide.
    """
    import torch
    from torch.utils.data import DataLoader

    from needlework.slides.embed import TileDataset
    from needlework.slides.reader import open_slide
    from needlework.slides.tiling import TilingConfig, tile_slide
    from needlework.slides.tissue import TissueParams

    if step not in ("segment", "read"):
        raise ValueError(f"step must be 'segment' or 'read', got {step!r}")
    torch.set_num_threads(1)
    openslide, reason = try_import("openslide")
    reader = "openslide" if openslide is not None else "tiffslide"
    path = bench_slide(size)
    ours_slide = open_slide(path, reader)
    config = TilingConfig(target_mpp=ours_slide.mpp, patch_size=256)
    params = TissueParams(seg_mpp=seg_um)
    a_t = 100 * min(1.0, (size / 16384) ** 2)  # CLAM's default, scaled down only for --quick's small slide
    info: dict[str, Any] = {"slide_side": size, "reader": reader, "opencv": cv2.__version__, "clam_a_t": a_t}
    if reason:
        info["skipped"] = reason
    peer_slide = openslide.OpenSlide(str(path)) if openslide is not None else None
    coords = tile_slide(ours_slide, config, params).coords
    if step == "segment":
        clam_ds = seg_um / ours_slide.mpp  # the peer segments at the same resolution as ours

        def ours_step() -> None:
            tile_slide(ours_slide, config, params)

        def peer_step() -> None:
            clam_tiling(peer_slide, clam_ds, a_t=a_t)

        info["tiles_ours"] = len(coords)
        if peer_slide is not None:
            peer_tiles = clam_tiling(peer_slide, clam_ds, a_t=a_t)
            level = peer_slide.get_best_level_for_downsample(clam_ds)
            info.update(tiles_peer=len(peer_tiles), tile_iou=round(tile_overlap(coords, peer_tiles), 4),
                        clam_level_downsample=float(peer_slide.level_downsamples[level]))  # fmt: skip
        return ours_step, (peer_step if peer_slide is not None else None), info

    info["tiles"] = len(coords)
    dataset = TileDataset(path, coords, 256, 256, reader)

    def ours_read() -> None:
        loader = DataLoader(dataset, batch_size=64, num_workers=workers)
        if sum(len(batch[1]) for batch in loader) != len(coords):
            raise RuntimeError("the DataLoader lost tiles")

    def peer_read() -> None:
        for x, y in coords.tolist():
            np.asarray(peer_slide.read_region((x, y), 0, (256, 256)).convert("RGB"))

    if peer_slide is not None:
        mid = len(coords) // 2
        x, y = coords[mid].tolist()
        theirs = np.asarray(peer_slide.read_region((x, y), 0, (256, 256)).convert("RGB"))
        info["pixels_equal"] = bool(np.array_equal(dataset[mid][0].numpy(), theirs))
    return ours_read, (peer_read if peer_slide is not None else None), info
