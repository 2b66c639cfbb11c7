"""Attention sampling over more than two resolutions (nested sampling).

Images ``x_0 < x_1 < … < x_L`` show the same scene at increasing resolution. Level 0 scores the whole of
``x_0`` and samples ``n_0`` cells; each maps to a region of ``x_1`` of side ``P_0`` (the patch at level 1).
Level ``l ≥ 1`` scores each of its patches of ``x_l`` with ``attention_nets[l]``, samples ``n_l`` cells per
patch and maps them to patches of side ``P_l`` in ``x_{l+1}``. Only the ``n_0·…·n_{L−1}`` finest patches
go through the feature network, and :func:`~needlework.ats.nested_expectation` averages them without
bias, with unbiased gradients for every level's attention network.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from needlework.ats import (
    attention_from_logits,
    cells_to_offsets,
    extract_patches_nd,
    nested_expectation,
    sample,
)

__all__ = ["MultiResolutionAttentionSampling"]


def _logits(net: nn.Module, x: torch.Tensor, level: int) -> torch.Tensor:
    out = net(x)
    if out.dim() == x.dim() and out.shape[1] == 1:
        out = out[:, 0]
    if out.dim() != x.dim() - 1:
        raise ValueError(
            f"attention_nets[{level}] must return (B, 1, *spatial) logits, got {tuple(out.shape)}"
        )
    return out


class MultiResolutionAttentionSampling(nn.Module):
    """Nested attention sampling over ``L + 1`` resolutions.

    Args:
        attention_nets: ``L`` networks; ``attention_nets[0]`` scores ``x_0``, ``attention_nets[l]`` scores
            each level-``l`` patch ``(R, C, P_{l−1}, …)`` of ``x_l``; each returns ``(R, 1, *map)`` logits.
        feature_net: ``(R, C, P_{L−1}, …) → (R, D)`` on patches of ``x_L``.
        n_patches: ``L`` sample counts ``n_l``.
        patch_sizes: ``L`` patch sides ``P_l`` (pixels of ``x_{l+1}``).
        replace: one flag or one per level.
        smoothing: ``ε_s`` of every level's attention.

    ``forward(levels)`` takes the list ``[x_0, …, x_L]`` of ``(B, C, *S_l)`` tensors and returns
    ``features (B, D)``, ``attentions`` (per level, ``(B·n_0·…·n_{l−1}, N_l)``), ``indices`` (per level),
    ``offsets`` (per level ``l``, ``(B, n_0·…·n_l, d)`` corners ``(x, y)`` in ``x_{l+1}``) and ``patches``
    ``(B, n_0·…·n_{L−1}, C, P…)``.
    """

    def __init__(
        self,
        attention_nets: Sequence[nn.Module],
        feature_net: nn.Module,
        n_patches: Sequence[int],
        patch_sizes: Sequence[int],
        replace: bool | Sequence[bool] = False,
        smoothing: float = 1e-5,
    ) -> None:
        super().__init__()
        L = len(attention_nets)
        if L < 1 or len(n_patches) != L or len(patch_sizes) != L:
            raise ValueError(
                f"need one n_patches and one patch_size per attention net: got {L} nets, "
                f"{len(n_patches)} n_patches, {len(patch_sizes)} patch_sizes"
            )
        self.attention_nets = nn.ModuleList(attention_nets)
        self.feature_net = feature_net
        self.n_patches = [int(n) for n in n_patches]
        self.patch_sizes = [int(p) for p in patch_sizes]
        self.replace = [bool(replace)] * L if isinstance(replace, bool) else [bool(r) for r in replace]
        self.smoothing = float(smoothing)

    def forward(self, levels: Sequence[torch.Tensor]) -> dict[str, Any]:
        L = len(self.attention_nets)
        if len(levels) != L + 1:
            raise ValueError(f"expected {L + 1} resolutions (x_0 … x_{L}), got {len(levels)}")
        B = levels[0].shape[0]
        d = levels[0].dim() - 2
        attentions, indices, all_offsets = [], [], []
        inputs = levels[0]  # what the level's attention net scores
        parent = torch.zeros(B, 1, d, dtype=torch.long, device=levels[0].device)  # corners in x_l
        count = 1  # samples per image so far
        for level in range(L):
            x_cur, x_next = levels[level], levels[level + 1]
            ratio = [x_next.shape[2 + a] / x_cur.shape[2 + a] for a in range(d)]
            logits = _logits(self.attention_nets[level], inputs, level)
            attention = attention_from_logits(logits, self.smoothing)
            idx, _ = sample(attention, self.n_patches[level], self.replace[level])
            seen = tuple(inputs.shape[2:])  # region scored: whole x_0, then patches of x_l
            region = [round(s * r) for s, r in zip(seen, ratio)]
            local = cells_to_offsets(idx, tuple(logits.shape[1:]), seen, region, self.patch_sizes[level])
            # parent corner (x_l pixels, coordinate order) scaled to x_{l+1}, plus the local corner
            scale = torch.tensor(ratio[::-1], device=parent.device, dtype=torch.float64)
            origin = torch.round(parent.reshape(-1, 1, d).double() * scale).long()
            count *= self.n_patches[level]
            offsets = (origin + local).reshape(B, count, d)
            patches = extract_patches_nd(x_next, offsets, self.patch_sizes[level])
            attentions.append(attention)
            indices.append(idx)
            all_offsets.append(offsets)
            inputs, parent = patches.flatten(0, 1), offsets
        feats = self.feature_net(inputs)
        if feats.dim() != 2 or feats.shape[0] != B * count:
            raise ValueError(f"feature_net must return ({B * count}, D), got {tuple(feats.shape)}")
        features = nested_expectation(attentions, indices, feats.view(B, count, -1), self.replace)
        return {
            "features": features,
            "attentions": attentions,
            "indices": indices,
            "offsets": all_offsets,
            "patches": patches,
            "samples_per_image": math.prod(self.n_patches),
        }
