"""DSMIL — dual-stream MIL (Li, Li, Eliceiri, CVPR 2021) (METHODS.md §10.5).

Instance stream: ``c = W_c h`` ``(N, C)``; the critical instance of class ``j`` is ``m_j = argmax_i c[i, j]``
(over real instances) and ``ŷ_max[j] = c[m_j, j]``. Bag stream: ``Q = W_q h`` ``(N, q)``,
``V = W_v Dropout(h)`` ``(N, L)``; ``A = softmax_i(⟨Q_i, Q_{m_j}⟩ / √q)`` ``(N, C)``;
``Bᵀ = Aᵀ V`` ``(C, L)``;
bag logits ``= Conv1d(C, C, kernel=L)(B)`` (each class logit mixes all class embeddings).

Loss: ``(1 − max_weight) · CE(bag logits) + max_weight · CE(ŷ_max)``. The reference uses binary cross-entropy
per class; here both streams use the library's task loss (cross-entropy over classes, or BCE when
``multilabel``). ``logits`` are the bag-stream logits; ``max_logits`` the instance-stream ones.

Example:
    >>> import torch, needlework
    >>> model = needlework.create_model("dsmil", in_dim=32, num_classes=2)
    >>> out = model(torch.randn(2, 9, 32))
    >>> out["logits"].shape, out["attention"].shape
    (torch.Size([2, 2]), torch.Size([2, 2, 9]))
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from needlework.models.mil.common import (
    MILModel,
    feature_projector,
    masked_max,
    masked_softmax,
    register_mil_model,
)


class DSMIL(MILModel):
    """Dual-stream MIL aggregator.

    Args:
        in_dim: feature width ``D``.
        num_classes: number of classes ``C``.
        embed_dim: optional projection ``φ`` before both streams (None = use the features, as the
            reference does).
        query_dim: width ``q`` of the queries (128 in the reference).
        nonlinear_query: queries by ``Linear–ReLU–Linear–tanh`` instead of one Linear.
        value_transform: ``V = Linear(Dropout(h))``; False = ``V = h``.
        dropout: dropout on the values' input.
        max_weight: weight of the instance-stream (max) loss.
    """

    def __init__(
        self,
        in_dim: int,
        num_classes: int = 2,
        embed_dim: int | None = None,
        query_dim: int = 128,
        nonlinear_query: bool = False,
        value_transform: bool = True,
        dropout: float = 0.0,
        max_weight: float = 0.5,
    ) -> None:
        super().__init__(in_dim, num_classes)
        width = embed_dim or in_dim
        self.max_weight = max_weight
        self.embed = feature_projector(in_dim, embed_dim)
        self.instance_classifier = nn.Linear(width, num_classes)
        if nonlinear_query:
            self.query = nn.Sequential(
                nn.Linear(width, query_dim), nn.ReLU(), nn.Linear(query_dim, query_dim), nn.Tanh()
            )
        else:
            self.query = nn.Linear(width, query_dim)
        self.value = (
            nn.Sequential(nn.Dropout(dropout), nn.Linear(width, width)) if value_transform else nn.Identity()
        )
        self.bag_classifier = nn.Conv1d(num_classes, num_classes, kernel_size=width)
        self.scale = 1.0 / math.sqrt(query_dim)

    def forward(
        self, bag: torch.Tensor, coords: torch.Tensor | None = None, mask: torch.Tensor | None = None
    ) -> dict[str, Any]:
        """``bag`` ``(B, N, D)`` → ``logits`` ``(B, C)``, ``max_logits`` ``(B, C)``,
        ``attention`` ``(B, C, N)``, ``instance_logits`` ``(B, N, C)``, ``critical_idx`` ``(B, C)``."""
        mask = self._check(bag, coords, mask)
        h = self.embed(bag)  # (B, N, L)
        c = self.instance_classifier(h)  # (B, N, C)
        max_logits, critical = masked_max(c, mask)  # (B, C), (B, C)
        attention = masked_softmax(self._scores(h, critical), mask)  # (B, C, N)
        class_embeddings = torch.bmm(attention, self.value(h))  # (B, C, L)
        logits = self.bag_classifier(class_embeddings).squeeze(-1)  # (B, C)
        return {
            "logits": logits,
            "max_logits": max_logits,
            "attention": attention,
            "instance_logits": c,
            "critical_idx": critical,
            "embedding": class_embeddings.flatten(1),
        }

    def _scores(self, h: torch.Tensor, critical: torch.Tensor) -> torch.Tensor:
        """``⟨Q_i, Q_{m_j}⟩ / √q`` ``(B, C, N)`` up to a constant per class, which the softmax ignores."""
        if isinstance(self.query, nn.Linear) and self.num_classes < self.query.out_features:
            # ⟨W h_i + b, q_m⟩ = h_i · (Wᵀ q_m) + b · q_m: the last term is the same for every instance, so
            # the (N, q) queries and their three GEMMs are never formed (O(N·L·C) instead of O(N·L·q)).
            h_crit = torch.gather(h, 1, critical[..., None].expand(-1, -1, h.shape[-1]))  # (B, C, L)
            u = self.query(h_crit) @ self.query.weight  # (B, C, L)
            return torch.bmm(u, h.transpose(1, 2)) * self.scale
        q = self.query(h)  # (B, N, q)
        q_crit = torch.gather(q, 1, critical[..., None].expand(-1, -1, q.shape[-1]))  # (B, C, q)
        # bmm rather than einsum: contiguous gradients w.r.t. q and h, which autograd accumulates in place
        return torch.bmm(q, q_crit.transpose(1, 2)).transpose(1, 2) * self.scale

    def compute_loss(
        self, output: dict[str, Any], target: torch.Tensor, class_weight: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """``(1 − w) · loss(bag logits) + w · loss(max logits)``; parts are the weighted terms."""

        def task(logits: torch.Tensor) -> torch.Tensor:
            if self.multilabel:
                return F.binary_cross_entropy_with_logits(logits, target.float(), pos_weight=class_weight)
            return F.cross_entropy(logits, target.long(), weight=class_weight)

        parts = {
            "task": (1.0 - self.max_weight) * task(output["logits"]),
            "max_instance": self.max_weight * task(output["max_logits"]),
        }
        return parts["task"] + parts["max_instance"], parts


@register_mil_model("dsmil")
def dsmil(in_dim: int, num_classes: int = 2, **kwargs: Any) -> DSMIL:
    """Dual-stream MIL."""
    return DSMIL(in_dim=in_dim, num_classes=num_classes, **kwargs)
