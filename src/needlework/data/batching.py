"""The default collate (``"default"`` in the collate registry; ``needlework.registry.get_collate``).

``collate_samples`` stacks entries whose shapes agree and keeps the others (boxes of varying count,
metadata) as lists, so detection/saliency targets travel with the batch.
"""

from __future__ import annotations

from typing import Any

import torch
from torch.utils.data import default_collate

from needlework.registry import register_collate


@register_collate("default")
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
