"""BagNet-style encoder with a selectable receptive field, and the dense testbed classifier.

The encoder follows the ResNet-50 layout of Needles in Haystacks (METHODS.md §3.1): a stem (1×1 conv,
3×3 *valid* conv), four stages of bottleneck blocks (``[3, 4, 6, 3]``, strides ``[2, 2, 2, 1]``, output
stride 8). In stage ``s`` only the first ``kernel3[s]`` blocks have a 3×3 middle convolution; the rest
use 1×1, which fixes the receptive field (RF): 9, 17, 33, 77 or 177 px. Convolutions are unpadded
("valid"), so every output unit sees exactly an RF-sized window of the image and nothing else; the
residual shortcut is cropped to the centre of the valid window to stay aligned.

Example:
    >>> enc = BagNetEncoder(receptive_field=33, width=0.25)
    >>> receptive_field(enc)
    33
    >>> enc(torch.zeros(1, 1, 64, 64)).shape
    torch.Size([1, 512, 4, 4])
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial

import torch
from torch import nn

from needlework.checks import check_shape
from needlework.models.base import NeedleworkModel
from needlework.models.layers import Conv1x1
from needlework.models.pooling import AttentionPool, create_pooling, flatten_map
from needlework.registry import register_model

#: receptive field (px) -> number of 3×3 blocks per stage (METHODS.md §3.1).
RF_KERNEL3 = {9: (1, 1, 0, 0), 17: (1, 1, 1, 0), 33: (1, 1, 1, 1), 77: (2, 2, 2, 2), 177: (3, 4, 6, 3)}
WIDTHS = (0.25, 0.5, 1.0, 2.0)


def make_norm(kind: str, channels: int) -> nn.Module:
    """``"instance"`` (affine InstanceNorm, the paper's default), ``"batch"``, ``"group"`` or ``"none"``."""
    if kind == "instance":
        return nn.InstanceNorm2d(channels, affine=True)
    if kind == "batch":
        return nn.BatchNorm2d(channels)
    if kind == "group":
        return nn.GroupNorm(min(32, channels), channels)
    if kind == "none":
        return nn.Identity()
    raise ValueError(f"norm must be 'instance', 'batch', 'group' or 'none', got {kind!r}")


class Bottleneck(nn.Module):
    """1×1 → k×k (valid, strided) → 1×1 bottleneck with a centre-cropped shortcut."""

    def __init__(self, in_ch: int, mid: int, out: int, stride: int, kernel: int, norm: str) -> None:
        super().__init__()
        self.kernel, self.stride = kernel, stride
        self.conv1 = nn.Conv2d(in_ch, mid, 1, bias=False)
        self.norm1 = make_norm(norm, mid)
        self.conv2 = nn.Conv2d(mid, mid, kernel, stride=stride, bias=False)
        self.norm2 = make_norm(norm, mid)
        self.conv3 = nn.Conv2d(mid, out, 1, bias=False)
        self.norm3 = make_norm(norm, out)
        self.relu = nn.ReLU(inplace=True)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_ch != out:
            self.shortcut = nn.Sequential(Conv1x1(in_ch, out, stride=stride),
                                          make_norm(norm, out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.norm1(self.conv1(x)))
        out = self.relu(self.norm2(self.conv2(out)))
        out = self.norm3(self.conv3(out))
        c = (self.kernel - 1) // 2  # the valid k×k conv is centred c pixels in from each border
        shortcut = x[..., c : x.shape[-2] - c, c : x.shape[-1] - c] if c else x
        return self.relu(out + self.shortcut(shortcut))


class BagNetEncoder(nn.Module):
    """Encoder ``(B, C_in, H, W)`` → ``(B, out_channels, h, w)`` with ``h ≈ (H - RF) / 8 + 1``.

    Args:
        in_channels: image channels.
        receptive_field: 9, 17, 33, 77 or 177 (ignored when ``kernel3`` is given).
        kernel3: 3×3 blocks per stage, e.g. ``(1, 1, 1, 1)``.
        width: capacity scale of all widths (paper: 1/4, 1/2, 1, 2).
        blocks: bottleneck blocks per stage (ResNet-50: ``(3, 4, 6, 3)``).
        norm: normalisation layer (see :func:`make_norm`).
        compensate: widen the middle conv of 1×1 blocks by 2.5× to keep parameter counts comparable.
        stem_stride: stride of the stem's 3×3 convolution. 1 is the paper's layout (the RF values above);
            2 quarters the compute of every layer (for CPU runs) and doubles the output stride to 16 —
            the receptive field then follows from the same recurrence (e.g. 63 px with ``kernel3=(1,1,1,1)``,
            31 px with ``(1,1,1,0)``); :func:`receptive_field` reports it.
    """

    def __init__(
        self,
        in_channels: int = 1,
        receptive_field: int = 33,
        kernel3: Sequence[int] | None = None,
        width: float = 1.0,
        blocks: Sequence[int] = (3, 4, 6, 3),
        norm: str = "instance",
        compensate: bool = True,
        stem_stride: int = 1,
    ) -> None:
        super().__init__()
        if kernel3 is None:
            if receptive_field not in RF_KERNEL3:
                raise ValueError(
                    f"receptive_field must be one of {sorted(RF_KERNEL3)}, got {receptive_field!r} "
                    "(or pass kernel3 explicitly)"
                )
            kernel3 = RF_KERNEL3[receptive_field]
        kernel3 = tuple(int(k) for k in kernel3)
        blocks = tuple(int(b) for b in blocks)
        if len(kernel3) != 4 or len(blocks) != 4:
            raise ValueError(f"kernel3 and blocks need 4 entries (one per stage), got {kernel3}, {blocks}")
        if any(not 0 <= k <= b for k, b in zip(kernel3, blocks)):
            raise ValueError(f"kernel3 {kernel3} must satisfy 0 <= kernel3[s] <= blocks[s] = {blocks}")
        if width <= 0:
            raise ValueError(f"width must be positive, got {width}")
        if stem_stride not in (1, 2):
            raise ValueError(f"stem_stride must be 1 or 2, got {stem_stride}")
        self.kernel3, self.blocks = kernel3, blocks

        def w(c: int) -> int:
            return max(4, int(round(c * width)))

        stem = w(64)
        self.stem = nn.Sequential(
            nn.Conv2d(in_channels, stem, 1, bias=False),
            nn.Conv2d(stem, stem, 3, stride=stem_stride, bias=False),
            make_norm(norm, stem),
            nn.ReLU(inplace=True),
        )
        stages, in_ch = [], stem
        for s, (n_blocks, n3, stride) in enumerate(zip(blocks, kernel3, (2, 2, 2, 1))):
            mid, out = w(64 * 2**s), w(256 * 2**s)
            layers = []
            for b in range(n_blocks):
                kernel = 3 if b < n3 else 1
                m = mid if kernel == 3 or not compensate else int(round(mid * 2.5))
                layers.append(Bottleneck(in_ch, m, out, stride if b == 0 else 1, kernel, norm))
                in_ch = out
            stages.append(nn.Sequential(*layers))
        self.stages = nn.Sequential(*stages)
        self.out_channels = in_ch
        self.in_channels = in_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_shape(x, ["B", str(self.in_channels), "H", "W"], "image")
        rf = receptive_field(self)
        if min(x.shape[-2:]) < rf:
            raise ValueError(f"image of size {tuple(x.shape[-2:])} is smaller than the receptive field {rf}")
        return self.stages(self.stem(x))


def receptive_field(module: nn.Module) -> int:
    """Receptive field in pixels of the main path, from the module list (``r += (k-1)·j; j *= s``).

    Shortcut convolutions (1×1) never enlarge it; only the main-path convolutions are walked.
    """
    r, j = 1, 1
    for name, m in module.named_modules():
        if isinstance(m, nn.Conv2d) and "shortcut" not in name:
            r += (m.kernel_size[0] - 1) * j
            j *= m.stride[0]
    return r


class DenseClassifier(NeedleworkModel):
    """BagNet encoder + global pooling + linear head, with per-position logits for saliency.

    ``forward(image (B, C, H, W))`` returns ``logits (B, K)``, ``logit_map (B, K, h, w)`` (the linear head
    applied at every position; equal to pooling the local logits only for mean pooling),
    ``attention (B, h*w)`` (pooling weights) and ``embedding (B, D)``.

    Args:
        num_classes: output classes (2 for needle-MNIST).
        pooling: ``max``, ``mean``, ``logsumexp``, ``lme``, ``attention`` or ``gated_attention``.
        dropout: Dropout2d on the feature map before pooling (paper option: 0.2).
        **encoder_kwargs: see :class:`BagNetEncoder`.
    """

    def __init__(
        self, num_classes: int = 2, pooling: str = "max", dropout: float = 0.0, **encoder_kwargs
    ) -> None:
        super().__init__()
        self.encoder = BagNetEncoder(**encoder_kwargs)
        dim = self.encoder.out_channels
        self.dropout = nn.Dropout2d(dropout) if dropout else nn.Identity()
        self.pool = create_pooling(pooling, dim=dim)
        self.head = nn.Linear(dim, num_classes)
        self.pooling = pooling

    def forward(self, image: torch.Tensor) -> dict[str, torch.Tensor]:
        fmap = self.dropout(self.encoder(image))
        inst = flatten_map(fmap)
        embedding, weights = self.pool(inst)
        logit_map = self.head(inst).transpose(1, 2).reshape(fmap.shape[0], -1, *fmap.shape[-2:])
        out = {"logits": self.head(embedding), "logit_map": logit_map, "embedding": embedding}
        if isinstance(self.pool, AttentionPool) or weights is not None:
            out["attention"] = weights
        return out


register_model("bagnet")(DenseClassifier)
for _rf in RF_KERNEL3:
    register_model(f"bagnet.rf{_rf}")(partial(DenseClassifier, receptive_field=_rf))
