"""Variance of the ATS gradient estimate against the number of sampled patches (issue #18, item 4).

For a fixed :class:`~needlework.models.ats.ATSClassifier` and batch, the features of *every* attention
cell are computed once (``f_i``, ``(B, N, D)``), so the exact expectation ``F* = Σ_i a_i f_i`` and its
gradient are available. Each draw then samples ``n`` cells, forms the ATS estimate
:func:`~needlework.ats.expectation` from the precomputed features and back-propagates. The gradient is
taken with respect to the attention network's parameters and to the cell features (the feature network's
parameter gradient is a fixed linear map of the latter), and for the cross-entropy loss also the
classifier's.

Two losses:

* ``linear``: ``⟨u, F⟩`` with ``u = ∂CE/∂F`` at ``F*`` held fixed — the quantity the estimator is
  unbiased for, so the mean over draws must match the exact gradient for every ``n``;
* ``cross_entropy``: the training loss itself, nonlinear in ``F``, so its gradient estimate carries a
  bias that shrinks with ``n``.

Per ``n`` and loss: ``trace`` = Σ over coordinates of the variance over draws (unbiased, float64),
``bias`` = ‖mean − exact‖, ``bias_z`` = bias² / (trace / draws), which is ≈ 1 in expectation for an
unbiased estimator (the squared error of a mean of ``draws`` independent draws) and grows with a bias.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F

from needlework.ats import attention_from_logits, cells_to_offsets, expectation, extract_patches_nd, sample
from needlework.metrics.attention import attention_entropy


@torch.no_grad()
def all_cell_features(model: torch.nn.Module, x_low: torch.Tensor, x_high: torch.Tensor, chunk: int = 256):
    """Features ``(B, N, D)`` of the patch of every attention cell, in chunks of cells."""
    s = model.sampler
    logits = s.attention_logits(x_low)
    B, shape = logits.shape[0], tuple(logits.shape[1:])
    N = math.prod(shape)
    idx = torch.arange(N).expand(B, N)
    offsets = cells_to_offsets(idx, shape, x_low.shape[2:], x_high.shape[2:], s.patch_size, s.receptive_field)
    feats = []
    for start in range(0, N, chunk):
        patches = extract_patches_nd(x_high, offsets[:, start : start + chunk], s.patch_size)
        feats.append(s.feature_net(patches.flatten(0, 1)).view(B, patches.shape[1], -1))
    return torch.cat(feats, 1)


def _grads(
    loss: torch.Tensor, groups: dict[str, list[torch.Tensor]], retain: bool = False
) -> dict[str, torch.Tensor]:
    tensors = [t for ts in groups.values() for t in ts]
    grads = torch.autograd.grad(loss, tensors, allow_unused=True, retain_graph=retain)
    out, k = {}, 0
    for name, ts in groups.items():
        parts = [(g if g is not None else torch.zeros_like(t)).flatten() for g, t in zip(grads[k:], ts)]
        out[name] = torch.cat(parts[: len(ts)]).double()
        k += len(ts)
    return out


def variance_study(
    model: torch.nn.Module,
    x_low: torch.Tensor,
    x_high: torch.Tensor,
    labels: torch.Tensor,
    ns: Sequence[int] = (2, 5, 10, 25, 50),
    draws: int = 1000,
    replace_modes: Sequence[bool] = (False, True),
    seed: int = 0,
) -> dict[str, Any]:
    """Trace of the gradient covariance and bias against ``n`` (see the module docstring).

    Args:
        model: an ATS classifier (``model.sampler``, ``model.classifier``); kept fixed.
        x_low, x_high: ``(B, C, h, w)`` and ``(B, C, H, W)``; labels: ``(B,)``.
        ns: numbers of patches; draws: repetitions per ``n``.

    Returns:
        ``{"rows": [...], "cells": N, "batch": B, "attention_entropy_norm": ..., "seconds": ...}``.
    """
    start = time.perf_counter()
    model.eval()
    s = model.sampler
    feats = all_cell_features(model, x_low, x_high).requires_grad_()
    att_params = [p for p in s.attention_net.parameters()]
    cls_params = [p for p in model.classifier.parameters()]

    def attention() -> torch.Tensor:
        return attention_from_logits(s.attention_logits(x_low), s.smoothing)

    a = attention()
    exact_f = torch.einsum("bn,bnd->bd", a, feats)
    ce = F.cross_entropy(model.classifier(exact_f), labels)
    u = torch.autograd.grad(ce, exact_f, retain_graph=True)[0].detach()
    groups = {"attention_net": att_params, "features": [feats], "classifier": cls_params}
    exact = {
        "cross_entropy": _grads(ce, groups, retain=True),
        "linear": _grads((u * torch.einsum("bn,bnd->bd", attention(), feats)).sum(), groups),
    }
    gen = torch.Generator().manual_seed(seed)
    rows = []
    for replace in replace_modes:
        for n in ns:
            sums = {loss: {g: [torch.zeros_like(v), torch.zeros_like(v)] for g, v in ex.items()}
                    for loss, ex in exact.items()}  # fmt: skip
            for _ in range(draws):
                a = attention()
                idx, _ = sample(a, n, replace, generator=gen)
                f = feats.gather(1, idx.unsqueeze(-1).expand(-1, -1, feats.shape[-1]))
                est = expectation(a, idx, f, replace)
                losses = {
                    "cross_entropy": F.cross_entropy(model.classifier(est), labels),
                    "linear": (u * est).sum(),
                }
                for loss, value in losses.items():
                    for g, v in _grads(value, groups, retain=loss == "cross_entropy").items():
                        sums[loss][g][0] += v
                        sums[loss][g][1] += v * v
            for loss, per_group in sums.items():
                for g, (s1, s2) in per_group.items():
                    if loss == "linear" and g == "classifier":
                        continue  # ⟨u, F⟩ does not involve the classifier
                    mean = s1 / draws
                    trace = float(((s2 - draws * mean * mean) / (draws - 1)).clamp_min(0).sum())
                    bias = float((mean - exact[loss][g]).norm())
                    rows.append({
                        "replace": replace, "n": n, "loss": loss, "group": g, "trace": trace, "bias": bias,
                        "exact_norm": float(exact[loss][g].norm()),
                        "bias_z": bias**2 / (trace / draws) if trace > 0 else float("nan"),
                    })  # fmt: skip
            print(
                f"  variance: replace={replace} n={n} done ({time.perf_counter() - start:.0f} s)", flush=True
            )
    return {
        "rows": rows,
        "draws": draws,
        "cells": int(feats.shape[1]),
        "batch": int(feats.shape[0]),
        "attention_entropy_norm": float(attention_entropy(a.detach(), normalised=True).mean()),
        "seconds": round(time.perf_counter() - start, 1),
    }
