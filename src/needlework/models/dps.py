"""DPS — Differentiable Patch Selection (Cordonnier et al., CVPR 2021), METHODS.md §5.

Pipeline: a small CNN scores a grid of cells on the low-resolution view; the scores are min-max
normalised and the perturbed top-K (:func:`needlework.topk.perturbed_topk`, correct outer-product
Jacobian) turns them into indicators ``Ŷ (B, K, N)``, kept on their support only (the candidates some
noise draw selected: no ``(B, K, N)`` tensor, which a slide's 611k cells would make 20 MB); patch k of the
high-resolution image is the soft mixture ``Σ_n Ŷ[k, n] · patch_n`` during training and the hard
top-K patch at evaluation; a patch CNN embeds the K patches and a transformer (positional encoding of
slot k = ``Σ_n Ŷ[k, n] E[n]``), max or mean aggregates them.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from needlework.checks import check_shape
from needlework.models.base import NeedleworkModel
from needlework.models.patch_cnn import build_patch_encoder
from needlework.models.positional import sinusoidal_2d
from needlework.ops.patches import extract_patches
from needlework.ops.tiled import tiled_map, unit_float
from needlework.registry import register_model
from needlework.topk import PerturbedTopK, cell_coords, sorted_topk_indices, support_patches

AGGREGATIONS = ("transformer", "max", "mean")
POS_ENCODINGS = ("learned", "sinusoidal", "none")


class Scorer(nn.Module):
    """3×3 ReLU convolutions + a 1×1 convolution to one channel, max-pooled to the selection grid.

    With ``tile`` set, the convolutions run tile by tile on inputs larger than ``tile`` px
    (:func:`~needlework.ops.tiled.tiled_map`, exact); when the grid's cells are whole squares of ``x_low``
    pixels each tile is max-pooled at once, else the one-channel map is held whole and pooled.
    """

    def __init__(
        self, in_channels: int, channels: Sequence[int], grid: tuple[int, int], tile: int | None = None
    ) -> None:
        super().__init__()
        if tile is not None and tile < 1:
            raise ValueError(f"scorer_tile must be >= 1 px or None, got {tile}")
        self.tile, self.halo = tile, len(channels)  # one px of reach per 3×3 convolution
        layers: list[nn.Module] = []
        prev = in_channels
        for ch in channels:
            layers += [nn.Conv2d(prev, ch, 3, padding=1), nn.ReLU(inplace=True)]
            prev = ch
        layers.append(nn.Conv2d(prev, 1, 1))
        self.net = nn.Sequential(*layers)
        self.pool = nn.AdaptiveMaxPool2d(grid)

    takes_uint8 = True  # a uint8 view is converted tile by tile (a slide's low view stays uint8)

    def _map(self, x_low: torch.Tensor) -> torch.Tensor:
        return self.net(unit_float(x_low))

    def forward(self, x_low: torch.Tensor, grid: tuple[int, int] | None = None) -> torch.Tensor:
        """``(B, C, h, w)`` float or uint8 → scores ``(B, gh·gw)`` (row-major cells of ``grid``, default
        the fixed one)."""
        gh, gw = grid if grid is not None else self.pool.output_size
        h, w = x_low.shape[-2:]
        if self.tile is None:
            return F.adaptive_max_pool2d(self._map(x_low), (gh, gw)).flatten(1)
        if h % gh == 0 and w % gw == 0 and h // gh == w // gw:
            # cells of s × s px: each tile is pooled as it is computed, so neither the full-resolution
            # one-channel map nor its gradient ever exists (on a slide's view, 39 MB each)
            s = h // gh
            pooled = tiled_map(lambda t: F.max_pool2d(self._map(t), s), x_low, self.tile, self.halo, s)
            return pooled.flatten(1)
        out = tiled_map(self._map, x_low, self.tile, self.halo)
        return F.adaptive_max_pool2d(out, (gh, gw)).flatten(1)


@register_model("dps")
class DPS(NeedleworkModel):
    """Differentiable Patch Selection.

    Args:
        num_classes: C.
        in_channels: image channels.
        multilabel: sigmoid/BCE loss over C labels instead of softmax/CE.
        grid: selection grid ``(gh, gw)`` (or one int): N = gh·gw candidate patches.
        cell_size: instead of a fixed grid, cells of this many ``x_high`` pixels: the grid follows the
            image, ``(H // cell_size, W // cell_size)``, so one model runs at any canvas (needs
            ``pos_encoding="none"``).
        patch_size: side P of the high-resolution patch centred on each cell.
        k: number of selected patches K.
        sigma, n_samples, sigma_schedule, total_steps, sigma_end, jacobian: perturbed top-K settings
            (see :class:`needlework.topk.PerturbedTopK`); ``total_steps`` counts training forwards.
        scorer_channels: widths of the scorer's 3×3 convolutions.
        scorer_tile: run the scorer tile by tile on ``x_low`` larger than this (px; exact, memory of one
            tile): for whole-slide low views.
        low_scale: if ``x_low`` is not given, it is ``x_high`` area-resized by this factor.
        dim: embedding width D.
        encoder: :func:`needlework.models.patch_cnn.build_patch_encoder` config (PatchCNN kwargs or
            ``{"preset": "resnet18_layer2"}``).
        aggregation: ``"transformer"``, ``"max"`` or ``"mean"``.
        n_layers, n_heads, dropout: transformer settings.
        pos_encoding: ``"learned"`` table, fixed 2-D ``"sinusoidal"``, or ``"none"`` (transformer only).
        entropy_weight: λ ≥ 0 maximising the entropy of ``softmax(scores)`` (METHODS.md §1.3).

    ``forward(x_low, x_high)`` with ``x_low (B, C, h, w)`` (optional) and ``x_high (B, C, H, W)`` returns
    ``logits (B, C)``, the indicators on their support — ``indicator_support (B, U)`` candidate indices and
    ``indicator_weights (B, K, U)`` = ``Ŷ[:, :, support]`` (in eval the top-K and the identity) —,
    ``attention (B, N)`` = softmax of the scores, ``scores``,
    ``selected_idx (B, K)`` (hard top-K of the scores, by position), ``selected_coords (B, K, 2)`` (top-left
    ``(x, y)`` in ``x_high`` pixels), ``candidate_coords (N, 2)``, ``embedding (B, D)`` and ``aux_loss``.
    ``x_high`` may be a lazy slide (:class:`~needlework.slides.patch_reader.SlidePixels`) with ``x_low``.

    Example:
        >>> m = DPS(num_classes=3, grid=4, patch_size=8, k=2, n_samples=10, dim=16, n_heads=2)
        >>> m(torch.rand(2, 1, 16, 16), torch.rand(2, 1, 32, 32))["logits"].shape
        torch.Size([2, 3])
    """

    def __init__(
        self,
        num_classes: int = 10,
        in_channels: int = 1,
        multilabel: bool = False,
        grid: int | tuple[int, int] = 10,
        patch_size: int = 50,
        cell_size: int | None = None,
        k: int = 5,
        sigma: float = 0.05,
        n_samples: int = 100,
        sigma_schedule: str = "constant",
        total_steps: int | None = None,
        sigma_end: float = 0.0,
        jacobian: str = "outer",
        scorer_channels: Sequence[int] = (8, 8, 8),
        scorer_tile: int | None = None,
        low_scale: float = 0.25,
        dim: int = 128,
        encoder: dict[str, Any] | None = None,
        aggregation: str = "transformer",
        n_layers: int = 1,
        n_heads: int = 4,
        dropout: float = 0.0,
        pos_encoding: str = "learned",
        entropy_weight: float = 0.0,
    ) -> None:
        super().__init__()
        if aggregation not in AGGREGATIONS:
            raise ValueError(f"aggregation must be one of {AGGREGATIONS}, got {aggregation!r}")
        if pos_encoding not in POS_ENCODINGS:
            raise ValueError(f"pos_encoding must be one of {POS_ENCODINGS}, got {pos_encoding!r}")
        if entropy_weight < 0:
            raise ValueError(f"entropy_weight must be >= 0 (it maximises entropy), got {entropy_weight}")
        self.grid = (grid, grid) if isinstance(grid, int) else (int(grid[0]), int(grid[1]))
        self.cell_size = cell_size
        if cell_size is not None and (cell_size < 1 or pos_encoding != "none"):
            raise ValueError(f"cell_size ({cell_size}) must be >= 1 and needs pos_encoding='none'")
        n = self.grid[0] * self.grid[1]
        if cell_size is None and not 1 <= k <= n:
            raise ValueError(f"k must be in [1, N = {n}] for grid {self.grid}, got {k}")
        self.multilabel = multilabel
        self.num_classes, self.in_channels, self.patch_size, self.k = num_classes, in_channels, patch_size, k
        self.low_scale, self.aggregation, self.entropy_weight = low_scale, aggregation, entropy_weight
        self.scorer = Scorer(in_channels, scorer_channels, self.grid, scorer_tile)
        self.topk = PerturbedTopK(
            k, sigma, n_samples, sigma_schedule, total_steps, sigma_end, normalize=True, jacobian=jacobian
        )
        self.encoder = build_patch_encoder(in_channels, dim, encoder)
        self.pos_encoding = pos_encoding if aggregation == "transformer" else "none"
        if self.pos_encoding == "learned":
            self.pos_table = nn.Parameter(torch.randn(n, dim) * 0.02)
        elif self.pos_encoding == "sinusoidal":
            cells = torch.stack(
                torch.meshgrid(torch.arange(self.grid[0]), torch.arange(self.grid[1]), indexing="ij")
            )
            self.register_buffer(
                "pos_table", sinusoidal_2d(cells.flip(0).flatten(1).T, dim), persistent=False
            )
        if aggregation == "transformer":
            self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
            layer = nn.TransformerEncoderLayer(
                dim, n_heads, 4 * dim, dropout, batch_first=True, norm_first=True, activation="gelu"
            )
            self.transformer = nn.TransformerEncoder(layer, n_layers, enable_nested_tensor=False)
            self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)

    def _aggregate(self, tokens: torch.Tensor, support: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        if self.aggregation == "max":
            return tokens.max(dim=1).values
        if self.aggregation == "mean":
            return tokens.mean(dim=1)
        if self.pos_encoding != "none":  # slot k's position = Σ_n Ŷ[k, n] E[n] ("Dense(indicators)")
            tokens = tokens + torch.bmm(weights.to(tokens.dtype), self.pos_table[support])
        cls = self.cls_token.expand(tokens.shape[0], -1, -1)
        return self.norm(self.transformer(torch.cat([cls, tokens], dim=1))[:, 0])

    def forward(
        self, x_low: torch.Tensor | None = None, x_high: torch.Tensor | None = None
    ) -> dict[str, Any]:
        if x_high is None:
            raise ValueError("DPS.forward needs x_high (B, C, H, W); x_low is optional")
        sizes = check_shape(x_high, ["B", str(self.in_channels), "H", "W"], "x_high")
        if x_low is None:
            if not isinstance(x_high, torch.Tensor):
                raise ValueError("DPS on a lazy x_high (a slide) needs x_low in the batch")
            x_low = F.interpolate(x_high, scale_factor=self.low_scale, mode="area")
        check_shape(x_low, [str(sizes["B"]), str(self.in_channels), "h", "w"], "x_low")
        cell = self.cell_size
        grid = self.grid if cell is None else (sizes["H"] // cell, sizes["W"] // cell)
        if self.cell_size is not None and grid[0] * grid[1] < self.k:
            raise ValueError(
                f"x_high of {sizes['H']}×{sizes['W']} px has {grid[0] * grid[1]} cells of {cell} px, "
                f"fewer than k = {self.k}; use a larger image or a smaller cell_size"
            )
        candidates = cell_coords((sizes["H"], sizes["W"]), grid, self.patch_size, device=x_high.device)
        scores = self.scorer(x_low, None if self.cell_size is None else grid)  # (B, N)
        support, weights = self.topk.support(scores)  # soft in training; hard (the top-K) in eval
        idx = sorted_topk_indices(scores.detach(), self.k)
        if self.training:
            patches = support_patches(x_high, support, weights, candidates, self.patch_size)
        else:
            patches = extract_patches(x_high, candidates[idx], self.patch_size)
        b = sizes["B"]
        tokens = self.encoder(patches.flatten(0, 1)).view(b, self.k, -1)
        embedding = self._aggregate(tokens, support, weights)
        probs = scores.softmax(dim=-1)
        out: dict[str, Any] = {
            "logits": self.head(embedding),
            "indicator_support": support,
            "indicator_weights": weights,
            "attention": probs,
            "scores": scores,
            "selected_idx": idx,
            "selected_coords": candidates[idx],
            "candidate_coords": candidates,
            "embedding": embedding,
            "aux_loss": {},
        }
        if self.entropy_weight > 0:
            entropy = -(probs * torch.log(probs + 1e-6)).sum(-1).mean()
            out["aux_loss"]["entropy"] = -self.entropy_weight * entropy
        return out


# Registered paper-scale preset for Megapixel MNIST (1500² canvas, 50-px patches); keyword arguments
# override any preset value, e.g. create_model("ips.megapixel_mnist", n_keep=50).
DPS_MEGAPIXEL_MNIST: dict[str, Any] = dict(
    num_classes=10,
    grid=30,
    patch_size=50,
    k=10,
    sigma=0.05,
    n_samples=500,
    sigma_schedule="cosine",
    sigma_end=1e-5,
    total_steps=150 * 313,  # 150 epochs of 5,000 images in batches of 16 (benbergner/dps schedule)
    low_scale=0.12,
    scorer_channels=(8, 16, 32),
    dim=128,
    encoder={"preset": "resnet18_layer2"},
    aggregation="transformer",
    n_layers=1,
    n_heads=8,
)  # [design]: the 30×30 grid of IPS's 50-px patches, DPS defaults of METHODS.md §4.5 / §5.3


@register_model("dps.megapixel_mnist")
def dps_megapixel_mnist(**overrides: Any) -> DPS:
    """DPS on the 30×30 grid of 50-px cells of a 1500² Megapixel MNIST image (K = 10, S = 500)."""
    return DPS(**(DPS_MEGAPIXEL_MNIST | overrides))
