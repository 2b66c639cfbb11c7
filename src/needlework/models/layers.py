"""Layers shared by the CNN families.

:class:`Conv1x1` is a drop-in ``nn.Conv2d(in, out, 1, stride)`` that computes a strided 1×1 convolution as
"subsample, then a stride-1 1×1 convolution" — the same numbers, and it never reaches the oneDNN kernel
that corrupts memory on AVX-512 CPUs (below).

Why: on x86 CPUs with AVX-512 (seen on AMD EPYC and on Intel Xeon with AMX, torch 2.13.0 / oneDNN 3.12),
oneDNN's ``jit_1x1:avx512_core`` *backward-weights* kernel for a **1×1 convolution with stride 2, fewer than
16 (or not a multiple of 16) input channels and a channels-last activation** writes out of bounds: the
interpreter dies with SIGSEGV, SIGABRT or ``munmap_chunk(): invalid pointer``, usually a few steps later.
The weight's own memory format does not matter, the activation's does. Smallest reproducer::

    conv = torch.nn.Conv2d(8, 32, 1, stride=2, bias=False).to(memory_format=torch.channels_last)
    x = torch.randn(1, 8, 124, 124, requires_grad=True)
    for _ in range(10):
        conv(x).sum().backward()          # SIGSEGV (124², 128², 96² crash; 60², 64², 125² did not)

16 or 24 input channels, stride 1, or the default (NCHW) layout run. The demo's BagNet (width 1/8) has such a
shortcut (8 → 32 channels, stride 2) in its first stage, which is why ``make demo`` crashed at the switch
from the 64-px to the 128-px canvas. ``tests/test_layers.py`` runs the reproducer's shapes through this layer
in a subprocess.

Example:
    >>> conv = Conv1x1(8, 32, stride=2)
    >>> ref = torch.nn.functional.conv2d
    >>> x = torch.randn(2, 8, 9, 9)
    >>> torch.allclose(conv(x), ref(x, conv.weight, stride=2), atol=1e-6)
    True
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["Conv1x1"]


class Conv1x1(nn.Conv2d):
    """1×1 convolution ``(B, C_in, H, W) → (B, C_out, ⌈H/s⌉, ⌈W/s⌉)``; parameters named as in ``nn.Conv2d``.

    ``stride`` keeps its meaning (and its value in ``self.stride``); only the computation differs, so
    checkpoints of an ``nn.Conv2d(in, out, 1, stride)`` load unchanged.
    """

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1, bias: bool = False) -> None:
        super().__init__(in_channels, out_channels, 1, stride=stride, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        sh, sw = self.stride
        if sh > 1 or sw > 1:
            x = x[..., ::sh, ::sw]  # a 1×1 kernel with stride s sees exactly these pixels
        return F.conv2d(x, self.weight, self.bias)
