"""Fast, low-memory writer of large synthetic pyramidal TIFF slides for ``slide_selection.py``.

Tissue is defined on a coarse grid of cells of ``CELL`` level-0 pixels (one cell = one level-0 tile):
a few ellipses given in fractions of the slide side, so the tissue fraction (~10 %) and the relative
layout are the same at every slide size. A tissue cell shows one of ``N_TEXTURES`` precomputed pink
textured tiles (crops of ``skimage.data.immunohistochemistry``, tinted), chosen by ``(row + col) % K``;
a glass cell is flat near-white. Level ``L`` of a cell is the ``2^L`` box mean of its level-0 tile, so the
pyramid is consistent at every level (levels halve until the longest side is ≤ ``min_side``).

Tiles are JPEG-encoded once per distinct content (keyed by the cell pattern they cover: at level 0
there are only ``K + 1`` distinct tiles) and handed to tifffile as a generator of pre-encoded bytes,
with exactly the codec settings tifffile itself uses for ``compression="jpeg", photometric="rgb"``
(YCbCr, 2×2 chroma subsampling). Memory stays at a few tiles; time is dominated by the file writes.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np

CELL = 256  # level-0 pixels per tissue-grid cell, equal to the tile side
N_TEXTURES = 4
GLASS = 242
# (cx, cy, rx, ry, angle) in fractions of the slide side; areas sum to ≈ 10 % of the slide
ELLIPSES = ((0.30, 0.35, 0.17, 0.10, 0.5), (0.68, 0.62, 0.13, 0.09, -0.9), (0.45, 0.80, 0.07, 0.045, 0.2))
_TINT = np.array([0.92, 0.68, 0.85])
JPEG_ARGS = {"level": 90, "subsampling": (2, 2), "colorspace": "RGB", "outcolorspace": "YCBCR"}


def tissue_cells(side: int) -> np.ndarray:
    """Bool ``(n, n)`` grid, ``n = ceil(side / CELL)``: cell centres inside one of :data:`ELLIPSES`."""
    n = -(-side // CELL)
    centre = (np.arange(n) + 0.5) * CELL / side  # cell centres in fractions of the side
    ys, xs = np.meshgrid(centre, centre, indexing="ij")
    mask = np.zeros((n, n), bool)
    for cx, cy, rx, ry, a in ELLIPSES:
        u = np.cos(a) * (xs - cx) + np.sin(a) * (ys - cy)
        v = -np.sin(a) * (xs - cx) + np.cos(a) * (ys - cy)
        mask |= (u / rx) ** 2 + (v / ry) ** 2 <= 1
    return mask


def cell_index(side: int) -> np.ndarray:
    """Int ``(n, n)``: the texture of each cell (``0..K-1``) or ``K`` for glass."""
    mask = tissue_cells(side)
    n = mask.shape[0]
    rows, cols = np.indices((n, n))
    return np.where(mask, (rows + cols) % N_TEXTURES, N_TEXTURES).astype(np.int16)


def base_tiles() -> np.ndarray:
    """``(K + 1, CELL, CELL, 3)`` uint8 level-0 tiles: ``K`` pink textures, then glass."""
    from skimage import data

    ihc = data.immunohistochemistry().astype(np.float32) * _TINT  # (512, 512, 3)
    crops = [ihc[:CELL, :CELL], ihc[:CELL, CELL:], ihc[CELL:, :CELL], ihc[CELL:, CELL:]]
    tiles = np.clip(np.stack(crops[:N_TEXTURES]), 0, 255).astype(np.uint8)
    glass = np.full((1, CELL, CELL, 3), GLASS, np.uint8)
    return np.concatenate([tiles, glass])


def box_mean(tiles: np.ndarray, f: int) -> np.ndarray:
    """``f × f`` box mean of ``(..., h, w, 3)`` uint8 (rounded), ``h`` and ``w`` multiples of ``f``."""
    *lead, h, w, c = tiles.shape
    t = tiles.reshape(*lead, h // f, f, w // f, f, c).astype(np.float32)
    return np.rint(t.mean(axis=(-4, -2))).astype(np.uint8)


def level_sizes(side: int, min_side: int = 512) -> list[int]:
    """Sides of the levels: halving (floor) until ≤ ``min_side``."""
    sizes = [side]
    while sizes[-1] > min_side:
        sizes.append(sizes[-1] // 2)
    return sizes


def level_tile(index: np.ndarray, tiles: np.ndarray, level: int, ty: int, tx: int) -> np.ndarray:
    """Tile ``(ty, tx)`` of level ``level`` ``(CELL, CELL, 3)``: the box mean of the level-0 cells it
    covers (cells beyond the grid are glass; tifffile crops the image edge)."""
    k = 2**level  # cells per tile side
    n = index.shape[0]
    block = np.full((k, k), N_TEXTURES, np.int16)
    sub = index[ty * k : min((ty + 1) * k, n), tx * k : min((tx + 1) * k, n)]
    block[: sub.shape[0], : sub.shape[1]] = sub
    c = max(1, CELL // k)  # pixels per cell at this level (1 once a tile spans ≥ CELL cells)
    small = tiles if c == CELL else box_mean(tiles, CELL // c)  # (K + 1, c, c, 3)
    out = small[block].transpose(0, 2, 1, 3, 4).reshape(k * c, k * c, 3)
    return out if k * c == CELL else box_mean(out, k * c // CELL)


def _encoded_tiles(index: np.ndarray, tiles: np.ndarray, level: int, side: int) -> Iterator[bytes]:
    import imagecodecs

    k, n = 2**level, index.shape[0]
    nt = -(-side // CELL)
    cache: dict[bytes, bytes] = {}
    for ty in range(nt):
        for tx in range(nt):
            block = index[ty * k : min((ty + 1) * k, n), tx * k : min((tx + 1) * k, n)]
            key = block.tobytes() + str(block.shape).encode()  # glass pads beyond the grid
            enc = cache.get(key)
            if enc is None:
                enc = imagecodecs.jpeg8_encode(level_tile(index, tiles, level, ty, tx), **JPEG_ARGS)
                if len(cache) < 20000:  # bounded: edge-of-tissue tiles are many at fine levels
                    cache[key] = enc
            yield enc


def write_slide(path: str | Path, side: int, mpp: float = 0.25, min_side: int = 512) -> dict[str, float]:
    """Write the ``side × side`` slide to ``path`` (temp name, then rename).

    Returns ``levels``, ``tissue_fraction`` (of the cell grid) and ``seconds``.
    """
    import time

    import tifffile

    if side < CELL:
        raise ValueError(f"side must be >= {CELL}, got {side}")
    start = time.perf_counter()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    index, tiles = cell_index(side), base_tiles()
    sizes = level_sizes(side, min_side)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with tifffile.TiffWriter(tmp, bigtiff=True) as tif:
        for level, s in enumerate(sizes):
            per_cm = 1e4 / (mpp * 2**level)
            tif.write(
                _encoded_tiles(index, tiles, level, s),
                shape=(s, s, 3),
                dtype=np.uint8,
                tile=(CELL, CELL),
                compression="jpeg",
                compressionargs={"level": JPEG_ARGS["level"]},
                photometric="rgb",
                subfiletype=1 if level else 0,
                resolution=(per_cm, per_cm),
                resolutionunit="CENTIMETER",
            )
    os.replace(tmp, path)
    return {
        "levels": len(sizes),
        "tissue_fraction": float((index < N_TEXTURES).mean()),
        "seconds": time.perf_counter() - start,
    }
