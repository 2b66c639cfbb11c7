"""``DatasetDataModule``: train/val/test loaders over any registered dataset."""

from __future__ import annotations

from typing import Any

import lightning as L
from torch.utils.data import DataLoader, Dataset

from needlework.data.batching import get_collate
from needlework.registry import create_dataset


class DatasetDataModule(L.LightningDataModule):
    """Loaders over ``create_dataset(dataset, split=..., **dataset_kwargs, **<split>_kwargs)``.

    Args:
        dataset: registry name (see ``needlework list datasets``).
        dataset_kwargs: arguments shared by all splits.
        train_kwargs, val_kwargs, test_kwargs: per-split overrides (e.g. ``size``, ``oversample``).
        batch_size: training batch size; ``eval_batch_size`` defaults to it.
        num_workers: DataLoader worker processes.
        collate: ``"default"`` (stack what stacks) or ``"pad_bags"`` (bags padded with masks).
    """

    def __init__(
        self,
        dataset: str,
        dataset_kwargs: dict[str, Any] | None = None,
        train_kwargs: dict[str, Any] | None = None,
        val_kwargs: dict[str, Any] | None = None,
        test_kwargs: dict[str, Any] | None = None,
        batch_size: int = 32,
        eval_batch_size: int | None = None,
        num_workers: int = 0,
        collate: str = "default",
        pin_memory: bool = False,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.collate_fn = get_collate(collate)
        self._datasets: dict[str, Dataset] = {}

    def dataset(self, split: str) -> Dataset:
        """The dataset of ``split`` (built on first use)."""
        if split not in self._datasets:
            h = self.hparams
            kwargs = {**(h.dataset_kwargs or {}), **(h.get(f"{split}_kwargs") or {})}
            self._datasets[split] = create_dataset(h.dataset, split=split, **kwargs)
        return self._datasets[split]

    def _loader(self, split: str, shuffle: bool) -> DataLoader:
        h = self.hparams
        workers = h.num_workers
        return DataLoader(
            self.dataset(split),
            batch_size=h.batch_size if shuffle else (h.eval_batch_size or h.batch_size),
            shuffle=shuffle,
            num_workers=workers,
            collate_fn=self.collate_fn,
            pin_memory=h.pin_memory,
            persistent_workers=workers > 0,
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val", shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", shuffle=False)

    def predict_dataloader(self) -> DataLoader:
        return self._loader("test", shuffle=False)
