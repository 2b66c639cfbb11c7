"""IPS — Iterative Patch Selection (Bergner, Lippert, Mahendran, ICLR 2023), METHODS.md §6.

1. The image is a regular grid of N patches (cut on demand, never all at once).
2. Without gradient, in eval mode: embed the first M patches (the memory), then scan the rest in chunks
   of I, each time scoring the M + I embeddings by cross-attention and keeping the top M.
3. With gradient: re-embed the M kept patches, add positional encodings, cross-attend with one learnable
   query per task, residual + LayerNorm + MLP, one linear head per task.

Peak memory is O((M + I) patches) whatever N is; gradients flow through the M kept patches only.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from needlework.checks import check_shape
from needlework.models.base import NeedleworkModel
from needlework.models.patch_cnn import build_patch_encoder
from needlework.models.positional import sinusoidal_1d, sinusoidal_2d
from needlework.registry import register_model
from needlework.topk import extract_patches, grid_coords

POS_ENCODINGS = ("1d", "2d", "none")


class CrossAttentionPool(nn.Module):
    """Multi-head cross-attention from T learnable queries to n embeddings, then an MLP.

    ``forward(emb (B, n, D))`` → ``(B, T, D)`` and attention ``(B, H, T, n)``;
    :meth:`scores` → ``(B, n)``: attention weights averaged over heads and queries (the IPS ranking).
    """

    def __init__(
        self, dim: int, n_queries: int, n_heads: int, d_k: int, d_inner: int, dropout: float
    ) -> None:
        super().__init__()
        self.n_heads, self.d_k = n_heads, d_k
        self.queries = nn.Parameter(torch.randn(1, n_queries, dim) * dim**-0.5)
        self.w_q = nn.Linear(dim, n_heads * d_k, bias=False)
        self.w_k = nn.Linear(dim, n_heads * d_k, bias=False)
        self.w_v = nn.Linear(dim, n_heads * d_k, bias=False)
        self.proj = nn.Linear(n_heads * d_k, dim)
        self.norm1 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(
            nn.Linear(dim, d_inner), nn.ReLU(inplace=True), nn.Dropout(dropout), nn.Linear(d_inner, dim)
        )
        self.norm2 = nn.LayerNorm(dim)
        self.dropout = nn.Dropout(dropout)

    def _heads(self, x: torch.Tensor) -> torch.Tensor:  # (B, n, H·d) -> (B, H, n, d)
        return x.view(x.shape[0], x.shape[1], self.n_heads, self.d_k).transpose(1, 2)

    def attention(self, emb: torch.Tensor) -> torch.Tensor:
        q = self._heads(self.w_q(self.queries)).expand(emb.shape[0], -1, -1, -1)
        k = self._heads(self.w_k(emb))
        return torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(self.d_k), dim=-1)  # (B, H, T, n)

    def scores(self, emb: torch.Tensor) -> torch.Tensor:
        return self.attention(emb).mean(dim=(1, 2))

    def forward(self, emb: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        attn = self.attention(emb)
        mixed = (self.dropout(attn) @ self._heads(self.w_v(emb))).transpose(1, 2).flatten(2)  # (B, T, H·d)
        out = self.norm1(self.queries + self.dropout(self.proj(mixed)))
        return self.norm2(out + self.dropout(self.mlp(out))), attn


def _low_index(pos: torch.Tensor, patch_size: int, low: int, full: int) -> torch.Tensor:
    """Index along one axis of a ``low``-px mask of the pixel under the centre of patches at ``pos``
    (corners on a ``full``-px axis of the same extent)."""
    return ((pos.to(torch.float64) + patch_size / 2) * low / full).long().clamp(0, low - 1)


def tissue_candidates(
    coords: torch.Tensor, tissue: torch.Tensor, image_hw: tuple[int, int], patch_size: int, minimum: int = 1
) -> torch.Tensor:
    """The grid patches ``coords (N, 2)`` whose centre falls on tissue in any image of the batch.

    ``tissue`` ``(B, 1, h, w)`` or ``(B, h, w)`` is a mask on a low-resolution view of the ``image_hw``
    image (same extent). Without any tissue the first ``minimum`` patches are kept, so a blank slide
    still gives a prediction.
    """
    mask = tissue.reshape(tissue.shape[0], tissue.shape[-2], tissue.shape[-1]).detach() > 0
    h, w = mask.shape[-2:]
    col = _low_index(coords[:, 0], patch_size, w, image_hw[1])
    row = _low_index(coords[:, 1], patch_size, h, image_hw[0])
    keep = mask[:, row.to(mask.device), col.to(mask.device)].any(0).to(coords.device)
    if not bool(keep.any()):
        return coords[: max(1, minimum)]
    return coords[keep]


def grid_tissue_candidates(
    image_hw: tuple[int, int], patch_size: int, stride: int, tissue: torch.Tensor, minimum: int = 1
) -> torch.Tensor:
    """:func:`tissue_candidates` of :func:`~needlework.ops.grids.grid_coords` ``(image_hw, patch_size,
    stride)``, the same coordinates in the same order, without building the whole grid: a patch's mask
    row depends only on its grid row and its column only on its grid column, so the test is one
    ``(gh, gw)`` lookup. (On a 100,000² slide the grid has 611k patches: the grid, its centres and the
    whole-mask copy were 40 MB for the 61k on tissue.)"""
    img_h, img_w = image_hw
    if min(img_h, img_w) < patch_size:
        raise ValueError(f"image of size {image_hw} is smaller than patch_size {patch_size}")
    t = tissue.reshape(tissue.shape[0], tissue.shape[-2], tissue.shape[-1]).detach()
    h, w = t.shape[-2:]
    ys = torch.arange(0, img_h - patch_size + 1, stride)
    xs = torch.arange(0, img_w - patch_size + 1, stride)
    row, col = _low_index(ys, patch_size, h, img_h), _low_index(xs, patch_size, w, img_w)
    keep = (t[:, row.to(t.device)][:, :, col.to(t.device)] > 0).any(0).cpu()  # (gh, gw)
    i, j = keep.nonzero(as_tuple=True)  # row-major, as grid_coords
    if not len(i):
        n = torch.arange(min(max(1, minimum), len(ys) * len(xs)))
        i, j = n // len(xs), n % len(xs)
    return torch.stack([xs[j], ys[i]], dim=1).to(tissue.device)


@register_model("ips")
class IPS(NeedleworkModel):
    """Iterative Patch Selection with one or several tasks.

    Args:
        num_classes: classes per task (an int for all tasks, or one per task).
        in_channels: image channels.
        multilabel: single-task mode only — BCE over ``num_classes`` labels.
        tasks: task names (one query token and head each); the first is the primary task whose logits
            are ``output["logits"]``. ``None`` = one task ``"main"``.
        multilabel_tasks: task names trained with sigmoid/BCE (the IPS 4-task "multi-label" task).
        patch_size, patch_stride: grid of candidate patches (stride defaults to the patch size).
        n_keep: M, patches kept. chunk_size: I, patches scored per iteration.
        dim: embedding width D. encoder: :func:`needlework.models.patch_cnn.build_patch_encoder` config.
        n_heads, d_k, d_inner, dropout: cross-attention transformer.
        pos_encoding: ``"1d"`` sinusoidal of the flattened patch index (reference), ``"2d"`` sinusoidal of
            the grid cell ``(x, y)``, or ``"none"``.
        shuffle: scan the patches in a random order during training (breaks score ties).

    ``forward(x_high (B, C, H, W), tissue=None)`` returns ``logits (B, C)`` (primary task), ``task_logits``
    (name → logits), ``attention (B, N)`` (final attention on the kept patches, 0 elsewhere, sums to 1),
    ``selected_idx (B, M)``, ``selected_coords (B, M, 2)``, ``candidate_coords (N, 2)`` (the scanned grid)
    and ``embedding (B, T, D)``. ``x_high`` may be a lazy slide (:class:`~needlework.slides.patch_reader.
    SlidePixels`); a ``tissue`` mask ``(B, 1, h, w)`` on a low view restricts the scan to the patches
    on tissue (:func:`grid_tissue_candidates`).

    Example:
        >>> m = IPS(num_classes=4, patch_size=8, n_keep=3, chunk_size=4, dim=32, d_k=8, n_heads=2)
        >>> m(torch.rand(2, 1, 32, 32))["logits"].shape
        torch.Size([2, 4])
    """

    def __init__(
        self,
        num_classes: int | Sequence[int] = 10,
        in_channels: int = 1,
        multilabel: bool = False,
        tasks: Sequence[str] | None = None,
        multilabel_tasks: Sequence[str] = ("multilabel", "multi"),
        patch_size: int = 50,
        patch_stride: int | None = None,
        n_keep: int = 10,
        chunk_size: int = 20,
        dim: int = 128,
        encoder: dict[str, Any] | None = None,
        n_heads: int = 8,
        d_k: int = 16,
        d_inner: int = 512,
        dropout: float = 0.1,
        pos_encoding: str = "1d",
        shuffle: bool = True,
    ) -> None:
        super().__init__()
        if pos_encoding not in POS_ENCODINGS:
            raise ValueError(f"pos_encoding must be one of {POS_ENCODINGS}, got {pos_encoding!r}")
        if n_keep < 1 or chunk_size < 1:
            raise ValueError(f"n_keep and chunk_size must be >= 1, got {n_keep} and {chunk_size}")
        self.tasks = list(tasks) if tasks else ["main"]
        classes = [num_classes] * len(self.tasks) if isinstance(num_classes, int) else list(num_classes)
        if len(classes) != len(self.tasks):
            raise ValueError(f"num_classes has {len(classes)} entries but there are {len(self.tasks)} tasks")
        self.task_multilabel = {
            t: (multilabel if tasks is None else t in multilabel_tasks) for t in self.tasks
        }
        self.multilabel = self.task_multilabel[self.tasks[0]]
        self.num_classes, self.in_channels = classes[0], in_channels
        self.patch_size, self.patch_stride = patch_size, patch_stride or patch_size
        self.n_keep, self.chunk_size, self.pos_encoding, self.shuffle = (
            n_keep,
            chunk_size,
            pos_encoding,
            shuffle,
        )
        self.dim = dim
        self.encoder = build_patch_encoder(in_channels, dim, encoder)
        self.aggregator = CrossAttentionPool(dim, len(self.tasks), n_heads, d_k, d_inner, dropout)
        self.heads = nn.ModuleDict({t: nn.Linear(dim, c) for t, c in zip(self.tasks, classes)})

    def _embed(self, image: torch.Tensor, coords: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        """Embeddings ``(B, n, D)`` (+ positional encoding) of the patches ``idx (B, n)``."""
        patches = extract_patches(image, coords[idx], self.patch_size)
        emb = self.encoder(patches.flatten(0, 1)).view(idx.shape[0], idx.shape[1], -1)
        if self.pos_encoding == "1d":
            emb = emb + sinusoidal_1d(idx, self.dim).to(emb.dtype)
        elif self.pos_encoding == "2d":
            emb = emb + sinusoidal_2d(coords[idx] // self.patch_stride, self.dim).to(emb.dtype)
        return emb

    @torch.no_grad()
    def select(self, image: torch.Tensor, coords: torch.Tensor) -> torch.Tensor:
        """Indices ``(B, M)`` of the M best patches by an eval-mode, no-gradient scan in chunks of I."""
        b, n = image.shape[0], coords.shape[0]
        m = min(self.n_keep, n)
        if self.shuffle and self.training:
            order = torch.randperm(n, device=image.device)
        else:
            order = torch.arange(n, device=image.device)
        modes = [(mod, mod.training) for mod in (self.encoder, self.aggregator)]
        for mod, _ in modes:
            mod.eval()
        try:
            keep_idx = order[:m].expand(b, m)
            keep_emb = self._embed(image, coords, keep_idx)
            for start in range(m, n, self.chunk_size):
                new_idx = order[start : start + self.chunk_size].expand(b, -1)
                all_idx = torch.cat([keep_idx, new_idx], dim=1)
                all_emb = torch.cat([keep_emb, self._embed(image, coords, new_idx)], dim=1)
                top = self.aggregator.scores(all_emb).topk(m, dim=1).indices
                keep_idx = all_idx.gather(1, top)
                keep_emb = all_emb.gather(1, top.unsqueeze(-1).expand(-1, -1, all_emb.shape[-1]))
        finally:
            for mod, mode in modes:
                mod.train(mode)
        return keep_idx

    def forward(self, x_high: torch.Tensor, tissue: torch.Tensor | None = None) -> dict[str, Any]:
        sizes = check_shape(x_high, ["B", str(self.in_channels), "H", "W"], "x_high")
        hw = (sizes["H"], sizes["W"])
        if tissue is not None:  # scan only the patches on tissue: the cost follows the tissue, not the slide
            coords = grid_tissue_candidates(hw, self.patch_size, self.patch_stride, tissue, self.n_keep)
            coords = coords.to(x_high.device)
        else:
            coords = grid_coords(hw, self.patch_size, self.patch_stride, x_high.device)
        idx = self.select(x_high, coords)  # (B, M)
        emb = self._embed(x_high, coords, idx)  # with gradient, train mode
        pooled, attn = self.aggregator(emb)  # (B, T, D), (B, H, T, M)
        task_logits = {t: self.heads[t](pooled[:, i]) for i, t in enumerate(self.tasks)}
        attention = emb.new_zeros(sizes["B"], coords.shape[0]).scatter(1, idx, attn.mean(dim=(1, 2)))
        return {
            "logits": task_logits[self.tasks[0]],
            "task_logits": task_logits,
            "attention": attention,
            "selected_idx": idx,
            "selected_coords": coords[idx],
            "candidate_coords": coords,
            "embedding": pooled,
        }

    def compute_loss(
        self, output: dict[str, Any], target: Any, class_weight: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Primary-task loss for a tensor ``target``; for a dict ``{task: target}``, the mean over its tasks.

        Each task uses cross-entropy, or BCE if it is multi-label; ``class_weight`` applies to the primary
        task only.
        """
        if not isinstance(target, dict):
            return super().compute_loss(output, target, class_weight)
        names = [t for t in self.tasks if t in target]
        if not names:
            raise KeyError(f"target has tasks {sorted(target)} but the model predicts {self.tasks}")
        parts: dict[str, torch.Tensor] = {}
        for t in names:
            logits, y = output["task_logits"][t], target[t]
            w = class_weight if t == self.tasks[0] else None
            if self.task_multilabel[t]:
                parts[f"task_{t}"] = F.binary_cross_entropy_with_logits(logits, y.float(), pos_weight=w)
            else:
                parts[f"task_{t}"] = F.cross_entropy(logits, y.long(), weight=w)
        total = torch.stack(list(parts.values())).mean()
        parts["task"] = total
        for name, value in (output.get("aux_loss") or {}).items():
            parts[name] = value
            total = total + value
        return total, parts


# Registered paper-scale preset for Megapixel MNIST (1500² canvas, 50-px patches); keyword arguments
# override any preset value, e.g. create_model("ips.megapixel_mnist", n_keep=50).
IPS_MEGAPIXEL_MNIST: dict[str, Any] = dict(
    num_classes=10,
    tasks=["majority", "max", "top", "multilabel"],
    patch_size=50,
    n_keep=100,
    chunk_size=100,
    dim=128,
    encoder={"preset": "resnet18_layer2"},
    n_heads=8,
    d_k=16,
    d_inner=512,
    dropout=0.1,
    pos_encoding="1d",
)  # METHODS.md §6.2 [ref-code]


@register_model("ips.megapixel_mnist")
def ips_megapixel_mnist(**overrides: Any) -> IPS:
    """IPS with the reference Megapixel MNIST settings (4 tasks, M = I = 100, ResNet-18 to layer2)."""
    return IPS(**(IPS_MEGAPIXEL_MNIST | overrides))
