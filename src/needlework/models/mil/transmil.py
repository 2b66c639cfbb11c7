"""TransMIL (Shao et al., NeurIPS 2021): Nyström transformer + PPEG position encoding (METHODS.md §10.4).

``h = ReLU(Linear(D → dim)(x))``; prepend a class token; TransLayer (``x + NystromAttention(LN(x))``);
PPEG (``x + DWConv7 + DWConv5 + DWConv3`` on the instance tokens laid out on a 2-D grid); TransLayer;
LayerNorm; class token → ``Linear(dim → C)``.

Grid layouts for PPEG:

* ``"sequence"`` (reference): instance ``i`` goes to cell ``i`` of a ``⌈√n⌉ × ⌈√n⌉`` grid, row-major.
* ``"coords"``: instance at level-0 coordinates ``c`` goes to cell ``(c − min c) // coord_stride``
  (``coord_stride`` = level-0 pixels between neighbouring tiles, CONVENTIONS.md §2.1); tiles sharing a
  cell are averaged there.

Padding: the reference squares the sequence by repeating its first instances; here the empty cells of
the grid are zeros and never enter attention, and each bag is processed at its own length (bags of equal
length are batched together), so a padded bag gives exactly the output of the bag alone.

``attention`` is the head-averaged Nyström class-token row of the last layer restricted to the
instances, clamped at 0 and normalised (an approximation: Nyström rows can be slightly negative).

Example:
    >>> import torch, needlework
    >>> model = needlework.create_model("transmil", in_dim=32, num_classes=2, dim=64, heads=4)
    >>> model(torch.randn(2, 10, 32))["logits"].shape
    torch.Size([2, 2])
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from needlework.models.mil.common import MILModel, register_mil_model
from needlework.models.mil.nystrom import NystromAttention

LAYOUTS = ("sequence", "coords")


class TransLayer(nn.Module):
    """``x + NystromAttention(LayerNorm(x))``."""

    def __init__(
        self,
        dim: int,
        heads: int,
        num_landmarks: int,
        pinv_iterations: int,
        dropout: float,
        residual_conv: bool = True,
        out_projection: bool = True,
    ):
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.attention = NystromAttention(
            dim,
            heads=heads,
            num_landmarks=num_landmarks,
            pinv_iterations=pinv_iterations,
            dropout=dropout,
            residual=residual_conv,
            out_projection=out_projection,
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.attention(self.norm(x))

    def forward_with_row(self, x: torch.Tensor, row: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Output and token ``row``'s (approximate) attention ``(B, T)``."""
        out, weights = self.attention.attend(self.norm(x), row)
        assert weights is not None
        return x + out, weights


