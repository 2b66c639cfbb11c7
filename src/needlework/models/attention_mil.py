"""``"attention_mil.megapixel_mnist"``: gated-attention MIL (Ilse et al. 2018) over every cell of a grid of
``x_high`` patches, with the ATS feature network — the "look at everything" counterpart of ATS."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from needlework.checks import check_shape
from needlework.models.ats_networks import MegapixelMNISTFeatures
from needlework.models.base import NeedleworkModel
from needlework.models.pooling import AttentionPool
from needlework.ops.patches import extract_patches
from needlework.registry import register_model

__all__ = ["AttentionMILClassifier", "grid_offsets"]


def grid_offsets(height: int, width: int, patch_size: int, batch: int, device: torch.device) -> torch.Tensor:
    """Top-left corners ``(B, N, 2)`` ``(x, y)`` of a non-overlapping grid covering ``height × width``
    (the last row/column of patches is zero-padded when the size is not a multiple of the patch)."""
    ys = torch.arange(0, height, patch_size, device=device)
    xs = torch.arange(0, width, patch_size, device=device)
    yy, xx = torch.meshgrid(ys, xs, indexing="ij")
    return torch.stack([xx.flatten(), yy.flatten()], -1).expand(batch, -1, -1)


@register_model("attention_mil.megapixel_mnist")
class AttentionMILClassifier(NeedleworkModel):
    """Gated-attention MIL over *all* grid patches of ``x_high`` with the ATS feature network.

    ``forward(x_high)`` → ``logits (B, C)``, ``attention (B, N)`` over the grid cells (row-major),
    ``attention_map (B, gh, gw)``, ``instance_coords (B, N, 2)`` corners ``(x, y)``, ``embedding``.
    """

    def __init__(
        self,
        num_classes: int = 10,
        in_channels: int = 1,
        patch_size: int = 50,
        feature_channels: int = 32,
        attention_dim: int = 64,
        multilabel: bool = False,
    ) -> None:
        super().__init__()
        self.patch_size = int(patch_size)
        self.features = MegapixelMNISTFeatures(in_channels, feature_channels)
        self.pool = AttentionPool(feature_channels, hidden=attention_dim, gated=True)
        self.classifier = nn.Linear(feature_channels, num_classes)
        self.multilabel = bool(multilabel)

    def forward(self, x_high: torch.Tensor) -> dict[str, Any]:
        B, _, H, W = check_shape(x_high, ["B", "C", "H", "W"], "x_high").values()
        P = self.patch_size
        coords = grid_offsets(H, W, P, B, x_high.device)
        patches = extract_patches(x_high, coords, P)  # (B, N, C, P, P)
        N = patches.shape[1]
        h = self.features(patches.flatten(0, 1)).view(B, N, -1)
        embedding, attention = self.pool(h)
        grid = (-(-H // P), -(-W // P))
        return {
            "logits": self.classifier(embedding),
            "attention": attention,
            "attention_map": attention.view(B, *grid),
            "instance_coords": coords,
            "embedding": embedding,
        }
