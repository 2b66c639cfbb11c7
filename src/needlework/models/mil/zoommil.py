"""ZoomMIL (Thandiackal et al., ECCV 2022): differentiable zooming through magnification levels
(METHODS.md §7).

Level 0 is the lowest magnification (``bag``); level ``l`` has ``r_l`` children per instance of level
``l − 1``, stored depth-first (:mod:`needlework.ops.zoom`). At every level: ``h = Dropout(ReLU(W x))``;
gated attention gives ``A`` and ``M_l = Σ A h``; a second gated-attention head gives ``A_aux``, from which
``perturbed_topk`` selects ``K = min(k, rows)`` instances (soft indicators in training, hard top-K in
evaluation); only their children are carried to the next level. ``logits = Linear(Σ_l M_l)``. The auxiliary
heads learn only through the perturbed top-K gradient (``jacobian="outer"``, the correct one, by default;
``"diagonal"`` reproduces the reference code). With ``input_norm`` every level's features are first
standardised (:class:`~needlework.models.mil.common.MaskedStandardize`, one per level): raw features such
as ``color_stats`` (tiny spread around large means) otherwise leave the model at the constant prediction.

Inputs beyond the contract's ``bag`` / ``coords`` / ``mask``, for ``l = 1 … num_levels − 1``:

* ``bag_<l>`` ``(B, N_l, D)`` precomputed features (``N_l = r_l · N_{l−1}``), or
* ``tiles_<l>`` ``(B, N_l, C, H, W)`` pixels or any :class:`needlework.ops.zoom.ChildTiles` source: only the
  children that carry weight are embedded, by ``child_encoder`` (the compute saving of zooming);
* ``mask_<l>`` ``(B, N_l)`` child validity (background children False); ``coords_<l>`` ``(B, N_l, 2)``.

Outputs: ``logits``, ``attention`` ``(B, N_0)`` (level 0), ``attention_levels``, ``selected_idx`` ``(B, K)``
(level-0 instances zoomed into), ``selected_idx_levels`` (original indices per level), ``selected_coords``
``(B, K, 2)`` when ``coords`` is given, ``embedded_children`` (tiles embedded per level on the fly).

Example:
    >>> import torch, needlework
    >>> model = needlework.create_model("zoommil", in_dim=8, num_classes=2, num_levels=2, k=2).eval()
    >>> out = model(torch.randn(1, 5, 8), bag_1=torch.randn(1, 20, 8))
    >>> out["logits"].shape, out["selected_idx"].shape
    (torch.Size([1, 2]), torch.Size([1, 2]))
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from needlework.models.mil.common import (
    GatedAttention,
    MaskedStandardize,
    MILModel,
    feature_projector,
    register_mil_model,
)
from needlework.ops.zoom import TensorTiles, ZoomRows, embed_rows
from needlework.registry import create_encoder


def _safe_softmax(scores: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Masked softmax over the last axis; all-zero for rows without any valid entry."""
    out = scores.masked_fill(~valid, float("-inf")).softmax(-1)
    return torch.nan_to_num(out, nan=0.0)


