"""Dense-box path of the submanifold convolution: scatter, ``conv2d``, gather (issue 16).

Inactive sites count as zeros in a submanifold convolution, so on the sites it *is* the dense convolution of
the zero-filled map. Where the sites fill most of their bounding box (a compact piece of tissue), scattering
the features into that box, running one ``F.conv2d`` and gathering the outputs at the sites is the fastest
plain-PyTorch way to compute it: the framework's convolution kernels (oneDNN, cuDNN) beat ``k²`` separate
gather–GEMM–scatter steps, and the box holds few zeros. On scattered sites the box is mostly zeros and the
rulebook wins; :func:`needlework.ops.sparse_conv.choose_method` picks by the box's fill.

The box is laid out channels last ``(B, H, W, C)`` and handed to ``conv2d`` as a permuted view, so neither
the scatter nor the gather transposes anything; autograd differentiates the three steps.

Example:
    >>> import torch
    >>> sites = torch.tensor([[0, 3, 4], [0, 3, 5], [0, 4, 4], [1, 0, 0]])
    >>> box = dense_box(sites)
    >>> box.shape, round(box.fill, 3)  # one 2 × 2 box per bag: bag 0 fills 3 cells, bag 1 one
    ((2, 2, 2), 0.5)
    >>> dense_box_conv2d(torch.randn(4, 8), box, torch.randn(16, 8, 3, 3)).shape
    torch.Size([4, 16])
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class DenseBox:
    """Where every site sits in the dense box of its bag (each bag's own bounding box, one common size).

    Attributes:
        positions: ``(S,)`` int64 flat index of each site in the ``(B, H, W)`` boxes.
        shape: ``(B, H, W)``.
        dilation: spacing of the kernel taps the box will be convolved with.
    """

    positions: torch.Tensor
    shape: tuple[int, int, int]
    dilation: int = 1

    @property
    def fill(self) -> float:
        """Fraction of the box cells that are sites (1 = a full rectangle per bag)."""
        b, h, w = self.shape
        return len(self.positions) / max(b * h * w, 1)

    def to(self, device: torch.device | str) -> DenseBox:
        """The same box on ``device``."""
        return DenseBox(self.positions.to(device), self.shape, self.dilation)


def dense_box(sites: torch.Tensor, dilation: int = 1) -> DenseBox:
    """Dense box of a site set.

    Args:
        sites: ``(S, 3)`` int ``(b, y, x)``, unique rows, non-negative.
        dilation: the convolution's dilation (kept for :func:`dense_box_conv2d`).

    Returns:
        :class:`DenseBox`; each bag's sites are shifted so that its bounding box starts at ``(0, 0)``.
    """
    if sites.dim() != 2 or sites.shape[1] != 3 or sites.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"sites must be an (S, 3) integer tensor of (b, y, x), got {tuple(sites.shape)}")
    if dilation < 1:
        raise ValueError(f"dilation must be >= 1, got {dilation}")
    sites = sites.long()
    if len(sites) == 0:
        return DenseBox(sites.new_zeros(0), (0, 0, 0), dilation)
    b = int(sites[:, 0].max()) + 1
    if b == 1:  # one bag: its minimum, without the per-bag reduction
        yx = sites[:, 1:] - sites[:, 1:].amin(dim=0)
    else:
        lo = sites.new_full((b, 2), torch.iinfo(torch.long).max).scatter_reduce(
            0, sites[:, :1].expand(-1, 2), sites[:, 1:], "amin"
        )
        yx = sites[:, 1:] - lo[sites[:, 0]]  # (S, 2) inside the bag's box
    h, w = (int(v) + 1 for v in yx.max(dim=0).values)
    positions = (sites[:, 0] * h + yx[:, 0]) * w + yx[:, 1]
    return DenseBox(positions, (b, h, w), dilation)


def dense_box_conv2d(
    features: torch.Tensor, box: DenseBox, weight: torch.Tensor, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """Submanifold convolution of ``features`` ``(S, C_in)`` on ``box`` → ``(S, C_out)``.

    ``weight`` ``(C_out, C_in, k, k)`` (``nn.Conv2d`` layout, odd ``k``), ``bias`` ``(C_out,)`` or None.
    """
    if features.dim() != 2 or len(features) != len(box.positions):
        raise ValueError(
            f"features must be (S, C_in) with S = {len(box.positions)} sites, got {tuple(features.shape)}"
        )
    c_out, c_in, k, _ = weight.shape
    b, h, w = box.shape
    if len(features) == 0:
        return features.new_zeros(0, c_out)
    grid = features.new_zeros(b * h * w, c_in).index_copy(0, box.positions, features)
    x = grid.view(b, h, w, c_in).permute(0, 3, 1, 2)  # (B, C_in, H, W) as a channels-last view
    pad = (k // 2) * box.dilation
    out = F.conv2d(x, weight, bias, padding=pad, dilation=box.dilation)  # channels last in, channels last out
    return out.permute(0, 2, 3, 1).reshape(b * h * w, c_out).index_select(0, box.positions)
