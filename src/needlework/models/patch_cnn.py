"""A small ResNet-style patch encoder in plain PyTorch (no torchvision), shared by DPS and IPS.

``PatchCNN`` maps ``(n, C, P, P)`` patches to ``(n, D)`` embeddings: a stem convolution, stages of
BasicBlocks, global pooling and an optional linear projection. Presets:

* default ``widths=(32, 32, 32)``, one block per stage, strides (1, 2, 2): the "ResNet-8, 32 ch" of
  ENVIRONMENT.md §8 (58k parameters) — CPU-sized DPS / IPS;
* ``PatchCNN.resnet18_layer2(in_channels)``: ResNet-18 (7×7/2 stem + max-pool, layer1, layer2), D = 128,
  the IPS Megapixel MNIST encoder (METHODS.md §6.2). Parameter names follow torchvision's
  ``conv1/bn1/layer1.0.conv1...`` where the layouts coincide.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from needlework.models.layers import Conv1x1

NORMS = ("batch", "group", "none")


def _norm(kind: str, channels: int) -> nn.Module:
    if kind == "batch":
        return nn.BatchNorm2d(channels)
    if kind == "group":
        return nn.GroupNorm(min(8, channels), channels)
    return nn.Identity()


class BasicBlock(nn.Module):
    """Two 3×3 convolutions with a residual connection (1×1 projection when the shape changes)."""

    def __init__(self, in_ch: int, out_ch: int, stride: int, norm: str) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, stride, 1, bias=norm == "none")
        self.bn1 = _norm(norm, out_ch)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, 1, 1, bias=norm == "none")
        self.bn2 = _norm(norm, out_ch)
        self.relu = nn.ReLU(inplace=True)
        self.downsample: nn.Module | None = None
        if stride != 1 or in_ch != out_ch:
            self.downsample = nn.Sequential(
                Conv1x1(in_ch, out_ch, stride, bias=norm == "none"), _norm(norm, out_ch)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        return self.relu(self.bn2(self.conv2(out)) + identity)


class PatchCNN(nn.Module):
    """ResNet-style encoder ``(n, C, P, P) → (n, D)``.

    Args:
        in_channels: image channels C.
        widths: channels of each stage.
        strides: stride of the first block of each stage (same length as ``widths``).
        blocks_per_stage: BasicBlocks per stage.
        stem_kernel, stem_stride, stem_pool: the stem convolution (to ``widths[0]`` channels) and an
            optional 3×3/2 max-pool after it.
        out_dim: if given, a linear projection to ``out_dim``; otherwise D = ``widths[-1]``.
        norm: ``"batch"``, ``"group"`` or ``"none"``.
        pool: global ``"avg"`` or ``"max"`` pooling.

    Example:
        >>> PatchCNN(1, out_dim=64)(torch.rand(5, 1, 32, 32)).shape
        torch.Size([5, 64])
    """

    def __init__(
        self,
        in_channels: int = 1,
        widths: Sequence[int] = (32, 32, 32),
        strides: Sequence[int] = (1, 2, 2),
        blocks_per_stage: int = 1,
        stem_kernel: int = 3,
        stem_stride: int = 1,
        stem_pool: bool = False,
        out_dim: int | None = None,
        norm: str = "batch",
        pool: str = "avg",
    ) -> None:
        super().__init__()
        if len(widths) != len(strides) or not widths:
            raise ValueError(
                f"widths {tuple(widths)} and strides {tuple(strides)} must be non-empty, same length"
            )
        if norm not in NORMS:
            raise ValueError(f"norm must be one of {NORMS}, got {norm!r}")
        if pool not in ("avg", "max"):
            raise ValueError(f"pool must be 'avg' or 'max', got {pool!r}")
        self.in_channels = in_channels
        self.conv1 = nn.Conv2d(
            in_channels, widths[0], stem_kernel, stem_stride, stem_kernel // 2, bias=norm == "none"
        )
        self.bn1 = _norm(norm, widths[0])
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, 1) if stem_pool else nn.Identity()
        in_ch = widths[0]
        for i, (width, stride) in enumerate(zip(widths, strides), start=1):
            blocks = [BasicBlock(in_ch, width, stride, norm)]
            blocks += [BasicBlock(width, width, 1, norm) for _ in range(blocks_per_stage - 1)]
            self.add_module(f"layer{i}", nn.Sequential(*blocks))
            in_ch = width
        self.n_stages = len(widths)
        self.pool = nn.AdaptiveAvgPool2d(1) if pool == "avg" else nn.AdaptiveMaxPool2d(1)
        self.fc = nn.Linear(in_ch, out_dim) if out_dim is not None else nn.Identity()
        self.out_dim = out_dim if out_dim is not None else in_ch

    @classmethod
    def resnet18_layer2(
        cls, in_channels: int = 1, out_dim: int | None = None, norm: str = "batch"
    ) -> PatchCNN:
        """ResNet-18 up to layer2 (D = 128): the IPS Megapixel MNIST encoder."""
        return cls(in_channels, (64, 128), (1, 2), 2, 7, 2, True, out_dim, norm, "avg")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4 or x.shape[1] != self.in_channels:
            raise ValueError(f"patches must have shape (n, {self.in_channels}, P, P), got {tuple(x.shape)}")
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        for i in range(1, self.n_stages + 1):
            x = getattr(self, f"layer{i}")(x)
        return self.fc(self.pool(x).flatten(1))


def build_patch_encoder(in_channels: int, dim: int, encoder: dict | None) -> PatchCNN:
    """A :class:`PatchCNN` from a config dict; ``{"preset": "resnet18_layer2", ...}`` picks the preset.

    The encoder always ends at ``dim`` features (a linear projection is added when its width differs).
    """
    cfg = dict(encoder or {})
    preset = cfg.pop("preset", None)
    if preset == "resnet18_layer2":
        enc = PatchCNN.resnet18_layer2(in_channels, norm=cfg.pop("norm", "batch"))
        if cfg:
            raise ValueError(f"preset 'resnet18_layer2' takes only 'norm', got extra keys {sorted(cfg)}")
    elif preset is None:
        enc = PatchCNN(in_channels, **cfg)
    else:
        raise ValueError(f"unknown encoder preset {preset!r}; use 'resnet18_layer2' or give PatchCNN kwargs")
    if enc.out_dim != dim:
        enc.fc = nn.Linear(enc.out_dim, dim)
        enc.out_dim = dim
    return enc
