"""MNIST-bags (Ilse, Tomczak, Welling, ICML 2018): "does this bag of digits contain a 9?".

Specification: DATASETS.md §6. A bag holds ``int(N(mean_bag_length, std_bag_length))`` digits (at least
``min_bag_length``, at most ``max_bag_length``) drawn uniformly **with replacement** from the split's digit
pool; it is positive iff it contains ``target_digit``. Unbalanced by default, like the reference (≈ 65 %
positives at mean length 10); ``balanced=True`` makes half the bags positive: negatives draw only
non-targets (exactly the reference distribution conditioned on "no target"), positives are rejection-sampled
until they hold a target. Each bag depends only on ``(seed, split, index)``.

Items are dicts for the ``pad_bags`` collate: ``bag`` ``(N, 1, 28, 28)`` float32 pixels in [0, 1] (or
normalised with MNIST's mean/std when ``normalize``), ``coords`` ``(N, 2)`` int64 — a synthetic row-major
layout on a ``⌈√N⌉``-wide grid of 28-px cells, for the spatial models (no meaning in the task) —,
``label`` int (1 = contains the target), ``instance_labels`` ``(N,)`` int64 and ``index``.

Example:
    >>> ds = MNISTBags(split="train", size=4, seed=0)
    >>> item = ds[0]; item["bag"].shape, item["instance_labels"].shape   # N = 10 for this (seed, index)
    (torch.Size([10, 1, 28, 28]), torch.Size([10]))
    >>> item["label"] == int(item["instance_labels"].max())
    True
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from needlework.data.mnist import SPLITS, digit_pool
from needlework.registry import register_dataset

MNIST_MEAN, MNIST_STD = 0.1307, 0.3081
DIGIT = 28
_SPLIT_IDS = {s: i for i, s in enumerate(SPLITS)}
_MAX_REJECTIONS = 10_000


def grid_layout(n: int, cell: int = DIGIT) -> np.ndarray:
    """``(n, 2)`` int64 ``(x, y)`` of ``n`` cells filled row-major on a ``⌈√n⌉``-wide grid."""
    width = max(1, math.ceil(math.sqrt(n)))
    i = np.arange(n)
    return np.stack([i % width, i // width], axis=1).astype(np.int64) * cell


@register_dataset("mnist_bags")
class MNISTBags(Dataset):
    """Bags of MNIST digits generated on the fly.

    Args:
        split: ``"train"``, ``"val"`` or ``"test"`` (digit pools never overlap).
        size: number of bags (reference: 200 train, 50 test; paper sweeps 50–500 train, 1,000 test).
        seed: dataset seed.
        mean_bag_length, std_bag_length: bag length ``int(N(mean, std))`` (reference 10 and 2).
        min_bag_length, max_bag_length: clamp of the length (None = no upper bound).
        target_digit: the positive class (reference 9).
        balanced: half the bags positive (see the module docstring).
        normalize: ``(x − 0.1307) / 0.3081`` as the reference loader; default keeps [0, 1].
        mnist_dir: full-MNIST IDX folder (default: the bundled 5k digits).
    """

    def __init__(
        self,
        split: str = "train",
        size: int = 200,
        seed: int = 0,
        mean_bag_length: float = 10.0,
        std_bag_length: float = 2.0,
        min_bag_length: int = 1,
        max_bag_length: int | None = None,
        target_digit: int = 9,
        balanced: bool = False,
        normalize: bool = False,
        mnist_dir: str | None = None,
    ) -> None:
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        if size < 1:
            raise ValueError(f"size must be positive, got {size}")
        if mean_bag_length < 1 or std_bag_length < 0:
            raise ValueError(
                f"mean_bag_length ({mean_bag_length}) must be >= 1 and std_bag_length ({std_bag_length}) >= 0"
            )
        if min_bag_length < 1 or (max_bag_length is not None and max_bag_length < min_bag_length):
            raise ValueError(
                f"need 1 <= min_bag_length ({min_bag_length}) <= max_bag_length ({max_bag_length})"
            )
        if not 0 <= target_digit <= 9:
            raise ValueError(f"target_digit must be a digit 0-9, got {target_digit}")
        self.split, self.size, self.seed = split, size, seed
        self.mean_bag_length, self.std_bag_length = mean_bag_length, std_bag_length
        self.min_bag_length, self.max_bag_length = min_bag_length, max_bag_length
        self.target_digit, self.balanced, self.normalize = target_digit, balanced, normalize
        self.pool = digit_pool(split, mnist_dir)
        self._targets = self.pool.indices_of(target_digit)
        self._others = self.pool.indices_not(target_digit)
        if len(self._targets) == 0 or len(self._others) == 0:
            raise ValueError(f"the {split} digit pool has no digit {target_digit} or no other digits")

    def __len__(self) -> int:
        return self.size

    def _length(self, rng: np.random.Generator) -> int:
        n = max(int(rng.normal(self.mean_bag_length, self.std_bag_length)), self.min_bag_length)
        return n if self.max_bag_length is None else min(n, self.max_bag_length)

    def sample(self, index: int) -> np.ndarray:
        """Pool indices of the digits of bag ``index`` ``(N,)``."""
        rng = np.random.default_rng(np.random.SeedSequence([self.seed, _SPLIT_IDS[self.split], index]))
        n = self._length(rng)
        pool = len(self.pool)
        if not self.balanced:
            return rng.integers(0, pool, size=n)
        if rng.random() >= 0.5:  # negative: i.i.d. from the non-targets
            return self._others[rng.integers(0, len(self._others), size=n)]
        labels = self.pool.labels
        for _ in range(_MAX_REJECTIONS):
            picks = rng.integers(0, pool, size=n)
            if (labels[picks] == self.target_digit).any():
                return picks
        picks[rng.integers(0, n)] = self._targets[rng.integers(0, len(self._targets))]
        return picks

    def __getitem__(self, index: int) -> dict[str, Any]:
        if not -len(self) <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} bags")
        index %= len(self)
        picks = self.sample(index)
        pixels = torch.from_numpy(self.pool.images[picks]).float().div_(255.0).unsqueeze(1)
        if self.normalize:
            pixels = (pixels - MNIST_MEAN) / MNIST_STD
        instance_labels = torch.from_numpy((self.pool.labels[picks] == self.target_digit).astype(np.int64))
        return {
            "bag": pixels,
            "coords": torch.from_numpy(grid_layout(len(picks))),
            "label": int(instance_labels.any()),
            "instance_labels": instance_labels,
            "index": index,
        }

    @property
    def labels(self) -> np.ndarray:
        """Bag labels of the whole dataset (generates the index lists, not the pixels)."""
        target = self.pool.labels == self.target_digit
        return np.array([int(target[self.sample(i)].any()) for i in range(len(self))], dtype=np.int64)
