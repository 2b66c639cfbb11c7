"""Collate functions for variable-size bags: zero padding plus a mask (True = real instance).

Example:
    >>> import torch
    >>> batch = pad_bags([{"bag": torch.ones(3, 4), "label": 1}, {"bag": torch.ones(5, 4), "label": 0}])
    >>> batch["bag"].shape, batch["mask"].sum(1).tolist(), batch["coords"].dtype
    (torch.Size([2, 5, 4]), [3, 5], torch.int64)
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from needlework.registry import register_collate


def _as_tensor(x: Any, dtype: torch.dtype | None = None) -> torch.Tensor:
    t = x if isinstance(x, torch.Tensor) else torch.as_tensor(x)
    return t.to(dtype) if dtype is not None else t


@register_collate("pad_bags")
def pad_bags(samples: Sequence[dict[str, Any]]) -> dict[str, torch.Tensor]:
    """Stack bags of different sizes into a padded batch.

    Each sample has ``bag`` ``(N_i, D)``, ``label`` (an int, or a ``(C,)`` vector for multi-label) and
    optionally ``coords`` ``(N_i, 2)`` and ``slide_index`` ``(N_i,)`` (patient bags).

    Returns:
        ``bag`` ``(B, N_max, D)`` float32 zero-padded, ``coords`` ``(B, N_max, 2)`` int64 (0 where padded or
        absent), ``mask`` ``(B, N_max)`` bool (True = real instance), ``label`` ``(B,)`` int64 (or ``(B, C)``
        float32 for vector labels), and ``slide_index`` ``(B, N_max)`` int64 when every sample has one.
    """
    if not samples:
        raise ValueError("pad_bags needs at least one sample")
    bags = [_as_tensor(s["bag"], torch.float32) for s in samples]
    for i, b in enumerate(bags):
        if b.dim() != 2:
            raise ValueError(f"sample {i}: bag must be (N, D), got {tuple(b.shape)}")
    dims = {b.shape[1] for b in bags}
    if len(dims) != 1:
        raise ValueError(f"bags have different feature widths {sorted(dims)}; use one encoder per dataset")
    batch, n_max, dim = len(bags), max(max(b.shape[0] for b in bags), 1), dims.pop()
    out_bag = torch.zeros(batch, n_max, dim, dtype=torch.float32)
    out_coords = torch.zeros(batch, n_max, 2, dtype=torch.int64)
    mask = torch.zeros(batch, n_max, dtype=torch.bool)
    with_index = all("slide_index" in s for s in samples)
    slide_index = torch.zeros(batch, n_max, dtype=torch.int64) if with_index else None
    for i, (s, b) in enumerate(zip(samples, bags)):
        n = b.shape[0]
        out_bag[i, :n] = b
        mask[i, :n] = True
        if s.get("coords") is not None:
            c = _as_tensor(s["coords"], torch.int64)
            if c.shape != (n, 2):
                raise ValueError(f"sample {i}: coords must be ({n}, 2), got {tuple(c.shape)}")
            out_coords[i, :n] = c
        if slide_index is not None:
            slide_index[i, :n] = _as_tensor(s["slide_index"], torch.int64)
    labels = [_as_tensor(s["label"]) for s in samples]
    if labels[0].dim() == 0:
        label = torch.stack([lab.to(torch.int64) for lab in labels])
    else:
        label = torch.stack([lab.to(torch.float32) for lab in labels])
    result = {"bag": out_bag, "coords": out_coords, "mask": mask, "label": label}
    if slide_index is not None:
        result["slide_index"] = slide_index
    return result
