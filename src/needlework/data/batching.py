"""Collate functions: the DataLoader's ``collate_fn`` by name.

``collate_samples`` stacks entries whose shapes agree and keeps the others (boxes of varying count,
metadata) as lists, so detection/saliency targets travel with the batch.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any

import torch
from torch.utils.data import default_collate


def collate_samples(samples: list[dict[str, Any]]) -> dict[str, Any]:
    """Batch a list of sample dicts: stack what stacks, keep lists for the rest."""
    batch: dict[str, Any] = {}
    for key in samples[0]:
        values = [s[key] for s in samples]
        first = values[0]
        if isinstance(first, torch.Tensor) and all(v.shape == first.shape for v in values):
            batch[key] = torch.stack(values)
        elif isinstance(first, (int, float, bool)) and not isinstance(first, bool):
            batch[key] = torch.tensor(values)
        elif isinstance(first, dict):
            batch[key] = default_collate(values)
        else:
            batch[key] = values
    return batch


#: collate name -> "module:function" (imported on use).
COLLATES = {
    "default": "needlework.data.batching:collate_samples",
    "pad_bags": "needlework.data.collate:pad_bags",
    "pad_bag_levels": "needlework.data.level_collate:pad_bag_levels",
}


def get_collate(name: str) -> Callable[[list[dict[str, Any]]], dict[str, Any]]:
    """The collate function registered under ``name`` (see :data:`COLLATES`)."""
    if name not in COLLATES:
        raise ValueError(f"unknown collate {name!r}; choose one of {sorted(COLLATES)}")
    module, func = COLLATES[name].split(":")
    return getattr(importlib.import_module(module), func)
