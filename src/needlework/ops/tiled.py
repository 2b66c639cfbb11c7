"""A fully convolutional network over a large image, tile by tile, with memory bounded by one tile.

The attention network of ATS and the scorer of DPS run on ``x_low``, the whole slide at low resolution. At a
fixed µm/px that view grows with the slide (3,125² px for 100,000² px at 8 µm/px), and so do the network's
activations, which autograd keeps for the backward: one training step on such a slide needed 3.6 GB, most of
it the attention network's feature maps (issue 14 item 3). :func:`tiled_map` runs the network on tiles with
a halo of at least its receptive-field radius, keeps only each tile's output, and under autograd wraps each
tile in a non-reentrant checkpoint, so the backward recomputes one tile at a time. The result equals the
network on the whole image exactly (same arithmetic per output position), as long as

* the network is translation-equivariant with ``same`` padding and no batch statistics (no BatchNorm in
  training mode): a position's output depends only on inputs within ``halo`` px of its cell;
* its output has stride ``stride`` (floor division, as ``MaxPool2d`` does), and tile sides and the halo
  are multiples of it, so pooling windows fall on the same input pixels as in the whole-image pass.

Example:
    >>> import torch
    >>> net = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3, padding=1), torch.nn.MaxPool2d(2))
    >>> x = torch.randn(1, 1, 50, 70)
    >>> torch.allclose(tiled_map(net, x, tile=16, halo=2, stride=2), net(x))
    True
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch.utils.checkpoint import checkpoint


def unit_float(x: torch.Tensor) -> torch.Tensor:
    """uint8 pixels (0–255) → float32 in [0, 1]; floating-point tensors pass through unchanged.

    A slide's low view travels as uint8 (a quarter of float32's bytes); networks that run tile by tile
    convert each tile as they read it, so a float copy of the whole view never exists.

    Example:
        >>> unit_float(torch.tensor([0, 51, 255], dtype=torch.uint8))
        tensor([0.0000, 0.2000, 1.0000])
    """
    if x.is_floating_point():
        return x
    if x.dtype != torch.uint8:
        raise TypeError(f"expected a floating-point or uint8 image, got {x.dtype}")
    return x.float().div_(255.0)


def _ceil_to(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple


def tiled_map(
    fn: Callable[[torch.Tensor], torch.Tensor],
    x: torch.Tensor,
    tile: int,
    halo: int,
    stride: int = 1,
) -> torch.Tensor:
    """``fn(x)`` computed on ``tile × tile`` pieces of ``x`` (plus ``halo`` px of context on each side).

    Args:
        fn: ``(B, C, h, w) → (B, C', h // stride, w // stride)``; fully convolutional, see the module notes.
        x: ``(B, C, H, W)``.
        tile: interior side of a tile in input px; rounded up to a multiple of ``stride``.
        halo: receptive-field radius of ``fn`` in input px; rounded up to a multiple of ``stride``.
        stride: output stride of ``fn``.

    Returns:
        ``(B, C', H // stride, W // stride)``, equal to ``fn(x)``. Whole-image inputs no larger than one tile
        go through ``fn`` directly.
    """
    if x.dim() != 4:
        raise ValueError(f"tiled_map needs a (B, C, H, W) input, got shape {tuple(x.shape)}")
    if tile < 1 or halo < 0 or stride < 1:
        raise ValueError(f"tiled_map needs tile >= 1, halo >= 0, stride >= 1; got {tile}, {halo}, {stride}")
    tile, halo = _ceil_to(tile, stride), _ceil_to(halo, stride)
    h, w = x.shape[-2:]
    if h <= tile and w <= tile:
        return fn(x)
    # under autograd, keep no activations: each tile is recomputed in the backward, one at a time (fn's
    # parameters are invisible here, so every tile is checkpointed whenever autograd records)
    grads = torch.is_grad_enabled()
    rows = []
    for r0 in range(0, h, tile):
        a, b = max(0, r0 - halo), min(h, r0 + tile + halo)
        top, n_rows = (r0 - a) // stride, min(r0 + tile, h) // stride - r0 // stride
        cols = []
        for c0 in range(0, w, tile):
            c, d = max(0, c0 - halo), min(w, c0 + tile + halo)
            left, n_cols = (c0 - c) // stride, min(c0 + tile, w) // stride - c0 // stride
            piece = x[..., a:b, c:d]
            out = checkpoint(fn, piece, use_reentrant=False) if grads else fn(piece)
            cols.append(out[..., top : top + n_rows, left : left + n_cols])
        rows.append(torch.cat(cols, dim=-1))
    return torch.cat(rows, dim=-2)
