"""Heatmaps of the pixel models (ATS, DPS, IPS on ``slide_images``): their attention over the slide as a
PNG overlay, an h5 of raw scores and QuPath GeoJSON, written by the feature-heatmap code
(:func:`~needlework.slides.heatmap_export.export_heatmap`).

The attention lives on the model's own grid: ATS's attention map over cells of ``x_low``, DPS's scores
over its candidate cells, IPS's final attention over the tissue patches it scanned. Each grid cell is
mapped to a level-0 tile through the batch's lazy ``x_high`` (exact, see
:func:`~needlework.slides.patch_reader.grid_to_level0`); cells of the zero padding outside the slide are
left out.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from needlework.slides.heatmap_export import FORMATS, export_heatmap
from needlework.slides.patch_reader import SlidePixels

__all__ = ["export_pixel_heatmap", "pixel_attention_tiles", "slide_pixel_batch"]


def pixel_attention_tiles(
    output: dict[str, Any], x_high: SlidePixels, index: int = 0, patch_size: int | None = None
) -> tuple[np.ndarray, np.ndarray, int]:
    """Scores ``(N,)``, level-0 top-left corners ``(N, 2)`` int64 and the level-0 tile side of slide
    ``index`` of a batch, from a model output.

    Uses ``attention_map`` ``(B, h_a, w_a)`` when present (ATS: one tile per cell of the map over the
    whole raster), else ``attention`` ``(B, N)`` over ``candidate_coords`` ``(N, 2)`` (DPS, IPS: tiles of
    ``patch_size`` raster pixels at the candidates' corners).
    """
    big_h, big_w = x_high.size
    dx, dy = x_high.downsamples[index]
    if output.get("attention_map") is not None:
        amap = output["attention_map"][index].detach().float().cpu()
        if amap.dim() != 2:
            raise ValueError(f"attention_map must be (B, h, w), got {tuple(output['attention_map'].shape)}")
        ha, wa = amap.shape
        rows, cols = torch.meshgrid(torch.arange(ha), torch.arange(wa), indexing="ij")
        corners = torch.stack([cols.flatten() * big_w / wa, rows.flatten() * big_h / ha], 1).double()
        scores = amap.flatten().numpy()
        side = (big_w / wa * dx + big_h / ha * dy) / 2
    elif output.get("candidate_coords") is not None and output.get("attention") is not None:
        if patch_size is None:
            raise ValueError(
                "patch_size is needed to draw tiles at candidate_coords (the model's patch_size)"
            )
        corners = output["candidate_coords"].detach().double().cpu()
        scores = output["attention"][index].detach().float().cpu().numpy()
        side = patch_size * (dx + dy) / 2
    else:
        raise KeyError("the output has neither attention_map nor attention over candidate_coords")
    level0 = np.asarray(corners.numpy() * np.array([dx, dy]))
    w0, h0 = x_high.readers[index].slide.dimensions
    inside = (level0[:, 0] < w0) & (level0[:, 1] < h0)  # drop cells of the padding
    return scores[inside], np.round(level0[inside]).astype(np.int64), max(1, round(side))


@torch.no_grad()
def export_pixel_heatmap(
    model: torch.nn.Module,
    batch: dict[str, Any],
    out_dir: str | Path,
    index: int = 0,
    formats: Iterable[str] = ("png", "h5", "geojson"),
    **kwargs: Any,
) -> dict[str, Path]:
    """Run ``model`` (eval mode) on a ``slide_pixels`` batch and write the heatmap of slide ``index``.

    ``kwargs`` go to :func:`~needlework.slides.heatmap_export.export_heatmap` (``normalisation``,
    ``cmap``, ``max_side``, ``geojson_top_k`` ...; ``attrs`` are added to the h5's). The h5 keeps
    ``mpp_level0``, ``low_mpp``, ``high_mpp`` and ``low_downsample`` beside the level-0 ``coords``.
    Returns ``{format: path}``.
    """
    from needlework.models.base import route_batch

    x_high = batch["x_high"]
    if not isinstance(x_high, SlidePixels):
        raise TypeError(
            "export_pixel_heatmap needs a batch of the slide_images dataset (x_high = SlidePixels)"
        )
    bad = set(formats) - set(FORMATS)
    if bad:
        raise ValueError(f"unknown heatmap formats {sorted(bad)}; choose from {FORMATS}")
    was_training = model.training
    model.eval()
    try:
        out = model(**route_batch(model.forward, batch))
    finally:
        model.train(was_training)
    patch = getattr(model, "patch_size", None)
    scores, coords, side = pixel_attention_tiles(
        out, x_high, index, patch if isinstance(patch, int) else None
    )
    reader = x_high.readers[index]
    mpp0 = float(reader.slide.mpp)
    attrs = {
        "model": type(model).__name__,
        "mpp_level0": mpp0,
        "high_downsample": float(np.mean(x_high.downsamples[index])),
        "high_mpp": mpp0 * float(np.mean(x_high.downsamples[index])),
    }
    if "low_downsample" in batch:  # x_low pixel (x, y) starts at level 0 (x·dx, y·dy)
        low = np.asarray(batch["low_downsample"][index], dtype=np.float64)
        attrs.update(low_downsample=low, low_mpp=mpp0 * float(low.mean()))
    attrs.update(kwargs.pop("attrs", None) or {})
    slide_id = batch["slide_id"][index] if "slide_id" in batch else None
    return export_heatmap(
        scores, coords, side, reader.slide, out_dir, slide_id=slide_id, formats=formats, attrs=attrs, **kwargs
    )


def slide_pixel_batch(
    path: str | Path,
    low_mpp: float,
    high_mpp: float,
    patch_size: int,
    mpp_override: float | None = None,
    max_low_side: int = 4096,
    tissue: dict[str, Any] | None = None,
    mask_low: bool = True,
    reader: str = "auto",
    num_threads: int = 1,
    slide_id: str | None = None,
) -> dict[str, Any]:
    """A batch of one slide, exactly as the ``slide_images`` dataset (same arguments) gives it to the
    model, without labels: ``x_low``, ``tissue``, ``x_high``, ``low_downsample``, ``slide_id``."""
    from needlework.slides.patch_reader import SlidePatchReader, cached_slide
    from needlework.slides.pixel_data import collate_slide_pixels, low_resolution_view, pixel_item
    from needlework.slides.reader import slide_id_of
    from needlework.slides.tissue import TissueParams

    if not 0 < high_mpp <= low_mpp:
        raise ValueError(f"need 0 < high_mpp <= low_mpp, got high_mpp={high_mpp}, low_mpp={low_mpp}")
    try:
        params = TissueParams(**(tissue or {}))
    except TypeError as exc:
        raise ValueError(f"bad tissue= {tissue!r}: {exc}") from None
    view = low_resolution_view(cached_slide(path, mpp_override, reader), low_mpp, max_low_side, params)
    patches = SlidePatchReader(path, mpp_override, reader, num_threads)
    item = pixel_item(view, patches, low_mpp / high_mpp, int(patch_size), mask_low)
    sid = slide_id or slide_id_of(Path(path))
    item.update(label=torch.tensor(-1), slide_id=sid, case_id=sid, index=0)
    return collate_slide_pixels([item])
