"""needle-crop extraction from annotated slides (nCAMELYON-style, DATASETS.md §9).

Positives: for each connected lesion component (8-connectivity, at the target resolution) small enough
for the O2I range, crops are drawn uniformly among the positions that contain the whole component
(rows ``[max(0, bottom − size + 1), min(H − size, top)]``, the reference's off-by-one fixed) and kept
when ``low < O2I < high`` (lesion pixels in the crop / crop area, strict), the component is fully inside
and the image has no pure-black pixel. Negatives: uniform positions on lesion-free slides, rejecting
crops with a pure-black pixel or a mean green value above ``max_mean_green`` (mostly background).

Example:
    >>> import numpy as np
    >>> mask = np.zeros((100, 100), bool); mask[40:45, 50:56] = True
    >>> rng = np.random.default_rng(0)
    >>> pos = positive_positions(mask, size=20, o2i=(0.01, 0.5), rng=rng, max_per_component=3)
    >>> all(40 - 19 + 4 <= r <= 40 and 50 - 19 + 5 <= c <= 50 for r, c, _, _ in pos), len(pos) > 0
    (True, True)
"""

from __future__ import annotations

import csv
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from scipy import ndimage

from needlework.io.geojson import read_polygons
from needlework.slides.reader import SlideReader, open_slide
from needlework.slides.stage_runner import make_tasks
from needlework.slides.status import save_png_atomic


@dataclass
class CropConfig:
    """Crop side ``size`` (pixels at ``target_mpp``), O2I range ``(low, high)`` and sampling budget.

    Attributes:
        size: crop side in pixels at ``target_mpp``.
        target_mpp: resolution of the crops, µm/px.
        o2i: ``(low, high)`` range of the lesion area fraction of a positive crop (strict).
        max_attempts: random positions tried per lesion component (and per negative slide).
        max_per_component: positive crops per lesion component at most.
        negatives_per_slide: negative crops per lesion-free slide.
        max_mean_green: negatives with a larger mean green value are background and rejected.
        lesion_classes: GeoJSON classification names of lesions (``None`` = every polygon).
        seed: seed of the crop positions (and of ``balance``).
    """

    size: int = 256
    target_mpp: float = 2.0
    o2i: tuple[float, float] = (0.01, 0.10)
    max_attempts: int = 10_000
    max_per_component: int = 50
    negatives_per_slide: int = 100
    max_mean_green: float = 200.0
    lesion_classes: tuple[str, ...] | None = None
    seed: int = 42


def lesion_mask_from_polygons(
    polygons: list[list[np.ndarray]], shape: tuple[int, int], downsample: float
) -> np.ndarray:
    """Union of polygon interiors (outer rings; level-0 coordinates) on a grid ``shape`` at ``downsample``."""
    from skimage.draw import polygon as draw_polygon

    mask = np.zeros(shape, bool)
    for rings in polygons:
        ring = rings[0] / downsample
        rr, cc = draw_polygon(ring[:, 1] - 0.5, ring[:, 0] - 0.5, shape)
        mask[rr, cc] = True
    return mask


def positive_positions(
    mask: np.ndarray,
    size: int,
    o2i: tuple[float, float],
    rng: np.random.Generator,
    max_attempts: int = 10_000,
    max_per_component: int = 50,
) -> list[tuple[int, int, float, int]]:
    """Candidate positive crops ``(row, col, o2i, component)`` from the lesion ``mask`` (target resolution).

    Only the mask conditions are checked here; image checks (pure black) are the caller's.
    """
    low, high = o2i
    h, w = mask.shape
    area = size * size
    if mask.sum() < low * area or h < size or w < size:
        return []
    labels, _ = ndimage.label(mask, structure=np.ones((3, 3)))
    table = np.zeros((h + 1, w + 1), np.int64)
    table[1:, 1:] = mask.cumsum(0).cumsum(1)
    out = []
    for comp, sl in enumerate(ndimage.find_objects(labels), start=1):
        comp_area = int((labels[sl] == comp).sum())
        if comp_area > high * area:
            continue
        top, bottom, left, right = sl[0].start, sl[0].stop - 1, sl[1].start, sl[1].stop - 1
        r_lo, r_hi = max(0, bottom - size + 1), min(h - size, top)
        c_lo, c_hi = max(0, right - size + 1), min(w - size, left)
        if r_lo > r_hi or c_lo > c_hi:
            continue  # the component does not fit in a crop
        seen: set[tuple[int, int]] = set()
        for _ in range(max_attempts):
            if len(seen) >= max_per_component:
                break
            r, c = int(rng.integers(r_lo, r_hi + 1)), int(rng.integers(c_lo, c_hi + 1))
            if (r, c) in seen:
                continue
            inside = table[r + size, c + size] - table[r, c + size] - table[r + size, c] + table[r, c]
            ratio = inside / area
            own = int((labels[r : r + size, c : c + size] == comp).sum())
            if low < ratio < high and own >= comp_area:
                seen.add((r, c))
                out.append((r, c, float(ratio), comp))
    return out


