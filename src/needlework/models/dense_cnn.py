"""``"dense.megapixel_mnist"``: the ATS feature network run densely over all of ``x_high``, max pool."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from needlework.checks import check_shape
from needlework.models.ats_networks import MegapixelMNISTFeatures
from needlework.models.base import NeedleworkModel
from needlework.registry import register_model

__all__ = ["DenseCNNClassifier"]


@register_model("dense.megapixel_mnist")
class DenseCNNClassifier(NeedleworkModel):
    """The ATS feature network applied densely to the full-resolution image, then a linear head.

    ``forward(x_high)`` with ``x_high (B, C, H, W)`` → ``logits (B, C)``, ``embedding``, and ``logit_map``
    ``(B, classes, h', w')`` (the head applied at every position before the max pool, for heatmaps).
    Memory grows with ``H·W`` (≈ 1.5 GB of activations per 1500² image for training).
    """

    def __init__(
        self,
        num_classes: int = 10,
        in_channels: int = 1,
        feature_channels: int = 32,
        multilabel: bool = False,
    ) -> None:
        super().__init__()
        self.features = MegapixelMNISTFeatures(in_channels, feature_channels)
        self.classifier = nn.Linear(feature_channels, num_classes)
        self.multilabel = bool(multilabel)

    def forward(self, x_high: torch.Tensor) -> dict[str, Any]:
        check_shape(x_high, ["B", "C", "H", "W"], "x_high")
        fmap = self.features.body(x_high)  # (B, D, h', w')
        embedding = F.normalize(torch.amax(fmap, dim=(-2, -1)), dim=-1)
        out: dict[str, Any] = {"logits": self.classifier(embedding), "embedding": embedding}
        if not self.training:
            out["logit_map"] = torch.einsum("bdhw,cd->bchw", fmap.detach(), self.classifier.weight.detach())
        return out
