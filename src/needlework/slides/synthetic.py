"""Synthetic whole-slide images with known tissue and planted lesions (DATASETS.md §10).

A slide is real IHC texture (``skimage.data.immunohistochemistry``, offline) tinted pink, cut into
elliptical tissue pieces on a white background, with small dark-purple elliptical "lesions" inside the
tissue. It is written as a JPEG-tiled pyramidal BigTIFF with **levels as successive pages** (OpenSlide
ignores SubIFD pyramids, ENVIRONMENT.md §4.2) and resolution tags for the chosen µm/px (or none, to
exercise the MPP-override path). Lesions are also written as QuPath GeoJSON annotations.

Example:
    >>> img, tissue, lesions = render_synthetic_slide(SyntheticSlideSpec(width=512, height=384, seed=1))
    >>> img.shape, tissue.shape, img.dtype
    ((384, 512, 3), (384, 512), dtype('uint8'))
"""

from __future__ import annotations

import csv
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from needlework.io.geojson import feature_collection, polygon_feature, write_geojson
from needlework.slides.synthetic_shapes import dilate as _dilate
from needlework.slides.synthetic_shapes import ellipse_ring as _ellipse_ring
from needlework.slides.synthetic_shapes import rasterise as _rasterise

LESION_CLASS = "Tumor"
LESION_TYPES = ("color", "texture")
_TINT = np.array([0.92, 0.68, 0.85])  # pink (eosin-like) tint so that tissue is clearly saturated
_LESION_RGB = np.array([85.0, 35.0, 120.0])


@dataclass
class SyntheticSlideSpec:
    """Parameters of one synthetic slide (sizes in level-0 pixels)."""

    width: int = 2048
    height: int = 1536
    seed: int = 0
    n_tissue: int = 2
    tissue_radius: tuple[float, float] = (0.18, 0.3)  # fraction of the shorter side
    n_lesions: int = 2
    lesion_radius: tuple[int, int] = (20, 48)
    mpp: float | None = 0.25
    tile: int = 256
    quality: int = 90
    min_level_side: int = 512
    lesion_type: str = (
        "color"  # "color": dark-purple blobs; "texture": enlarged crowded nuclei, colour-matched
    )
    nucleus_radius: float = 3.5  # texture: mean nucleus radius, level-0 px
    nucleus_density: float = 0.003  # texture: nuclei per tissue pixel (Poisson)
    max_lesion_fraction: float = 0.0005  # texture: all lesions together cover at most this of the tissue


