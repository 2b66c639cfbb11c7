"""Sparse Gabor-noise textures: the reconstruction task of MIST (registered ``"gabor_noise"``).

An image is a sum of ``n_impulses`` Gabor kernels placed at Poisson-disk impulse positions; the impulse
positions are the ground truth of the detection. Each kernel is non-negative so that the background is 0
and the image is exactly a sum of patches (what MIST's re-synthesis ``Σ_k S⁻¹(P_k, x_k)`` can represent):

    g(u, v) = exp(−(u² + v²) / (2σ²)) · (1 + cos(2π u' / λ)) / 2,   u' = u cos θ + v sin θ,

with orientation θ drawn from ``n_orientations`` equally spaced angles in [0, π) (the box label is the
orientation index). The sum is clipped to [0, 1].

Items carry the same keys as MNIST-hard: ``image`` ``(1, H, W)``, ``label`` (counts per orientation),
``boxes`` ``(n_max, 4)`` xyxy (the ``kernel_size`` square around each impulse), ``box_labels``,
``keypoints`` ``(n_max, 3)`` ``(x, y, half-size)``; padded rows have label −1.

Example:
    >>> item = GaborTextures("train", size=2)[0]
    >>> tuple(item["image"].shape), tuple(item["boxes"].shape)
    ((1, 64, 64), (4, 4))
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import lru_cache

import numpy as np
import torch

from needlework.data.mnist import SPLITS
from needlework.data.mnist_hard import DEFAULT_SIZES, count_range
from needlework.data.poisson import poisson_disk
from needlework.registry import register_dataset


@lru_cache(maxsize=32)
def gabor_kernel(size: int, sigma: float, wavelength: float, theta: float) -> np.ndarray:
    """``(size, size)`` float32 non-negative Gabor kernel with peak 1 at the centre (see module doc)."""
    r = np.arange(size, dtype=np.float64) + 0.5 - size / 2.0
    v, u = np.meshgrid(r, r, indexing="ij")
    rot = u * np.cos(theta) + v * np.sin(theta)
    g = np.exp(-(u**2 + v**2) / (2 * sigma**2)) * 0.5 * (1.0 + np.cos(2 * np.pi * rot / wavelength))
    return (g / g.max()).astype(np.float32)


@register_dataset("gabor_noise")
class GaborTextures(torch.utils.data.Dataset):
    """Sparse non-negative Gabor noise with the impulse positions as ground truth.

    Args:
        split, seed, size: as every generator (item = pure function of ``(seed, split, index)``).
        canvas: side of the square image in pixels.
        n_impulses: impulses per image, an int or an inclusive ``[min, max]`` range.
        kernel_size: side of each kernel's support (and of its ground-truth box) in pixels.
        sigma: Gaussian envelope std in pixels (default ``kernel_size / 5``).
        wavelength: carrier wavelength in pixels.
        n_orientations: number of equally spaced orientations in [0, π).
        min_distance: Poisson-disk radius between impulses (default ``kernel_size``: little overlap).
    """

    def __init__(
        self,
        split: str = "train",
        seed: int = 0,
        size: int | None = None,
        canvas: int = 64,
        n_impulses: int | Sequence[int] = 4,
        kernel_size: int = 16,
        sigma: float | None = None,
        wavelength: float = 6.0,
        n_orientations: int = 4,
        min_distance: float | None = None,
        max_retries: int = 20,
    ) -> None:
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        self.split, self.seed = split, int(seed)
        self.size = DEFAULT_SIZES[split] if size is None else int(size)
        self.canvas, self.kernel_size = int(canvas), int(kernel_size)
        if self.kernel_size >= self.canvas:
            raise ValueError(f"kernel_size ({kernel_size}) must be smaller than canvas ({canvas})")
        self.n_range = count_range(n_impulses, "n_impulses")
        self.sigma = self.kernel_size / 5.0 if sigma is None else float(sigma)
        self.wavelength, self.n_orientations = float(wavelength), int(n_orientations)
        if self.n_orientations < 1:
            raise ValueError(f"n_orientations must be >= 1, got {n_orientations}")
        self.min_distance = float(self.kernel_size if min_distance is None else min_distance)
        self.max_retries = int(max_retries)

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        if not 0 <= index < self.size:
            raise IndexError(f"index {index} out of range for a dataset of {self.size} items")
        rng = np.random.default_rng(np.random.SeedSequence([self.seed, SPLITS.index(self.split), index, 7]))
        n = int(rng.integers(self.n_range[0], self.n_range[1] + 1))
        half = self.kernel_size / 2.0
        lo, hi = half, self.canvas - half
        for _ in range(self.max_retries):
            pts = poisson_disk((lo, lo, hi, hi), self.min_distance, rng)
            if len(pts) >= n:
                break
        else:
            raise RuntimeError(
                f"only {len(pts)} impulses of min_distance={self.min_distance} fit a {self.canvas}-px "
                f"canvas; lower n_impulses ({n}) or min_distance"
            )
        pts = pts[rng.choice(len(pts), size=n, replace=False)]
        orient = rng.integers(0, self.n_orientations, size=n)
        image = np.zeros((self.canvas, self.canvas), dtype=np.float32)
        n_max = self.n_range[1]
        boxes = np.zeros((n_max, 4), dtype=np.float32)
        keypoints = np.zeros((n_max, 3), dtype=np.float32)
        labels = -np.ones(n_max, dtype=np.int64)
        s = self.kernel_size
        for k in range(n):
            kern = gabor_kernel(
                s, self.sigma, self.wavelength, float(orient[k]) * np.pi / self.n_orientations
            )
            x0 = int(np.clip(round(pts[k, 0] - half), 0, self.canvas - s))
            y0 = int(np.clip(round(pts[k, 1] - half), 0, self.canvas - s))
            image[y0 : y0 + s, x0 : x0 + s] += kern
            boxes[k] = (x0, y0, x0 + s, y0 + s)
            keypoints[k] = (x0 + half, y0 + half, half)
            labels[k] = orient[k]
        return {
            "image": torch.from_numpy(np.clip(image, 0.0, 1.0))[None],
            "label": torch.from_numpy(np.bincount(orient, minlength=self.n_orientations).astype(np.int64)),
            "boxes": torch.from_numpy(boxes),
            "box_labels": torch.from_numpy(labels),
            "keypoints": torch.from_numpy(keypoints),
        }
