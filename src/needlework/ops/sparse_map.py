"""Sparse maps from tile coordinates: tiles → integer sites, with features averaged per site.

SparseConvMIL (METHODS.md §9.1) places each tile at site ``(⌊(y − y_min)/d⌋, ⌊(x − x_min)/d⌋)`` of its
bag, ``d`` = ``cell_size`` in level-0 pixels (``coords`` are ``(x, y)``, CONVENTIONS.md §2.1). Tiles that
land on the same site are averaged (scatter-mean); :attr:`SparseMap.collision_rate` reports how often.

Example:
    >>> import torch
    >>> coords = torch.tensor([[[0, 0], [256, 0], [300, 10], [0, 512]]])
    >>> smap = coords_to_sites(coords, torch.ones(1, 4, dtype=torch.bool), cell_size=256)
    >>> smap.sites.tolist()              # (b, y, x); tiles 1 and 2 share site (0, 1)
    [[0, 0, 0], [0, 0, 1], [0, 2, 0]]
    >>> smap.instance_site.tolist()
    [[0, 1, 1, 2]]
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from needlework.checks import check_shape


@dataclass
class SparseMap:
    """Active sites of a batch of bags.

    Attributes:
        sites: ``(S, 3)`` int64 ``(b, y, x)``, unique, sorted.
        instance_site: ``(B, N)`` int64, the site row of each instance (−1 at padding).
        batch_size: ``B``.
    """

    sites: torch.Tensor
    instance_site: torch.Tensor
    batch_size: int

    @property
    def batch_index(self) -> torch.Tensor:
        """Bag of each site, ``(S,)``."""
        return self.sites[:, 0]

    @property
    def collision_rate(self) -> float:
        """Fraction of real instances that share their site with an earlier instance."""
        real = int((self.instance_site >= 0).sum())
        return 1.0 - len(self.sites) / max(real, 1)

    def site_counts(self, weights: torch.Tensor | None = None) -> torch.Tensor:
        """Number (or total ``weights`` ``(B, N)``) of instances on each site, ``(S,)``."""
        valid = self.instance_site >= 0
        w = None if weights is None else weights[valid]
        return torch.bincount(self.instance_site[valid], weights=w, minlength=len(self.sites))

    def scatter_mean(self, features: torch.Tensor, weights: torch.Tensor | None = None) -> torch.Tensor:
        """Average the instance features ``(B, N, D)`` of each site → ``(S, D)``, optionally weighted
        by ``weights`` ``(B, N)`` (e.g. how often a tile was sampled)."""
        valid = self.instance_site >= 0
        idx, f = self.instance_site[valid], features[valid]
        if weights is not None:
            f = f * weights[valid].to(f.dtype)[:, None]
        sums = features.new_zeros(len(self.sites), features.shape[-1]).index_add(0, idx, f)
        return sums / self.site_counts(weights).clamp(min=1e-12).to(features.dtype)[:, None]


def coords_to_sites(coords: torch.Tensor, mask: torch.Tensor | None, cell_size: float) -> SparseMap:
    """Map instance coordinates ``(B, N, 2)`` ``(x, y)`` to the sites of a sparse map.

    Args:
        coords: ``(B, N, 2)`` level-0 ``(x, y)`` (int or float, e.g. after augmentation).
        mask: ``(B, N)`` bool, True = real instance (None = all real).
        cell_size: side of a site in the units of ``coords`` (the downsampling factor ``d``).
    """
    check_shape(coords, ["B", "N", "2"], "coords")
    b, n = coords.shape[:2]
    if cell_size <= 0:
        raise ValueError(f"cell_size must be positive, got {cell_size}")
    if mask is None:
        mask = torch.ones(b, n, dtype=torch.bool, device=coords.device)
    c = coords.double()
    origin = c.masked_fill(~mask[..., None], float("inf")).amin(dim=1, keepdim=True)  # per bag (x, y)
    cell = torch.floor((c - origin) / cell_size).long()  # (B, N, 2) as (x, y)
    bag = torch.arange(b, device=coords.device)[:, None].expand(b, n)
    rows = torch.stack([bag[mask], cell[..., 1][mask], cell[..., 0][mask]], dim=1)  # (b, y, x)
    sites, inverse = torch.unique(rows, dim=0, return_inverse=True)
    instance_site = torch.full((b, n), -1, dtype=torch.long, device=coords.device)
    instance_site[mask] = inverse
    return SparseMap(sites=sites, instance_site=instance_site, batch_size=b)


def sample_instances(
    mask: torch.Tensor, k: int, replacement: bool = False, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Draw ``k`` real instances per bag; returns how often each was drawn, ``(B, N)`` float.

    Without replacement a bag with fewer than ``k`` real instances keeps them all; with replacement
    (SparseConvMIL's reference) counts follow a multinomial over the real instances.
    """
    if k < 1:
        raise ValueError(f"k must be positive, got {k}")
    if replacement:
        draws = torch.multinomial(mask.float(), k, replacement=True, generator=generator)
        ones = torch.ones(draws.shape, device=mask.device)
        return torch.zeros(mask.shape, device=mask.device).scatter_add_(1, draws, ones)
    keys = torch.rand(mask.shape, generator=generator, device=mask.device).masked_fill(~mask, -1.0)
    rank = keys.argsort(dim=1, descending=True).argsort(dim=1)
    return ((rank < k) & mask).float()
