"""Baselines of the MIST paper: channel-wise heatmaps and a fixed grid of patches.

* ``"mist.channelwise"`` (:class:`ChannelwiseMIST`): the heatmap network outputs K channels, one per
  instance; each channel's spatial softmax gives a location by soft-argmax, which is differentiable, so the
  whole model is trained end to end on the task loss (paper §5: 25.4 / 75.5 / 24.8 % on MNIST-hard).
* ``"mist.grid"`` (:class:`GridMIST`): K = g² patches at the centres of a regular g×g grid; only the task
  network learns.

Example:
    >>> m = GridMIST(k=4, classifier_widths=(8,), classifier_blocks=1)
    >>> m.locate(torch.zeros(1, 1, 40, 40))["centres"][0].tolist()
    [[10.0, 10.0], [30.0, 10.0], [10.0, 30.0], [30.0, 30.0]]
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

from needlework.models.mist import PatchTaskModel
from needlework.models.mist_networks import HeatmapNet, soft_argmax
from needlework.registry import register_model


@register_model("mist.channelwise")
class ChannelwiseMIST(PatchTaskModel):
    """Channel-wise heatmap baseline: one heatmap channel per instance, soft-argmax locations.

    Args (besides :class:`~needlework.models.mist.PatchTaskModel`'s):
        heatmap_width, heatmap_blocks: residual trunk of the heatmap network.
        temperature: spatial-softmax temperature of the soft-argmax.
    """

    training_mode = "end_to_end"

    def __init__(
        self,
        task: str = "classification",
        num_classes: int = 10,
        k: int = 9,
        in_channels: int = 1,
        patch_size: int = 32,
        anchor: float = 20.0,
        heatmap_width: int = 32,
        heatmap_blocks: int = 4,
        temperature: float = 1.0,
        classifier_widths: Sequence[int] = (8, 16, 32, 64, 128),
        classifier_blocks: int = 3,
        latent_dim: int = 32,
        ae_width: int = 16,
        class_loss: str = "l2",
    ) -> None:
        super().__init__(
            task,
            num_classes,
            k,
            in_channels,
            patch_size,
            anchor,
            classifier_widths,
            classifier_blocks,
            latent_dim,
            ae_width,
            class_loss,
        )
        self.heatmap_net = HeatmapNet(in_channels, self.k, heatmap_width, heatmap_blocks)
        self.temperature = float(temperature)

    def detector_parameters(self) -> list[nn.Parameter]:
        return list(self.heatmap_net.parameters())

    def locate(self, image: torch.Tensor) -> dict[str, torch.Tensor]:
        centres, peak = soft_argmax(self.heatmap_net(image), self.temperature)
        sizes = torch.full_like(peak, self.anchor)
        return {"centres": centres, "sizes": sizes, "scores": peak, "scales": torch.ones_like(peak)}


@register_model("mist.grid")
class GridMIST(PatchTaskModel):
    """Fixed-grid baseline: K = g² patches centred on the cells of a g×g grid.

    Args (besides :class:`~needlework.models.mist.PatchTaskModel`'s): ``cell_boxes`` — box side = cell
    size (True) or ``anchor`` (False, default).
    """

    training_mode = "task_only"

    def __init__(
        self,
        task: str = "classification",
        num_classes: int = 10,
        k: int = 9,
        in_channels: int = 1,
        patch_size: int = 32,
        anchor: float = 20.0,
        cell_boxes: bool = False,
        classifier_widths: Sequence[int] = (8, 16, 32, 64, 128),
        classifier_blocks: int = 3,
        latent_dim: int = 32,
        ae_width: int = 16,
        class_loss: str = "l2",
    ) -> None:
        g = math.isqrt(k)
        if g * g != k:
            raise ValueError(f"the grid baseline needs k to be a square number (g × g cells), got k={k}")
        super().__init__(
            task,
            num_classes,
            k,
            in_channels,
            patch_size,
            anchor,
            classifier_widths,
            classifier_blocks,
            latent_dim,
            ae_width,
            class_loss,
        )
        self.grid, self.cell_boxes = g, bool(cell_boxes)

    def locate(self, image: torch.Tensor) -> dict[str, torch.Tensor]:
        b, _, h, w = image.shape
        g = self.grid
        ix = torch.arange(self.k, device=image.device)
        cx = (ix % g + 0.5).to(image.dtype) * (w / g)
        cy = (ix // g + 0.5).to(image.dtype) * (h / g)
        centres = torch.stack([cx, cy], dim=-1).expand(b, -1, -1)
        side = min(h, w) / g if self.cell_boxes else self.anchor
        sizes = torch.full((b, self.k), side, dtype=image.dtype, device=image.device)
        ones = torch.ones(b, self.k, dtype=image.dtype, device=image.device)
        return {"centres": centres, "sizes": sizes, "scores": ones, "scales": ones}