def _read_crop(slide: SlideReader, r: int, c: int, size: int, ds: float) -> tuple[np.ndarray, int, int, int]:
    x, y, s0 = round(c * ds), round(r * ds), round(size * ds)
    return slide.read_region_at(x, y, s0, s0, size, size), x, y, s0


def extract_slide_crops(
    slide_path: str | Path,
    out_dir: str | Path,
    cfg: CropConfig,
    annotations: str | Path | None = None,
    negative: bool = False,
    mpp_override: float | None = None,
    reader: str = "auto",
) -> list[dict[str, Any]]:
    """Positive crops of an annotated slide, or negative crops of a lesion-free slide (``negative=True``).

    Writes ``<out_dir>/{positive,negative}/<slide_id>_x<X>_y<Y>.png`` and returns one row per crop
    (level-0 ``x, y, size_level0``, ``o2i``, ``component``).
    """
    rng = np.random.default_rng(np.random.SeedSequence([cfg.seed, *map(ord, Path(slide_path).name)]))
    rows: list[dict[str, Any]] = []
    with open_slide(slide_path, reader, mpp_override) as slide:
        ds = cfg.target_mpp / slide.mpp
        w0, h0 = slide.dimensions
        shape = (int(h0 / ds), int(w0 / ds))
        kind = "negative" if negative else "positive"
        folder = Path(out_dir) / kind
        if negative:
            accepted: set[tuple[int, int]] = set()
            for _ in range(cfg.max_attempts):
                if len(accepted) >= cfg.negatives_per_slide:
                    break
                r = int(rng.integers(0, shape[0] - cfg.size + 1))
                c = int(rng.integers(0, shape[1] - cfg.size + 1))
                if (r, c) in accepted:
                    continue
                img, x, y, s0 = _read_crop(slide, r, c, cfg.size, ds)
                if (img.astype(np.int32).sum(2) == 0).any() or img[..., 1].mean() > cfg.max_mean_green:
                    continue
                accepted.add((r, c))
                rows.append(_row(slide, kind, x, y, s0, cfg, 0.0, 0, folder, img))
            return rows
        if annotations is None:
            raise ValueError(f"{slide.slide_id}: positive crops need lesion annotations (GeoJSON)")
        mask = lesion_mask_from_polygons(read_polygons(annotations, cfg.lesion_classes), shape, ds)
        for r, c, ratio, comp in positive_positions(
            mask, cfg.size, cfg.o2i, rng, cfg.max_attempts, cfg.max_per_component
        ):
            img, x, y, s0 = _read_crop(slide, r, c, cfg.size, ds)
            if (img.astype(np.int32).sum(2) == 0).any():
                continue
            rows.append(_row(slide, kind, x, y, s0, cfg, ratio, comp, folder, img))
    return rows