def _texture(height: int, width: int, rng: np.random.Generator) -> np.ndarray:
    from skimage import data

    base = data.immunohistochemistry().astype(np.float32) * _TINT
    size = base.shape[0]
    reps = (-(-height // size), -(-width // size))
    out = np.empty((reps[0] * size, reps[1] * size, 3), np.uint8)
    for i in range(reps[0]):
        for j in range(reps[1]):
            tile = base if (i + j) % 2 == 0 else base[::-1, ::-1]
            gain = 1.0 + rng.normal(0.0, 0.04, size=3)  # mild per-tile colour variation
            out[i * size : (i + 1) * size, j * size : (j + 1) * size] = np.clip(tile * gain, 0, 255)
    return out[:height, :width]


def _ellipse_mask(
    cx: float, cy: float, rx: float, ry: float, angle: float, shape: tuple[int, int]
) -> np.ndarray:
    """Pixels whose centres lie inside the ellipse, computed in its bounding window."""
    h, w = shape
    mask = np.zeros(shape, bool)
    r = max(rx, ry)
    x0, x1 = max(int(cx - r) - 1, 0), min(int(cx + r) + 2, w)
    y0, y1 = max(int(cy - r) - 1, 0), min(int(cy + r) + 2, h)
    ys, xs = np.mgrid[y0:y1, x0:x1].astype(np.float32) + 0.5
    dx, dy = xs - cx, ys - cy
    c, s = np.cos(angle), np.sin(angle)
    u, v = c * dx + s * dy, -s * dx + c * dy
    mask[y0:y1, x0:x1] = (u / rx) ** 2 + (v / ry) ** 2 <= 1.0
    return mask


def render_synthetic_slide(spec: SyntheticSlideSpec) -> tuple[np.ndarray, np.ndarray, list[dict[str, Any]]]:
    """Level-0 image ``(H, W, 3)`` uint8, tissue mask ``(H, W)`` bool and the planted lesions.

    Each lesion is a dict with ``ring`` (``(P, 2)`` level-0 ``(x, y)`` polygon), ``box`` (xyxy, level-0
    pixels, inclusive-exclusive), ``area`` (pixels) and ``center``. Deterministic from ``spec.seed``.
    """
    rng = np.random.default_rng(np.random.SeedSequence([spec.seed, 7011]))
    h, w = spec.height, spec.width
    short = min(h, w)
    tissue = np.zeros((h, w), bool)
    for _ in range(spec.n_tissue):
        rx, ry = rng.uniform(*spec.tissue_radius, size=2) * short
        cx = rng.uniform(max(rx, ry) * 0.8 + 8, w - max(rx, ry) * 0.8 - 8)
        cy = rng.uniform(max(rx, ry) * 0.8 + 8, h - max(rx, ry) * 0.8 - 8)
        piece = _ellipse_mask(cx, cy, rx, ry, rng.uniform(0, np.pi), (h, w))
        # Keep a margin of background around the slide edge.
        piece[:4], piece[-4:], piece[:, :4], piece[:, -4:] = False, False, False, False
        tissue |= piece
    if spec.lesion_type not in LESION_TYPES:
        raise ValueError(f"lesion_type must be one of {LESION_TYPES}, got {spec.lesion_type!r}")
    noise = rng.integers(-2, 3, size=(h, w, 1), dtype=np.int16)
    background = (241 + noise).astype(np.uint8)
    if spec.lesion_type == "texture":
        from needlework.slides.synthetic_texture import render_texture_slide

        return render_texture_slide(spec, tissue, background, rng)
    image = np.where(tissue[..., None], _texture(h, w, rng), background)

    lesions: list[dict[str, Any]] = []
    lesion_mask = np.zeros((h, w), bool)
    attempts = 0
    while len(lesions) < spec.n_lesions and attempts < 1000:
        attempts += 1
        r = rng.uniform(*spec.lesion_radius)
        rx, ry = r, r * rng.uniform(0.6, 1.0)
        cx, cy = rng.uniform(r + 2, w - r - 2), rng.uniform(r + 2, h - r - 2)
        ring = _ellipse_ring(cx, cy, rx, ry, rng.uniform(0, np.pi))
        # Work in a window around the lesion (a full-size mask per attempt is slow on big slides).
        pad = 20
        x0, y0 = max(int(cx - r) - pad, 0), max(int(cy - r) - pad, 0)
        x1, y1 = min(int(cx + r) + pad + 2, w), min(int(cy + r) + pad + 2, h)
        local = _rasterise(ring - [x0, y0], (y1 - y0, x1 - x0))
        # Entirely inside tissue, and apart from the other lesions.
        if not local.any() or not tissue[y0:y1, x0:x1][local].all():
            continue
        if (lesion_mask[y0:y1, x0:x1] & _dilate(local, 16)).any():
            continue
        lesion_mask[y0:y1, x0:x1] |= local
        rows, cols = np.nonzero(local)
        lesions.append(
            {
                "ring": ring,
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
        raise RuntimeError(f"could not place {spec.n_lesions} lesions inside the tissue (seed {spec.seed})")
    image[lesion_mask] = (0.35 * image[lesion_mask] + 0.65 * _LESION_RGB).round().astype(np.uint8)
    return image, tissue, lesions


def pyramid(image: np.ndarray, min_side: int = 512) -> list[np.ndarray]:
    """Levels by 2×2 mean until the longest side is ≤ ``min_side`` (level 0 first)."""
    levels = [image]
    while max(levels[-1].shape[:2]) > min_side:
        prev = levels[-1]
        h, w = prev.shape[0] // 2 * 2, prev.shape[1] // 2 * 2
        p = prev[:h, :w].astype(np.uint16)
        down = (p[0::2, 0::2] + p[1::2, 0::2] + p[0::2, 1::2] + p[1::2, 1::2] + 2) // 4
        levels.append(down.astype(np.uint8))
    return levels


def write_pyramidal_tiff(
    path: str | Path,
    image: np.ndarray,
    mpp: float | None = 0.25,
    tile: int = 256,
    quality: int = 90,
    min_side: int = 512,
) -> Path:
    """Write a JPEG-tiled BigTIFF pyramid, one page per level (reduced levels ``subfiletype=1``).

    ``mpp=None`` writes no resolution tags (unit NONE), so readers find no µm/px.
    """
    import tifffile

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    with tifffile.TiffWriter(tmp, bigtiff=True) as tif:
        for level, arr in enumerate(pyramid(image, min_side)):
            kwargs: dict[str, Any] = {}
            if mpp is not None:
                per_cm = 1e4 / (mpp * 2**level)
                kwargs = {"resolution": (per_cm, per_cm), "resolutionunit": "CENTIMETER"}
            tif.write(
                arr,
                tile=(tile, tile),
                compression="jpeg",
                compressionargs={"level": quality},
                photometric="rgb",
                subfiletype=1 if level else 0,
                **kwargs,
            )
    os.replace(tmp, path)
    return path


def lesions_geojson(lesions: list[dict[str, Any]]) -> dict[str, Any]:
    """Lesions as QuPath ``annotation`` polygons of class ``Tumor``."""
    return feature_collection(
        [polygon_feature([les["ring"].tolist()], "annotation", LESION_CLASS, (200, 0, 0)) for les in lesions]
    )


def make_synthetic_slide(
    path: str | Path, spec: SyntheticSlideSpec, annotations: str | Path | None = None
) -> dict:
    """Render and write one slide (+ GeoJSON lesion annotations if ``annotations`` is a path).

    Returns metadata: ``spec``, ``lesions`` (box/area/center), ``tissue_fraction``, ``label``.
    """
    image, tissue, lesions = render_synthetic_slide(spec)
    write_pyramidal_tiff(path, image, spec.mpp, spec.tile, spec.quality, spec.min_level_side)
    if annotations is not None:
        write_geojson(annotations, lesions_geojson(lesions))
    return {
        "spec": asdict(spec),
        "lesions": [{k: v for k, v in les.items() if k != "ring"} for les in lesions],
        "tissue_fraction": float(tissue.mean()),
        "label": int(bool(lesions)),
    }


def make_synthetic_cohort(
    out_dir: str | Path,
    n_slides: int = 8,
    width: int = 2048,
    height: int = 1536,
    seed: int = 0,
    positive_fraction: float = 0.5,
    slides_per_patient: int = 2,
    n_lesions: int = 2,
    lesion_radius: tuple[int, int] = (20, 48),
    no_mpp_slides: int = 1,
    mpp: float = 0.25,
    lesion_type: str = "color",
) -> dict[str, Any]:
    """Write a cohort: ``slides/*.tif``, ``annotations/*.geojson``, ``labels.csv`` (``case_id, slide_id,
    label``) and ``mpp_overrides.csv`` (``wsi, mpp``) for the last ``no_mpp_slides`` slides, which carry no
    resolution tags. Label 1 = the slide has lesions. Returns the paths and per-slide metadata.

    Args:
        out_dir: output folder.
        n_slides: number of slides.
        width: slide width in level-0 pixels.
        height: slide height in level-0 pixels.
        seed: seed of the cohort (slide ``i`` uses ``seed · 100003 + i``).
        positive_fraction: fraction of slides with lesions (label 1).
        slides_per_patient: consecutive slides sharing a ``case_id``.
        n_lesions: lesions per positive slide.
        lesion_radius: ``(min, max)`` lesion radius in level-0 pixels.
        no_mpp_slides: the last slides written without resolution tags (listed in ``mpp_overrides.csv``).
        mpp: level-0 µm/px of the slides.
        lesion_type: ``"color"`` (dark-purple blobs that colour statistics find) or ``"texture"``
            (clusters of enlarged, crowded nuclei with the colour distribution of the tissue around
            them, at most 0.05 % of the tissue area; :mod:`needlework.slides.synthetic_texture`).
    """
    if lesion_type not in LESION_TYPES:
        raise ValueError(f"lesion_type must be one of {LESION_TYPES}, got {lesion_type!r}")
    out = Path(out_dir)
    (out / "slides").mkdir(parents=True, exist_ok=True)
    n_pos = round(n_slides * positive_fraction)
    rng = np.random.default_rng(np.random.SeedSequence([seed, 4242]))
    labels = rng.permutation([1] * n_pos + [0] * (n_slides - n_pos))
    rows, overrides, meta = [], [], {}
    for i in range(n_slides):
        slide_id = f"slide_{i:03d}"
        has_mpp = i < n_slides - no_mpp_slides
        spec = SyntheticSlideSpec(
            width=width,
            height=height,
            seed=seed * 100_003 + i,
            n_lesions=n_lesions if labels[i] else 0,
            lesion_radius=lesion_radius,
            mpp=mpp if has_mpp else None,
            lesion_type=lesion_type,
        )
        ann = out / "annotations" / f"{slide_id}.geojson"
        meta[slide_id] = make_synthetic_slide(out / "slides" / f"{slide_id}.tif", spec, ann)
        rows.append(
            {
                "case_id": f"patient_{i // slides_per_patient:03d}",
                "slide_id": slide_id,
                "label": int(labels[i]),
            }
        )
        if not has_mpp:
            overrides.append({"wsi": f"{slide_id}.tif", "mpp": mpp})
    _write_csv(out / "labels.csv", ["case_id", "slide_id", "label"], rows)
    _write_csv(out / "mpp_overrides.csv", ["wsi", "mpp"], overrides)
    return {
        "slides_dir": out / "slides",
        "labels_csv": out / "labels.csv",
        "mpp_csv": out / "mpp_overrides.csv",
        "annotations_dir": out / "annotations",
        "slides": meta,
    }


def _write_csv(path: Path, fields: list[str], rows: list[dict[str, Any]]) -> None:
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    with tmp.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)
    os.replace(tmp, path)
