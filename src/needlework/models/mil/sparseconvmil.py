"""SparseConvMIL (Lerousseau et al., MICCAI COMPAY 2021) on tile features (METHODS.md §9).

0. Optionally standardise the tile features (``input_norm``, :class:`~needlework.models.mil.common.
   MaskedStandardize`): needed for raw features like ``color_stats``, whose few lesion tiles otherwise
   vanish in the global mean.
1. Optionally (training only) sample ``tiles_per_bag`` tiles per bag, without replacement by default or
   with replacement as the reference (a tile drawn twice counts twice in its site's mean).
2. Optionally augment the tile coordinates (training only): translation by up to one site, rotation in
   radians (or right angles), flips, per-axis scaling — :func:`needlework.ops.coord_augment.augment_coords`.
3. Sparse map: tile at level-0 ``(x, y)`` → site ``⌊(· − min)/cell_size⌋``; tiles sharing a site are
   averaged (:func:`needlework.ops.sparse_map.coords_to_sites`).
4. Submanifold sparse convolutions (``SubMConv → ReLU`` per entry of ``channels``), gather + matmul by
   default (:mod:`needlework.ops.sparse_conv`), ``backend="spconv"`` optionally.
5. Sparse global average pooling over each bag's active sites; ``Linear → ReLU → Linear`` classifier.

``attention`` is each tile's weight in the global mean, ``1 / (n_sites · tiles on its site)``;
``collision_rate`` is the fraction of tiles averaged into an already occupied site. The model is
permutation invariant (a bag is a set of (coordinate, feature) pairs) but needs ``coords``.

Example:
    >>> import torch, needlework
    >>> model = needlework.create_model("sparseconvmil", in_dim=16, num_classes=2, cell_size=256)
    >>> coords = torch.randint(0, 10, (2, 30, 2)) * 256
    >>> model(torch.randn(2, 30, 16), coords)["logits"].shape
    torch.Size([2, 2])
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from needlework.models.mil.common import MaskedStandardize, MILModel, register_mil_model
from needlework.ops.coord_augment import augment_coords
from needlework.ops.rulebook import rulebook
from needlework.ops.sparse_conv import SubmanifoldConv2d, neighbor_table, sparse_global_mean
from needlework.ops.sparse_map import coords_to_sites, sample_instances


class SparseConvMIL(MILModel):
    """Sparse-convolutional MIL over a sparse map of tile features.

    Args:
        in_dim: feature width ``D``.
        num_classes: number of classes ``C``.
        cell_size: site side ``d`` in the units of ``coords`` (level-0 pixels; e.g. the tile stride
            for one tile per site).
        channels: output channels of the successive submanifold convolutions (reference: 2 × 32).
        kernel_size: odd kernel side.
        classifier_hidden: hidden width of the classifier (32 in the reference).
        dropout: dropout before the classifier.
        backend: ``"torch"`` (gather + matmul) or ``"spconv"``.
        conv_method: torch backend path, ``"auto"``, ``"rulebook"``, ``"im2col"`` or ``"dense"``
            (:func:`needlework.ops.sparse_conv.submanifold_conv2d`).
        augment: apply the coordinate augmentation in training mode.
        rotation: ``"uniform"`` (radians), ``"right_angles"`` or ``"none"``.
        flip: random axis flips.
        scale: per-axis scale range, None = none (reference: (0.7, 1.3)).
        translate: random translation up to one ``cell_size``.
        tiles_per_bag: tiles sampled per bag in training (None = all; evaluation always uses all).
        sample_with_replacement: sample with replacement (reference) instead of without.
        input_norm: standardise the features of the real tiles first (running statistics in evaluation).
    """

    def __init__(
        self,
        in_dim: int,
        num_classes: int = 2,
        cell_size: float = 256.0,
        channels: Sequence[int] = (32, 32),
        kernel_size: int = 3,
        classifier_hidden: int = 32,
        dropout: float = 0.0,
        backend: str = "torch",
        augment: bool = True,
        rotation: str = "uniform",
        flip: bool = True,
        scale: tuple[float, float] | None = (0.7, 1.3),
        translate: bool = True,
        tiles_per_bag: int | None = None,
        sample_with_replacement: bool = False,
        input_norm: bool = False,
        conv_method: str = "auto",
    ) -> None:
        super().__init__(in_dim, num_classes)
        if cell_size <= 0:
            raise ValueError(f"cell_size must be positive, got {cell_size}")
        self.cell_size, self.kernel_size, self.backend = float(cell_size), kernel_size, backend
        self.augment, self.rotation, self.flip, self.translate = augment, rotation, flip, translate
        self.scale = tuple(scale) if scale is not None else None
        self.tiles_per_bag, self.sample_with_replacement = tiles_per_bag, sample_with_replacement
        self.input_norm = MaskedStandardize(in_dim) if input_norm else None
        widths = [in_dim, *channels]
        self.convs = nn.ModuleList(
            SubmanifoldConv2d(a, b, kernel_size, backend=backend, method=conv_method)
            for a, b in itertools.pairwise(widths)
        )
        self.classifier = nn.Sequential(
            nn.Dropout(dropout), nn.Linear(widths[-1], classifier_hidden), nn.ReLU(),
            nn.Linear(classifier_hidden, num_classes),
        )

    def forward(
        self, bag: torch.Tensor, coords: torch.Tensor | None = None, mask: torch.Tensor | None = None
    ) -> dict[str, Any]:
        """``bag`` ``(B, N, D)``, ``coords`` ``(B, N, 2)`` → ``logits`` ``(B, C)``, ``attention`` ``(B, N)``,
        ``embedding`` ``(B, channels[-1])``, ``collision_rate`` (float)."""
        if coords is None:
            raise ValueError("SparseConvMIL needs coords (B, N, 2): level-0 (x, y) of every tile")
        mask = self._check(bag, coords, mask)
        if self.input_norm is not None:
            bag = self.input_norm(bag, mask)
        weights = None
        if self.training and self.tiles_per_bag is not None:
            weights = sample_instances(mask, self.tiles_per_bag, self.sample_with_replacement)
            mask = mask & (weights > 0)
        if self.training and self.augment:
            coords = augment_coords(
                coords, mask, flip=self.flip, rotation=self.rotation, scale=self.scale,
                translate=self.cell_size if self.translate else 0.0,
            )
        smap = coords_to_sites(coords, mask, self.cell_size)
        x = smap.scatter_mean(bag, weights)  # (S, D)
        nbr = None
        if self.backend == "torch":  # one table per batch; one rulebook (with the dense boxes) unless im2col
            nbr = neighbor_table(smap.sites, self.kernel_size)
            if any(conv.method != "im2col" for conv in self.convs):
                nbr = rulebook(nbr, smap.sites)
        for conv in self.convs:
            x = torch.relu(conv(x, nbr, sites=smap.sites, batch_size=smap.batch_size))
        z = sparse_global_mean(x, smap.batch_index, smap.batch_size)
        # each tile's weight in the global mean: w / (sites in its bag · total w on its site)
        sites_per_bag = torch.bincount(smap.batch_index, minlength=smap.batch_size).to(bag.dtype)
        site_weight = 1.0 / (sites_per_bag[smap.batch_index] * smap.site_counts(weights).to(bag.dtype))
        tile_weight = site_weight[smap.instance_site.clamp(min=0)]
        if weights is not None:
            tile_weight = tile_weight * weights.to(bag.dtype)
        attention = torch.where(mask, tile_weight, bag.new_zeros(()))
        return {
            "logits": self.classifier(z),
            "attention": attention,
            "embedding": z,
            "collision_rate": smap.collision_rate,
        }


@register_mil_model("sparseconvmil")
def sparseconvmil(in_dim: int, num_classes: int = 2, **kwargs: Any) -> SparseConvMIL:
    """SparseConvMIL with the gather + matmul submanifold convolution."""
    return SparseConvMIL(in_dim=in_dim, num_classes=num_classes, **kwargs)
