"""Index-based zooming for multi-magnification bags (ZoomMIL, METHODS.md §7).

Bags are stored depth-first: the ``r`` children of instance ``i`` of level ``l − 1`` are rows
``i·r … i·r + r − 1`` of level ``l``. Zooming keeps the children of the selected parents only. The reference
builds ``kron(Ŷ, I_r)`` — a dense ``(K·r) × (N·r)`` matrix — and multiplies it with every child; here the
current rows of a level are kept as sparse mixtures of original instances (:class:`ZoomRows`):

    row i = Σ_t weight[b, i, t] · x_orig[b, index[b, i, t]]

Selecting with soft indicators ``Ŷ`` ``(B, K, R)`` keeps only the non-zero entries of each row of ``Ŷ``
(its support), and taking children maps ``index → index·r + j``, so only the features of children that
carry weight are ever read — or embedded, when children are embedded on the fly (:class:`TensorTiles`).
Hard selection (one-hot ``Ŷ``) gives mixtures of one term: a plain gather.

Example:
    >>> import torch
    >>> rows = ZoomRows.identity(1, 3)                      # three level-0 instances
    >>> y = torch.tensor([[[0.0, 1.0, 0.0], [0.0, 0.0, 1.0]]])  # select instances 1 and 2
    >>> rows.select(y).children(2).index.flatten().tolist()  # their children at level 1
    [2, 3, 4, 5]
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch

from needlework.checks import check_shape


@dataclass
class ZoomRows:
    """Current rows of a level as mixtures of original instances.

    Attributes:
        weight: ``(B, R, m)`` mixture weights.
        index: ``(B, R, m)`` int64 original row indices at this level.
    """

    weight: torch.Tensor
    index: torch.Tensor

    @classmethod
    def identity(cls, batch: int, n: int, device: torch.device | None = None) -> ZoomRows:
        """Every original instance as its own row."""
        index = torch.arange(n, device=device).expand(batch, n).unsqueeze(-1).contiguous()
        return cls(torch.ones(batch, n, 1, device=device), index)

    @property
    def rows(self) -> int:
        return self.index.shape[1]

    def select(self, indicators: torch.Tensor) -> ZoomRows:
        """Rows ``k`` = ``Σ_n Ŷ[b, k, n] · row_n`` for indicators ``(B, K, R)`` (soft or one-hot)."""
        b, k, r = check_shape(indicators, ["B", "K", "R"], "indicators").values()
        if r != self.rows:
            raise ValueError(f"indicators select among {r} rows but the level has {self.rows}")
        support = int((indicators != 0).sum(-1).max().clamp(min=1))  # widest row of Ŷ
        vals, cols = indicators.topk(support, dim=-1)  # (B, K, P); zeros beyond a row's support
        m = self.weight.shape[-1]
        gather = cols.reshape(b, k * support, 1).expand(-1, -1, m)
        weight = torch.gather(self.weight, 1, gather).view(b, k, support, m) * vals[..., None]
        index = torch.gather(self.index, 1, gather).view(b, k, support, m)
        return ZoomRows(weight.reshape(b, k, support * m), index.reshape(b, k, support * m))

    def children(self, r: int) -> ZoomRows:
        """The ``r`` children of every row, depth-first: ``(B, R·r, m)``."""
        b, rows, m = self.index.shape
        j = torch.arange(r, device=self.index.device).view(1, 1, r, 1)
        index = self.index.unsqueeze(2) * r + j
        weight = self.weight.unsqueeze(2).expand(b, rows, r, m)
        return ZoomRows(weight.reshape(b, rows * r, m), index.reshape(b, rows * r, m))

    def gather(self, features: torch.Tensor) -> torch.Tensor:
        """Mix original ``features`` ``(B, N, D)`` (or ``(B, N)``) into the rows: ``(B, R, D)``."""
        squeeze = features.dim() == 2
        f = features.unsqueeze(-1) if squeeze else features
        b, rows, m = self.index.shape
        picked = torch.gather(f, 1, self.index.reshape(b, rows * m, 1).expand(-1, -1, f.shape[-1]))
        out = (picked.view(b, rows, m, -1) * self.weight.unsqueeze(-1).to(f.dtype)).sum(2)
        return out.squeeze(-1) if squeeze else out

    def dominant(self) -> torch.Tensor:
        """The original index carrying the largest weight in each row, ``(B, R)``."""
        top = self.weight.argmax(dim=-1, keepdim=True)
        return torch.gather(self.index, 2, top).squeeze(-1)

    def used(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Original instances that carry weight: ``(batch_idx (U,), index (U,), inverse (B, R, m))``;
        ``inverse`` points every term at its unique instance (``U`` for zero-weight terms)."""
        b = self.index.shape[0]
        n = int(self.index.max()) + 1
        live = self.weight != 0
        keys = torch.arange(b, device=self.index.device).view(b, 1, 1) * n + self.index
        unique, inverse = torch.unique(keys[live], return_inverse=True)
        full = torch.full_like(self.index, len(unique))
        full[live] = inverse
        return unique // n, unique % n, full


class ChildTiles(Protocol):
    """Source of child tiles for on-the-fly embedding: ``gather(batch_idx (U,), index (U,))`` returns the
    pixels ``(U, C, H, W)`` of instances ``index`` of bags ``batch_idx`` (e.g. read from a slide)."""

    def gather(self, batch_idx: torch.Tensor, index: torch.Tensor) -> torch.Tensor: ...


class TensorTiles:
    """:class:`ChildTiles` over an in-memory tensor ``(B, N, C, H, W)``."""

    def __init__(self, tiles: torch.Tensor) -> None:
        check_shape(tiles, ["B", "N", "C", "H", "W"], "tiles")
        self.tiles = tiles

    def __len__(self) -> int:
        return self.tiles.shape[1]

    def gather(self, batch_idx: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        return self.tiles[batch_idx, index]


def embed_rows(rows: ZoomRows, source: ChildTiles, encoder: torch.nn.Module) -> tuple[torch.Tensor, int]:
    """Embed only the original instances the rows use and mix them: ``(B, R, D)`` and the number of
    instances embedded."""
    batch_idx, index, inverse = rows.used()
    feats = encoder(source.gather(batch_idx, index))  # (U, D)
    feats = torch.cat([feats, feats.new_zeros(1, feats.shape[-1])])  # zero row for zero-weight terms
    b, r, m = rows.index.shape
    mixed = (feats[inverse.reshape(-1)].view(b, r, m, -1) * rows.weight.unsqueeze(-1)).sum(2)
    return mixed, len(index)
