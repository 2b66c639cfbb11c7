"""Megapixel MNIST, generated on the fly (DATASETS.md §3 ATS version, §4 IPS version).

Each image is a ``H × W`` black canvas with ``n_target`` copies of a target digit class, ``n_other`` digits
of other classes (no two digit boxes overlap) and ``n_noise`` crossing-stroke noise patterns (each two
straight strokes from the top corners of a 28² block, drawn from ``n_noise_patterns`` patterns fixed per
split). The ATS version paints the noise *after* the digits (a noise block erases the digit pixels under
it, recorded as ``meta["erased_target_fraction"]``) and renders the low-resolution view object by object
(each digit/pattern rescaled with anti-aliasing and pasted). The IPS version paints the noise first and has
four tasks: ``majority`` (the target class), ``max`` (largest digit class), ``top`` (class of the digit
highest in the image; ties → generation order, targets first) and ``multilabel`` (multi-hot of the classes
present).

Items (dicts): ``x_high`` ``(1, H, W)`` and ``x_low`` ``(1, h, w)`` float32 in [0, 1]; ``label``;
``labels`` (every task); ``boxes`` ``(5, 4)`` float32 **xyxy** pixels of ``x_high`` (targets first);
``box_labels`` ``(5,)`` int64; ``meta`` (numbers). Every item is a pure function of ``(seed, split, index)``;
digits come only from the split's digit pool (:func:`~needlework.data.mnist.digit_pool`).

Example:
    >>> ds = MegapixelMNIST("train", size=4, preset="ci")
    >>> item = ds[0]; item["x_high"].shape, item["x_low"].shape
    (torch.Size([1, 256, 256]), torch.Size([1, 30, 30]))
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from skimage.transform import rescale

from needlework.data.mnist import SPLITS, digit_pool
from needlework.registry import register_dataset

__all__ = ["PRESETS", "TASKS", "Layout", "MegapixelMNIST", "MegapixelMNISTIPS", "noise_patterns"]

D = 28  # side of a digit / noise block
TASKS = ("majority", "max", "top", "multilabel")
PRESETS: dict[str, dict[str, Any]] = {
    # canvas, noise count, items per split (train, val, test)
    "reference": {"canvas": 1500, "n_noise": 50, "size": {"train": 5000, "val": 1000, "test": 1000}},
    "small": {"canvas": 500, "n_noise": 6, "size": {"train": 2000, "val": 500, "test": 500}},
    "ci": {"canvas": 256, "n_noise": 2, "size": {"train": 200, "val": 100, "test": 100}},
}
_SPLIT_ID = {s: i for i, s in enumerate(SPLITS)}


def noise_patterns(rng: np.random.Generator, count: int) -> np.ndarray:
    """``count`` crossing-stroke patterns ``(count, 28, 28)`` float32 (DATASETS §3).

    Pattern ``i``: stroke ``A_i`` from the top-left corner at angle ``U·72°``; ``B`` = the strokes in a
    random order, each mirrored left–right with probability 0.33, twice (net ≈ 0.44); pattern =
    ``1{A_i + B_i > 0}`` times ``U(0.8, 1.0)`` per pixel.
    """
    strokes = np.zeros((count, D, D), dtype=np.float32)
    for i in range(count):
        t = np.tan(rng.uniform() * np.pi / 2.5)
        with np.errstate(divide="ignore"):
            u = np.linspace(0, min(27.49, 27.49 / t if t > 0 else np.inf), 56)
        strokes[i, np.round(u).astype(int), np.round(t * u).astype(int)] = 1
    other = strokes[rng.permutation(count)]
    for _ in range(2):  # the reference's "horizontal" and "vertical" flips both mirror the columns
        flip = rng.uniform(size=count) < 0.33
        other[flip] = other[flip, :, ::-1]
    mask = (strokes + other) > 0
    return (mask * rng.uniform(0.8, 1.0, size=mask.shape)).astype(np.float32)


@dataclass(frozen=True)
class Layout:
    """Placement plan of one image: pool indices, classes and ``(row, col)`` corners of the digits
    (targets first), ``(row, col)`` corners and pattern ids of the noise blocks."""

    target: int
    digit_indices: np.ndarray
    digit_labels: np.ndarray
    digit_positions: np.ndarray
    noise_positions: np.ndarray
    noise_ids: np.ndarray


def _render_small(block: np.ndarray, scale: float) -> np.ndarray:
    """Bilinear rescale with anti-aliasing and zero boundary (the reference low-view rendering)."""
    return rescale(block, scale, order=1, mode="constant", cval=0.0, anti_aliasing=True).astype(np.float32)


@register_dataset("megapixel_mnist")
class MegapixelMNIST(torch.utils.data.Dataset):
    """Megapixel MNIST, ATS version by default (majority digit, 10 classes).

    Args:
        split: ``"train"``, ``"val"`` or ``"test"`` (digit pools and noise patterns are per split).
        seed: dataset seed.
        size: number of items (default: the preset's count for ``split``).
        canvas: ``H`` (square) or ``(H, W)`` (default: the preset's).
        n_target, n_other: digits of the target class and of other classes.
        n_noise: noise blocks per image (default: the preset's).
        n_noise_patterns: distinct patterns per split (default 50).
        paint_order: ``"digits_then_noise"`` (ATS: noise erases digits) or ``"noise_then_digits"`` (IPS).
        low_scale: scale of ``x_low`` (``int(H·s)`` per side); ``None`` omits ``x_low``.
        low_view: ``"render"`` (per object, as the reference) or ``"downsample"`` (area resize of ``x_high``).
        task: which of :data:`TASKS` is ``label``.
        preset: ``"reference"`` (1500², 50 noise, 5000/1000/1000), ``"small"`` (500², 6 noise,
            2000/500/500) or ``"ci"`` (256², 2 noise, 200/100/100).
        mnist_dir: folder of full-MNIST IDX files (default: the bundled 5k digits).
    """

    def __init__(
        self,
        split: str = "train",
        seed: int = 0,
        size: int | None = None,
        canvas: int | tuple[int, int] | None = None,
        n_target: int = 3,
        n_other: int = 2,
        n_noise: int | None = None,
        n_noise_patterns: int = 50,
        paint_order: str = "digits_then_noise",
        low_scale: float | None = 0.12,
        low_view: str = "render",
        task: str = "majority",
        preset: str = "reference",
        mnist_dir: str | None = None,
    ) -> None:
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        if preset not in PRESETS:
            raise ValueError(f"preset must be one of {sorted(PRESETS)}, got {preset!r}")
        if paint_order not in ("digits_then_noise", "noise_then_digits"):
            raise ValueError(
                f"paint_order must be 'digits_then_noise' or 'noise_then_digits', got {paint_order!r}"
            )
        if low_view not in ("render", "downsample"):
            raise ValueError(f"low_view must be 'render' or 'downsample', got {low_view!r}")
        if task not in TASKS:
            raise ValueError(f"task must be one of {TASKS}, got {task!r}")
        if low_scale is not None and not 0 < low_scale <= 1:
            raise ValueError(f"low_scale must be in (0, 1] or None, got {low_scale}")
        if n_target < 1 or n_other < 0 or n_noise_patterns < 1:
            raise ValueError("need n_target >= 1, n_other >= 0 and n_noise_patterns >= 1")
        p = PRESETS[preset]
        canvas = p["canvas"] if canvas is None else canvas
        self.height, self.width = (
            (canvas, canvas) if isinstance(canvas, int) else (int(canvas[0]), int(canvas[1]))
        )
        if min(self.height, self.width) < 2 * D + 1:
            raise ValueError(f"canvas {canvas} too small: noise blocks need at least {2 * D + 1} px per side")
        self.split, self.seed, self.task, self.preset = split, int(seed), task, preset
        self.size = int(p["size"][split] if size is None else size)
        self.n_target, self.n_other = int(n_target), int(n_other)
        self.n_noise = int(p["n_noise"] if n_noise is None else n_noise)
        self.n_noise_patterns = int(n_noise_patterns)
        self.paint_order, self.low_scale, self.low_view = paint_order, low_scale, low_view
        self.mnist_dir = mnist_dir
        n_digits = self.n_target + self.n_other
        free = (self.height - D + 1) * (self.width - D + 1)
        if n_digits * (2 * D - 1) ** 2 > free:
            raise ValueError(f"canvas {canvas} is too small for {n_digits} non-overlapping digits")

    # -- cached per-dataset state (rebuilt lazily in DataLoader workers) --------------------------------
    @cached_property
    def pool(self):
        return digit_pool(self.split, self.mnist_dir)

    @cached_property
    def _class_indices(self) -> tuple[list[np.ndarray], list[np.ndarray]]:
        return [self.pool.indices_of(d) for d in range(10)], [self.pool.indices_not(d) for d in range(10)]

    @cached_property
    def patterns(self) -> np.ndarray:
        """The split's noise patterns ``(n_noise_patterns, 28, 28)`` float32."""
        rng = np.random.default_rng(np.random.SeedSequence([self.seed, _SPLIT_ID[self.split], 0, 0]))
        return noise_patterns(rng, self.n_noise_patterns)

    @cached_property
    def _patterns_low(self) -> list[np.ndarray]:
        return [_render_small(p, self.low_scale) for p in self.patterns]

    @property
    def low_shape(self) -> tuple[int, int] | None:
        if self.low_scale is None:
            return None
        return int(self.height * self.low_scale), int(self.width * self.low_scale)

    def __len__(self) -> int:
        return self.size

    # -- generation -------------------------------------------------------------------------------------
    def layout(self, index: int) -> Layout:
        """The placement plan of item ``index`` (RNG order: digits → positions → noise)."""
        if not 0 <= index < self.size:
            raise IndexError(f"index {index} out of range for {self.size} items")
        rng = np.random.default_rng(np.random.SeedSequence([self.seed, _SPLIT_ID[self.split], 1, index]))
        of_class, not_class = self._class_indices
        target = int(rng.integers(10))
        idx = np.concatenate(
            [rng.choice(of_class[target], self.n_target), rng.choice(not_class[target], self.n_other)]
        )
        positions: list[tuple[int, int]] = []
        while len(positions) < len(idx):
            r = round(rng.uniform() * (self.height - D))
            c = round(rng.uniform() * (self.width - D))
            if all(abs(r - r0) >= D or abs(c - c0) >= D for r0, c0 in positions):
                positions.append((r, c))
        noise_pos = rng.uniform(size=(self.n_noise, 2)) * ([self.height, self.width] - np.array(2 * D)) + D
        noise_ids = np.floor(rng.uniform(size=self.n_noise) * self.n_noise_patterns).astype(np.int64)
        return Layout(
            target=target,
            digit_indices=idx,
            digit_labels=self.pool.labels[idx].astype(np.int64),
            digit_positions=np.array(positions, dtype=np.int64).reshape(-1, 2),
            noise_positions=noise_pos.astype(np.int64).reshape(-1, 2),
            noise_ids=noise_ids,
        )

    def _paint(self, lay: Layout) -> tuple[np.ndarray, float]:
        canvas = np.zeros((self.height, self.width), dtype=np.uint8)
        noise_u8 = np.floor(self.patterns * 255).astype(np.uint8)

        def digits() -> None:
            for i, (r, c) in zip(lay.digit_indices, lay.digit_positions):
                canvas[r : r + D, c : c + D] = self.pool.images[i]

        def noise() -> None:
            for k, (r, c) in zip(lay.noise_ids, lay.noise_positions):
                canvas[r : r + D, c : c + D] = noise_u8[k]

        order = (digits, noise) if self.paint_order == "digits_then_noise" else (noise, digits)
        for paint in order:
            paint()
        ink = kept = 0
        for i, (r, c) in zip(lay.digit_indices[: self.n_target], lay.digit_positions):
            digit = self.pool.images[i]
            on = digit > 0
            ink += int(on.sum())
            kept += int((canvas[r : r + D, c : c + D][on] == digit[on]).sum())
        return canvas, 1.0 - kept / max(ink, 1)

    def _render_low(self, lay: Layout) -> np.ndarray:
        s = self.low_scale
        h, w = self.low_shape
        low = np.zeros((h, w), dtype=np.float32)

        def paste(block: np.ndarray, r: int, c: int) -> None:
            r0, c0 = int(r * s), int(c * s)
            part = block[: h - r0, : w - c0]
            low[r0 : r0 + part.shape[0], c0 : c0 + part.shape[1]] = part

        def digits() -> None:
            for i, (r, c) in zip(lay.digit_indices, lay.digit_positions):
                paste(_render_small(self.pool.images[i] / 255.0, s), r, c)

        def noise() -> None:
            for k, (r, c) in zip(lay.noise_ids, lay.noise_positions):
                paste(self._patterns_low[k], r, c)

        for paint in (digits, noise) if self.paint_order == "digits_then_noise" else (noise, digits):
            paint()
        return low

    def labels_of(self, lay: Layout) -> dict[str, Any]:
        """Every task's label for a layout."""
        multi = np.zeros(10, dtype=np.float32)
        multi[lay.digit_labels] = 1
        return {
            "majority": lay.target,
            "max": int(lay.digit_labels.max()),
            "top": int(lay.digit_labels[int(np.argmin(lay.digit_positions[:, 0]))]),
            "multilabel": torch.from_numpy(multi),
        }

    def __getitem__(self, index: int) -> dict[str, Any]:
        lay = self.layout(int(index))
        canvas, erased = self._paint(lay)
        # numpy, not torch: tiny torch ops on a busy machine pay for waking the intra-op thread pool
        x_high = torch.from_numpy(canvas.astype(np.float32) / np.float32(255)).unsqueeze(0)
        item: dict[str, Any] = {"x_high": x_high}
        if self.low_scale is not None:
            if self.low_view == "render":
                item["x_low"] = torch.from_numpy(self._render_low(lay)).unsqueeze(0)
            else:
                item["x_low"] = F.interpolate(x_high[None], size=self.low_shape, mode="area")[0]
        labels = self.labels_of(lay)
        rc = lay.digit_positions.astype(np.float32)
        boxes = np.stack([rc[:, 1], rc[:, 0], rc[:, 1] + D, rc[:, 0] + D], axis=1)
        item.update(
            label=labels[self.task],
            labels=labels,
            boxes=torch.from_numpy(boxes),
            box_labels=torch.from_numpy(lay.digit_labels),
            meta={
                "index": int(index),
                "erased_target_fraction": float(erased),
                "o2i": float(D * D / (self.height * self.width)),
            },
        )
        return item


@register_dataset("megapixel_mnist_ips")
class MegapixelMNISTIPS(MegapixelMNIST):
    """IPS version (DATASETS §4): noise painted first (digits intact), ``n_noise`` sets both the number of
    patterns and of noise blocks, four tasks selected by ``task``. ``x_low`` defaults to an area
    downsample by 0.25 (for DPS-style scorers); ``low_scale=None`` omits it."""

    def __init__(
        self,
        split: str = "train",
        seed: int = 0,
        size: int | None = None,
        canvas: int | tuple[int, int] | None = None,
        task: str = "majority",
        n_target: int = 3,
        n_other: int = 2,
        n_noise: int | None = None,
        low_scale: float | None = 0.25,
        low_view: str = "downsample",
        preset: str = "reference",
        mnist_dir: str | None = None,
    ) -> None:
        n = PRESETS[preset]["n_noise"] if (n_noise is None and preset in PRESETS) else n_noise
        super().__init__(
            split=split,
            seed=seed,
            size=size,
            canvas=canvas,
            n_target=n_target,
            n_other=n_other,
            n_noise=n,
            n_noise_patterns=max(int(n or 1), 1),
            paint_order="noise_then_digits",
            low_scale=low_scale,
            low_view=low_view,
            task=task,
            preset=preset,
            mnist_dir=mnist_dir,
        )
