"""Built-in tile encoders: ResNets with torchvision parameter names, a small CNN and colour statistics.

Every encoder is a :class:`TileEncoder`: it takes tiles ``(B, 3, H, W)`` float32 in [0, 1] and returns
embeddings ``(B, D)`` with ``D = encoder.embed_dim``; it normalises its input itself (``mean``/``std``).
The ResNets use torchvision's parameter names, so a torchvision or timm ResNet checkpoint saved as a plain
state dict loads without importing either package (ENVIRONMENT.md §2). Without ``weights`` they are
randomly initialised from ``seed`` (deterministic, useful for tests and CPU demos).

Example:
    >>> import torch
    >>> enc = create_encoder("resnet8")
    >>> enc(torch.rand(2, 3, 64, 64)).shape
    torch.Size([2, 128])
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from needlework.checks import check_shape
from needlework.models.layers import Conv1x1
from needlework.registry import create_encoder, register_encoder

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

__all__ = ["IMAGENET_MEAN", "IMAGENET_STD", "ColorStats", "ResNet", "TileEncoder", "create_encoder"]


class TileEncoder(nn.Module):
    """Wraps a backbone returning ``(B, D)`` with input normalisation and metadata.

    Attributes:
        embed_dim: ``D``.
        input_size: tile side the encoder was trained at (tiles are resized to it by the embedder
            only if the user asks; CNNs accept any size).
        name, version: recorded in feature files (``encoder``, ``encoder_version``).
    """

    def __init__(
        self,
        backbone: nn.Module,
        embed_dim: int,
        name: str,
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
        input_size: int = 224,
        version: str = "random-init",
    ):
        super().__init__()
        self.backbone = backbone
        self.embed_dim = int(embed_dim)
        self.name = name
        self.version = version
        self.input_size = int(input_size)
        self.register_buffer(
            "mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1), persistent=False
        )
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` ``(B, 3, H, W)`` in [0, 1] → ``(B, D)``."""
        check_shape(x, ["B", "3", "H", "W"], "tiles")
        out = self.backbone((x - self.mean.to(x.dtype)) / self.std.to(x.dtype))
        if out.dim() != 2 or out.shape[1] != self.embed_dim:
            raise RuntimeError(
                f"encoder {self.name} returned {tuple(out.shape)}, expected (B, {self.embed_dim})"
            )
        return out


# --- ResNets with torchvision parameter names -------------------------------------------------------


def _conv3(cin: int, cout: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, 3, stride, 1, bias=False)


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, cin: int, width: int, stride: int = 1):
        super().__init__()
        self.conv1, self.bn1 = _conv3(cin, width, stride), nn.BatchNorm2d(width)
        self.conv2, self.bn2 = _conv3(width, width), nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = _shortcut(cin, width, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + (self.downsample(x) if self.downsample is not None else x))


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, cin: int, width: int, stride: int = 1):
        super().__init__()
        cout = width * 4
        self.conv1, self.bn1 = nn.Conv2d(cin, width, 1, bias=False), nn.BatchNorm2d(width)
        self.conv2, self.bn2 = _conv3(width, width, stride), nn.BatchNorm2d(width)
        self.conv3, self.bn3 = nn.Conv2d(width, cout, 1, bias=False), nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = _shortcut(cin, cout, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + (self.downsample(x) if self.downsample is not None else x))


def _shortcut(cin: int, cout: int, stride: int) -> nn.Sequential | None:
    if stride == 1 and cin == cout:
        return None
    return nn.Sequential(Conv1x1(cin, cout, stride), nn.BatchNorm2d(cout))


class ResNet(nn.Module):
    """ResNet trunk (torchvision layout: ``conv1, bn1, layer1..layerK``) + global average pool → ``(B, D)``.

    Args:
        block: ``"basic"`` or ``"bottleneck"``.
        layers: blocks per stage, e.g. ``(2, 2, 2, 2)`` (ResNet-18); fewer stages = truncated network.
        widths: stage widths (torchvision: 64, 128, 256, 512).
        stem: ``"imagenet"`` (7×7 stride 2 + max-pool) or ``"small"`` (3×3 stride 2, no pool).
    """

    def __init__(
        self,
        block: str = "basic",
        layers: Sequence[int] = (2, 2, 2, 2),
        widths: Sequence[int] = (64, 128, 256, 512),
        stem: str = "imagenet",
    ):
        super().__init__()
        cls = {"basic": BasicBlock, "bottleneck": Bottleneck}[block]
        c = widths[0]
        if stem == "imagenet":
            self.conv1 = nn.Conv2d(3, c, 7, 2, 3, bias=False)
            self.maxpool: nn.Module = nn.MaxPool2d(3, 2, 1)
        else:
            self.conv1 = nn.Conv2d(3, c, 3, 2, 1, bias=False)
            self.maxpool = nn.Identity()
        self.bn1, self.relu = nn.BatchNorm2d(c), nn.ReLU(inplace=True)
        cin = c
        for i, (n, width) in enumerate(zip(layers, widths)):
            blocks = []
            for j in range(n):
                blocks.append(cls(cin, width, stride=2 if (j == 0 and i > 0) else 1))
                cin = width * cls.expansion
            setattr(self, f"layer{i + 1}", nn.Sequential(*blocks))
        self.n_stages = len(layers)
        self.out_dim = cin

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        for i in range(self.n_stages):
            x = getattr(self, f"layer{i + 1}")(x)
        return x.mean(dim=(2, 3))


