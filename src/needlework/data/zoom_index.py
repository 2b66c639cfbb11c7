"""Parent → children index of tiles cut at several magnifications, from their level-0 coordinates.

Level 0 is the **lowest** magnification (largest level-0 footprint ``S_0``); level ``l`` has footprint
``S_l`` with integer factors ``f_l = S_{l-1} / S_l ≥ 2``. Every level-0 tile owns a regular
``F_l × F_l`` block of *slots* at level ``l`` (``F_l = f_1 ⋯ f_l``), laid out **depth-first** as ZoomMIL
and :mod:`needlework.data.planted_bags` expect: the ``f_l²`` children of slot ``i`` of level ``l − 1`` are
slots ``i·f_l² … i·f_l² + f_l² − 1`` of level ``l``, row-major within their parent. A level-``l`` tile is put
in the slot whose level-0 extent contains the tile's **centre**, so tiling grids whose origins differ
between magnifications are handled; slots without a tile (tissue filtering) get row ``−1``. Tiles whose
centre lies in no level-0 tile ("orphans") are left out and counted; when two tiles fall into one slot
(irregular grids) the one whose centre is nearest the slot centre is kept and the other counted.

Example:
    >>> import numpy as np
    >>> idx = build_zoom_index([np.array([[0, 0]]), np.array([[64, 0], [0, 64]])], [128, 64])
    >>> idx.rows[1].tolist(), idx.slot_coords[1].tolist()
    ([-1, 0, 1, -1], [[0, 0], [64, 0], [0, 64], [64, 64]])
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np


@dataclass
class ZoomIndex:
    """Per level ``l``: ``rows[l]`` ``(N_0·F_l²,)`` int64 — the tile (row of level ``l``'s own arrays) in
    each slot or −1; ``slot_coords[l]`` ``(N_0·F_l², 2)`` int64 level-0 top-left ``(x, y)`` of each slot
    (the tile's own coordinates where a tile fills it); ``factors[l]`` = ``f_l`` (``factors[0] = 1``).
    ``orphans[l]`` / ``collisions[l]``: tiles of level ``l`` left out (see the module docstring)."""

    rows: list[np.ndarray]
    slot_coords: list[np.ndarray]
    factors: list[int]
    orphans: list[int] = field(default_factory=list)
    collisions: list[int] = field(default_factory=list)


def level_factors(sizes: Sequence[int], names: Sequence[str] | None = None) -> list[int]:
    """Integer factors ``[1, f_1, …]`` between successive footprints; clear errors otherwise."""
    names = list(names) if names is not None else [f"level {i}" for i in range(len(sizes))]
    if len(sizes) < 1 or any(int(s) <= 0 for s in sizes):
        raise ValueError(f"patch sizes (level-0 pixels) must be positive, got {list(sizes)}")
    factors = [1]
    for lo, hi, a, b in zip(sizes[:-1], sizes[1:], names[:-1], names[1:]):
        if hi >= lo:
            raise ValueError(
                f"magnification levels must be ordered from low to high magnification: {a} has tiles of "
                f"{lo} level-0 px but the next one, {b}, has {hi} (give the lowest magnification first)"
            )
        if lo % hi:
            raise ValueError(
                f"tiles of {a} ({lo} level-0 px) and {b} ({hi} level-0 px) do not nest: the factor "
                f"{lo / hi:g} is not an integer (tile every magnification with the same --tiling.patch_size)"
            )
        factors.append(lo // hi)
    return factors


def _find_parents(parents: np.ndarray, size: int, centres2: np.ndarray) -> np.ndarray:
    """Index of the level-0 tile (top-left ``parents`` (N, 2), side ``size``) containing each doubled
    centre ``centres2`` (M, 2) (= 2·top-left + side, integer), or −1."""
    out = np.full(len(centres2), -1, np.int64)
    if len(parents) == 0 or len(centres2) == 0:
        return out
    origin = parents[0] % size
    if np.all((parents - origin) % size == 0):  # a regular grid: look the cell up
        cells = (parents - origin) // size
        cx = (centres2 - 2 * origin) // (2 * size)
        lo = np.minimum(cells.min(0), cx.min(0))
        span = np.maximum(cells.max(0), cx.max(0)) - lo + 1
        key_p = (cells[:, 1] - lo[1]) * span[0] + (cells[:, 0] - lo[0])
        key_c = (cx[:, 1] - lo[1]) * span[0] + (cx[:, 0] - lo[0])
        order = np.argsort(key_p, kind="stable")
        pos = np.clip(np.searchsorted(key_p[order], key_c), 0, len(order) - 1)
        hit = key_p[order][pos] == key_c
        out[hit] = order[pos[hit]]
        return out
    for start in range(0, len(centres2), 2048):  # irregular level 0: containment, chunk by chunk
        c = centres2[start : start + 2048, None, :]
        inside = ((c >= 2 * parents[None]) & (c < 2 * (parents[None] + size))).all(-1)
        found = inside.any(1)
        out[start : start + 2048][found] = inside[found].argmax(1)
    return out


def _depth_first(gy: np.ndarray, gx: np.ndarray, factors: Sequence[int]) -> np.ndarray:
    """Depth-first slot index within a level-0 tile of the cell ``(gy, gx)`` of its ``F × F`` block."""
    index = np.zeros_like(gy)
    below = int(np.prod(factors))
    for f in factors:
        below //= f
        digit = (gy // below % f) * f + gx // below % f
        index = index * f * f + digit
    return index


def _slot_offsets(factors: Sequence[int]) -> np.ndarray:
    """``(F², 2)`` ``(x, y)`` cell offsets (in units of the level's tile) of each depth-first slot."""
    side = int(np.prod(factors))
    gy, gx = np.meshgrid(np.arange(side), np.arange(side), indexing="ij")
    order = _depth_first(gy.ravel(), gx.ravel(), factors)
    offsets = np.empty((side * side, 2), np.int64)
    offsets[order] = np.stack([gx.ravel(), gy.ravel()], 1)
    return offsets


def build_zoom_index(
    coords: Sequence[np.ndarray], sizes: Sequence[int], names: Sequence[str] | None = None
) -> ZoomIndex:
    """Slots of every level (see the module docstring).

    Args:
        coords: per level, ``(N_l, 2)`` level-0 top-left ``(x, y)``, lowest magnification first.
        sizes: per level, the tile side in level-0 pixels (``patch_size_level0``).
        names: per level, a name for error messages (e.g. the features file).
    """
    if len(coords) != len(sizes):
        raise ValueError(f"got {len(coords)} coordinate arrays but {len(sizes)} patch sizes")
    factors = level_factors([int(s) for s in sizes], names)
    parents = np.asarray(coords[0], np.int64).reshape(-1, 2)
    n0 = len(parents)
    index = ZoomIndex([np.arange(n0, dtype=np.int64)], [parents.copy()], factors, [0], [0])
    s0 = int(sizes[0])
    for level in range(1, len(coords)):
        s = int(sizes[level])
        per_parent = (s0 // s) ** 2
        tiles = np.asarray(coords[level], np.int64).reshape(-1, 2)
        centres2 = 2 * tiles + s
        parent = _find_parents(parents, s0, centres2)
        ok = parent >= 0
        cell = (centres2[ok] - 2 * parents[parent[ok]]) // (2 * s)  # (x, y) cell in the parent's block
        slot = parent[ok] * per_parent + _depth_first(cell[:, 1], cell[:, 0], factors[1 : level + 1])
        offsets = _slot_offsets(factors[1 : level + 1])
        slot_coords = (parents[:, None, :] + offsets[None] * s).reshape(-1, 2)
        # nearest centre first, so that np.unique keeps the best tile of a slot
        tile_ids = np.flatnonzero(ok)
        dist = np.abs(centres2[ok] - (2 * slot_coords[slot] + s)).sum(1)
        order = np.lexsort((dist, slot))
        first = np.unique(slot[order], return_index=True)[1]
        keep_slot, keep_tile = slot[order][first], tile_ids[order][first]
        rows = np.full(n0 * per_parent, -1, np.int64)
        rows[keep_slot] = keep_tile
        slot_coords[keep_slot] = tiles[keep_tile]
        index.rows.append(rows)
        index.slot_coords.append(slot_coords)
        index.orphans.append(int((~ok).sum()))
        index.collisions.append(int(ok.sum() - len(keep_slot)))
    return index
