"""Heatmaps from per-tile scores and coordinates alone — no re-tiling, no model re-run (CONVENTIONS.md §5).

:func:`export_heatmap` writes any of: ``png`` (overlay on the thumbnail with a colour bar and the slide id),
``h5`` (raw scores, never rescaled, plus CLAM's ``attention_scores``), ``tiles`` (top-k / bottom-k tile
images and an index CSV) and ``geojson`` (QuPath detections with the score as a measurement).
:func:`scores_from_model` gets per-tile scores from any model returning ``attention`` or
``instance_logits``. The overlay canvas is at the visualisation resolution only (never level 0).
"""

from __future__ import annotations

import csv
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from needlework.io.geojson import tiles_to_geojson, write_geojson
from needlework.io.h5 import atomic_h5
from needlework.slides.reader import SlideReader, open_slide
from needlework.slides.status import save_png_atomic

FORMATS = ("png", "h5", "tiles", "geojson")


def normalise_scores(scores: np.ndarray, method: str = "percentile") -> np.ndarray:
    """Map scores ``(N,)`` to [0, 1]: ``"percentile"`` (rank, ties averaged; robust to outliers),
    ``"minmax"``, or ``"none"`` (clip to [0, 1])."""
    s = np.asarray(scores, dtype=np.float64).reshape(-1)
    if method == "percentile":
        from scipy.stats import rankdata

        return (rankdata(s) - 1) / max(len(s) - 1, 1)
    if method == "minmax":
        if len(s) == 0:
            return s
        lo, hi = s.min(), s.max()
        return (s - lo) / (hi - lo) if hi > lo else np.zeros_like(s)
    if method == "none":
        return np.clip(s, 0, 1)
    raise ValueError(f"normalisation must be 'percentile', 'minmax' or 'none', got {method!r}")


@torch.no_grad()
def scores_from_model(
    model: torch.nn.Module,
    bag: torch.Tensor,
    coords: torch.Tensor | None = None,
    class_index: int | None = None,
) -> tuple[np.ndarray, str]:
    """Per-tile scores ``(N,)`` of one bag ``(N, D)`` and their name.

    Uses ``attention`` ``(1, N)`` / ``(1, C, N)`` if the model returns it, else ``instance_logits``
    ``(1, N, C)`` as probabilities (softmax; column ``class_index``, default the last class).
    """
    from needlework.models.base import route_batch

    was_training = model.training
    model.eval()
    batch = {"bag": bag.unsqueeze(0).float(), "mask": torch.ones(1, bag.shape[0], dtype=torch.bool)}
    if coords is not None:
        batch["coords"] = coords.unsqueeze(0).long()
    try:
        out = model(**route_batch(model.forward, batch))
    finally:
        model.train(was_training)
    if out.get("attention") is not None:
        att = out["attention"][0].float()
        if att.dim() == 2:  # (C, N) multi-branch
            c = att.shape[0] - 1 if class_index is None else class_index
            return att[c].cpu().numpy(), f"attention_class_{c}"
        return att.cpu().numpy(), "attention"
    if out.get("instance_logits") is not None:
        probs = out["instance_logits"][0].float().softmax(-1)
        c = probs.shape[-1] - 1 if class_index is None else class_index
        return probs[:, c].cpu().numpy(), f"prob_class_{c}"
    raise ValueError("the model returns neither 'attention' nor 'instance_logits'; no per-tile scores")


def _colours(values01: np.ndarray, cmap: str) -> np.ndarray:
    import matplotlib

    return (matplotlib.colormaps[cmap](values01)[..., :3] * 255).round().astype(np.uint8)


def _overlay(
    slide: SlideReader,
    coords: np.ndarray,
    ps0: int,
    values01: np.ndarray,
    cmap: str,
    alpha: float,
    max_side: int,
    smooth_sigma: float,
) -> np.ndarray:
    thumb, (dx, dy) = slide.thumbnail_at_downsample(max(slide.dimensions) / max_side, max_side)
    h, w = thumb.shape[:2]
    total = np.zeros((h, w), np.float32)
    count = np.zeros((h, w), np.float32)
    for (x, y), v in zip(coords.tolist(), values01.tolist()):
        c0, c1 = int(x / dx), max(int(np.ceil((x + ps0) / dx)), int(x / dx) + 1)
        r0, r1 = int(y / dy), max(int(np.ceil((y + ps0) / dy)), int(y / dy) + 1)
        total[r0:r1, c0:c1] += v  # overlapping tiles are averaged
        count[r0:r1, c0:c1] += 1
    covered = count > 0
    if smooth_sigma > 0:
        from scipy.ndimage import gaussian_filter

        total, count = gaussian_filter(total, smooth_sigma), gaussian_filter(count, smooth_sigma)
    mean = np.where(count > 1e-6, total / np.maximum(count, 1e-6), 0.0)
    colour = _colours(mean, cmap)
    out = thumb.copy()
    out[covered] = ((1 - alpha) * thumb[covered] + alpha * colour[covered]).round().astype(np.uint8)
    return out


