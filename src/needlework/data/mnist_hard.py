"""MNIST-hard and MNIST-easy: several MNIST digits per canvas, for MIST (DATASETS.md §5).

MNIST-hard (``"mnist_hard"``, :class:`MultiMNIST`): ``n_digits`` digits (9 by default) with i.i.d. uniform
identities (repeats allowed), resized to ``digit_size`` px, centred at points of a Poisson-disk sample
(Bridson, minimum distance ``min_distance`` < ``digit_size`` so digits may overlap) drawn over
``[margin, canvas − margin]²``; layers are combined by pixel-wise maximum.

MNIST-easy (``"mnist_easy"``, :class:`MultiMNISTEasy`): the digits, sorted by class, sit on a g×g grid of
cells (g = ⌈√n_max⌉), each centre perturbed by Gaussian noise of std ``cell/8``.

Each item is a dict:

* ``image`` ``(C, H, W)`` float32 in [0, 1] (C = 3 with ``rgb=True``);
* ``label`` ``(10,)`` int64 — how many digits of each class the image holds (the label multiset);
* ``boxes`` ``(n_max, 4)`` float32 xyxy pixels, ``box_labels`` ``(n_max,)`` int64, ``keypoints``
  ``(n_max, 3)`` float32 ``(x, y, s)`` (centre and half-size). When ``n_digits`` is a range, rows past the
  image's digit count are padding: box 0, label −1, so default collation still works.

Pixel coordinates are continuous: pixel ``(row r, col c)`` covers ``[c, c+1) × [r, r+1)``.

Example:
    >>> ds = MultiMNIST("train", size=4)
    >>> item = ds[0]; item["image"].shape, item["boxes"].shape
    (torch.Size([1, 80, 80]), torch.Size([9, 4]))
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from functools import lru_cache

import numpy as np
import torch
from PIL import Image

from needlework.data.mnist import SPLITS, digit_pool
from needlework.data.poisson import poisson_disk
from needlework.registry import register_dataset

DEFAULT_SIZES = {"train": 10_000, "val": 1_000, "test": 1_000}
NUM_CLASSES = 10


def count_range(n: int | Sequence[int], name: str = "n_digits") -> tuple[int, int]:
    """``(lo, hi)`` inclusive from an int or a ``[lo, hi]`` pair, validated."""
    if isinstance(n, int | np.integer):
        lo = hi = int(n)
    else:
        if len(n) != 2:
            raise ValueError(f"{name} must be an int or a [min, max] pair, got {n!r}")
        lo, hi = int(n[0]), int(n[1])
    if not 1 <= lo <= hi:
        raise ValueError(f"{name} must satisfy 1 <= min <= max, got {n!r}")
    return lo, hi


def resize_digit(digit: np.ndarray, size: int) -> np.ndarray:
    """A ``(28, 28)`` uint8 digit resized to ``(size, size)`` float32 in [0, 1] (bilinear, anti-aliased)."""
    img = Image.fromarray(digit).resize((size, size), Image.BILINEAR)
    return np.asarray(img, dtype=np.float32) / 255.0


@lru_cache(maxsize=8)
def _resized_pool(split: str, size: int, mnist_dir: str | None) -> np.ndarray:
    pool = digit_pool(split, mnist_dir)
    return np.stack([resize_digit(d, size) for d in pool.images])


class MultiMNIST(torch.utils.data.Dataset):
    """MNIST-hard: several digits per canvas at Poisson-disk positions (registered ``"mnist_hard"``).

    Args:
        split: ``"train"``, ``"val"`` or ``"test"`` (digits come from that split's pool only).
        seed: dataset seed; an item is a pure function of ``(seed, split, index)``.
        size: number of items (default 10,000 / 1,000 / 1,000 for train / val / test).
        canvas: side of the square canvas in pixels.
        n_digits: digits per image, an int or an inclusive ``[min, max]`` range.
        digit_size: side in pixels each 28×28 digit is resized to (20 = MIST's anchor 0.25·80).
        scale_jitter: optional ``[min, max]`` half-size range; each digit gets a uniform half-size from it
            instead of ``digit_size / 2``.
        min_distance: Poisson-disk radius (minimum centre distance) in pixels.
        margin: centres lie in ``[margin, canvas − margin]``; default ``digit_size / 2`` keeps boxes inside.
        rgb: replicate the grey channel to 3 channels.
        mnist_dir: optional folder of MNIST IDX files (DATASETS.md §1.2).
        max_retries: Poisson-disk draws tried before giving up when too few points fit.
    """

    dataset_name = "mnist_hard"

    def __init__(
        self,
        split: str = "train",
        seed: int = 0,
        size: int | None = None,
        canvas: int = 80,
        n_digits: int | Sequence[int] = 9,
        digit_size: int = 20,
        scale_jitter: Sequence[float] | None = None,
        min_distance: float = 14.0,
        margin: float | None = None,
        rgb: bool = False,
        mnist_dir: str | None = None,
        max_retries: int = 20,
    ) -> None:
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        self.split, self.seed = split, int(seed)
        self.size = DEFAULT_SIZES[split] if size is None else int(size)
        if self.size < 0:
            raise ValueError(f"size must be >= 0, got {size}")
        self.canvas, self.digit_size = int(canvas), int(digit_size)
        self.n_range = count_range(n_digits)
        self.scale_jitter = None if scale_jitter is None else (float(scale_jitter[0]), float(scale_jitter[1]))
        if self.scale_jitter is not None and not 0 < self.scale_jitter[0] <= self.scale_jitter[1]:
            raise ValueError(
                f"scale_jitter must be [min, max] half-sizes with 0 < min <= max, got {scale_jitter}"
            )
        max_half = self.scale_jitter[1] if self.scale_jitter else self.digit_size / 2
        self.margin = max_half if margin is None else float(margin)
        if 2 * self.margin >= self.canvas:
            raise ValueError(f"margin ({self.margin}) leaves no room on a {self.canvas}-px canvas")
        if 2 * max_half > self.canvas:
            raise ValueError(f"digits of {2 * max_half} px do not fit a {self.canvas}-px canvas")
        self.min_distance, self.rgb = float(min_distance), bool(rgb)
        self.mnist_dir, self.max_retries = mnist_dir, int(max_retries)
        self.pool = digit_pool(split, mnist_dir)
        self._by_class = [self.pool.indices_of(d) for d in range(NUM_CLASSES)]

    def __len__(self) -> int:
        return self.size

    def rng(self, index: int) -> np.random.Generator:
        return np.random.default_rng(np.random.SeedSequence([self.seed, SPLITS.index(self.split), index]))

    # -- layout ---------------------------------------------------------------------------------
    def centres(self, n: int, labels: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """``(n, 2)`` digit centres (overridden by the easy variant)."""
        lo, hi = self.margin, self.canvas - self.margin
        for _ in range(self.max_retries):
            pts = poisson_disk((lo, lo, hi, hi), self.min_distance, rng)
            if len(pts) >= n:
                return pts[rng.choice(len(pts), size=n, replace=False)]
        raise RuntimeError(
            f"Poisson-disk sampling found fewer than {n} points with min_distance={self.min_distance} on a "
            f"{self.canvas}-px canvas (margin {self.margin}) in {self.max_retries} tries: lower min_distance "
            "or n_digits, or enlarge the canvas"
        )

    def half_sizes(self, n: int, rng: np.random.Generator) -> np.ndarray:
        if self.scale_jitter is None:
            return np.full(n, self.digit_size / 2.0)
        return rng.uniform(*self.scale_jitter, size=n)

    # -- item -----------------------------------------------------------------------------------
    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        if not 0 <= index < self.size:
            raise IndexError(f"index {index} out of range for a dataset of {self.size} items")
        rng = self.rng(index)
        n = int(rng.integers(self.n_range[0], self.n_range[1] + 1))
        labels = rng.integers(0, NUM_CLASSES, size=n)
        centres = self.centres(n, labels, rng)
        halves = self.half_sizes(n, rng)
        picks = [int(rng.choice(self._by_class[d])) for d in labels]

        canvas = np.zeros((self.canvas, self.canvas), dtype=np.float32)
        n_max = self.n_range[1]
        boxes = np.zeros((n_max, 4), dtype=np.float32)
        keypoints = np.zeros((n_max, 3), dtype=np.float32)
        box_labels = -np.ones(n_max, dtype=np.int64)
        fixed = (
            _resized_pool(self.split, self.digit_size, self.mnist_dir) if self.scale_jitter is None else None
        )
        for k in range(n):
            side = round(2 * halves[k])
            digit = fixed[picks[k]] if fixed is not None else resize_digit(self.pool.images[picks[k]], side)
            # integer top-left, clamped so that the digit lies inside the canvas
            x0 = int(np.clip(round(centres[k, 0] - side / 2), 0, self.canvas - side))
            y0 = int(np.clip(round(centres[k, 1] - side / 2), 0, self.canvas - side))
            np.maximum(
                canvas[y0 : y0 + side, x0 : x0 + side], digit, out=canvas[y0 : y0 + side, x0 : x0 + side]
            )
            boxes[k] = (x0, y0, x0 + side, y0 + side)
            keypoints[k] = (x0 + side / 2, y0 + side / 2, side / 2)
            box_labels[k] = labels[k]
        image = torch.from_numpy(canvas)[None]
        if self.rgb:
            image = image.expand(3, -1, -1).clone()
        return {
            "image": image,
            "label": torch.from_numpy(np.bincount(labels, minlength=NUM_CLASSES).astype(np.int64)),
            "boxes": torch.from_numpy(boxes),
            "box_labels": torch.from_numpy(box_labels),
            "keypoints": torch.from_numpy(keypoints),
        }


class MultiMNISTEasy(MultiMNIST):
    """MNIST-easy: digits sorted by class on a perturbed g×g grid (registered ``"mnist_easy"``).

    Same arguments as :class:`MultiMNIST` plus ``jitter`` (std of the centre noise as a fraction of the
    cell size, default 1/8 as in the paper). ``min_distance`` is unused.
    """

    dataset_name = "mnist_easy"

    def __init__(self, *args, jitter: float = 0.125, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.jitter = float(jitter)
        self.grid = math.ceil(math.sqrt(self.n_range[1]))

    def centres(self, n: int, labels: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        labels.sort()  # digits sorted by class fill the cells in row-major order
        cell = self.canvas / self.grid
        cells = np.arange(n)
        base = np.stack([(cells % self.grid + 0.5) * cell, (cells // self.grid + 0.5) * cell], axis=1)
        pts = base + rng.normal(0.0, self.jitter * cell, size=(n, 2))
        return np.clip(pts, self.margin, self.canvas - self.margin)


register_dataset("mnist_hard")(MultiMNIST)
register_dataset("mnist_easy")(MultiMNISTEasy)