def _seeded(seed: int, build):  # type: ignore[no-untyped-def]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build()


def _resnet_encoder(name: str, seed: int, weights: str | None, **resnet_kw) -> TileEncoder:  # type: ignore[no-untyped-def]
    net = _seeded(seed, lambda: ResNet(**resnet_kw))
    enc = TileEncoder(net, net.out_dim, name)
    if weights is not None:
        from needlework.io.checkpoints import load_weights_into

        load_weights_into(enc.backbone, weights)
        enc.version = f"weights:{weights}"
    return enc.eval()


@register_encoder("resnet18")
def resnet18(weights: str | None = None, seed: int = 0) -> TileEncoder:
    """ResNet-18 (512-d), torchvision names; ``weights`` = local state-dict file."""
    return _resnet_encoder("resnet18", seed, weights, block="basic", layers=(2, 2, 2, 2))


@register_encoder("resnet50")
def resnet50(weights: str | None = None, seed: int = 0) -> TileEncoder:
    """ResNet-50 (2048-d), torchvision names."""
    return _resnet_encoder("resnet50", seed, weights, block="bottleneck", layers=(3, 4, 6, 3))


@register_encoder("resnet50_trunc")
def resnet50_trunc(weights: str | None = None, seed: int = 0) -> TileEncoder:
    """ResNet-50 truncated after ``layer3`` (1024-d), the CLAM baseline; loads a full ResNet-50
    checkpoint (``layer4`` and ``fc`` are ignored)."""
    return _resnet_encoder("resnet50_trunc", seed, weights, block="bottleneck", layers=(3, 4, 6))


@register_encoder("resnet8")
def resnet8(weights: str | None = None, seed: int = 0, width: int = 32) -> TileEncoder:
    """Small 3-stage CNN (``4 · width``-d, 3×3 stride-2 stem): fast CPU features for tests and demos."""
    return _resnet_encoder(
        "resnet8",
        seed,
        weights,
        block="basic",
        layers=(1, 1, 1),
        widths=(width, 2 * width, 4 * width),
        stem="small",
    )


class ColorStats(nn.Module):
    """Hand-crafted colour features, no weights: per-channel mean, std and ``bins``-bin histograms of R,
    G, B and of darkness (``1 − max(R, G, B)``), plus the fraction of saturated pixels.
    ``D = 6 + 4·bins + 1``."""

    def __init__(self, bins: int = 8):
        super().__init__()
        self.bins = bins

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.float()
        mean, std = x.mean(dim=(2, 3)), x.std(dim=(2, 3))
        mx, mn = x.max(dim=1).values, x.min(dim=1).values
        chans = torch.cat([x, (1 - mx).unsqueeze(1)], dim=1).clamp(0, 1)  # (B, 4, H, W)
        idx = (chans * self.bins).long().clamp(max=self.bins - 1).flatten(2)
        hist = (
            torch.zeros(x.shape[0], 4, self.bins, device=x.device).scatter_add_(
                2, idx, torch.ones_like(idx, dtype=torch.float32)
            )
            / idx.shape[2]
        )
        sat = ((mx - mn) / mx.clamp_min(1e-6) > 0.25).float().mean(dim=(1, 2)).unsqueeze(1)
        return torch.cat([mean, std, hist.flatten(1), sat], dim=1)


@register_encoder("color_stats")
def color_stats(bins: int = 8, weights: str | None = None, seed: int = 0) -> TileEncoder:
    """Colour statistics (:class:`ColorStats`); instant on CPU, enough to find the synthetic lesions."""
    if weights is not None:
        raise ValueError("color_stats has no weights")
    return TileEncoder(
        ColorStats(bins), 6 + 4 * bins + 1, "color_stats", mean=(0, 0, 0), std=(1, 1, 1), version="v1"
    ).eval()
