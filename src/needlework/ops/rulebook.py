"""Rulebook (gather–GEMM–scatter) path of the submanifold convolution (METHODS.md §9.2, issue 16).

The im2col path multiplies every site's full ``k²·C_in`` neighbourhood, missing neighbours included; on a
scattered map most of those rows are zeros. The rulebook keeps, for each kernel offset ``o``, only the
pairs that exist: ``out_o[j]`` is a site whose neighbour at offset ``o`` is the active site ``in_o[j]``.
Then

    out = F @ W_c + b + Σ_{o ≠ c} scatter_add(out_o, F[in_o] @ W_o)

(the centre offset ``c`` pairs every site with itself, so it is a plain GEMM), and the backward is

    grad_F   = G @ W_cᵀ + Σ_{o ≠ c} scatter_add(in_o, G[out_o] @ W_oᵀ)
    grad_W_o = F[in_o]ᵀ @ G[out_o],   grad_W_c = Fᵀ @ G,   grad_b = Σ_s G_s.

Within one offset every output row occurs at most once (a site has one neighbour per offset), so each
``index_add_`` writes distinct rows and the offsets are added in a fixed order: the result is
deterministic, also on CUDA.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.autograd.function import once_differentiable

from needlework.ops.dense_box import DenseBox, dense_box


@dataclass(frozen=True)
class Rulebook:
    """Pairs that exist per kernel offset, built once per site set and shared by every layer on it.

    Attributes:
        neighbors: ``(S, k²)`` table it was built from (kept so the im2col path can use it too).
        in_rows: ``(P,)`` int64 input rows of all non-centre pairs, grouped by offset.
        out_rows: ``(P,)`` int64 output rows, same order.
        counts: ``k²`` pair counts per offset (the centre's is 0 here; it is handled as ``F @ W_c``).
        fraction: fraction of the ``S·k²`` table entries that are real neighbours (centre included).
        box: the sites' dense boxes when the rulebook was built with ``sites`` (the dense path), else None.
    """

    neighbors: torch.Tensor
    in_rows: torch.Tensor
    out_rows: torch.Tensor
    counts: tuple[int, ...]
    fraction: float
    box: DenseBox | None = None

    @property
    def n_sites(self) -> int:
        return self.neighbors.shape[0]

    @property
    def kernel_size(self) -> int:
        return round(self.neighbors.shape[1] ** 0.5)

    def to(self, device: torch.device | str) -> Rulebook:
        """The same rulebook on ``device``."""
        return Rulebook(
            self.neighbors.to(device), self.in_rows.to(device), self.out_rows.to(device), self.counts,
            self.fraction, None if self.box is None else self.box.to(device),
        )


def rulebook(neighbors: torch.Tensor, sites: torch.Tensor | None = None, dilation: int = 1) -> Rulebook:
    """Rulebook of a neighbour table.

    Args:
        neighbors: ``(S, k²)`` int64 from :func:`needlework.ops.sparse_conv.neighbor_table` (``S`` = missing).
        sites: the ``(S, 3)`` sites the table was built from; given, the rulebook also holds their dense
            boxes (:mod:`needlework.ops.dense_box`), which ``method="auto"`` takes on compact site sets.
        dilation: the table's dilation (for the dense boxes).

    Returns:
        :class:`Rulebook`; pairs of offset ``o`` are sorted by output row.
    """
    if neighbors.dim() != 2 or neighbors.dtype != torch.long:
        raise ValueError(
            f"neighbors must be an (S, k²) int64 table, got {tuple(neighbors.shape)} {neighbors.dtype}"
        )
    s, kk = neighbors.shape
    k = round(kk**0.5)
    if k * k != kk or k % 2 != 1:
        raise ValueError(f"neighbors must have k² columns for an odd k, got {kk}")
    exists = neighbors.t() < s  # (k², S): offset-major so nonzero() groups the pairs by offset
    real = int(exists.sum())
    exists[kk // 2] = False  # the centre is the identity, done as one dense GEMM
    offset, out_rows = exists.nonzero(as_tuple=True)
    in_rows = neighbors[out_rows, offset]
    counts = torch.bincount(offset, minlength=kk).tolist() if len(offset) else [0] * kk
    fraction = real / (s * kk) if s else 0.0
    box = None
    if sites is not None:
        if len(sites) != s:
            raise ValueError(
                f"sites has {len(sites)} rows but the neighbour table {s}: pass the same site set"
            )
        box = dense_box(sites, dilation)
    return Rulebook(neighbors, in_rows, out_rows, tuple(counts), fraction, box)


class RulebookConv(torch.autograd.Function):
    """``(features (S, C_in), w (k², C_in, C_out), bias (C_out,) | None, rulebook)`` → ``(S, C_out)``.

    Saves only ``features``, ``w`` and the rulebook's index tensors: the gathered rows are recomputed in
    the backward, one offset at a time, rather than kept.
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: torch.autograd.function.FunctionCtx,
        features: torch.Tensor,
        w: torch.Tensor,
        bias: torch.Tensor | None,
        book: Rulebook,
    ) -> torch.Tensor:
        centre = w.shape[0] // 2
        out = features @ w[centre]
        if bias is not None:
            out += bias
        start = 0
        for o, n in enumerate(book.counts):
            if n:
                # per-offset gathers (≈ S·C_in each) rather than one (P, C_in) buffer: a buffer that large
                # is a fresh mmap every call on CPU, and its page faults cost more than the GEMMs
                rows = book.in_rows[start : start + n]
                out.index_add_(0, book.out_rows[start : start + n], features.index_select(0, rows) @ w[o])
                start += n
        ctx.save_for_backward(features, w, book.in_rows, book.out_rows)
        ctx.counts, ctx.has_bias = book.counts, bias is not None
        return out

    @staticmethod
    @once_differentiable
    def backward(  # type: ignore[override]
        ctx: torch.autograd.function.FunctionCtx, grad: torch.Tensor
    ) -> tuple[torch.Tensor | None, ...]:
        features, w, in_rows, out_rows = ctx.saved_tensors
        need_f, need_w, need_b = ctx.needs_input_grad[:3]
        centre = w.shape[0] // 2
        grad = grad.contiguous()
        grad_f = grad @ w[centre].T if need_f else None
        grad_w = None
        if need_w:
            grad_w = torch.zeros_like(w)
            grad_w[centre] = features.T @ grad
        if need_f or need_w:
            start = 0
            for o, n in enumerate(ctx.counts):
                if not n:
                    continue
                ins, outs = in_rows[start : start + n], out_rows[start : start + n]
                g_out = grad.index_select(0, outs)  # (n, C_out)
                if need_f:
                    grad_f.index_add_(0, ins, g_out @ w[o].T)
                if need_w:
                    grad_w[o] = features.index_select(0, ins).T @ g_out
                start += n
        grad_b = grad.sum(0) if need_b and ctx.has_bias else None
        return grad_f, grad_w, grad_b, None


def rulebook_conv2d(
    features: torch.Tensor, book: Rulebook, weight: torch.Tensor, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """Submanifold convolution by gather–GEMM–scatter over ``book``.

    Args:
        features: ``(S, C_in)``.
        book: :class:`Rulebook` of the site set.
        weight: ``(C_out, C_in, k, k)`` (``nn.Conv2d`` layout).
        bias: ``(C_out,)`` or None.

    Returns:
        ``(S, C_out)``.
    """
    c_out, c_in, k, _ = weight.shape
    w = weight.permute(2, 3, 1, 0).reshape(k * k, c_in, c_out)  # offset-major, matching the table
    return RulebookConv.apply(features, w, bias, book)
