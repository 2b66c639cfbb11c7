"""End-to-end MIL on pixel bags ``(B, N, C, H, W)``: an instance encoder + any MIL aggregator.

The ABMIL MNIST-bags setup (Ilse et al. 2018, METHODS.md §10.2) trains a LeNet instance encoder
(Conv 20@5 → ReLU → MaxPool 2 → Conv 50@5 → ReLU → MaxPool 2 → FC 800 → 500 → ReLU) jointly with the
attention pooling. :class:`PixelBagMIL` embeds only the real instances (padding is never encoded) and
hands ``(B, N, embed_dim)`` with the same ``coords`` and ``mask`` to the registered MIL model ``mil``, so
every model of the zoo can be trained end-to-end on pixel bags; its ``compute_loss`` is the aggregator's.

Example:
    >>> import torch, needlework
    >>> model = needlework.create_model("lenet_mil", num_classes=2, mil="abmil.gated",
    ...                                 mil_kwargs={"embed_dim": None})
    >>> model(torch.rand(2, 5, 1, 28, 28))["logits"].shape
    torch.Size([2, 2])
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from needlework.checks import check_shape
from needlework.models.base import NeedleworkModel
from needlework.models.mil.common import MILModel, check_bag
from needlework.registry import create_encoder, create_model, register_encoder, register_model


@register_encoder("lenet")
class LeNetEncoder(nn.Module):
    """LeNet instance encoder of the ABMIL paper: ``(M, C, 28, 28)`` → ``(M, embed_dim)``.

    Args:
        in_channels: image channels.
        embed_dim: output width (500 in the paper).
        image_size: input side (28 for MNIST); sets the width of the fully connected layer.
    """

    def __init__(self, in_channels: int = 1, embed_dim: int = 500, image_size: int = 28) -> None:
        super().__init__()
        side = ((image_size - 4) // 2 - 4) // 2
        if side < 1:
            raise ValueError(f"image_size {image_size} is too small for LeNet (needs >= 16)")
        self.embed_dim = embed_dim
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, 20, 5), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(20, 50, 5), nn.ReLU(), nn.MaxPool2d(2),
        )
        self.fc = nn.Sequential(nn.Linear(50 * side * side, embed_dim), nn.ReLU())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.features(x).flatten(1))


class PixelBagMIL(NeedleworkModel):
    """Instance encoder + MIL aggregator, trained end-to-end on pixel bags.

    Args:
        num_classes: number of classes.
        mil: registry name of the aggregator (any of ``needlework.models.mil.list_mil_models()``).
        mil_kwargs: its keyword arguments (``in_dim`` is the encoder width and set here).
        encoder: registry name of the instance encoder (``"lenet"``).
        encoder_kwargs: its keyword arguments.
    """

    def __init__(
        self,
        num_classes: int = 2,
        mil: str = "abmil.gated",
        mil_kwargs: dict[str, Any] | None = None,
        encoder: str = "lenet",
        encoder_kwargs: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        self.encoder = create_encoder(encoder, **(encoder_kwargs or {}))
        self.aggregator: MILModel = create_model(
            mil, in_dim=self.encoder.embed_dim, num_classes=num_classes, **(mil_kwargs or {})
        )
        self.num_classes = num_classes
        self.permutation_invariant = self.aggregator.permutation_invariant

    @property
    def multilabel(self) -> bool:  # type: ignore[override]
        return self.aggregator.multilabel

    @multilabel.setter
    def multilabel(self, value: bool) -> None:
        self.aggregator.multilabel = value

    def forward(
        self, bag: torch.Tensor, coords: torch.Tensor | None = None, mask: torch.Tensor | None = None
    ) -> dict[str, Any]:
        """``bag`` ``(B, N, C, H, W)`` → the aggregator's output on the instance embeddings."""
        sizes = check_shape(bag, ["B", "N", "C", "H", "W"], "bag")
        flat = bag.new_zeros(sizes["B"], sizes["N"], 1)
        mask = check_bag(flat, coords, mask)
        real = self.encoder(bag[mask])  # only real instances are encoded
        embeddings = real.new_zeros(sizes["B"], sizes["N"], real.shape[-1]).index_put((mask,), real)
        return self.aggregator(embeddings, coords, mask)

    def compute_loss(
        self, output: dict[str, Any], target: torch.Tensor, class_weight: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        return self.aggregator.compute_loss(output, target, class_weight)


register_model("lenet_mil")(PixelBagMIL)
