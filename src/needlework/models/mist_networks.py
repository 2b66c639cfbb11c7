"""Networks of MIST: heatmap network (single- and multi-scale), patch classifier, patch auto-encoder.

Widths and depths default to the reference MNIST setting (METHODS.md §8.1) and are parameters, so CPU
presets can shrink them.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from needlework.checks import check_shape
from needlework.mist.keypoints import local_spatial_softmax


class UnpaddedResidualBlock(nn.Module):
    """Two unpadded 3×3 convs with GroupNorm(1) and ReLU; the skip is centre-cropped (output 4 px smaller)."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(width, width, 3)
        self.norm1 = nn.GroupNorm(1, width)
        self.conv2 = nn.Conv2d(width, width, 3)
        self.norm2 = nn.GroupNorm(1, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu(self.norm1(self.conv1(x)))
        y = self.norm2(self.conv2(y))
        return F.relu(y + x[..., 2:-2, 2:-2])


class HeatmapNet(nn.Module):
    """Stride-1 heatmap network: reflect pad, BatchNorm on the input, 1×1 conv, residual blocks, 1×1 conv.

    Args:
        in_channels: image channels.
        out_channels: score maps (1 for MIST; K for the channel-wise baseline).
        width: channels of the residual trunk (32 in the reference).
        n_blocks: unpadded residual blocks (4); the reflect padding ``2·n_blocks`` keeps the size.

    Shapes: ``(B, C_in, H, W)`` → ``(B, C_out, H, W)`` raw scores.
    """

    def __init__(
        self, in_channels: int = 1, out_channels: int = 1, width: int = 32, n_blocks: int = 4
    ) -> None:
        super().__init__()
        self.pad = 2 * n_blocks
        self.input_norm = nn.BatchNorm2d(in_channels)
        self.stem = nn.Conv2d(in_channels, width, 1)
        self.blocks = nn.Sequential(*[UnpaddedResidualBlock(width) for _ in range(n_blocks)])
        self.head = nn.Conv2d(width, out_channels, 1)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        check_shape(image, ["B", "C", "H", "W"], "image")
        h, w = image.shape[-2:]
        if self.pad >= min(h, w):
            raise ValueError(f"image of {h}×{w} px is too small for reflect padding {self.pad}")
        x = (
            F.pad(self.input_norm(image), [self.pad] * 4, mode="reflect")
            if self.pad
            else self.input_norm(image)
        )
        return self.head(self.blocks(self.stem(x)))


class MultiScaleHeatmap(nn.Module):
    """Per-scale local-softmax heatmaps: the network runs on the image rescaled by ``1/s`` for each scale.

    Args:
        net: a heatmap network with one output channel.
        scales: increasing scales ``s``; ``(1.0,)`` is the single-scale MNIST setting.
        softmax_window: odd window of the local spatial softmax (None or 0 disables it: sigmoid instead).
        beta: inverse temperature of the local softmax.
        softmax_padding: border handling of the local softmax, ``"reflect"`` or ``"zeros"`` (see
            :func:`~needlework.mist.keypoints.local_spatial_softmax`).

    Shapes: ``(B, C, H, W)`` → ``(B, S, H, W)`` in [0, 1].
    """

    def __init__(
        self,
        net: nn.Module,
        scales: Sequence[float] = (1.0,),
        softmax_window: int | None = 15,
        beta: float = 10.0,
        softmax_padding: str = "reflect",
    ) -> None:
        super().__init__()
        self.net = net
        self.scales = [float(s) for s in scales]
        if (
            not self.scales
            or any(b <= a for a, b in zip(self.scales, self.scales[1:]))
            or self.scales[0] <= 0
        ):
            raise ValueError(f"scales must be positive and strictly increasing, got {list(scales)}")
        self.softmax_window, self.beta, self.softmax_padding = softmax_window, float(beta), softmax_padding

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        h, w = image.shape[-2:]
        maps = []
        for s in self.scales:
            if s == 1.0:
                maps.append(self.net(image))
                continue
            size = (max(1, round(h / s)), max(1, round(w / s)))
            small = F.interpolate(image, size=size, mode="bilinear", align_corners=False, antialias=s > 1)
            maps.append(F.interpolate(self.net(small), size=(h, w), mode="bilinear", align_corners=False))
        scores = torch.cat(maps, dim=1)
        if self.softmax_window:
            return local_spatial_softmax(scores, self.softmax_window, self.beta, self.softmax_padding)
        return torch.sigmoid(scores)


class PaddedResidualBlock(nn.Module):
    """Two padded 3×3 convs with GroupNorm(1) and ReLU and an identity skip."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(width, width, 3, padding=1),
            nn.GroupNorm(1, width),
            nn.ReLU(inplace=True),
            nn.Conv2d(width, width, 3, padding=1),
            nn.GroupNorm(1, width),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(x + self.body(x))


class PatchClassifier(nn.Module):
    """Task network for classification: levels of [conv → residual blocks → max-pool 2], then Linear.

    Reference: 5 levels, widths 8 → 128, 3 blocks each, for 32×32 patches (paper App. C.1).

    Shapes: ``(N, C, P, P)`` → ``(N, num_classes)`` logits.
    """

    def __init__(
        self,
        in_channels: int = 1,
        num_classes: int = 10,
        widths: Sequence[int] = (8, 16, 32, 64, 128),
        blocks_per_level: int = 3,
    ) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        prev = in_channels
        for width in widths:
            layers += [nn.Conv2d(prev, width, 3, padding=1), nn.GroupNorm(1, width), nn.ReLU(inplace=True)]
            layers += [PaddedResidualBlock(width) for _ in range(blocks_per_level)]
            layers.append(nn.MaxPool2d(2, ceil_mode=True))
            prev = width
        self.features = nn.Sequential(*layers)
        self.fc = nn.Linear(prev, num_classes)

    def forward(self, patches: torch.Tensor) -> torch.Tensor:
        x = self.features(patches)
        return self.fc(x.amax(dim=(-2, -1)) if x.shape[-1] > 1 else x.flatten(1))


class PatchAutoencoder(nn.Module):
    """Task network for reconstruction: conv encoder to a ``latent_dim`` code, transposed-conv decoder.

    Shapes: ``(N, C, P, P)`` → ``(N, C, P, P)`` in [0, 1]; ``P`` must be divisible by 4.
    """

    def __init__(
        self, in_channels: int = 1, patch_size: int = 32, latent_dim: int = 32, width: int = 16
    ) -> None:
        super().__init__()
        if patch_size % 4:
            raise ValueError(f"patch_size must be divisible by 4 for the auto-encoder, got {patch_size}")
        q = patch_size // 4
        self.encoder = nn.Sequential(
            nn.Conv2d(in_channels, width, 3, stride=2, padding=1),
            nn.ReLU(inplace=True),
            nn.Conv2d(width, 2 * width, 3, stride=2, padding=1),
            nn.ReLU(inplace=True),
            nn.Flatten(),
            nn.Linear(2 * width * q * q, latent_dim),
        )
        self.decoder = nn.Sequential(
            nn.Linear(latent_dim, 2 * width * q * q),
            nn.ReLU(inplace=True),
            nn.Unflatten(1, (2 * width, q, q)),
            nn.ConvTranspose2d(2 * width, width, 4, stride=2, padding=1),
            nn.ReLU(inplace=True),
            nn.ConvTranspose2d(width, in_channels, 4, stride=2, padding=1),
            nn.Sigmoid(),
        )

    def forward(self, patches: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.encoder(patches))


def soft_argmax(scores: torch.Tensor, temperature: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Differentiable expected position of a spatial softmax per channel.

    Args:
        scores: ``(B, K, H, W)`` raw scores.
        temperature: softmax temperature.

    Returns:
        ``(centres (B, K, 2), peak (B, K))``: expected ``(x, y)`` in continuous pixels and the maximum
        probability of each channel (a confidence).
    """
    b, k, h, w = check_shape(scores, ["B", "K", "H", "W"], "scores").values()
    prob = (scores.flatten(2) / temperature).softmax(dim=-1).reshape(b, k, h, w)
    xs = torch.arange(w, dtype=scores.dtype, device=scores.device) + 0.5
    ys = torch.arange(h, dtype=scores.dtype, device=scores.device) + 0.5
    cx = (prob.sum(dim=2) * xs).sum(-1)
    cy = (prob.sum(dim=3) * ys).sum(-1)
    return torch.stack([cx, cy], dim=-1), prob.flatten(2).amax(-1)
