"""``pad_bag_levels``: pad bags with several instance sets (magnification levels) into one batch.

A sample holds ``bag`` ``(N, ...)`` and, for multi-magnification bags (ZoomMIL, :mod:`planted_bags`),
``bag_1``, ``bag_2`` … ``(N_l, ...)``. Every tensor whose key has the same level suffix (``coords_1``,
``instance_labels_1``, a child-validity ``mask_1`` …) and whose first dimension equals that level's bag
length is zero-padded to the longest bag of the batch, and ``mask`` / ``mask_<l>`` ``(B, N_l)`` bool
(True = real; AND-ed with a sample's own mask when it has one) is added. Scalars (``label``, ``index``)
become tensors; other entries are stacked when their shapes agree and kept as lists otherwise.

With one level this is the plain padding collate of CONVENTIONS.md §1.2.

Example:
    >>> import torch
    >>> batch = pad_bag_levels([{"bag": torch.ones(2, 3), "label": 1}, {"bag": torch.ones(4, 3), "label": 0}])
    >>> batch["bag"].shape, batch["mask"].tolist()
    (torch.Size([2, 4, 3]), [[True, True, False, False], [True, True, True, True]])
"""

from __future__ import annotations

import re
from typing import Any

import torch

from needlework.registry import register_collate

_BAG_KEY = re.compile(r"^bag(_\d+)?$")


def _suffix(key: str) -> str:
    match = re.search(r"(_\d+)$", key)
    return match.group(1) if match else ""


def _pad(values: list[torch.Tensor], n_max: int) -> torch.Tensor:
    first = values[0]
    out = first.new_zeros(len(values), n_max, *first.shape[1:])
    for i, v in enumerate(values):
        out[i, : len(v)] = v
    return out


@register_collate("pad_bag_levels")
def pad_bag_levels(samples: list[dict[str, Any]]) -> dict[str, Any]:
    """Collate samples with one or more bag levels (see the module docstring)."""
    if not samples:
        raise ValueError("pad_bag_levels got an empty list of samples")
    if "bag" not in samples[0]:
        raise KeyError(f"pad_bag_levels needs a 'bag' entry per sample, got keys {sorted(samples[0])}")
    lengths = {
        _suffix(key): [len(s[key]) for s in samples] for key in samples[0] if _BAG_KEY.match(key)
    }
    batch: dict[str, Any] = {}
    for key, first in samples[0].items():
        values = [s[key] for s in samples]
        suffix = _suffix(key)
        per_level = suffix in lengths and isinstance(first, torch.Tensor) and first.dim() >= 1
        if per_level and all(len(v) == n for v, n in zip(values, lengths[suffix])):
            batch[key] = _pad(values, max(lengths[suffix]))
        elif isinstance(first, torch.Tensor) and all(v.shape == first.shape for v in values):
            batch[key] = torch.stack(values)
        elif isinstance(first, (int, float)):
            batch[key] = torch.tensor(values)
        else:
            batch[key] = values
    for suffix, lens in lengths.items():
        mask = torch.zeros(len(samples), max(lens), dtype=torch.bool)
        for i, n in enumerate(lens):
            mask[i, :n] = True
        own = batch.get(f"mask{suffix}")
        batch[f"mask{suffix}"] = mask if own is None else mask & own.bool()
    return batch
