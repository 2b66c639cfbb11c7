"""Synthetic tissue whose lesions are morphology, not colour (``lesion_type="texture"``, DATASETS.md §10).

Tissue is pink stroma with smooth low-frequency variation and fine grain, sprinkled with small dark nuclei
placed by a homogeneous Poisson process (``nucleus_density`` nuclei per pixel, radius ``nucleus_radius``
level-0 px, random elongation and angle). A lesion is a small elliptical cluster of **enlarged**
(``LESION_RADIUS_SCALE`` × radius) and **crowded** (``LESION_DENSITY_SCALE`` × density) nuclei. Its pixels
are paler (vesicular), so that the lesion holds as much stain as the ring of tissue around it, and its
pixels are then shifted, per channel, to the mean of that ring (``x' = x − μ_in + μ_ring``, a small
correction; scaling to the ring's std as well would stretch the stroma between the big nuclei into a
visible pale halo). The shapes, sizes and crowding of the nuclei stay; the mean colour is that of the
neighbourhood and the spread close to it, so colour statistics of a tile do not reveal the lesion.

Everything is vectorised numpy / OpenCV (a few thousand px a side in about a second).
"""

from __future__ import annotations

from typing import Any

import cv2
import numpy as np

from needlework.errors import ConfigError
from needlework.slides.synthetic_shapes import dilate, ellipse_ring, rasterise

__all__ = [
    "COLOUR_RING_PX",
    "LESION_DENSITY_SCALE",
    "LESION_RADIUS_SCALE",
    "draw_nuclei",
    "match_ring_colour",
    "render_texture_slide",
    "stroma",
]

LESION_RADIUS_SCALE = 1.6  # lesion nuclei are enlarged ...
LESION_DENSITY_SCALE = 1.9  # ... and crowded
_STROMA_RGB = np.array([236.0, 176.0, 206.0], np.float32)  # eosin pink
_NUCLEUS_RGB = np.array([92.0, 48.0, 128.0], np.float32)  # haematoxylin purple
COLOUR_RING_PX = 24  # the colour reference: tissue within this many px (city-block) of the lesion
_SHIFT = 4  # cv2 sub-pixel bits for nucleus centres and axes


