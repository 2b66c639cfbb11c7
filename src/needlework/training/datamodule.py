"""``DatasetDataModule``: train/val/test loaders over any registered dataset."""

from __future__ import annotations

from typing import Any

import lightning as L
from lightning.pytorch.callbacks import Timer
from lightning.pytorch.utilities import rank_zero_info
from torch.utils.data import DataLoader, Dataset

import needlework.data  # registers the built-in datasets and collates
import needlework.slides.pixel_data  # registers slide_images and the slide_pixels collate
import needlework.slides.zoom_tiles  # noqa: F401  (registers slide_bags_multimag_pixels + its collate)
from needlework.registry import create_dataset, create_transform, get_collate
from needlework.training.distributed import UnpaddedDistributedSampler


class TransformedDataset(Dataset):
    """``dataset`` with sample transforms applied on access (in DataLoader workers); other attributes
    (``labels``, ``o2i``, ...) pass through to the wrapped dataset."""

    def __init__(self, dataset: Dataset, transforms: list[Any]) -> None:
        self.dataset, self.transforms = dataset, list(transforms)

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, index: int) -> Any:
        item = self.dataset[index]
        for transform in self.transforms:
            item = transform(item)
        return item

    def __getattr__(self, name: str) -> Any:
        if name in ("dataset", "transforms"):
            raise AttributeError(name)
        return getattr(self.dataset, name)


