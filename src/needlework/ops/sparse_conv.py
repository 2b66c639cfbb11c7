"""Submanifold sparse 2-D convolution in plain PyTorch: neighbour table, then im2col or a rulebook.

Active sites are integer ``(b, y, x)`` rows (bag index, row, column) with features ``(S, C_in)``. A
submanifold convolution produces outputs only at the active sites and reads only active neighbours
(inactive sites count as zeros): ``out_s = b + Σ_o W_o · F[nbr(s, o)]`` over the ``k²`` kernel offsets
``o = (dy, dx)`` in row-major order (METHODS.md §9.2). The neighbour table is built once per site set with
linear keys (a dense key → row map when the padded map is small, else sorted keys and
``searchsorted``) and shared by every layer on that set. Two exact, deterministic
paths compute the same sum: **im2col** (gather all ``k²`` neighbour rows, missing ones as zeros, one GEMM)
and the **rulebook** (:mod:`needlework.ops.rulebook`: per offset only the pairs that exist,
gather–GEMM–scatter); a rulebook built with its sites also offers the **dense** path
(:mod:`needlework.ops.dense_box`: scatter into each bag's bounding box, ``conv2d``, gather), the fastest
where the sites fill their box. ``method="auto"`` picks by the measured rule of :func:`choose_method`.

The weight layout is ``nn.Conv2d``'s ``(C_out, C_in, k, k)``: a dense masked ``conv2d`` with the same
weight is the reference (see :func:`dense_submanifold_conv2d`).

Example:
    >>> import torch
    >>> sites = torch.tensor([[0, 0, 0], [0, 0, 1], [0, 5, 5], [1, 0, 0]])
    >>> nbr = neighbor_table(sites, kernel_size=3)
    >>> nbr[0].tolist()  # (0,0)'s neighbours: only itself (offset 4) and (0,1) (offset 5); 4 = missing
    [4, 4, 4, 4, 0, 1, 4, 4, 4]
    >>> conv = SubmanifoldConv2d(8, 16, kernel_size=3)
    >>> conv(torch.randn(4, 8), nbr).shape
    torch.Size([4, 16])
    >>> book = rulebook(nbr)  # build once per site set, pass to every layer
    >>> book.counts  # pairs per offset (the centre, offset 4, is handled as one dense GEMM)
    (0, 0, 0, 1, 0, 1, 0, 0, 0)
    >>> conv(torch.randn(4, 8), book).shape
    torch.Size([4, 16])
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from needlework.checks import check_shape
from needlework.ops.dense_box import dense_box_conv2d
from needlework.ops.rulebook import Rulebook, rulebook, rulebook_conv2d

BACKENDS = ("torch", "spconv")
METHODS = ("auto", "rulebook", "im2col", "dense")
DENSE_FILL = 0.8  # the dense path from this box fill up (see choose_method)


def _check_sites(sites: torch.Tensor) -> None:
    check_shape(sites, ["S", "3"], "sites")
    if sites.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"sites must be an integer tensor of (b, y, x) rows, got {sites.dtype}")
    if len(sites) and int(sites.min()) < 0:
        raise ValueError("sites must be non-negative (b, y, x); shift coordinates so the minimum is 0")


def neighbor_table(sites: torch.Tensor, kernel_size: int = 3, dilation: int = 1) -> torch.Tensor:
    """Row of each kernel neighbour of every active site, ``S`` where the neighbour is inactive.

    Args:
        sites: ``(S, 3)`` int ``(b, y, x)``, unique rows.
        kernel_size: odd kernel side ``k``.
        dilation: spacing of the kernel taps.

    Returns:
        ``(S, k²)`` int64; column ``o = (dy + r)·k + (dx + r)`` for offsets ``dy, dx ∈ [−r, r]``,
        ``r = k // 2``.
    """
    _check_sites(sites)
    if kernel_size % 2 != 1 or kernel_size < 1:
        raise ValueError(f"kernel_size must be a positive odd number, got {kernel_size}")
    s = len(sites)
    sites = sites.long()
    r = (kernel_size // 2) * dilation
    steps = torch.arange(-r, r + 1, dilation, device=sites.device)
    dy, dx = torch.meshgrid(steps, steps, indexing="ij")
    if s == 0:
        return torch.empty(0, kernel_size**2, dtype=torch.long, device=sites.device)
    h = int(sites[:, 1].max()) + 1 + 2 * r  # padded extents: every shifted key stays unique
    w = int(sites[:, 2].max()) + 1 + 2 * r

    def key(b: torch.Tensor, y: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return (b * h + y + r) * w + x + r

    keys = key(sites[:, 0], sites[:, 1], sites[:, 2])
    # keys are linear in (y, x): one broadcast add of the offsets' key steps (several times faster than
    # building the (S, k²) keys from strided coordinate columns)
    query = keys[:, None] + (dy.flatten() * w + dx.flatten())  # (S, k²)
    cells = (int(sites[:, 0].max()) + 1) * h * w
    if cells <= max(16 * s * kernel_size**2, 1 << 20):
        # small padded map: a dense key → row index is a plain gather, no sort or binary search
        # (20,000 sites on 512²: 2 MB, several times faster than searchsorted)
        grid = torch.full((cells,), s, dtype=torch.long, device=sites.device)
        rows = torch.arange(s, device=sites.device)
        grid[keys] = rows
        if bool((grid[keys] != rows).any()):
            raise ValueError("sites must be unique; average the features of duplicate sites first")
        return grid[query]
    sorted_keys, perm = keys.sort()
    if s > 1 and bool((sorted_keys[1:] == sorted_keys[:-1]).any()):
        raise ValueError("sites must be unique; average the features of duplicate sites first")
    pos = torch.searchsorted(sorted_keys, query).clamp(max=s - 1)
    found = sorted_keys[pos] == query
    return torch.where(found, perm[pos], torch.full_like(pos, s))


def choose_method(fraction: float, n_sites: int, c_in: int, fill: float | None = None) -> str:
    """``"dense"``, ``"rulebook"`` or ``"im2col"`` for a site set whose table has ``fraction`` real
    neighbours and whose sites fill ``fill`` of their dense boxes (None: no boxes, the dense path is out).

    Dense when ``fill ≥ DENSE_FILL`` (0.8): one ``conv2d`` over a box with few empty cells beats the
    rulebook (``benchmarks/sparse_fill.py``, 20,000 sites, forward + backward, one thread: the dense path
    overtakes at a fill of about 0.68 for C = 32 and 0.78 for C = 128; compact sites, fill 0.999, 1.93× and
    1.47× the rulebook's speed). Otherwise:

    Measured on one CPU thread (3×3, forward + backward; ``benchmarks/peers.py`` sizes and smaller): the
    rulebook does ``fraction·k²`` rows of work against im2col's ``k²``, but in ``k²`` small GEMMs with
    gathers and scatters around them. It wins on sparse tables unless the whole problem is tiny (Python
    overhead per offset), and on full tables once the GEMMs are large (``C_in ≥ 64`` or ``S·C_in ≥ 2¹⁹``:
    20,000 compact sites, C = 32: 26 vs 32 ms; C = 128: 310 vs 341 ms); im2col keeps small-``C`` full
    tables (20,000 compact sites, C = 8: 10.5 vs 13.6 ms).
    """
    if fill is not None and fill >= DENSE_FILL:
        return "dense"
    work = n_sites * c_in
    if (fraction <= 0.6 and work >= 2**14) or c_in >= 64 or work >= 2**19:
        return "rulebook"
    return "im2col"


def submanifold_conv2d(
    features: torch.Tensor,
    neighbors: torch.Tensor | Rulebook,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    method: str = "auto",
) -> torch.Tensor:
    """Submanifold convolution of site features.

    Args:
        features: ``(S, C_in)``.
        neighbors: ``(S, k²)`` table from :func:`neighbor_table` (``S`` = missing), or its
            :class:`~needlework.ops.rulebook.Rulebook` (build it once per site set: a bare table that
            takes the rulebook path has its rulebook rebuilt in every call).
        weight: ``(C_out, C_in, k, k)`` (``nn.Conv2d`` layout).
        bias: ``(C_out,)`` or None.
        method: ``"auto"`` (:func:`choose_method`), ``"rulebook"``, ``"im2col"`` or ``"dense"`` (needs a
            rulebook built with its sites, ``rulebook(table, sites)``).

    Returns:
        ``(S, C_out)``.
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    book = neighbors if isinstance(neighbors, Rulebook) else None
    table = book.neighbors if book is not None else neighbors
    s, c_in = check_shape(features, ["S", "C_in"], "features").values()
    sizes = check_shape(weight, ["C_out", str(c_in), "k", "k"], "weight")
    c_out, k = sizes["C_out"], sizes["k"]
    check_shape(table, [str(s), str(k * k)], "neighbors")
    box = book.box if book is not None else None
    if method == "auto":
        fraction = book.fraction if book is not None else float((table < s).sum()) / max(table.numel(), 1)
        method = choose_method(fraction, s, c_in, None if box is None else box.fill)
    if method == "dense":
        if box is None:
            raise ValueError(
                "method='dense' needs the sites' boxes: pass rulebook(table, sites) as neighbors"
            )
        return dense_box_conv2d(features, box, weight, bias)
    if method == "rulebook":
        return rulebook_conv2d(features, book if book is not None else rulebook(table), weight, bias)
    padded = torch.cat([features, features.new_zeros(1, c_in)])
    w = weight.permute(2, 3, 1, 0).reshape(k * k * c_in, c_out)  # offset-major, matching the table
    out = padded[table].reshape(s, k * k * c_in) @ w
    return out if bias is None else out + bias


def sparse_global_mean(features: torch.Tensor, batch_index: torch.Tensor, batch_size: int) -> torch.Tensor:
    """Mean of the site features of each bag: ``(S, C)`` with bag ids ``(S,)`` → ``(B, C)``.

    Bags without sites get zeros.
    """
    sums = features.new_zeros(batch_size, features.shape[1]).index_add(0, batch_index, features)
    counts = torch.bincount(batch_index, minlength=batch_size).clamp(min=1).to(features.dtype)
    return sums / counts[:, None]


def dense_submanifold_conv2d(
    features: torch.Tensor,
    sites: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    dilation: int = 1,
) -> torch.Tensor:
    """Reference: scatter to a dense map, ``conv2d``, keep the active sites. Same signature semantics
    as :func:`submanifold_conv2d` (slow; for tests and tiny maps)."""
    _check_sites(sites)
    sites = sites.long()
    b, h, w = (int(v) + 1 for v in sites.max(dim=0).values)
    dense = features.new_zeros(b, features.shape[1], h, w)
    dense[sites[:, 0], :, sites[:, 1], sites[:, 2]] = features
    k = weight.shape[-1]
    out = F.conv2d(dense, weight, bias, padding=(k // 2) * dilation, dilation=dilation)
    return out[sites[:, 0], :, sites[:, 1], sites[:, 2]]


class SubmanifoldConv2d(nn.Module):
    """Submanifold sparse convolution layer.

    Args:
        in_channels, out_channels, kernel_size, dilation: as ``nn.Conv2d`` (odd kernel, stride 1).
        bias: learnable bias.
        backend: ``"torch"`` (default; gather + matmul) or ``"spconv"`` (optional, see
            :mod:`needlework.ops.spconv_backend`; needs ``sites``/``batch_size`` in :meth:`forward`).
        method: torch backend path, ``"auto"``, ``"rulebook"``, ``"im2col"`` or ``"dense"``
            (:func:`submanifold_conv2d`).
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int = 3,
        dilation: int = 1,
        bias: bool = True,
        backend: str = "torch",
        method: str = "auto",
    ) -> None:
        super().__init__()
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
        if method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {method!r}")
        self.kernel_size, self.dilation, self.backend, self.method = kernel_size, dilation, backend, method
        self.weight = nn.Parameter(torch.empty(out_channels, in_channels, kernel_size, kernel_size))
        self.bias = nn.Parameter(torch.empty(out_channels)) if bias else None
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))  # nn.Conv2d's initialisation
        if self.bias is not None:
            bound = 1.0 / math.sqrt(in_channels * kernel_size**2)
            nn.init.uniform_(self.bias, -bound, bound)

    def forward(
        self,
        features: torch.Tensor,
        neighbors: torch.Tensor | Rulebook | None = None,
        sites: torch.Tensor | None = None,
        batch_size: int | None = None,
    ) -> torch.Tensor:
        """``features`` ``(S, C_in)`` → ``(S, C_out)``; the torch backend needs ``neighbors`` (a table or
        its rulebook; built from ``sites`` when absent, with the dense boxes), spconv needs ``sites``
        ``(S, 3)`` and ``batch_size``."""
        if self.backend == "spconv":
            from needlework.ops.spconv_backend import spconv_submanifold_conv2d

            if sites is None or batch_size is None:
                raise ValueError("backend='spconv' needs sites (S, 3) and batch_size")
            return spconv_submanifold_conv2d(
                features, sites, self.weight, self.bias, batch_size, self.dilation
            )
        if neighbors is None:
            if sites is None:
                raise ValueError("pass neighbors (from neighbor_table) or sites (S, 3)")
            neighbors = neighbor_table(sites, self.kernel_size, self.dilation)
            if self.method != "im2col":  # the rulebook, with the dense boxes "auto" may pick
                neighbors = rulebook(neighbors, sites, self.dilation)
        return submanifold_conv2d(features, neighbors, self.weight, self.bias, self.method)

    def extra_repr(self) -> str:
        c_out, c_in, k, _ = self.weight.shape
        return (
            f"{c_in}, {c_out}, kernel_size={k}, dilation={self.dilation}, backend={self.backend!r}, "
            f"method={self.method!r}"
        )
