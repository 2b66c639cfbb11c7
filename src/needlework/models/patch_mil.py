"""``"patch_mil"``: MIL over *all* patches of a grid, the "look at everything" baseline of the selectors.

The image is cut into a regular grid of ``P × P`` patches (zero-padded at the right and bottom borders when
the size is not a multiple of ``P``), each patch is embedded by a small CNN
(:func:`~needlework.models.patch_cnn.build_patch_encoder`), and any MIL head of the zoo pools the bag of
patch embeddings (ABMIL by default; ``needlework list models`` shows the zoo), with the patch centres as
coordinates for heads that use them (TransMIL, SparseConvMIL, ...).

Example:
    >>> m = PatchGridMIL(num_classes=2, patch_size=16, dim=32, encoder={"widths": [8, 16], "strides": [1, 2]})
    >>> out = m(torch.rand(2, 1, 64, 48))
    >>> out["logits"].shape, out["attention"].shape, out["attention_map"].shape
    (torch.Size([2, 2]), torch.Size([2, 12]), torch.Size([2, 4, 3]))
"""

from __future__ import annotations

from typing import Any

import torch

from needlework.checks import check_shape
from needlework.models.base import NeedleworkModel
from needlework.models.patch_cnn import build_patch_encoder
from needlework.ops.patches import extract_patches
from needlework.registry import create_model, register_model

__all__ = ["PatchGridMIL", "patch_grid"]


def patch_grid(height: int, width: int, patch_size: int, device: torch.device | None = None) -> torch.Tensor:
    """Top-left corners ``(N, 2)`` ``(x, y)`` of the non-overlapping grid covering ``height × width``
    (row-major; the last row and column may reach past the image, where patches read zeros)."""
    ys = torch.arange(0, height, patch_size, device=device)
    xs = torch.arange(0, width, patch_size, device=device)
    yy, xx = torch.meshgrid(ys, xs, indexing="ij")
    return torch.stack([xx.flatten(), yy.flatten()], -1)


@register_model("patch_mil")
class PatchGridMIL(NeedleworkModel):
    """Embed every grid patch of ``image (B, C, H, W)``, pool them with a MIL head.

    Args:
        num_classes: classes ``K``.
        in_channels: image channels.
        patch_size: side ``P`` of the grid's patches.
        dim: embedding width ``D`` of a patch.
        encoder: :class:`~needlework.models.patch_cnn.PatchCNN` kwargs (or ``{"preset": ...}``).
        mil: registry name of the MIL head (``"abmil"``, ``"abmil.gated"``, ``"transmil"``, ...).
        mil_kwargs: arguments of the head beyond ``in_dim`` and ``num_classes``.
        chunk_size: patches embedded per encoder call (bounds the activation memory at inference).

    ``forward(image)`` returns ``logits (B, K)``, ``attention (B, N)`` over the grid cells (row-major;
    uniform when the head has none), ``attention_map (B, gh, gw)`` and ``instance_coords (B, N, 2)``.
    """

    def __init__(
        self,
        num_classes: int = 2,
        in_channels: int = 1,
        patch_size: int = 32,
        dim: int = 64,
        encoder: dict[str, Any] | None = None,
        mil: str = "abmil",
        mil_kwargs: dict[str, Any] | None = None,
        chunk_size: int = 4096,
    ) -> None:
        super().__init__()
        if patch_size < 1 or chunk_size < 1:
            raise ValueError(f"patch_size ({patch_size}) and chunk_size ({chunk_size}) must be positive")
        self.num_classes, self.in_channels = num_classes, in_channels
        self.patch_size, self.chunk_size = int(patch_size), int(chunk_size)
        self.encoder = build_patch_encoder(in_channels, dim, encoder)
        self.head = create_model(mil, in_dim=dim, num_classes=num_classes, **(mil_kwargs or {}))

    def forward(self, image: torch.Tensor) -> dict[str, Any]:
        check_shape(image, ["B", str(self.in_channels), "H", "W"], "image")
        B, _, H, W = image.shape
        P = self.patch_size
        corners = patch_grid(H, W, P, image.device)  # (N, 2)
        coords = corners.expand(B, -1, -1)
        patches = extract_patches(image, coords, P).flatten(0, 1)  # (B·N, C, P, P)
        emb = torch.cat([self.encoder(c) for c in patches.split(self.chunk_size)]).view(B, len(corners), -1)
        centres = (coords + P / 2).float()
        out = self.head(bag=emb, coords=centres)
        N = emb.shape[1]
        attention = out.get("attention")
        if attention is None or attention.shape != (B, N):
            attention = torch.full((B, N), 1.0 / N, device=image.device)
        grid = (-(-H // P), -(-W // P))
        return {
            **out,
            "logits": out["logits"],
            "attention": attention,
            "attention_map": attention.reshape(B, *grid),
            "instance_coords": coords,
        }
