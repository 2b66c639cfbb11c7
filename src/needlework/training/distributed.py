"""Helpers for training on several processes (Lightning DDP) without biasing evaluation.

Lightning gives every evaluation loader a ``DistributedSampler`` that *pads* the dataset with repeated
items until it divides by the number of processes, so with 2 processes and 33 test images one image counts
twice and the metrics differ from a one-process evaluation. :class:`UnpaddedDistributedSampler` deals
items round-robin without padding instead: rank ``r`` of ``W`` gets ``r, r + W, r + 2W, ...``, so every
item is evaluated exactly once and the ranks' batch counts differ by at most one. That is safe for
evaluation because nothing there needs a collective per batch (metrics are synced once per epoch by
torchmetrics, logged losses by Lightning's ``sync_dist``), but not for training, where DDP all-reduces the
gradients of every step: training keeps Lightning's padded sampler.
"""

from __future__ import annotations

from collections.abc import Iterator, Sized
from typing import Any

import torch
from torch.utils.data import DistributedSampler


class UnpaddedDistributedSampler(DistributedSampler):
    """Round-robin share of ``range(len(dataset))`` for rank ``rank`` of ``num_replicas``, no padding.

    Being a ``DistributedSampler``, Lightning keeps it instead of injecting its padded one.

    Example:
        >>> data = list(range(5))
        >>> [list(UnpaddedDistributedSampler(data, num_replicas=2, rank=r)) for r in (0, 1)]
        [[0, 2, 4], [1, 3]]
    """

    def __init__(self, dataset: Sized, num_replicas: int, rank: int, name: str = "dataset") -> None:
        if len(dataset) < num_replicas:
            # a rank without items would skip the evaluation loop and its once-per-epoch metric sync
            raise ValueError(
                f"the {name} has {len(dataset)} items for {num_replicas} processes: every process needs at "
                "least one; evaluate on fewer devices or a larger split"
            )
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=False, drop_last=False)  # type: ignore[arg-type]
        self.num_samples = len(range(rank, len(dataset), num_replicas))
        self.total_size = len(dataset)

    def __iter__(self) -> Iterator[int]:
        return iter(range(self.rank, self.total_size, self.num_replicas))

    def __len__(self) -> int:
        return self.num_samples


def is_distributed() -> bool:
    """Whether a ``torch.distributed`` process group with more than one process is running."""
    return (
        torch.distributed.is_available()
        and torch.distributed.is_initialized()
        and torch.distributed.get_world_size() > 1
    )


def gather_objects(obj: Any) -> list[Any]:
    """``[obj of rank 0, obj of rank 1, ...]`` (``[obj]`` on one process). A collective: every rank must
    call it at the same point."""
    if not is_distributed():
        return [obj]
    out: list[Any] = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(out, obj)
    return out