class PPEG(nn.Module):
    """Pyramid position encoding: ``x + DWConv7(x) + DWConv5(x) + DWConv3(x)`` on a 2-D token grid.

    The three depthwise convolutions and the identity are one linear map, so they run as a single 7×7
    depthwise convolution whose kernel is their sum (smaller kernels zero-padded, identity = a centre 1):
    the same result to float rounding, in about a third of the time of three convolutions (their inputs
    are copied per convolution, and the 7×7 dominates anyway). Gradients reach the three kernels through
    the sum.
    """

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.convs = nn.ModuleList(nn.Conv2d(dim, dim, k, padding=k // 2, groups=dim) for k in (7, 5, 3))

    def kernel(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The combined depthwise kernel ``(dim, 1, 7, 7)`` and bias ``(dim,)``."""
        weight = sum(F.pad(conv.weight, [(7 - conv.kernel_size[0]) // 2] * 4) for conv in self.convs)
        identity = torch.zeros(7, 7, dtype=weight.dtype, device=weight.device)
        identity[3, 3] = 1.0
        return weight + identity, sum(conv.bias for conv in self.convs)

    def _encode(self, canvas: torch.Tensor) -> torch.Tensor:
        weight, bias = self.kernel()
        return F.conv2d(canvas, weight, bias, padding=3, groups=canvas.shape[1])

    def forward(
        self, tokens: torch.Tensor, cells: torch.Tensor | None, grid: tuple[int, int]
    ) -> torch.Tensor:
        """``tokens`` ``(G, n, dim)`` at flat cell indices ``cells`` ``(G, n)`` of an ``(H, W)`` grid;
        ``cells=None`` puts token ``i`` in cell ``i`` (the sequence layout)."""
        g, n, dim = tokens.shape
        h, w = grid
        if cells is None:  # one token per cell, in order: pad and slice instead of scatter and gather
            canvas = F.pad(tokens, (0, 0, 0, h * w - n)).transpose(1, 2).reshape(g, dim, h, w)
            return self._encode(canvas).flatten(2)[:, :, :n].transpose(1, 2)
        idx = cells[..., None].expand(-1, -1, dim)
        canvas = tokens.new_zeros(g, h * w, dim).scatter_add(1, idx, tokens)
        count = tokens.new_zeros(g, h * w, 1).scatter_add(1, cells[..., None], tokens.new_ones(g, n, 1))
        canvas = (canvas / count.clamp(min=1)).transpose(1, 2).reshape(g, dim, h, w)
        return torch.gather(self._encode(canvas).flatten(2).transpose(1, 2), 1, idx)


class TransMIL(MILModel):
    """TransMIL aggregator.

    Args:
        in_dim: feature width ``D``.
        num_classes: number of classes ``C``.
        dim: token width (512 in the reference).
        heads: attention heads (8).
        num_landmarks: Nyström landmarks (reference: ``dim // 2``).
        pinv_iterations: pseudo-inverse iterations (6).
        dropout: dropout after each attention block (0.1).
        ppeg_layout: ``"sequence"`` or ``"coords"`` (see the module docstring).
        coord_stride: level-0 pixels between neighbouring tiles; required for ``"coords"``.
        residual_conv: the Nyström layers add the depthwise convolution of the values (reference: yes).
        out_projection: the Nyström layers end with a ``Linear(dim → dim)`` (reference: yes). torchmil's
            TransMIL has neither; ``residual_conv=False, out_projection=False`` matches it.
    """

    permutation_invariant = False

    def __init__(
        self,
        in_dim: int,
        num_classes: int = 2,
        dim: int = 512,
        heads: int = 8,
        num_landmarks: int | None = None,
        pinv_iterations: int = 6,
        dropout: float = 0.1,
        ppeg_layout: str = "sequence",
        coord_stride: int | None = None,
        residual_conv: bool = True,
        out_projection: bool = True,
    ) -> None:
        super().__init__(in_dim, num_classes)
        if ppeg_layout not in LAYOUTS:
            raise ValueError(f"ppeg_layout must be one of {LAYOUTS}, got {ppeg_layout!r}")
        if ppeg_layout == "coords" and (coord_stride is None or coord_stride <= 0):
            raise ValueError("ppeg_layout='coords' needs coord_stride (level-0 pixels between tiles) > 0")
        if dim % heads:
            raise ValueError(f"dim ({dim}) must be divisible by heads ({heads})")
        self.ppeg_layout, self.coord_stride = ppeg_layout, coord_stride
        landmarks = num_landmarks or dim // 2
        self.embed = nn.Sequential(nn.Linear(in_dim, dim), nn.ReLU())
        self.cls_token = nn.Parameter(torch.randn(1, 1, dim) * 0.02)
        layer_args = (dim, heads, landmarks, pinv_iterations, dropout, residual_conv, out_projection)
        self.layer1 = TransLayer(*layer_args)
        self.ppeg = PPEG(dim)
        self.layer2 = TransLayer(*layer_args)
        self.norm = nn.LayerNorm(dim)
        self.classifier = nn.Linear(dim, num_classes)

    def _grid(self, coords: torch.Tensor | None, n: int) -> tuple[torch.Tensor | None, tuple[int, int]]:
        if self.ppeg_layout == "sequence":
            side = math.ceil(math.sqrt(n))
            return None, (side, side)  # token i in cell i
        if coords is None:
            raise ValueError("ppeg_layout='coords' needs coords (B, N, 2) in the batch")
        cell = (coords - coords.amin(dim=1, keepdim=True)) // self.coord_stride  # (G, n, 2) as (x, y)
        h, w = int(cell[..., 1].max()) + 1, int(cell[..., 0].max()) + 1
        return cell[..., 1] * w + cell[..., 0], (h, w)

    def _encode(self, h: torch.Tensor, coords: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """Bags of equal length ``h`` ``(G, n, dim)`` → class embedding ``(G, dim)``, attention ``(G, n)``."""
        g, n, _ = h.shape
        x = torch.cat([self.cls_token.expand(g, -1, -1), h], dim=1)
        x = self.layer1(x)
        cells, grid = self._grid(coords, n)
        x = torch.cat([x[:, :1], self.ppeg(x[:, 1:], cells, grid)], dim=1)
        x, row = self.layer2.forward_with_row(x, 0)
        attention = row[:, 1:].clamp(min=0)
        attention = attention / attention.sum(dim=1, keepdim=True).clamp(min=1e-12)
        return self.norm(x[:, 0]), attention

    def forward(
        self, bag: torch.Tensor, coords: torch.Tensor | None = None, mask: torch.Tensor | None = None
    ) -> dict[str, Any]:
        """``bag`` ``(B, N, D)`` → ``logits`` ``(B, C)``, ``attention`` ``(B, N)``, ``embedding``."""
        mask = self._check(bag, coords, mask)
        h = self.embed(bag)
        b, n_max, dim = h.shape
        if bool(mask.all()):  # no padding: one group, no reordering (the usual batch of one bag)
            embedding, attention = self._encode(h, coords)
            return {"logits": self.classifier(embedding), "attention": attention, "embedding": embedding}
        order = torch.argsort((~mask).to(torch.int8), dim=1, stable=True)  # real instances first, in order
        counts = mask.sum(dim=1)
        embedding = h.new_zeros(b, dim)
        attention = h.new_zeros(b, n_max)
        for n in counts.unique().tolist():
            rows = (counts == n).nonzero().flatten()
            idx = order[rows, :n]  # (G, n)
            tokens = torch.gather(h[rows], 1, idx[..., None].expand(-1, -1, dim))
            c = None if coords is None else torch.gather(coords[rows], 1, idx[..., None].expand(-1, -1, 2))
            emb, att = self._encode(tokens, c)
            embedding = embedding.index_put((rows,), emb)
            attention = attention.index_put((rows[:, None], idx), att)
        return {"logits": self.classifier(embedding), "attention": attention, "embedding": embedding}


@register_mil_model("transmil")
def transmil(in_dim: int, num_classes: int = 2, **kwargs: Any) -> TransMIL:
    """TransMIL with sequence-order PPEG (``ppeg_layout="coords"`` places tokens at tile positions)."""
    return TransMIL(in_dim=in_dim, num_classes=num_classes, **kwargs)