class DatasetDataModule(L.LightningDataModule):
    """Loaders over ``create_dataset(dataset, split=..., **dataset_kwargs, **<split>_kwargs)``.

    Args:
        dataset: registry name (see ``needlework list datasets``).
        dataset_kwargs: arguments shared by all splits.
        train_kwargs, val_kwargs, test_kwargs: per-split overrides (e.g. ``size``, ``oversample``).
        batch_size: training batch size; ``eval_batch_size`` defaults to it.
        num_workers: DataLoader worker processes.
        collate: ``"default"`` (stack what stacks) or ``"pad_bags"`` (bags padded with masks).
        train_schedule: a curriculum — stages ``{"epochs": n, **train overrides}`` run in order, the last
            one until training ends (e.g. ``[{"epochs": 20, "canvas": 64}, {"epochs": 10}]``: small
            canvases first, at a quarter of the cost per image). A stage ``canvas`` larger than the
            dataset's own ``canvas`` is capped at it, so one curriculum serves every target size.
            Under a wall-clock budget (``trainer.max_time``) stages may instead give ``{"time": f}``,
            the fraction of the budget they run for (e.g. ``[{"time": 0.3, "canvas": 64}, {"time": 0.7}]``):
            the curriculum then fits any machine's speed. The stage is chosen when each epoch starts.
        resample_each_epoch: draw a fresh training set every epoch (generated datasets: ``seed`` is
            derived from the epoch), so a long run never sees the same image twice.
        transforms: sample transforms applied in order to every item of every split, each
            ``{"name": <registered transform>, **kwargs}`` — e.g. ``[{"name": "views", "factor": 8}]``
            adds ``x_high``/``x_low`` so ATS, DPS and IPS train on any image dataset.

    With ``train_schedule`` or ``resample_each_epoch`` the trainer must rebuild the training loader
    every epoch (``Trainer(reload_dataloaders_every_n_epochs=1)``).

    On several processes (DDP) the training loader gets Lightning's ``DistributedSampler`` (shuffled by
    the seed and the epoch, the same on every rank, so a resumed run sees the same order); evaluation
    loaders get an :class:`~needlework.training.distributed.UnpaddedDistributedSampler`, so validation
    and test metrics equal those of one process.
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
        train_schedule: list[dict[str, Any]] | None = None,
        resample_each_epoch: bool = False,
        transforms: list[dict[str, Any]] | None = None,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self._schedule_unit = _check_schedule(train_schedule)
        self.collate_fn = get_collate(collate)
        self.transforms = [create_transform(spec) for spec in transforms or []]
        self._datasets: dict[str, Dataset] = {}

    def dataset(self, split: str) -> Dataset:
        """The dataset of ``split`` (built on first use)."""
        if split not in self._datasets:
            h = self.hparams
            kwargs = {**(h.dataset_kwargs or {}), **(h.get(f"{split}_kwargs") or {})}
            self._datasets[split] = self._wrap(create_dataset(h.dataset, split=split, **kwargs))
        return self._datasets[split]

    def _wrap(self, dataset: Dataset) -> Dataset:
        return TransformedDataset(dataset, self.transforms) if self.transforms else dataset

    def _loader(self, split: str, shuffle: bool) -> DataLoader:
        h = self.hparams
        workers = h.num_workers
        dataset = self.dataset(split)
        sampler = None
        world = getattr(self.trainer, "world_size", 1)  # (stand-in trainers of tests have none)
        if not shuffle and world > 1:
            # evaluation counts each item once (Lightning's own sampler would pad with repeats)
            sampler = UnpaddedDistributedSampler(dataset, world, self.trainer.global_rank, f"{split} split")
        return DataLoader(
            dataset,
            batch_size=h.batch_size if shuffle else (h.eval_batch_size or h.batch_size),
            shuffle=shuffle,
            sampler=sampler,
            num_workers=workers,
            collate_fn=self.collate_fn,
            pin_memory=h.pin_memory,
            persistent_workers=workers > 0,
        )

    def train_dataloader(self) -> DataLoader:
        h = self.hparams
        if not h.train_schedule and not h.resample_each_epoch:
            return self._loader("train", shuffle=True)
        trainer = self.trainer
        if trainer is not None and trainer.reload_dataloaders_every_n_epochs != 1:
            raise ValueError(
                "data.train_schedule / data.resample_each_epoch need a new training loader every epoch: "
                "set trainer.reload_dataloaders_every_n_epochs to 1"
            )
        epoch = trainer.current_epoch if trainer is not None else 0
        base = {**(h.dataset_kwargs or {}), **(h.train_kwargs or {})}
        if self._schedule_unit == "time":
            stage = self.train_stage_at(_budget_fraction(trainer))
        else:
            stage = self.train_stage(epoch)
        if isinstance(stage.get("canvas"), int) and isinstance(base.get("canvas"), int):
            stage["canvas"] = min(stage["canvas"], base["canvas"])  # a curriculum never exceeds the target
        kwargs = {**base, **stage}
        if h.resample_each_epoch:
            kwargs["seed"] = int(kwargs.get("seed", 0)) * 1_000_003 + epoch + 1
        self._datasets["train"] = self._wrap(create_dataset(h.dataset, split="train", **kwargs))
        if h.train_schedule and stage != getattr(self, "_last_stage", None):
            rank_zero_info(f"curriculum: from epoch {epoch}, training with {stage or 'the base settings'}")
        self._last_stage = stage
        return self._loader("train", shuffle=True)

    def train_stage(self, epoch: int) -> dict[str, Any]:
        """Training-set overrides of the curriculum stage that ``epoch`` falls in ({} without one)."""
        stages = self.hparams.train_schedule or []
        if self._schedule_unit == "time":
            raise ValueError("this curriculum is in fractions of the time budget: use train_stage_at()")
        for stage in stages:
            if epoch < stage["epochs"]:
                return {k: v for k, v in stage.items() if k != "epochs"}
            epoch -= stage["epochs"]
        return {k: v for k, v in stages[-1].items() if k != "epochs"} if stages else {}

    def val_dataloader(self) -> DataLoader:
        return self._loader("val", shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", shuffle=False)

    def predict_dataloader(self) -> DataLoader:
        return self._loader("test", shuffle=False)

    def train_stage_at(self, fraction: float) -> dict[str, Any]:
        """Training-set overrides of the time-budget curriculum stage at ``fraction`` of the budget."""
        stages = self.hparams.train_schedule or []
        start = 0.0
        for stage in stages:
            start += stage["time"]
            if fraction < start:
                return {k: v for k, v in stage.items() if k != "time"}
        return {k: v for k, v in stages[-1].items() if k != "time"} if stages else {}


def _check_schedule(stages: list[dict[str, Any]] | None) -> str:
    """``"epochs"`` or ``"time"``: the unit of a valid curriculum (clear errors otherwise)."""
    units = set()
    for i, stage in enumerate(stages or []):
        epochs, frac = (stage.get("epochs"), stage.get("time")) if isinstance(stage, dict) else (None, None)
        if isinstance(epochs, int) and epochs >= 1:
            units.add("epochs")
        elif isinstance(frac, (int, float)) and 0 < frac <= 1:
            units.add("time")
        else:
            raise ValueError(
                f"train_schedule[{i}] must be a dict with a positive integer 'epochs' or a 'time' fraction "
                f"of the budget in (0, 1], got {stage!r}"
            )
        if "epochs" in stage and "time" in stage:
            raise ValueError(f"train_schedule[{i}] gives both 'epochs' and 'time'; give one")
    if len(units) > 1:
        raise ValueError("train_schedule mixes 'epochs' and 'time' stages; use one unit for every stage")
    if units == {"time"} and sum(s["time"] for s in stages) > 1 + 1e-9:  # type: ignore[union-attr]
        raise ValueError("train_schedule 'time' fractions add up to more than 1 (the whole budget)")
    return units.pop() if units else "epochs"


def _budget_fraction(trainer: Any) -> float:
    """Elapsed fraction of the ``trainer.max_time`` budget (the Timer callback Lightning adds for it)."""
    timer = next((cb for cb in getattr(trainer, "callbacks", []) if isinstance(cb, Timer)), None)
    remaining = timer.time_remaining() if timer is not None else None
    if remaining is None:
        raise ValueError(
            "data.train_schedule has 'time' stages (fractions of the budget) but the trainer has no budget: "
            "set trainer.max_time (e.g. --trainer.max_time 00:00:15:00) or give the stages in 'epochs'"
        )
    elapsed = timer.time_elapsed()
    return elapsed / max(elapsed + remaining, 1e-9)
