"""Max / mean / log-sum-exp pooling baselines, instance-level and embedding-level (METHODS.md §10.1).

* Instance-level (mi-Net style): a classifier scores each instance, ``c_i = g(h_i)`` ``(N, C)``, and the
  bag logit pools the scores over instances; ``instance_logits`` are the explanation.
* Embedding-level (MI-Net style): the instance embeddings are pooled per dimension, then classified.

``attention`` is the weight each pooling gives to each instance: for instance-level max, the one-hot of
the winning instance per class ``(B, C, N)``; for embedding-level max, the share of embedding dimensions an
instance wins ``(B, N)`` (ties split evenly); for means, ``1 / n``; for log-sum-exp, the softmax
weights ``softmax(r ·)`` (the gradient of the smooth max), averaged over dimensions for
embedding-level pooling.

Example:
    >>> import torch, needlework
    >>> model = needlework.create_model("instance.max", in_dim=16, num_classes=2)
    >>> out = model(torch.randn(3, 7, 16))
    >>> out["logits"].shape, out["instance_logits"].shape
    (torch.Size([3, 2]), torch.Size([3, 7, 2]))
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from needlework.models.mil.common import (
    MILModel,
    feature_projector,
    masked_logsumexp,
    masked_max,
    masked_mean,
    masked_softmax,
    register_mil_model,
    uniform_attention,
)

POOLINGS = ("max", "mean", "lse")


def _check_pooling(pooling: str) -> None:
    if pooling not in POOLINGS:
        raise ValueError(f"pooling must be one of {POOLINGS}, got {pooling!r}")


class _PoolingMIL(MILModel):
    """Shared constructor of the instance- and embedding-level pooling models."""

    def __init__(
        self,
        in_dim: int,
        num_classes: int = 2,
        pooling: str = "max",
        embed_dim: int | None = 128,
        dropout: float = 0.0,
        lse_r: float = 5.0,
    ) -> None:
        super().__init__(in_dim, num_classes)
        _check_pooling(pooling)
        self.pooling, self.lse_r = pooling, lse_r
        self.embed = feature_projector(in_dim, embed_dim, dropout)
        self.classifier = nn.Linear(embed_dim or in_dim, num_classes)


class InstancePoolingMIL(_PoolingMIL):
    """Score every instance, pool the scores: ``logits = pool_i g(φ(x_i))``.

    Args:
        in_dim: feature width ``D``.
        num_classes: number of classes ``C``.
        pooling: ``"max"``, ``"mean"`` or ``"lse"`` (``(1/r) log mean exp(r ·)``).
        embed_dim: width of ``φ`` (Linear + ReLU + dropout); None = use the features as they are.
        dropout: dropout after ``φ``.
        lse_r: sharpness ``r`` of the log-sum-exp pooling.
    """

    def forward(
        self, bag: torch.Tensor, coords: torch.Tensor | None = None, mask: torch.Tensor | None = None
    ) -> dict[str, Any]:
        """``bag`` ``(B, N, D)`` → ``logits`` ``(B, C)``, ``instance_logits`` ``(B, N, C)``, ``attention``."""
        mask = self._check(bag, coords, mask)
        scores = self.classifier(self.embed(bag))  # (B, N, C)
        if self.pooling == "max":
            logits, winner = masked_max(scores, mask)  # (B, C)
            attention = F.one_hot(winner, bag.shape[1]).to(scores.dtype)  # (B, C, N)
        elif self.pooling == "mean":
            logits = masked_mean(scores, mask)
            attention = uniform_attention(mask, scores.dtype)
        else:
            logits = masked_logsumexp(scores, mask, self.lse_r, normalise=True)
            attention = masked_softmax(self.lse_r * scores.transpose(1, 2), mask)  # (B, C, N)
        return {"logits": logits, "instance_logits": scores, "attention": attention}


class EmbeddingPoolingMIL(_PoolingMIL):
    """Pool the instance embeddings per dimension, then classify: ``logits = g(pool_i φ(x_i))``.

    Args: as :class:`InstancePoolingMIL`.
    """

    def forward(
        self, bag: torch.Tensor, coords: torch.Tensor | None = None, mask: torch.Tensor | None = None
    ) -> dict[str, Any]:
        """``bag`` ``(B, N, D)`` → ``logits`` ``(B, C)``, ``embedding`` ``(B, L)``, ``attention``."""
        mask = self._check(bag, coords, mask)
        h = self.embed(bag)  # (B, N, L)
        if self.pooling == "max":
            z, _ = masked_max(h, mask)  # (B, L)
            # share of dimensions each instance wins; ties (e.g. ReLU zeros) split evenly
            wins = ((h == z[:, None, :]) & mask[..., None]).to(h.dtype)  # (B, N, L)
            attention = (wins / wins.sum(dim=1, keepdim=True)).mean(dim=2)
        elif self.pooling == "mean":
            z = masked_mean(h, mask)
            attention = uniform_attention(mask, h.dtype)
        else:
            z = masked_logsumexp(h, mask, self.lse_r, normalise=True)
            attention = masked_softmax(self.lse_r * h.transpose(1, 2), mask).mean(dim=1)
        return {"logits": self.classifier(z), "embedding": z, "attention": attention}


def _factory(cls: type[MILModel], pooling: str) -> Any:
    def build(in_dim: int, num_classes: int = 2, **kwargs: Any) -> MILModel:
        return cls(in_dim=in_dim, num_classes=num_classes, pooling=pooling, **kwargs)

    build.__doc__ = f"{cls.__name__} with {pooling} pooling."
    build.__annotations__["return"] = cls  # the class whose arguments **kwargs takes (cli.model_args)
    return build


for _pool in POOLINGS:
    register_mil_model(f"instance.{_pool}")(_factory(InstancePoolingMIL, _pool))
    register_mil_model(f"embedding.{_pool}")(_factory(EmbeddingPoolingMIL, _pool))
