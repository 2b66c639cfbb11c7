"""Attention-based MIL (Ilse, Tomczak, Welling, ICML 2018), plain and gated (METHODS.md §10.2).

``h_i = φ(x_i)``; ``a = softmax_i(wᵀ tanh(V h_i))`` or, gated,
``a = softmax_i(wᵀ (tanh(V h_i) ⊙ sigmoid(U h_i)))``; ``z = Σ_i a_i h_i``; ``logits = W z``.
Padded instances get attention logit −∞ (weight exactly 0).

Example:
    >>> import torch, needlework
    >>> model = needlework.create_model("abmil.gated", in_dim=32, num_classes=3)
    >>> out = model(torch.randn(2, 5, 32), mask=torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]]).bool())
    >>> out["logits"].shape, float(out["attention"][0, 3:].detach().sum())
    (torch.Size([2, 3]), 0.0)
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from needlework.models.mil.common import (
    GatedAttention,
    MILModel,
    feature_projector,
    masked_softmax,
    register_mil_model,
)


class ABMIL(MILModel):
    """Attention-based MIL pooling.

    Args:
        in_dim: feature width ``D``.
        num_classes: number of classes ``C``.
        embed_dim: width ``L`` of ``φ`` (Linear + ReLU + dropout); None = the features themselves
            (as with the LeNet encoder of the MNIST-bags setup, which already outputs L = 500).
        attention_dim: hidden width of the attention network (128 in the paper, 256 in CLAM's "small").
        gated: use the gated attention ``tanh ⊙ sigmoid``.
        dropout: dropout after ``φ`` and inside the attention network.
    """

    def __init__(
        self,
        in_dim: int,
        num_classes: int = 2,
        embed_dim: int | None = 512,
        attention_dim: int = 128,
        gated: bool = False,
        dropout: float = 0.0,
    ) -> None:
        super().__init__(in_dim, num_classes)
        width = embed_dim or in_dim
        self.embed = feature_projector(in_dim, embed_dim, dropout)
        self.attention = GatedAttention(width, attention_dim, heads=1, gated=gated, dropout=dropout)
        self.classifier = nn.Linear(width, num_classes)

    def forward(
        self, bag: torch.Tensor, coords: torch.Tensor | None = None, mask: torch.Tensor | None = None
    ) -> dict[str, Any]:
        """``bag`` ``(B, N, D)`` → ``logits`` ``(B, C)``, ``attention`` ``(B, N)``, ``embedding`` ``(B, L)``.

        ``instance_logits`` ``(B, N, C)`` applies the bag classifier to each instance embedding.
        """
        mask = self._check(bag, coords, mask)
        h = self.embed(bag)  # (B, N, L)
        attention = masked_softmax(self.attention(h).squeeze(-1), mask)  # (B, N)
        # bmm rather than einsum: its gradient w.r.t. h is contiguous, so autograd adds it in place to the
        # attention branch's instead of allocating an (N, L) sum (measured, benchmarks/peers.py)
        z = torch.bmm(attention.unsqueeze(1), h).squeeze(1)
        return {
            "logits": self.classifier(z),
            "attention": attention,
            "embedding": z,
            "instance_logits": self.classifier(h),
        }


@register_mil_model("abmil")
def abmil(in_dim: int, num_classes: int = 2, **kwargs: Any) -> ABMIL:
    """ABMIL with the plain ``tanh`` attention."""
    return ABMIL(in_dim=in_dim, num_classes=num_classes, gated=False, **kwargs)


@register_mil_model("abmil.gated")
def abmil_gated(in_dim: int, num_classes: int = 2, **kwargs: Any) -> ABMIL:
    """ABMIL with gated attention ``tanh ⊙ sigmoid``."""
    return ABMIL(in_dim=in_dim, num_classes=num_classes, gated=True, **kwargs)