def stroma(height: int, width: int, rng: np.random.Generator) -> np.ndarray:
    """Pink stroma ``(H, W, 3)`` float32 in [0, 255]: smooth low-frequency variation + fine grain."""
    cell = 96  # the low-frequency field varies over ~100 px
    gh, gw = max(2, height // cell + 2), max(2, width // cell + 2)
    field = rng.normal(0.0, 1.0, size=(gh, gw, 3)).astype(np.float32)
    field = cv2.resize(field, (width, height), interpolation=cv2.INTER_CUBIC)
    grain = rng.normal(0.0, 1.0, size=(height, width)).astype(np.float32)
    grain = cv2.GaussianBlur(grain, (0, 0), 1.2)  # fibre-like fine grain, shared by all channels
    out = _STROMA_RGB * (1.0 + 0.05 * field) + (10.0 * grain)[..., None]
    return np.clip(out, 0, 255)


def draw_nuclei(
    shape: tuple[int, int],
    rng: np.random.Generator,
    density: float,
    radius: float,
    region: np.ndarray | None = None,
) -> np.ndarray:
    """Nucleus opacity ``(H, W)`` float32 in [0, 1] for a Poisson process of ``density`` nuclei per pixel.

    Centres are uniform over the image (or over the ``True`` pixels of ``region``, same expected count
    per pixel); each nucleus is an ellipse of mean radius ``radius`` (±15 %), axis ratio 0.65-1, random
    angle, with a slightly blurred rim.
    """
    h, w = shape
    if region is None:
        n = rng.poisson(density * h * w)
        xs, ys = rng.uniform(0, w, n), rng.uniform(0, h, n)
    else:
        rows, cols = np.nonzero(region)
        n = rng.poisson(density * rows.size)
        pick = rng.integers(0, max(rows.size, 1), n)
        xs = cols[pick] + rng.uniform(0, 1, n) if rows.size else np.zeros(0)
        ys = rows[pick] + rng.uniform(0, 1, n) if rows.size else np.zeros(0)
    r = radius * rng.uniform(0.85, 1.15, n)
    ratio = rng.uniform(0.65, 1.0, n)
    angle = rng.uniform(0, 180, n)
    alpha = np.zeros((h, w), np.uint8)
    scale = 1 << _SHIFT
    centres = np.stack([xs, ys], 1) * scale
    axes = np.stack([r, r * ratio], 1) * scale
    for (cx, cy), (ax, ay), a in zip(centres.astype(int), axes.astype(int), angle):
        cv2.ellipse(
            alpha, (int(cx), int(cy)), (int(ax), int(ay)), float(a), 0, 360, 255, -1, cv2.LINE_8, _SHIFT
        )
    return cv2.GaussianBlur(alpha.astype(np.float32) / 255.0, (0, 0), 0.7)


def blend_nuclei(base: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    """``base`` with nuclei of opacity ``alpha`` (float32, same leading shape)."""
    return base * (1.0 - alpha[..., None]) + _NUCLEUS_RGB * alpha[..., None]


def match_ring_colour(
    patch: np.ndarray, inside: np.ndarray, ring: np.ndarray, match_std: bool = False
) -> np.ndarray:
    """``patch`` ``(h, w, 3)`` float32 with the pixels in ``inside`` shifted, per channel, to the mean of
    the pixels in ``ring`` (both ``(h, w)`` bool); with ``match_std`` also scaled to the ring's std.
    Values stay in [0, 255] (the shift is re-applied after clipping)."""
    out = patch.copy()
    src, ref = patch[inside], patch[ring]
    mu_r = ref.mean(0)
    mapped = src
    if match_std:
        mapped = (src - src.mean(0)) / (src.std(0) + 1e-6) * ref.std(0) + mu_r
    for _ in range(4):  # clipping moves the mean a little: shift it back
        mapped = np.clip(mapped + (mu_r - mapped.mean(0)), 0, 255)
    out[inside] = mapped
    return out


def render_texture_slide(
    spec: Any, tissue: np.ndarray, background: np.ndarray, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray, list[dict[str, Any]]]:
    """The ``lesion_type="texture"`` slide of a :class:`~needlework.slides.synthetic.SyntheticSlideSpec`.

    ``tissue`` ``(H, W)`` bool and ``background`` ``(H, W, 3)`` uint8 come from the caller (same tissue
    shapes as the colour mode). Returns the image, the tissue mask and the lesions in the format of
    :func:`~needlework.slides.synthetic.render_synthetic_slide`; the lesions of a slide together cover at
    most ``spec.max_lesion_fraction`` of its tissue pixels, and each one and its colour ring lie in tissue.
    """
    h, w = tissue.shape
    base = stroma(h, w, rng)
    alpha = draw_nuclei((h, w), rng, spec.nucleus_density, spec.nucleus_radius)
    grain = rng.uniform(0.8, 1.0, size=(h, w)).astype(np.float32)  # chromatin texture
    image = blend_nuclei(base, alpha * grain)

    lesions: list[dict[str, Any]] = []
    lesion_mask = np.zeros((h, w), bool)
    per_lesion = spec.max_lesion_fraction * float(tissue.sum()) / max(spec.n_lesions, 1)
    smallest = LESION_RADIUS_SCALE * spec.nucleus_radius  # a cluster holds at least one big nucleus
    if spec.n_lesions and np.sqrt(per_lesion / np.pi) < smallest:
        raise ConfigError(
            f"slide {spec.width}x{spec.height} (seed {spec.seed}): {spec.n_lesions} texture lesion(s) within "
            f"{spec.max_lesion_fraction:.4%} of its {int(tissue.sum())} tissue pixels would be smaller than "
            f"one enlarged nucleus (radius {smallest:.1f} px); use a larger slide or fewer lesions"
        )
    attempts = 0
    while len(lesions) < spec.n_lesions and attempts < 2000:
        attempts += 1
        q = rng.uniform(0.6, 1.0)
        # The area budget caps the radius (rasterised area ≈ π·rx·ry; 0.9 leaves room for pixelisation).
        r = min(rng.uniform(*spec.lesion_radius), float(np.sqrt(0.9 * per_lesion / (np.pi * q))))
        rx, ry = r, r * q
        ring_w = int(max(COLOUR_RING_PX, np.ceil(r)))  # the colour reference ring around the lesion
        pad = ring_w + 20
        cx, cy = rng.uniform(r + pad, w - r - pad), rng.uniform(r + pad, h - r - pad)
        outline = ellipse_ring(cx, cy, rx, ry, rng.uniform(0, np.pi))
        x0, y0 = max(int(cx - r) - pad, 0), max(int(cy - r) - pad, 0)
        x1, y1 = min(int(cx + r) + pad + 2, w), min(int(cy + r) + pad + 2, h)
        local = rasterise(outline - [x0, y0], (y1 - y0, x1 - x0))
        if not local.any() or local.sum() > per_lesion:
            continue
        around = dilate(local, ring_w)
        # The lesion and its ring entirely inside tissue, and apart from the other lesions.
        if not tissue[y0:y1, x0:x1][around].all() or (lesion_mask[y0:y1, x0:x1] & dilate(around, 8)).any():
            continue
        big = draw_nuclei(
            local.shape,
            rng,
            spec.nucleus_density * LESION_DENSITY_SCALE,
            spec.nucleus_radius * LESION_RADIUS_SCALE,
            region=local,
        )
        ring = around & ~local
        ink = alpha[y0:y1, x0:x1] * grain[y0:y1, x0:x1]
        big_ink = big * grain[y0:y1, x0:x1]
        # Crowded big nuclei would darken the lesion: make them paler (vesicular, as in many tumours)
        # so that the lesion holds as much stain as the ring around it; the colour match then only
        # corrects a small residual and leaves no visible halo.
        pale = min(1.0, float(ink[ring].mean() / max(big_ink[local].mean(), 1e-6)))
        # Inside: the lesion's nuclei only; around it, the enlarged nuclei that straddle the border.
        win_ink = np.where(local, pale * big_ink, np.maximum(ink, pale * big_ink))
        patch = match_ring_colour(blend_nuclei(base[y0:y1, x0:x1], win_ink), local, ring)
        image[y0:y1, x0:x1] = patch
        lesion_mask[y0:y1, x0:x1] |= local
        rows, cols = np.nonzero(local)
        lesions.append(
            {
                "ring": outline,
                "box": [
                    int(cols.min()) + x0,
                    int(rows.min()) + y0,
                    int(cols.max()) + x0 + 1,
                    int(rows.max()) + y0 + 1,
                ],
                "area": int(local.sum()),
                "center": [float(cx), float(cy)],
            }
        )
    if len(lesions) < spec.n_lesions:
        raise RuntimeError(
            f"could not place {spec.n_lesions} texture lesions with their colour ring inside the tissue "
            f"(seed {spec.seed}); use a larger slide or fewer lesions"
        )
    out = np.where(tissue[..., None], np.clip(image, 0, 255).round().astype(np.uint8), background)
    return out, tissue, lesions
