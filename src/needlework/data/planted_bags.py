"""Planted feature bags: synthetic "slides" of tile features with a small planted lesion.

METHODS.md §11's "random bags with planted positive instances", with space and magnification: a slide is a
``grid × grid`` map of tiles at the lowest magnification, of which a random ``tissue_fraction`` is tissue.
Each level up multiplies the side by ``scale`` (``r = scale²`` children per parent), up to ``levels``
magnifications. Features are generated at the highest magnification — ``N(0, I_D)`` noise, plus
``signal · u`` on the tiles of a ``lesion_size × lesion_size`` square in positive slides (``u`` a fixed unit
direction) — and every coarser level is the average of its descendants plus fresh noise that restores unit
variance, so the lesion is diluted by its area share at low magnification (what ZoomMIL exploits).

Items: ``bag`` ``(N, D)`` float32 = the **lowest** magnification's tissue tiles (row-major), ``coords``
``(N, 2)`` int64 level-0 top-left ``(x, y)`` (tile side ``tile_size · scale^(levels−1−l)`` at level l),
``label`` (1 = lesion), ``instance_labels`` ``(N,)`` (tile overlaps the lesion), ``index``. With
``levels > 1`` also ``bag_1 … bag_{L−1}`` ``(N·r^l, D)``, ``coords_l`` and ``instance_labels_l``, stored
**depth-first** (the ``r`` children of row ``i`` of level l−1 are rows ``i·r … i·r + r − 1`` of level l,
children row-major), the layout ZoomMIL zooms into (METHODS.md §7.1). Each slide depends only on
``(seed, split, index)``; ``u`` depends only on ``seed``.

Example:
    >>> ds = PlantedBags(split="train", size=4, grid=6, levels=2)
    >>> item = ds[0]; item["bag"].shape[1], item["bag_1"].shape[0] == 4 * item["bag"].shape[0]
    (32, True)
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from needlework.data.mnist import SPLITS
from needlework.registry import register_dataset

_SPLIT_IDS = {s: i for i, s in enumerate(SPLITS)}


def children_order(parents_yx: np.ndarray, scale: int) -> np.ndarray:
    """Depth-first children ``(n·scale², 2)`` ``(y, x)`` of parents ``(n, 2)`` ``(y, x)``."""
    d = np.arange(scale)
    dy, dx = np.meshgrid(d, d, indexing="ij")
    offsets = np.stack([dy.ravel(), dx.ravel()], axis=1)  # row-major within a parent
    return (parents_yx[:, None, :] * scale + offsets[None]).reshape(-1, 2)


@register_dataset("planted_bags")
class PlantedBags(Dataset):
    """Synthetic multi-magnification feature bags with a planted lesion.

    Args:
        split: ``"train"``, ``"val"`` or ``"test"``.
        size: number of slides.
        seed: dataset seed (the lesion direction depends on it only).
        grid: side of the tile map at the lowest magnification.
        levels: number of magnifications.
        scale: side ratio between successive magnifications.
        dim: feature width ``D``.
        tissue_fraction: share of lowest-magnification tiles that are tissue (at least one).
        lesion_size: side of the lesion square in highest-magnification tiles.
        signal: lesion feature shift along ``u`` (in noise standard deviations).
        positive_fraction: share of positive slides.
        tile_size: level-0 pixels of a highest-magnification tile.
    """

    def __init__(
        self,
        split: str = "train",
        size: int = 200,
        seed: int = 0,
        grid: int = 12,
        levels: int = 1,
        scale: int = 2,
        dim: int = 32,
        tissue_fraction: float = 0.6,
        lesion_size: int = 2,
        signal: float = 1.5,
        positive_fraction: float = 0.5,
        tile_size: int = 256,
    ) -> None:
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        if size < 1 or grid < 1 or levels < 1 or scale < 1 or dim < 1 or lesion_size < 1:
            raise ValueError("size, grid, levels, scale, dim and lesion_size must be positive integers")
        if not 0.0 < tissue_fraction <= 1.0 or not 0.0 <= positive_fraction <= 1.0:
            raise ValueError(
                f"tissue_fraction ({tissue_fraction}) must lie in (0, 1] and positive_fraction "
                f"({positive_fraction}) in [0, 1]"
            )
        self.split, self.size, self.seed = split, size, seed
        self.grid, self.levels, self.scale, self.dim = grid, levels, scale, dim
        self.tissue_fraction, self.lesion_size, self.signal = tissue_fraction, lesion_size, signal
        self.positive_fraction, self.tile_size = positive_fraction, tile_size
        self.n_positive = int(round(size * positive_fraction))
        u = np.random.default_rng(np.random.SeedSequence([seed, 99])).standard_normal(dim)
        self.direction = (u / np.linalg.norm(u)).astype(np.float32)

    def __len__(self) -> int:
        return self.size

    @property
    def labels(self) -> np.ndarray:
        return (np.arange(self.size) < self.n_positive).astype(np.int64)

    def generate(self, index: int) -> dict[str, np.ndarray]:
        """Per-level arrays for slide ``index``: ``features_l``, ``yx_l`` (grid cells) and ``lesion_l``."""
        rng = np.random.default_rng(np.random.SeedSequence([self.seed, _SPLIT_IDS[self.split], index]))
        g, s, levels = self.grid, self.scale, self.levels
        fine = g * s ** (levels - 1)
        n_tissue = max(1, int(round(self.tissue_fraction * g * g)))
        tissue = np.zeros(g * g, dtype=bool)
        tissue[rng.choice(g * g, size=n_tissue, replace=False)] = True
        tissue = tissue.reshape(g, g)
        lesion = np.zeros((fine, fine), dtype=bool)
        if index < self.n_positive:
            fine_tissue = np.kron(tissue, np.ones((s ** (levels - 1),) * 2, dtype=bool))
            side = min(self.lesion_size, fine)
            # top-left corners whose whole square is tissue (else a single tissue tile)
            ok = np.lib.stride_tricks.sliding_window_view(fine_tissue, (side, side)).all(axis=(2, 3))
            corners = np.argwhere(ok) if ok.any() else np.argwhere(fine_tissue)
            y, x = corners[rng.integers(len(corners))]
            side = side if ok.any() else 1
            lesion[y : y + side, x : x + side] = True
        feats = rng.standard_normal((fine, fine, self.dim)).astype(np.float32)
        feats += self.signal * lesion[..., None] * self.direction
        out: dict[str, np.ndarray] = {}
        yx = np.argwhere(tissue)  # row-major
        for level in range(levels):
            factor = s ** (levels - 1 - level)
            if level > 0:
                yx = children_order(yx, s)
            side = fine // factor
            pooled = feats.reshape(side, factor, side, factor, self.dim).mean(axis=(1, 3))
            if factor > 1:  # restore unit noise variance after averaging factor² tiles
                pooled += np.sqrt(1 - 1 / factor**2) * rng.standard_normal(pooled.shape).astype(np.float32)
            hit = lesion.reshape(side, factor, side, factor).any(axis=(1, 3))
            out[f"features_{level}"] = pooled[yx[:, 0], yx[:, 1]]
            out[f"yx_{level}"] = yx
            out[f"lesion_{level}"] = hit[yx[:, 0], yx[:, 1]]
        return out

    def __getitem__(self, index: int) -> dict[str, Any]:
        if not -len(self) <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} slides")
        index %= len(self)
        data = self.generate(index)
        item: dict[str, Any] = {"label": int(index < self.n_positive), "index": index}
        for level in range(self.levels):
            tile = self.tile_size * self.scale ** (self.levels - 1 - level)
            suffix = "" if level == 0 else f"_{level}"
            item[f"bag{suffix}"] = torch.from_numpy(data[f"features_{level}"])
            item[f"coords{suffix}"] = torch.from_numpy(data[f"yx_{level}"][:, ::-1] * tile).long()
            item[f"instance_labels{suffix}"] = torch.from_numpy(data[f"lesion_{level}"].astype(np.int64))
        return item