class ZoomMIL(MILModel):
    """Multi-level MIL with differentiable zooming.

    Args:
        in_dim: feature width ``D`` (every level).
        num_classes: number of classes.
        num_levels: number of magnifications ``L`` (1 = gated ABMIL).
        hidden_dim: width after ``W`` (512).
        attention_dim: gated-attention hidden width (256).
        dropout: dropout after ``W`` (0.25).
        k: instances zoomed into per level (int or one per zooming level; 12 in the reference).
        sigma, n_samples: perturbed top-K noise scale and draws (0.002 and 100 in the reference).
        jacobian: ``"outer"`` (correct) or ``"diagonal"`` (reference reproduction).
        share_levels: one ``W`` and attention pair for all levels instead of one per level.
        child_encoder: registry name of the encoder for ``tiles_<l>`` inputs (its ``embed_dim`` must be
            ``in_dim``); ``child_encoder_kwargs`` its arguments.
        input_norm: standardise each level's features (statistics over its real instances; running ones
            in evaluation) before ``W``.
    """

    def __init__(
        self,
        in_dim: int,
        num_classes: int = 2,
        num_levels: int = 3,
        hidden_dim: int = 512,
        attention_dim: int = 256,
        dropout: float = 0.25,
        k: int | Sequence[int] = 12,
        sigma: float = 0.002,
        n_samples: int = 100,
        jacobian: str = "outer",
        share_levels: bool = False,
        child_encoder: str | None = None,
        child_encoder_kwargs: dict[str, Any] | None = None,
        input_norm: bool = False,
    ) -> None:
        super().__init__(in_dim, num_classes)
        if num_levels < 1:
            raise ValueError(f"num_levels must be at least 1, got {num_levels}")
        ks = [k] * max(num_levels - 1, 0) if isinstance(k, int) else list(k)
        if len(ks) != num_levels - 1 or any(v < 1 for v in ks):
            raise ValueError(f"k must be a positive int or {num_levels - 1} positive ints, got {k!r}")
        self.num_levels, self.ks = num_levels, ks
        self.sigma, self.n_samples, self.jacobian = sigma, n_samples, jacobian
        n_modules = 1 if share_levels else num_levels
        self.embed = nn.ModuleList(feature_projector(in_dim, hidden_dim, dropout) for _ in range(n_modules))
        self.attention = nn.ModuleList(
            GatedAttention(hidden_dim, attention_dim, gated=True) for _ in range(n_modules)
        )
        self.aux_attention = nn.ModuleList(
            GatedAttention(hidden_dim, attention_dim, gated=True)
            for _ in range(min(n_modules, num_levels - 1))
        )
        self.classifier = nn.Linear(hidden_dim, num_classes)
        self.input_norm = (
            nn.ModuleList(MaskedStandardize(in_dim) for _ in range(num_levels)) if input_norm else None
        )
        self.child_encoder = None
        if child_encoder is not None:
            self.child_encoder = create_encoder(child_encoder, **(child_encoder_kwargs or {}))
            width = getattr(self.child_encoder, "embed_dim", in_dim)
            if width != in_dim:
                raise ValueError(f"child_encoder outputs {width} features but in_dim={in_dim}")

    def _level_source(
        self, level: int, levels: dict[str, Any], n_parent: int
    ) -> tuple[int, torch.Tensor | None, Any]:
        """Original size of ``level`` and its precomputed features or its tile source."""
        feats, tiles = levels.get(f"bag_{level}"), levels.get(f"tiles_{level}")
        if feats is None and tiles is None:
            raise ValueError(
                f"ZoomMIL with num_levels={self.num_levels} needs bag_{level} (features) or tiles_{level} "
                f"(pixels) for level {level}; got {sorted(levels)}"
            )
        source = feats if feats is not None else tiles
        n = source.shape[1] if isinstance(source, torch.Tensor) else len(source)
        if n % n_parent:
            raise ValueError(
                f"level {level} has {n} instances, not a multiple of level {level - 1}'s {n_parent}"
            )
        if feats is not None:
            if feats.shape[-1] != self.in_dim:
                raise ValueError(
                    f"bag_{level} has feature dimension {feats.shape[-1]} but in_dim={self.in_dim}"
                )
            return n, feats, None
        if self.child_encoder is None:
            raise ValueError(f"tiles_{level} given but the model has no child_encoder to embed them")
        return n, None, TensorTiles(tiles) if isinstance(tiles, torch.Tensor) else tiles

    def forward(
        self,
        bag: torch.Tensor,
        coords: torch.Tensor | None = None,
        mask: torch.Tensor | None = None,
        **levels: Any,
    ) -> dict[str, Any]:
        """See the module docstring for the inputs and outputs."""
        mask = self._check(bag, coords, mask)
        b, n0, _ = bag.shape
        rows = ZoomRows.identity(b, n0, bag.device)
        if self.input_norm is not None:
            bag = self.input_norm[0](bag, mask)
        x, valid, n_orig = bag, mask, n0
        original_valid = mask
        total = None
        out: dict[str, Any] = {"attention_levels": [], "selected_idx_levels": [], "embedded_children": []}
        for level in range(self.num_levels):
            i = 0 if len(self.embed) == 1 else level
            h = self.embed[i](x)
            attention = _safe_softmax(self.attention[i](h).squeeze(-1), valid)
            m_level = torch.einsum("bn,bnd->bd", attention, h)
            total = m_level if total is None else total + m_level
            out["attention_levels"].append(attention)
            if level == self.num_levels - 1:
                break
            from needlework.topk import perturbed_topk

            # select among the current rows with the auxiliary attention; invalid rows can never win
            aux_head = self.aux_attention[min(i, len(self.aux_attention) - 1)]
            aux = _safe_softmax(aux_head(h).squeeze(-1), valid)
            k = min(self.ks[level], rows.rows)
            indicators = perturbed_topk(
                aux.masked_fill(~valid, float("-inf")), k, self.sigma, self.n_samples,
                training=self.training, jacobian=self.jacobian,
            )
            selected = rows.select(indicators)
            out["selected_idx_levels"].append(selected.dominant())
            # zoom: children of the selected rows at the next level
            n_next, feats, source = self._level_source(level + 1, levels, n_orig)
            r = n_next // n_orig
            rows = selected.children(r)
            child_valid = original_valid.repeat_interleave(r, dim=1)
            given = levels.get(f"mask_{level + 1}")
            if given is not None:
                child_valid = child_valid & given.bool()
            original_valid, n_orig = child_valid, n_next
            valid = rows.gather(child_valid.to(bag.dtype)) >= 0.5
            norm = None if self.input_norm is None else self.input_norm[level + 1]
            if feats is not None:
                if norm is not None:  # statistics of every real child of the level, selected or not
                    feats = norm(feats, child_valid)
                x = rows.gather(feats)
                out["embedded_children"].append(0)
            else:
                x, count = embed_rows(rows, source, self.child_encoder)
                if norm is not None:  # only the selected children are embedded: their statistics
                    x = norm(x, valid)
                out["embedded_children"].append(count)
        out["logits"] = self.classifier(total)
        out["embedding"] = total
        out["attention"] = out["attention_levels"][0]
        if self.num_levels > 1:
            out["selected_idx"] = out["selected_idx_levels"][0]
            if coords is not None:
                idx = out["selected_idx"]
                out["selected_coords"] = torch.gather(coords, 1, idx[..., None].expand(-1, -1, 2))
        return out


@register_mil_model("zoommil")
def zoommil(in_dim: int, num_classes: int = 2, **kwargs: Any) -> ZoomMIL:
    """ZoomMIL over ``num_levels`` magnifications (default 3)."""
    return ZoomMIL(in_dim=in_dim, num_classes=num_classes, **kwargs)
