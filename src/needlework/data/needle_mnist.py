"""needle-MNIST: "is there a 3 in this image?" with a controlled object-to-image ratio (O2I).

Specification: DATASETS.md §2 (Pawlowski et al., Needles in Haystacks). A positive canvas holds exactly
one target digit plus ``n_clutter`` digits of the other classes; a negative holds ``n_clutter + 1``
clutter digits, so both classes carry the same number of objects. The target is placed inside one cell
of a 64-px grid (never straddling a cell boundary); clutter is placed uniformly and *added* to the
canvas, which is clipped to [0, 1] once at the end. Digits come only from the split's digit pool.

Every image is a pure function of ``(seed, split, index)`` and is generated on the fly; ``cache=True``
materialises small datasets once as a uint8 ``.npy`` in the cache directory (values are exact: digit
sums are integers before the clip).

Example:
    >>> ds = NeedleMNIST(canvas=128, split="train", size=8, seed=0)
    >>> item = ds[0]; item["image"].shape, item["label"], ds.o2i
    (torch.Size([1, 128, 128]), 1, 0.0478...)
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from needlework.data.mnist import SPLITS, cache_dir, digit_pool
from needlework.registry import register_dataset

DIGIT = 28
#: canvas side (px) -> clutter digits per image (DATASETS.md §2.1, README value 6 at 128 px).
CLUTTER_TABLE = {64: 2, 128: 6, 256: 25, 512: 100, 1024: 400, 2048: 1600, 4096: 6400, 6144: 14400}
_SPLIT_IDS = {s: i for i, s in enumerate(SPLITS)}
GENERATOR_VERSION = 1


def default_clutter(canvas: int) -> int:
    """Clutter count for ``canvas`` from the table; other sizes keep the density (1 digit / 2,621 px²)."""
    if canvas in CLUTTER_TABLE:
        return CLUTTER_TABLE[canvas]
    return max(1, round(canvas * canvas / 2621.44))


@register_dataset("needle_mnist")
class NeedleMNIST(Dataset):
    """needle-MNIST images generated on the fly.

    Args:
        canvas: image side in pixels (64 ... 6144; a multiple of ``cell`` with grid placement).
        split: ``"train"``, ``"val"`` or ``"test"`` (digit pools never overlap).
        size: number of images; default one positive and one negative per target digit of the split,
            times ``duplicates``.
        seed: dataset seed; image ``i`` depends only on ``(seed, split, i)``.
        n_clutter: clutter digits in a positive (negatives get one more); default from the table.
        target_digit: the needle class (default 3).
        positive_fraction: share of positives in the dataset (class-balance sweeps).
        oversample: repeat the minority class (deterministically) until both classes have equal counts.
        duplicates: passes over the split's target digits when ``size`` is not given.
        target_placement: ``"grid"`` (inside one ``cell``-px grid cell, reference) or ``"uniform"``.
        cell: grid cell for target placement (reference: 64).
        mnist_dir: full-MNIST IDX folder (default: the bundled 5k digits).
        cache: materialise the images once as uint8 under the cache directory (small canvases only).
        augment: draw every digit (needle and clutter) through a small random affine map — rotation
            ±15°, scale 0.9–1.1, shear ±0.15 — so a training set built from few needle instances (the
            bundled pool has about 360 training 3s) generalises to unseen ones. For training splits;
            the draws come from their own stream, so ``augment=False`` images are unchanged.

    Items are dicts: ``image`` ``(1, H, W)`` float32 in [0, 1], ``label`` int (1 = contains the needle),
    ``boxes`` ``(n, 4)`` float32 xyxy of the needle (n = 1 for positives, 0 for negatives),
    ``box_labels`` ``(n,)``, ``index``.
    """

    def __init__(
        self,
        canvas: int = 128,
        split: str = "train",
        size: int | None = None,
        seed: int = 0,
        n_clutter: int | None = None,
        target_digit: int = 3,
        positive_fraction: float = 0.5,
        oversample: bool = False,
        duplicates: int = 2,
        target_placement: str = "grid",
        cell: int = 64,
        mnist_dir: str | None = None,
        cache: bool = False,
        augment: bool = False,
    ) -> None:
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        if not isinstance(canvas, int) or canvas < DIGIT + 1:
            raise ValueError(f"canvas must be an integer of at least {DIGIT + 1} px, got {canvas!r}")
        if target_placement not in ("grid", "uniform"):
            raise ValueError(f"target_placement must be 'grid' or 'uniform', got {target_placement!r}")
        if target_placement == "grid":
            if cell <= DIGIT:
                raise ValueError(f"cell must be larger than a digit ({DIGIT} px), got {cell}")
            if canvas % cell:
                raise ValueError(
                    f"canvas ({canvas}) must be a multiple of the cell ({cell}) for grid placement; "
                    f"use canvas={canvas - canvas % cell or cell} or target_placement='uniform'"
                )
        n_clutter = default_clutter(canvas) if n_clutter is None else n_clutter
        if not isinstance(n_clutter, int) or n_clutter < 0:
            raise ValueError(f"n_clutter must be a non-negative integer, got {n_clutter!r}")
        if not 0.0 <= positive_fraction <= 1.0:
            raise ValueError(f"positive_fraction must lie in [0, 1], got {positive_fraction}")
        if not 0 <= target_digit <= 9:
            raise ValueError(f"target_digit must be a digit 0-9, got {target_digit}")
        if duplicates < 1:
            raise ValueError(f"duplicates must be at least 1, got {duplicates}")

        self.canvas, self.split, self.seed = canvas, split, seed
        self.n_clutter, self.target_digit = n_clutter, target_digit
        self.target_placement, self.cell = target_placement, cell
        self.augment = bool(augment)
        self.pool = digit_pool(split, mnist_dir)
        self._targets = self.pool.indices_of(target_digit)
        self._clutter = self.pool.indices_not(target_digit)
        if len(self._targets) == 0 or len(self._clutter) == 0:
            raise ValueError(f"the {split} digit pool has no digit {target_digit} or no other digits")
        if size is None:
            size = 2 * len(self._targets) * duplicates
        if size < 1:
            raise ValueError(f"size must be positive, got {size}")
        self.n_positive = int(round(size * positive_fraction))
        self.n_negative = size - self.n_positive
        self.positive_fraction = positive_fraction
        self._order = self._index_map(oversample)
        self._cache: np.ndarray | None = None
        if cache:
            self._cache = self._load_or_build_cache(mnist_dir)

    # -- bookkeeping -------------------------------------------------------------------------------------
    def _index_map(self, oversample: bool) -> np.ndarray:
        """Dataset index -> base index (base indices < n_positive are positives)."""
        pos = np.arange(self.n_positive)
        neg = np.arange(self.n_positive, self.n_positive + self.n_negative)
        if oversample and len(pos) and len(neg):
            target = max(len(pos), len(neg))
            pos, neg = np.resize(pos, target), np.resize(neg, target)
        return np.concatenate([pos, neg])

    @property
    def o2i(self) -> float:
        """Object-to-image ratio of the needle: digit box area / image area."""
        return DIGIT * DIGIT / (self.canvas * self.canvas)

    @property
    def labels(self) -> np.ndarray:
        """Labels of all items (without generating the images)."""
        return (self._order < self.n_positive).astype(np.int64)

    def __len__(self) -> int:
        return len(self._order)

    def meta(self) -> dict[str, Any]:
        return {
            "canvas": self.canvas,
            "o2i": self.o2i,
            "n_clutter": self.n_clutter,
            "seed": self.seed,
            "split": self.split,
            "digit_source": self.pool.source,
            "generator_version": GENERATOR_VERSION,
            "augment": self.augment,
        }

    # -- generation --------------------------------------------------------------------------------------
    def _rng(self, base: int, stream: int = 0) -> np.random.Generator:
        """Generator of item ``base``; stream 0 places the digits, stream 1 draws augmentations."""
        key = [self.seed, _SPLIT_IDS[self.split], base] + ([stream] if stream else [])
        return np.random.default_rng(np.random.SeedSequence(key))

    def generate(self, base: int) -> tuple[np.ndarray, np.ndarray]:
        """Image ``(H, W)`` uint8 and needle boxes ``(n, 4)`` xyxy for base index ``base``."""
        rng = self._rng(base)
        size, images = self.canvas, self.pool.images
        warp = _DigitWarp(self._rng(base, stream=1)) if self.augment else (lambda digit: digit)
        canvas = np.zeros((size, size), dtype=np.int32)
        boxes = np.zeros((0, 4), dtype=np.float32)
        positive = base < self.n_positive
        if positive:
            digit = images[self._targets[base % len(self._targets)]]
            x, y = self._target_corner(rng)
            canvas[y : y + DIGIT, x : x + DIGIT] += warp(digit)
            boxes = np.array([[x, y, x + DIGIT, y + DIGIT]], dtype=np.float32)
        n = self.n_clutter + (0 if positive else 1)
        picks = self._clutter[rng.integers(0, len(self._clutter), size=n)]
        corners = rng.integers(0, size - DIGIT, size=(n, 2))
        for idx, (x, y) in zip(picks, corners):
            canvas[y : y + DIGIT, x : x + DIGIT] += warp(images[idx])
        return np.minimum(canvas, 255).astype(np.uint8), boxes

    def __getitem__(self, index: int) -> dict[str, Any]:
        if not -len(self) <= index < len(self):
            raise IndexError(f"index {index} out of range for a dataset of {len(self)} images")
        base = int(self._order[index])
        if self._cache is not None:
            image = np.asarray(self._cache[base])
            boxes = self.needle_boxes(base)
        else:
            image, boxes = self.generate(base)
        label = int(base < self.n_positive)
        return {
            "image": torch.from_numpy(image.astype(np.float32) / 255.0).unsqueeze(0),
            "label": label,
            "boxes": torch.from_numpy(boxes),
            "box_labels": torch.full((len(boxes),), self.target_digit, dtype=torch.long),
            "index": int(index),
        }

    def _target_corner(self, rng: np.random.Generator) -> tuple[int, int]:
        """Top-left corner of the needle; always the first draws of an item's generator."""
        if self.target_placement == "grid":
            cx, cy = rng.integers(0, self.canvas // self.cell, size=2)
            ox, oy = rng.integers(0, self.cell - DIGIT, size=2)  # {0..cell-29}: stays inside the cell
            return int(cx * self.cell + ox), int(cy * self.cell + oy)
        x, y = rng.integers(0, self.canvas - DIGIT, size=2)
        return int(x), int(y)

    def needle_boxes(self, base: int) -> np.ndarray:
        """Needle boxes ``(n, 4)`` xyxy of base index ``base``, without drawing the image."""
        if base >= self.n_positive:
            return np.zeros((0, 4), dtype=np.float32)
        x, y = self._target_corner(self._rng(base))
        return np.array([[x, y, x + DIGIT, y + DIGIT]], dtype=np.float32)

    # -- optional cache ----------------------------------------------------------------------------------
    _MAX_CACHE_BYTES = 2 * 1024**3

    def _load_or_build_cache(self, mnist_dir: str | None) -> np.ndarray:
        n = self.n_positive + self.n_negative
        nbytes = n * self.canvas * self.canvas
        if nbytes > self._MAX_CACHE_BYTES:
            raise ValueError(
                f"cache=True would store {nbytes / 1024**3:.1f} GiB; the cache is for small canvases "
                "(generate on the fly instead: cache=False)"
            )
        key = json.dumps({**self.meta(), "n_pos": self.n_positive, "n_neg": self.n_negative,
                          "target": self.target_digit, "placement": self.target_placement,
                          "cell": self.cell, "mnist_dir": str(mnist_dir)}, sort_keys=True)
        digest = hashlib.sha1(key.encode()).hexdigest()[:16]
        path = Path(cache_dir()) / "needle_mnist" / f"{digest}.npy"
        if path.exists():
            arr = np.load(path, mmap_mode="r")
            if arr.shape == (n, self.canvas, self.canvas):
                return arr
        from tqdm.auto import tqdm

        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.stem}.{os.getpid()}.tmp.npy")
        out = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.uint8, shape=(n, self.canvas, self.canvas))
        for base in tqdm(range(n), desc=f"caching needle-MNIST {self.split}", leave=False):
            out[base] = self.generate(base)[0]
        out.flush()
        del out
        os.replace(tmp, path)
        return np.load(path, mmap_mode="r")


class _DigitWarp:
    """Random small affine map of a 28×28 uint8 digit about its centre (bilinear, rounded to uint8)."""

    def __init__(self, rng: np.random.Generator) -> None:
        self.rng = rng

    def __call__(self, digit: np.ndarray) -> np.ndarray:
        from scipy.ndimage import affine_transform

        angle = np.deg2rad(self.rng.uniform(-15, 15))
        scale = self.rng.uniform(0.9, 1.1)
        shear = self.rng.uniform(-0.15, 0.15)
        cos, sin = np.cos(angle), np.sin(angle)
        forward = scale * np.array([[cos, -sin], [sin, cos]]) @ np.array([[1.0, shear], [0.0, 1.0]])
        inverse = np.linalg.inv(forward)  # affine_transform maps output coordinates to input ones
        centre = np.array([(DIGIT - 1) / 2, (DIGIT - 1) / 2])
        out = affine_transform(digit.astype(np.float32), inverse, offset=centre - inverse @ centre, order=1)
        return np.clip(np.rint(out), 0, 255).astype(np.uint8)
