"""The ATS paper's Megapixel MNIST networks (METHODS §2.5), shared by ATS, the dense CNN and attention MIL.

:class:`CellAttention` is a deeper, configurable attention network for tiny objects: it looks at a
neighbourhood of each cell (3×3 convolutions with max pools between them) and scores coarse cells.

Attention: Conv 8@3×3 tanh, Conv 8@3×3 tanh, Conv 1@3×3, ``same`` padding (the last layer zero-initialised
so training starts from uniform attention). Features: Conv 32@7×7, 3 × Conv 32@3×3, ReLU, valid padding,
global max pool, L2-normalised.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from needlework.ops.tiled import tiled_map, unit_float

__all__ = ["CellAttention", "MegapixelMNISTAttention", "MegapixelMNISTFeatures"]

_ACTIVATIONS = {"tanh": nn.Tanh, "relu": nn.ReLU}


def _channels_last(net: nn.Module) -> None:
    """Store ``net``'s convolution weights channels-last, so oneDNN runs every layer in NHWC.

    With a channels-last weight, ``conv2d`` gives a channels-last output even for a 1-channel NCHW input,
    and the next layers follow: forward + backward of these narrow (8- and 32-channel) stride-1 3×3 / 7×7
    stacks measured 1.3× (features) and 1.8× (attention) faster on a Xeon CPU, A/B in one process.
    Outputs are the same up to float rounding; ``.to(device)`` / ``load_state_dict`` keep the layout.
    These layers avoid the strided 1×1 kernel that crashes in channels-last on AVX-512 CPUs
    (``models/layers.py``); ``tests/test_demo_crash.py`` trains them in a subprocess at two input sizes
    so a crash fails the test.
    """
    net.to(memory_format=torch.channels_last)


class MegapixelMNISTAttention(nn.Sequential):
    """Attention network: ``(B, C, h, w) → (B, 1, h, w)`` logits (``same`` padding, RF border 0)."""

    def __init__(self, in_channels: int = 1, channels: int = 8, activation: str = "tanh") -> None:
        if activation not in _ACTIVATIONS:
            raise ValueError(f"activation must be one of {sorted(_ACTIVATIONS)}, got {activation!r}")
        act = _ACTIVATIONS[activation]
        last = nn.Conv2d(channels, 1, 3, padding=1)
        nn.init.zeros_(last.weight)  # uniform attention at initialisation
        nn.init.zeros_(last.bias)
        super().__init__(
            nn.Conv2d(in_channels, channels, 3, padding=1),
            act(),
            nn.Conv2d(channels, channels, 3, padding=1),
            act(),
            last,
        )
        _channels_last(self)


class MegapixelMNISTFeatures(nn.Module):
    """Feature network: ``(B, C, P, P) → (B, channels)``, L2-normalised.

    Conv ``channels``@7×7 then 3 × Conv ``channels``@3×3, ReLU, valid padding (50² → 38²), global max
    pool. Runs on any input at least 13 px wide, so the dense baseline uses it on the whole image.
    """

    def __init__(self, in_channels: int = 1, channels: int = 32, normalise: bool = True) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(in_channels, channels, 7),
            nn.ReLU(),
            nn.Conv2d(channels, channels, 3),
            nn.ReLU(),
            nn.Conv2d(channels, channels, 3),
            nn.ReLU(),
            nn.Conv2d(channels, channels, 3),
            nn.ReLU(),
        )
        self.out_dim = channels
        self.normalise = normalise
        _channels_last(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # The global max pool as ``adaptive_max_pool2d``: its backward scatters one gradient per channel,
        # where ``amax``'s compares and multiplies the whole map (3.4× slower on (160, 32, 38, 38), ~5 % of
        # an ATS step). Same values; the gradients differ only on tied zeros, which the ReLU masks anyway.
        h = F.adaptive_max_pool2d(self.body(x), 1).flatten(1)
        return F.normalize(h, dim=-1) if self.normalise else h


class CellAttention(nn.Module):
    """Attention logits ``(B, 1, h / s, w / s)`` on coarse cells of ``x_low (B, C, h, w)``.

    ``channels`` are 3×3 ``same`` convolutions with ReLU; after the layers listed in ``pool_after`` a 2×2
    max pool halves the resolution; a zero-initialised 1×1 convolution (uniform attention at the start)
    gives one logit per position, max-pooled by ``cell_pool``. The cell side in ``x_low`` pixels is
    ``s = 2^len(pool_after) · cell_pool``. With ``tile`` set, inputs larger than ``tile`` px run tile by
    tile (:func:`~needlework.ops.tiled.tiled_map`, exact): memory stays that of one tile however large the
    slide's low view.

    Example:
        >>> net = CellAttention(1, channels=(8, 16), pool_after=(0,), cell_pool=4)
        >>> net(torch.zeros(2, 1, 64, 64)).shape, net.cell
        (torch.Size([2, 1, 8, 8]), 8)
    """

    def __init__(
        self,
        in_channels: int = 1,
        channels: tuple[int, ...] | list[int] = (16, 16, 32, 32),
        pool_after: tuple[int, ...] | list[int] = (1,),
        cell_pool: int = 8,
        tile: int | None = None,
    ) -> None:
        super().__init__()
        if tile is not None and tile < 1:
            raise ValueError(f"CellAttention tile must be >= 1 px or None, got {tile}")
        if not channels or cell_pool < 1 or any(not 0 <= i < len(channels) for i in pool_after):
            raise ValueError(
                f"CellAttention needs channels, pool_after indices into them and cell_pool >= 1; got "
                f"{channels}, {pool_after}, {cell_pool}"
            )
        layers: list[nn.Module] = []
        prev, step, radius = in_channels, 1, 0
        for i, ch in enumerate(channels):
            layers += [nn.Conv2d(prev, ch, 3, padding=1), nn.ReLU(inplace=True)]
            radius += step  # a 3×3 conv reaches one position further, `step` input px apart
            if i in pool_after:
                layers.append(nn.MaxPool2d(2))
                step *= 2
            prev = ch
        last = nn.Conv2d(prev, 1, 1)
        nn.init.zeros_(last.weight)
        nn.init.zeros_(last.bias)
        layers.append(last)
        self.net = nn.Sequential(*layers)
        self.cell_pool = int(cell_pool)
        self.cell = 2 ** len(set(pool_after)) * self.cell_pool
        self.tile, self.halo = tile, radius  # halo: receptive-field radius in x_low px

    takes_uint8 = True  # a uint8 view is converted tile by tile (a slide's low view stays uint8)

    def _logits(self, x_low: torch.Tensor) -> torch.Tensor:
        out = self.net(unit_float(x_low))
        return F.max_pool2d(out, self.cell_pool) if self.cell_pool > 1 else out

    def forward(self, x_low: torch.Tensor) -> torch.Tensor:
        if self.tile is None:
            return self._logits(x_low)
        return tiled_map(self._logits, x_low, self.tile, self.halo, self.cell)
