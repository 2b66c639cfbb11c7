"""The ATS paper's Megapixel MNIST networks and the models built from them.

Registered models (all 10-way classifiers of the ``megapixel_mnist`` datasets by default):

* ``"ats.megapixel_mnist"`` — attention sampling: attention net on ``x_low``, 10 patches of 50² from
  ``x_high`` sampled without replacement, feature net on the patches. ``forward(x_low, x_high)``.
* ``"dense.megapixel_mnist"`` — the same feature net run densely over the whole ``x_high``
  (global max pool). ``forward(x_high)``.
* ``"attention_mil.megapixel_mnist"`` — the same feature net on every cell of a regular grid of
  ``x_high`` patches, gated-attention pooling (Ilse et al. 2018). ``forward(x_high)``.

Reference networks (METHODS §2.5): attention Conv 8@3×3 tanh, Conv 8@3×3 tanh, Conv 1@3×3, ``same``
padding (the last layer zero-initialised so training starts from uniform attention); features Conv 32@7×7,
3 × Conv 32@3×3, ReLU, valid padding, global max pool, L2-normalised.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from needlework.ats import extract_patches
from needlework.checks import check_shape
from needlework.models.ats import ATSClassifier
from needlework.models.base import NeedleworkModel
from needlework.models.pooling import AttentionPool
from needlework.registry import register_model

__all__ = [
    "AttentionMILClassifier",
    "DenseCNNClassifier",
    "MegapixelMNISTAttention",
    "MegapixelMNISTFeatures",
    "ats_megapixel_mnist",
]

_ACTIVATIONS = {"tanh": nn.Tanh, "relu": nn.ReLU}


class MegapixelMNISTAttention(nn.Sequential):
    """Attention network: ``(B, C, h, w) → (B, 1, h, w)`` logits (``same`` padding, RF border 0)."""

    def __init__(self, in_channels: int = 1, channels: int = 8, activation: str = "tanh") -> None:
        if activation not in _ACTIVATIONS:
            raise ValueError(f"activation must be one of {sorted(_ACTIVATIONS)}, got {activation!r}")
        act = _ACTIVATIONS[activation]
        last = nn.Conv2d(channels, 1, 3, padding=1)
        nn.init.zeros_(last.weight)  # uniform attention at initialisation
        nn.init.zeros_(last.bias)
        super().__init__(
            nn.Conv2d(in_channels, channels, 3, padding=1),
            act(),
            nn.Conv2d(channels, channels, 3, padding=1),
            act(),
            last,
        )


class MegapixelMNISTFeatures(nn.Module):
    """Feature network: ``(B, C, P, P) → (B, channels)``, L2-normalised.

    Conv ``channels``@7×7 then 3 × Conv ``channels``@3×3, ReLU, valid padding (50² → 38²), global max
    pool. Runs on any input at least 13 px wide, so the dense baseline uses it on the whole image.
    """

    def __init__(self, in_channels: int = 1, channels: int = 32, normalise: bool = True) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(in_channels, channels, 7),
            nn.ReLU(),
            nn.Conv2d(channels, channels, 3),
            nn.ReLU(),
            nn.Conv2d(channels, channels, 3),
            nn.ReLU(),
            nn.Conv2d(channels, channels, 3),
            nn.ReLU(),
        )
        self.out_dim = channels
        self.normalise = normalise

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.amax(self.body(x), dim=(-2, -1))
        return F.normalize(h, dim=-1) if self.normalise else h


@register_model("ats.megapixel_mnist")
def ats_megapixel_mnist(
    num_classes: int = 10,
    in_channels: int = 1,
    n_patches: int = 10,
    patch_size: int = 50,
    replace: bool = False,
    smoothing: float = 1e-5,
    entropy_weight: float = 1e-4,
    attention_channels: int = 8,
    attention_activation: str = "tanh",
    feature_channels: int = 32,
    estimator: str = "unbiased",
    multilabel: bool = False,
) -> ATSClassifier:
    """ATS with the reference Megapixel MNIST networks (defaults: the reference code's settings)."""
    features = MegapixelMNISTFeatures(in_channels, feature_channels)
    return ATSClassifier(
        attention_net=MegapixelMNISTAttention(in_channels, attention_channels, attention_activation),
        feature_net=features,
        feature_dim=features.out_dim,
        num_classes=num_classes,
        n_patches=n_patches,
        patch_size=patch_size,
        replace=replace,
        smoothing=smoothing,
        receptive_field=0,
        entropy_weight=entropy_weight,
        estimator=estimator,
        multilabel=multilabel,
    )


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