def _row(
    slide: SlideReader,
    kind: str,
    x: int,
    y: int,
    s0: int,
    cfg: CropConfig,
    o2i: float,
    comp: int,
    folder: Path,
    img: np.ndarray,
) -> dict[str, Any]:
    path = save_png_atomic(folder / f"{slide.slide_id}_x{x}_y{y}.png", img)
    return {
        "slide_id": slide.slide_id,
        "label": int(kind == "positive"),
        "x": x,
        "y": y,
        "size_level0": s0,
        "size": cfg.size,
        "target_mpp": cfg.target_mpp,
        "o2i": round(o2i, 6),
        "component": comp,
        "file": str(path.relative_to(folder.parent)),
    }


def camelyon_centre(patient_id: int) -> int:
    """CAMELYON17 centre of a patient: ``patient_id // 20``."""
    return int(patient_id) // 20


def camelyon_split(patient_id: int) -> str:
    """Centre-wise nCAMELYON split: centre 3 → val, centre 4 → test, centres 0–2 → train."""
    return {3: "val", 4: "test"}.get(camelyon_centre(patient_id), "train")


def balance_crops(
    rows: list[dict[str, Any]], seed: int = 42, key: str | None = "split"
) -> list[dict[str, Any]]:
    """Sub-sample the larger class so positives and negatives are equal (per ``key`` group if present)."""
    rng = np.random.default_rng(seed)
    groups: dict[Any, list[dict[str, Any]]] = {}
    for row in rows:
        groups.setdefault(row.get(key) if key else None, []).append(row)
    out = []
    for group in groups.values():
        pos = [r for r in group if r["label"] == 1]
        neg = [r for r in group if r["label"] == 0]
        n = min(len(pos), len(neg))
        for part in (pos, neg):
            idx = np.sort(rng.permutation(len(part))[:n])
            out += [part[i] for i in idx]
    return out


def extract_crops(
    slides: str | Path,
    annotations_dir: str | Path,
    labels_csv: str | Path,
    out_dir: str | Path,
    cfg: CropConfig | None = None,
    mpp_csv: str | Path | None = None,
    balance: bool = False,
    reader: str = "auto",
) -> list[dict[str, Any]]:
    """Needle crops of a cohort: positives from the annotated slides, negatives from the slides with label
    0 (or ``negative``); writes the PNGs and ``<out_dir>/crops.csv``, returns its rows.

    Args:
        slides: folder of slides.
        annotations_dir: folder of ``<slide_id>.geojson`` lesion annotations.
        labels_csv: slide-label CSV (``case_id, slide_id, label``); slides with label 0 give negatives.
        out_dir: output folder (``positive/``, ``negative/``, ``crops.csv``).
        cfg: crop size, resolution, O2I range and sampling budget.
        mpp_csv: per-slide MPP override CSV (columns ``wsi,mpp`` or ``slide_id,mpp``).
        balance: keep equal numbers of positives and negatives.
        reader: slide reader (``auto``: OpenSlide, then tiffslide).
    """
    from needlework.data.splits import read_label_csv  # importing needlework.data loads torch

    cfg = cfg or CropConfig()
    labels = {r["slide_id"]: r for r in read_label_csv(labels_csv)}
    tasks, _ = make_tasks(slides, mpp_csv)
    rows: list[dict[str, Any]] = []
    for task in tasks:
        if task.slide_id not in labels:
            warnings.warn(f"{task.slide_id} is not in {labels_csv}; skipped", stacklevel=2)
            continue
        negative = str(labels[task.slide_id]["label"]) in ("0", "negative")
        ann = Path(annotations_dir) / f"{task.slide_id}.geojson"
        got = extract_slide_crops(
            task.slide_path, out_dir, cfg, None if negative else ann, negative, task.mpp_override, reader
        )
        rows += [{**r, "case_id": labels[task.slide_id]["case_id"]} for r in got]
    if balance:
        rows = balance_crops(rows, cfg.seed, key=None)
    write_crop_index(rows, Path(out_dir) / "crops.csv")
    return rows


def write_crop_index(rows: list[dict[str, Any]], path: str | Path) -> Path:
    """Write the crop index CSV atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fields = list(rows[0]) if rows else ["slide_id", "label", "x", "y", "size_level0", "o2i", "file"]
    tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")
    with tmp.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)
    os.replace(tmp, path)
    return path
