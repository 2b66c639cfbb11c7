"""CLAM-SB (Lu et al., Nat. Biomed. Eng. 2021): gated attention plus instance clustering (METHODS.md §10.3).

``h = Dropout(ReLU(Linear(D → 512)))``; gated attention ``512 → 256 → 1``; ``z = Σ a_i h_i``; bag logits
``Linear(512 → C)``. Instance clustering: one binary instance classifier per class. For the true class the
``k`` highest-attention instances are pseudo-labelled 1 and the ``k`` lowest 0; with ``subtyping`` the ``k``
highest instances are also pseudo-labelled 0 by the classifiers of every other class and the summed
instance loss is divided by ``C``. Total loss ``bag_weight · L_bag + (1 − bag_weight) · L_inst``.

``k = min(k_sample, n // 2)`` per bag (``n`` = real instances), so small bags neither fail nor get
overlapping positive and negative sets; bags with a single instance contribute no instance loss.

Example:
    >>> import torch, needlework
    >>> model = needlework.create_model("clam_sb", in_dim=32, num_classes=2)
    >>> out = model(torch.randn(2, 20, 32))
    >>> total, parts = model.compute_loss(out, torch.tensor([0, 1]))
    >>> sorted(parts)
    ['instance', 'task']
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from needlework.models.mil.common import (
    GatedAttention,
    MILModel,
    feature_projector,
    masked_softmax,
    register_mil_model,
)

SIZES = {"small": (512, 256), "big": (512, 384)}


class CLAMSB(MILModel):
    """Single-branch CLAM.

    Args:
        in_dim: feature width ``D``.
        num_classes: number of classes ``C``.
        size: ``"small"`` (512, 256) or ``"big"`` (512, 384): embedding and attention widths.
        dropout: dropout after the embedding and inside the attention network.
        k_sample: instances per pseudo-label set (8 in the reference).
        bag_weight: weight ``c₁`` of the bag loss; the instance loss gets ``1 − c₁``.
        subtyping: also push the top instances to 0 under the other classes' classifiers.
    """

    def __init__(
        self,
        in_dim: int,
        num_classes: int = 2,
        size: str = "small",
        dropout: float = 0.25,
        k_sample: int = 8,
        bag_weight: float = 0.7,
        subtyping: bool = False,
    ) -> None:
        super().__init__(in_dim, num_classes)
        if size not in SIZES:
            raise ValueError(f"size must be one of {sorted(SIZES)}, got {size!r}")
        if not 0.0 <= bag_weight <= 1.0:
            raise ValueError(f"bag_weight must lie in [0, 1], got {bag_weight}")
        width, hidden = SIZES[size]
        self.k_sample, self.bag_weight, self.subtyping = k_sample, bag_weight, subtyping
        self.embed = feature_projector(in_dim, width, dropout)
        self.attention = GatedAttention(width, hidden, heads=1, gated=True, dropout=dropout)
        self.classifier = nn.Linear(width, num_classes)
        # C binary instance classifiers stored as one Linear(width → 2C)
        self.instance_classifiers = nn.Linear(width, 2 * num_classes)

    def forward(
        self, bag: torch.Tensor, coords: torch.Tensor | None = None, mask: torch.Tensor | None = None
    ) -> dict[str, Any]:
        """``bag`` ``(B, N, D)`` → ``logits`` ``(B, C)``, ``attention`` ``(B, N)``, ``embedding``.

        Also ``instance_features`` ``(B, N, 512)`` and ``mask`` for the instance loss in :meth:`compute_loss`.
        """
        mask = self._check(bag, coords, mask)
        h = self.embed(bag)
        attention = masked_softmax(self.attention(h).squeeze(-1), mask)
        z = torch.einsum("bn,bnl->bl", attention, h)
        return {
            "logits": self.classifier(z),
            "attention": attention,
            "embedding": z,
            "instance_logits": self.classifier(h),
            "instance_features": h,
            "mask": mask,
        }

    def instance_loss(self, output: dict[str, Any], target: torch.Tensor) -> torch.Tensor:
        """Mean over bags of the clustering loss (CE of the per-class binary instance classifiers)."""
        h, attention, mask = output["instance_features"], output["attention"], output["mask"]
        b, n, _ = h.shape
        c = self.num_classes
        count = mask.sum(dim=1)  # (B,)
        k = torch.clamp(count // 2, max=self.k_sample)  # (B,)
        # rank of each instance by attention, real instances first (descending), padding last
        order = attention.masked_fill(~mask, -1.0).argsort(dim=1, descending=True)
        rank = torch.empty_like(order).scatter_(1, order, torch.arange(n, device=h.device).expand(b, n))
        top = rank < k[:, None]  # (B, N)
        bottom = (rank >= (count - k)[:, None]) & (rank < count[:, None])
        logits = self.instance_classifiers(h).view(b, n, c, 2)
        ce1 = F.cross_entropy(logits.permute(0, 3, 1, 2), torch.ones(b, n, c, dtype=torch.long,
                              device=h.device), reduction="none")  # (B, N, C): loss for pseudo-label 1
        ce0 = F.cross_entropy(logits.permute(0, 3, 1, 2), torch.zeros(b, n, c, dtype=torch.long,
                              device=h.device), reduction="none")
        true_class = F.one_hot(target.long(), c).bool()  # (B, C)
        # in-class: top → 1, bottom → 0, averaged over the 2k selected instances
        in_sum = (ce1 * top[..., None]).sum(1) + (ce0 * bottom[..., None]).sum(1)  # (B, C)
        per_bag = (in_sum * true_class).sum(1) / (2 * k).clamp(min=1)
        if self.subtyping:
            out_sum = (ce0 * top[..., None]).sum(1)  # (B, C): top → 0 under other classes
            per_bag = per_bag + (out_sum * ~true_class).sum(1) / k.clamp(min=1)
            per_bag = per_bag / c
        return (per_bag * (k > 0)).mean()

    def compute_loss(
        self, output: dict[str, Any], target: torch.Tensor, class_weight: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """``bag_weight · CE(bag) + (1 − bag_weight) · instance loss``; parts are the weighted terms."""
        bag_loss = F.cross_entropy(output["logits"], target.long(), weight=class_weight)
        parts = {
            "task": self.bag_weight * bag_loss,
            "instance": (1.0 - self.bag_weight) * self.instance_loss(output, target),
        }
        return parts["task"] + parts["instance"], parts


@register_mil_model("clam_sb")
def clam_sb(in_dim: int, num_classes: int = 2, **kwargs: Any) -> CLAMSB:
    """CLAM single-branch with instance clustering."""
    return CLAMSB(in_dim=in_dim, num_classes=num_classes, **kwargs)
