"""Attention sampling as modules: :class:`AttentionSampling` and the classifier :class:`ATSClassifier`.

``AttentionSampling(attention_net, feature_net, ...)`` takes ``(x_low, x_high)``: the attention network
scores every cell of the low-resolution view, ``n_patches`` cells are sampled from the smoothed softmax,
each maps to a patch of the high-resolution image centred on the cell's region, the feature network
embeds the patches and :func:`~needlework.ats.expectation` averages them without bias (value and
gradients). Any ``nn.Module`` works as either network.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from needlework.ats import (
    attention_from_logits,
    cells_to_offsets,
    entropy,
    entropy_regulariser,
    expectation,
    extract_patches_nd,
    sample,
)
from needlework.checks import check_same
from needlework.models.ats_networks import CellAttention, MegapixelMNISTAttention, MegapixelMNISTFeatures
from needlework.models.base import NeedleworkModel
from needlework.models.patch_cnn import build_patch_encoder
from needlework.ops.tiled import unit_float
from needlework.registry import register_model

__all__ = ["ATSClassifier", "AttentionSampling", "ats_cnn", "ats_megapixel_mnist"]


class AttentionSampling(nn.Module):
    """Sample patches of ``x_high`` where the attention on ``x_low`` points; average their features.

    Args:
        attention_net: ``(B, C, *s_low) → (B, 1, *s_att)`` or ``(B, *s_att)`` attention logits.
        feature_net: ``(B·n, C, *patch) → (B·n, D)`` patch features.
        n_patches: ``n`` patches per image.
        patch_size: patch side ``P`` (or per-axis sizes) in high-resolution pixels.
        replace: sample with replacement (i.i.d.) or without (Gumbel-top-k, the reference default).
        smoothing: ``ε_s`` in ``a = (1 − ε_s) softmax + ε_s / N``.
        receptive_field: low-resolution border lost by the attention net's valid convolutions (0 for
            ``same`` padding), see :func:`~needlework.ats.cells_to_offsets`.
        estimator: ``"unbiased"`` or ``"reference_tf"`` (see :func:`~needlework.ats.expectation`).
        clamp: without replacement, sample every cell once when the map has fewer than ``n_patches``
            cells (small images) instead of raising.

    Forward returns a dict: ``features (B, D)``, ``attention (B, N)``, ``attention_map (B, *s_att)``,
    ``idx (B, n)`` sampled cells in sampling order, ``offsets (B, n, d)`` patch corners ``(x, y)`` in
    ``x_high`` pixels, ``patches (B, n, C, *patch)``, ``sampled_attention (B, n)``.
    """

    def __init__(
        self,
        attention_net: nn.Module,
        feature_net: nn.Module,
        n_patches: int,
        patch_size: int | Sequence[int],
        replace: bool = False,
        smoothing: float = 1e-5,
        receptive_field: float | Sequence[float] = 0,
        estimator: str = "unbiased",
        clamp: bool = False,
    ) -> None:
        super().__init__()
        self.clamp = bool(clamp)
        if n_patches < 1:
            raise ValueError(f"n_patches must be >= 1, got {n_patches}")
        self.attention_net = attention_net
        self.feature_net = feature_net
        self.n_patches = int(n_patches)
        self.patch_size = patch_size
        self.replace = bool(replace)
        self.smoothing = float(smoothing)
        self.receptive_field = receptive_field
        self.estimator = estimator

    def attention_logits(self, x_low: torch.Tensor) -> torch.Tensor:
        """Attention logits ``(B, *s_att)`` of the low-resolution view (float, or uint8 pixels)."""
        if not x_low.is_floating_point() and not getattr(self.attention_net, "takes_uint8", False):
            x_low = unit_float(x_low)  # nets that cannot convert tile by tile get the whole view in float
        logits = self.attention_net(x_low)
        if logits.dim() == x_low.dim():
            if logits.shape[1] != 1:
                raise ValueError(
                    f"attention_net must output one channel, got shape {tuple(logits.shape)} for x_low "
                    f"{tuple(x_low.shape)}"
                )
            logits = logits[:, 0]
        if logits.dim() != x_low.dim() - 1 or logits.shape[0] != x_low.shape[0]:
            raise ValueError(
                f"attention_net output {tuple(logits.shape)} is not a (B, 1, *spatial) map for x_low "
                f"{tuple(x_low.shape)}"
            )
        return logits

    def forward(self, x_low: torch.Tensor, x_high: torch.Tensor) -> dict[str, torch.Tensor]:
        if x_low.dim() < 3 or x_high.dim() != x_low.dim():
            raise ValueError(
                f"x_low {tuple(x_low.shape)} and x_high {tuple(x_high.shape)} must both be (B, C, *spatial)"
            )
        check_same("x_low batch size", x_low.shape[0], "x_high batch size", x_high.shape[0])
        logits = self.attention_logits(x_low)
        B, map_shape = logits.shape[0], tuple(logits.shape[1:])
        attention = attention_from_logits(logits, self.smoothing)
        n = self.n_patches
        if not self.replace and n > attention.shape[1]:
            if not self.clamp:
                raise ValueError(
                    f"n_patches={n} exceeds the {attention.shape[1]} attention cells; use replace=True, "
                    "clamp=True or a larger attention map"
                )
            n = attention.shape[1]  # every cell once: the exact expectation
        idx, probs = sample(attention, n, self.replace)
        offsets = cells_to_offsets(
            idx, map_shape, x_low.shape[2:], x_high.shape[2:], self.patch_size, self.receptive_field
        )
        patches = extract_patches_nd(x_high, offsets, self.patch_size)  # (B, n, C, *patch)
        feats = self.feature_net(patches.flatten(0, 1))
        if feats.dim() != 2 or feats.shape[0] != B * n:
            raise ValueError(f"feature_net must return (B·n, D) = ({B * n}, D), got {tuple(feats.shape)}")
        features = expectation(attention, idx, feats.view(B, n, -1), self.replace, estimator=self.estimator)
        return {
            "features": features,
            "attention": attention,
            "attention_map": attention.view(B, *map_shape),
            "idx": idx,
            "offsets": offsets,
            "patches": patches,
            "sampled_attention": probs,
        }


class ATSClassifier(NeedleworkModel):
    """Attention sampling followed by a classifier on the expected features.

    Args:
        attention_net, feature_net, n_patches, patch_size, replace, smoothing, receptive_field, estimator,
        clamp: as :class:`AttentionSampling`.
        feature_dim: ``D``, output width of ``feature_net``.
        num_classes: ``C``.
        entropy_weight: ``λ ≥ 0``; adds ``−λ · mean H(a)`` as ``aux_loss["entropy"]`` (spreads attention).
        classifier: optional head ``(B, D) → (B, C)`` (default ``nn.Linear(D, C)``).
        multilabel: binary cross-entropy per class instead of cross-entropy.

    ``forward(x_low, x_high)`` returns ``logits (B, C)``, ``attention (B, N)``, ``attention_map``,
    ``selected_idx (B, n)``, ``selected_coords (B, n, 2)`` (patch corners ``(x, y)`` in ``x_high``),
    ``patches``, ``embedding (B, D)``, ``attention_entropy`` (scalar, for logging) and ``aux_loss``.
    """

    def __init__(
        self,
        attention_net: nn.Module,
        feature_net: nn.Module,
        feature_dim: int,
        num_classes: int,
        n_patches: int = 10,
        patch_size: int | Sequence[int] = 50,
        replace: bool = False,
        smoothing: float = 1e-5,
        receptive_field: float | Sequence[float] = 0,
        entropy_weight: float = 1e-4,
        estimator: str = "unbiased",
        classifier: nn.Module | None = None,
        multilabel: bool = False,
        clamp: bool = False,
    ) -> None:
        super().__init__()
        if entropy_weight < 0:
            raise ValueError(f"entropy_weight must be >= 0 (it maximises entropy), got {entropy_weight}")
        self.sampler = AttentionSampling(
            attention_net, feature_net, n_patches, patch_size, replace, smoothing, receptive_field, estimator,
            clamp,
        )
        self.classifier = classifier if classifier is not None else nn.Linear(feature_dim, num_classes)
        self.entropy_weight = float(entropy_weight)
        self.multilabel = bool(multilabel)

    def forward(self, x_low: torch.Tensor, x_high: torch.Tensor) -> dict[str, Any]:
        out = self.sampler(x_low, x_high)
        attention = out["attention"]
        return {
            "logits": self.classifier(out["features"]),
            "attention": attention,
            "attention_map": out["attention_map"],
            "selected_idx": out["idx"],
            "selected_coords": out["offsets"],
            "patches": out["patches"],
            "embedding": out["features"],
            "attention_entropy": entropy(attention.detach()).mean(),
            "aux_loss": {"entropy": entropy_regulariser(attention, self.entropy_weight)},
        }


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


@register_model("ats.cnn")
def ats_cnn(
    num_classes: int = 2,
    in_channels: int = 1,
    n_patches: int = 4,
    patch_size: int = 64,
    attention: dict[str, Any] | None = None,
    dim: int = 64,
    encoder: dict[str, Any] | None = None,
    replace: bool = False,
    smoothing: float = 1e-3,
    entropy_weight: float = 1e-4,
    estimator: str = "unbiased",
) -> ATSClassifier:
    """ATS for tiny objects at any image size: :class:`CellAttention` on ``x_low`` scores coarse cells,
    a :class:`~needlework.models.patch_cnn.PatchCNN` embeds ``patch_size`` patches of ``x_high`` centred on
    the sampled cells; fewer cells than ``n_patches`` (small images) means every cell once."""
    features = build_patch_encoder(in_channels, dim, encoder)
    return ATSClassifier(
        attention_net=CellAttention(in_channels, **(attention or {})),
        feature_net=features,
        feature_dim=dim,
        num_classes=num_classes,
        n_patches=n_patches,
        patch_size=patch_size,
        replace=replace,
        smoothing=smoothing,
        receptive_field=0,
        entropy_weight=entropy_weight,
        estimator=estimator,
        clamp=True,
    )