def _with_margin(image: np.ndarray, label: str, cmap: str) -> np.ndarray:
    from PIL import Image, ImageDraw

    h, w = image.shape[:2]
    margin = 40
    canvas = np.full((h + margin, max(w, 300), 3), 255, np.uint8)
    canvas[:h, :w] = image
    bar_w = min(256, canvas.shape[1] // 3)
    canvas[h + 8 : h + 20, 10 : 10 + bar_w] = _colours(np.linspace(0, 1, bar_w), cmap)[None]
    pil = Image.fromarray(canvas)
    draw = ImageDraw.Draw(pil)
    draw.text((10, h + 22), "low", fill=(0, 0, 0))
    draw.text((10 + bar_w - 24, h + 22), "high", fill=(0, 0, 0))
    draw.text((20 + bar_w, h + 8), label, fill=(0, 0, 0))
    return np.asarray(pil)


def export_heatmap(
    scores: Any,
    coords: Any,
    patch_size_level0: int,
    slide: str | Path | SlideReader,
    out_dir: str | Path,
    slide_id: str | None = None,
    formats: Iterable[str] = FORMATS,
    score_name: str = "attention",
    class_index: int = -1,
    normalisation: str = "percentile",
    cmap: str = "viridis",
    alpha: float = 0.4,
    max_side: int = 4096,
    smooth_sigma: float = 0.0,
    top_k: int = 10,
    bottom_k: int = 0,
    tile_size: int | None = None,
    geojson_top_k: int | None = None,
    geojson_min_score: float | None = None,
    attrs: dict[str, Any] | None = None,
) -> dict[str, Path]:
    """Write heatmap artefacts for one slide; returns ``{format: path}``.

    Args:
        scores: ``(N,)`` or ``(N, C)`` raw per-tile scores (the h5 keeps all columns; pictures use
            column ``class_index``).
        coords: ``(N, 2)`` level-0 top-left ``(x, y)``; ``patch_size_level0``: tile side in level-0 px.
        slide: path or open reader (for the thumbnail and tile images).
        tile_size: pixel size of exported tiles (default: ``attrs["patch_size"]`` or ``patch_size_level0``).
        geojson_top_k, geojson_min_score: keep the GeoJSON small.
        attrs: metadata copied into the h5 (``level0_magnification``, ``target_magnification``,
            ``mpp_level0``, ``model`` ...).
    """
    formats = set(formats)
    bad = formats - set(FORMATS)
    if bad:
        raise ValueError(f"unknown heatmap formats {sorted(bad)}; choose from {FORMATS}")
    raw = np.asarray(scores, dtype=np.float32)
    coords = np.asarray(coords, dtype=np.int64).reshape(-1, 2)
    if raw.shape[0] != len(coords) or raw.ndim not in (1, 2):
        raise ValueError(f"scores {raw.shape} must be (N,) or (N, C) with N = {len(coords)} coords")
    values = raw if raw.ndim == 1 else raw[:, class_index]
    opened = not isinstance(slide, SlideReader)
    reader = open_slide(slide) if opened else slide
    sid = slide_id or reader.slide_id
    out_dir = Path(out_dir)
    attrs = dict(attrs or {})
    written: dict[str, Path] = {}
    try:
        norm = normalise_scores(values, normalisation)
        if "h5" in formats:
            path = out_dir / f"{sid}_scores.h5"
            with atomic_h5(path) as f:
                f.create_dataset("coords", data=coords)
                ds = f.create_dataset("scores", data=raw)
                meta = {
                    **attrs,
                    "patch_size_level0": int(patch_size_level0),
                    "score_name": score_name,
                    "normalisation": normalisation,
                    "name": sid,
                }
                for k, v in meta.items():
                    if v is not None:
                        ds.attrs[k] = v
                if raw.ndim == 1:  # CLAM blockmap keys
                    f.create_dataset("attention_scores", data=raw.reshape(-1, 1))
            written["h5"] = path
        if "png" in formats:
            over = _overlay(reader, coords, int(patch_size_level0), norm, cmap, alpha, max_side, smooth_sigma)
            label = f"{sid}  {score_name} ({normalisation})"
            written["png"] = save_png_atomic(out_dir / f"{sid}_heatmap.png", _with_margin(over, label, cmap))
        if "tiles" in formats:
            size = int(tile_size or attrs.get("patch_size") or patch_size_level0)
            written["tiles"] = _export_tiles(
                reader,
                coords,
                values,
                int(patch_size_level0),
                size,
                out_dir / f"{sid}_tiles",
                top_k,
                bottom_k,
            )
        if "geojson" in formats:
            keep = np.arange(len(values))
            if geojson_min_score is not None:
                keep = keep[values[keep] >= geojson_min_score]
            if geojson_top_k is not None:
                keep = keep[np.argsort(-values[keep], kind="stable")[:geojson_top_k]]
            fc = tiles_to_geojson(
                coords[keep],
                patch_size_level0,
                {score_name: values[keep]},
                class_name=score_name,
                colors=_colours(norm[keep], cmap).tolist(),
            )
            written["geojson"] = write_geojson(out_dir / f"{sid}_heatmap.geojson", fc)
    finally:
        if opened:
            reader.close()
    return written


def _export_tiles(
    reader: SlideReader,
    coords: np.ndarray,
    values: np.ndarray,
    ps0: int,
    size: int,
    folder: Path,
    top_k: int,
    bottom_k: int,
) -> Path:
    order = np.argsort(-values, kind="stable")
    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    for which, idx in (("top", order[:top_k]), ("bottom", order[::-1][:bottom_k])):
        for rank, i in enumerate(idx.tolist()):
            x, y = coords[i].tolist()
            name = f"{rank:03d}_{values[i]:.4f}_x{x}_y{y}.png"
            sub = folder if which == "top" else folder / "bottom"
            save_png_atomic(sub / name, reader.read_region_at(x, y, ps0, ps0, size, size))
            rows.append([which, rank, float(values[i]), x, y, ps0])
    tmp = folder / f"index.csv.tmp{os.getpid()}"
    with tmp.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["set", "rank", "score", "x", "y", "patch_size_level0"])
        writer.writerows(rows)
    os.replace(tmp, folder / "index.csv")
    return folder
