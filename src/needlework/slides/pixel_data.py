"""Whole-slide images as multi-resolution inputs for ATS, DPS and IPS (registered as ``"slide_images"``).

Each item is one slide: ``x_low`` ``(3, h, w)`` uint8, the slide at ``low_mpp`` µm/px read from the nearest
pyramid level (never coarser) and area-resized, multiplied by its tissue mask (the attention / scoring
network sees tissue only; it converts the view to float tile by tile, so the view costs 3 bytes a pixel);
``tissue`` ``(1, h, w)`` uint8 the mask (:func:`~needlework.slides.tissue.segment_tissue`
at that resolution); and ``x_high``, a :class:`~needlework.slides.patch_reader.SlidePixels` — the slide at
``high_mpp`` as a lazy image that the models cut patches from. Nothing larger than ``x_low`` is ever held
in memory, so the cost of an item grows with the low-resolution view only.

Batch items with the ``"slide_pixels"`` collate: ``x_low``/``tissue`` are zero-padded to the largest in the
batch and the lazy ``x_high`` follows the padded canvas (outside a slide, pixels are 0).

Example (YAML, with a cohort from ``needlework slides synth`` and folds from ``needlework slides splits``)::

    data:
      class_path: needlework.training.DatasetDataModule
      init_args:
        dataset: slide_images
        dataset_kwargs: {slides_dir: cohort/slides, labels_csv: cohort/labels.csv, splits_dir: splits,
                         fold: 0, low_mpp: 8.0, high_mpp: 0.5, patch_size: 64,
                         mpp_csv: cohort/mpp_overrides.csv}
        collate: slide_pixels
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import cv2
import numpy as np
import torch
from torch.utils.data import Dataset

from needlework.data.splits import SPLITS, build_label_map, read_label_csv, select_split
from needlework.registry import register_collate, register_dataset
from needlework.slides.mpp import load_mpp_overrides, override_for
from needlework.slides.patch_reader import SlidePatchReader, SlidePixels, cached_slide
from needlework.slides.reader import SlideReader, list_slides, slide_id_of
from needlework.slides.tissue import TissueParams, segment_tissue

__all__ = [
    "SEGMENT_MAX_SIDE",
    "LowView",
    "SlideImageDataset",
    "collate_slide_pixels",
    "low_resolution_view",
    "pixel_canvas",
    "pixel_item",
    "tissue_at_most",
]


@dataclass
class LowView:
    """A slide at low resolution: ``image`` RGB uint8 ``(h, w, 3)``, ``tissue`` bool ``(h, w)``,
    ``downsample`` ``(dx, dy)`` level-0 pixels per pixel (exact, see
    :func:`~needlework.slides.patch_reader.grid_to_level0`) and ``mpp`` its µm/px."""

    image: np.ndarray
    tissue: np.ndarray
    downsample: tuple[float, float]
    mpp: float


#: longest side of the image the tissue is segmented on: a larger view is area-downsampled by a whole
#: factor first and the mask is scaled back up (nearest), so the segmentation's memory stays flat in the
#: slide's size (it needed 76 MB on a 3,125² view, about 2.5× the view itself); thumbnails of this size
#: are what tissue segmenters (CLAM's among them) usually work on.
SEGMENT_MAX_SIDE = 2048


def low_resolution_view(
    slide: SlideReader,
    low_mpp: float,
    max_side: int = 4096,
    tissue: TissueParams | None = None,
    segment_max_side: int = SEGMENT_MAX_SIDE,
) -> LowView:
    """``slide`` at ``low_mpp`` µm/px (longest side at most ``max_side``) with its tissue mask.

    Reads the pyramid level with the largest downsample not above the requested one, in blocks when
    that level is large, and area-resizes (OpenCV ``INTER_AREA``). The mask is segmented on the view, or
    on the view area-downsampled by the smallest whole factor that brings it to ``segment_max_side`` px.
    """
    if low_mpp <= 0:
        raise ValueError(f"low_mpp must be positive, got {low_mpp}")
    if segment_max_side < 1:
        raise ValueError(f"segment_max_side must be >= 1 px, got {segment_max_side}")
    image, (dx, dy) = slide.thumbnail_at_mpp(low_mpp, max_side, resize="area")
    mpp = slide.mpp * (dx + dy) / 2
    return LowView(image, tissue_at_most(image, mpp, tissue, segment_max_side), (dx, dy), mpp)


def tissue_at_most(
    image: np.ndarray, mpp: float, params: TissueParams | None, max_side: int
) -> np.ndarray:
    """Tissue mask ``(h, w)`` bool of ``image`` ``(h, w, 3)`` uint8, segmented at most ``max_side`` px
    wide (see :data:`SEGMENT_MAX_SIDE`)."""
    h, w = image.shape[:2]
    factor = math.ceil(max(h, w) / max_side)
    if factor <= 1:
        return segment_tissue(image, mpp, params)
    sh, sw = math.ceil(h / factor), math.ceil(w / factor)
    small = cv2.resize(image, (sw, sh), interpolation=cv2.INTER_AREA)
    mask = segment_tissue(small, mpp * (h / sh + w / sw) / 2, params)
    del small
    mask = np.ascontiguousarray(mask, dtype=bool)
    return cv2.resize(mask.view(np.uint8), (w, h), interpolation=cv2.INTER_NEAREST).view(bool)


@register_dataset("slide_images")
class SlideImageDataset(Dataset):
    """Slides as ``x_low`` + tissue mask + lazy ``x_high`` for pixel-level patch selection.

    Args:
        split: ``"train"``, ``"val"``, ``"test"`` (slides of that column of the split file) or ``"all"``.
        slides_dir: folder of slide files (``<slide_id>.<ext>``).
        labels_csv: ``case_id, slide_id, label`` (column names configurable).
        splits_dir, fold: CLAM-style ``splits_<fold>.csv`` from ``needlework slides splits``
            (or ``split_file`` directly).
        low_mpp: µm/px of ``x_low`` (e.g. 8 = 1.25×).
        high_mpp: µm/px of the patches (0.5 = 20×, 0.25 = 40×).
        patch_size: side of the models' patches in ``x_high`` pixels; the canvas is padded so that the
            patch grid covers the whole slide.
        mpp_csv: per-slide level-0 µm/px overrides (``wsi, mpp``) for files without resolution tags.
        max_low_side: cap on the longest side of ``x_low`` (a coarser view for huge slides).
        tissue: :class:`~needlework.slides.tissue.TissueParams` fields (e.g. ``{"min_area_um2": 0}``).
        mask_low: multiply ``x_low`` by the tissue mask.
        low_image: put ``x_low`` in the items; ``False`` for a model that reads only the tissue mask and
            ``x_high`` (IPS), which saves the view's memory (29 MB for a 100,000² slide at 8 µm/px).
        reader: ``"auto"``, ``"openslide"`` or ``"tiffslide"``.
        num_threads: threads reading the patches of one call.
        label_map, size, case_column, slide_column, label_column: as ``slide_bags``.
        cache: keep each slide's low view in memory (per process) after the first read.
    """

    def __init__(
        self,
        split: str = "train",
        slides_dir: str = "",
        labels_csv: str = "",
        splits_dir: str | None = None,
        fold: int = 0,
        low_mpp: float = 8.0,
        high_mpp: float = 0.5,
        patch_size: int = 64,
        mpp_csv: str | None = None,
        split_file: str | None = None,
        max_low_side: int = 4096,
        tissue: dict[str, Any] | None = None,
        mask_low: bool = True,
        low_image: bool = True,
        reader: str = "auto",
        num_threads: int = 1,
        label_map: dict[str, int] | None = None,
        size: int | None = None,
        cache: bool = True,
        case_column: str = "case_id",
        slide_column: str = "slide_id",
        label_column: str = "label",
    ) -> None:
        if split not in (*SPLITS, "all"):
            raise ValueError(f"split must be one of {(*SPLITS, 'all')}, got {split!r}")
        if not slides_dir or not labels_csv:
            raise ValueError("slide_images needs slides_dir= (folder of slide files) and labels_csv=")
        if not 0 < high_mpp <= low_mpp:
            raise ValueError(f"need 0 < high_mpp <= low_mpp, got high_mpp={high_mpp}, low_mpp={low_mpp}")
        if patch_size < 1:
            raise ValueError(f"patch_size must be >= 1, got {patch_size}")
        self.low_mpp, self.high_mpp, self.patch_size = float(low_mpp), float(high_mpp), int(patch_size)
        self.ratio = self.low_mpp / self.high_mpp
        self.max_low_side, self.mask_low, self.reader, self.num_threads = (
            max_low_side,
            mask_low,
            reader,
            num_threads,
        )
        self.low_image = bool(low_image)
        try:
            self.tissue = TissueParams(**(tissue or {}))
        except TypeError as exc:
            raise ValueError(f"slide_images: bad tissue= {tissue!r}: {exc}") from None
        files = {slide_id_of(p): p for p in list_slides(slides_dir)}
        overrides = load_mpp_overrides(mpp_csv) if mpp_csv else {}
        rows = read_label_csv(labels_csv, case_column, slide_column, label_column)
        self.label_map = build_label_map([r["label"] for r in rows], label_map)
        rows = select_split(rows, split, split_file, splits_dir, fold, labels_csv)
        missing = [r["slide_id"] for r in rows if r["slide_id"] not in files]
        if missing:
            raise FileNotFoundError(
                f"{len(missing)} slide(s) of split {split!r} have no file in {slides_dir}: {missing[:10]}"
            )
        self.items = [
            {
                **r,
                "path": files[r["slide_id"]],
                "mpp_override": override_for(overrides, files[r["slide_id"]].name, r["slide_id"]),
                "y": self.label_map[str(r["label"])],
            }
            for r in rows
        ][:size]
        self._cache: dict[int, LowView] | None = {} if cache else None

    def __len__(self) -> int:
        return len(self.items)

    @property
    def labels(self) -> list[int]:
        return [it["y"] for it in self.items]

    def __getstate__(self) -> dict[str, Any]:
        # workers fill their own caches; never ship the parent's arrays
        return {**self.__dict__, "_cache": {} if self._cache is not None else None}

    def low_view(self, i: int) -> LowView:
        """The low-resolution view of slide ``i`` (cached per process when ``cache``)."""
        if self._cache is not None and i in self._cache:
            return self._cache[i]
        it = self.items[i]
        view = low_resolution_view(
            cached_slide(it["path"], it["mpp_override"], self.reader),
            self.low_mpp,
            self.max_low_side,
            self.tissue,
        )
        if self._cache is not None:
            self._cache[i] = view
        return view

    def __getitem__(self, i: int) -> dict[str, Any]:
        it = self.items[i]
        reader = SlidePatchReader(it["path"], it["mpp_override"], self.reader, self.num_threads)
        return {
            **pixel_item(
                self.low_view(i), reader, self.ratio, self.patch_size, self.mask_low, self.low_image
            ),
            "label": torch.tensor(it["y"], dtype=torch.int64),
            "slide_id": it["slide_id"],
            "case_id": it["case_id"],
            "index": i,
        }


def pixel_canvas(h: int, w: int, patch_size: int, ratio: float) -> tuple[int, int]:
    """Low canvas ≥ ``(h, w)`` whose high raster (``ratio`` times finer) holds whole patches of
    ``patch_size`` over all of the slide."""
    p, r = patch_size, ratio
    return tuple(  # type: ignore[return-value]
        max(n, math.ceil(math.ceil(n * r / p) * p / r - 1e-9)) for n in (h, w)
    )


def pixel_item(
    view: LowView,
    reader: SlidePatchReader,
    ratio: float,
    patch_size: int,
    mask_low: bool = True,
    low_image: bool = True,
) -> dict[str, Any]:
    """The model inputs of one slide (no label): ``x_low`` ``(3, h, w)`` uint8 (masked to tissue when
    ``mask_low``; absent unless ``low_image``) and ``tissue`` ``(1, h, w)`` uint8 (0 / 1) on the padded
    canvas of :func:`pixel_canvas`, the lazy ``x_high`` and ``low_downsample`` ``(2,)`` float64. Used by the
    dataset and by the pixel heatmaps, so both see a slide identically. The view stays uint8 (no float
    copy of it is ever made here): at 100,000² px and 8 µm/px that is 29 MB instead of 117 MB a copy."""
    h, w = view.tissue.shape
    ch, cw = pixel_canvas(h, w, patch_size, ratio)
    tissue = torch.zeros(1, ch, cw, dtype=torch.uint8)
    mask = torch.from_numpy(np.ascontiguousarray(view.tissue, dtype=bool))
    tissue[0, :h, :w] = mask
    item: dict[str, Any] = {
        "tissue": tissue,
        "x_high": SlidePixels.from_low([reader], [view.downsample], (ch, cw), ratio),
        "low_downsample": torch.tensor(view.downsample, dtype=torch.float64),
    }
    if low_image:
        low = torch.zeros(3, ch, cw, dtype=torch.uint8)
        low[:, :h, :w] = torch.from_numpy(view.image).permute(2, 0, 1)
        if mask_low:
            low[:, :h, :w].mul_(mask)
        item["x_low"] = low
    return item


@register_collate("slide_pixels")
def collate_slide_pixels(samples: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Batch ``slide_images`` items: ``x_low`` ``(B, 3, h, w)`` and ``tissue`` ``(B, 1, h, w)`` zero-padded
    to the largest, ``x_high`` one :class:`SlidePixels` on the padded canvas, ``label`` ``(B,)``,
    ``low_downsample`` ``(B, 2)``, ``index`` ``(B,)``, ``slide_id``/``case_id`` lists."""
    if not samples:
        raise ValueError("slide_pixels needs at least one sample")
    h = max(s["tissue"].shape[1] for s in samples)
    w = max(s["tissue"].shape[2] for s in samples)
    keys = [k for k in ("x_low", "tissue") if k in samples[0]]  # x_low is absent with low_image=False
    if len(samples) == 1:  # one slide (the usual batch): views, no second copy of the low view
        views = {k: samples[0][k][None] for k in keys}
    else:
        views = {k: torch.zeros(len(samples), samples[0][k].shape[0], h, w, dtype=samples[0][k].dtype)
                 for k in keys}  # fmt: skip
        for b, s in enumerate(samples):
            _, sh, sw = s["tissue"].shape
            for k in keys:
                views[k][b, :, :sh, :sw] = s[k]
    return {
        **views,
        "x_high": SlidePixels.cat([s["x_high"] for s in samples], (h, w)),
        "low_downsample": torch.stack([s["low_downsample"] for s in samples]),
        "label": torch.stack([torch.as_tensor(s["label"]) for s in samples]),
        "index": torch.tensor([int(s["index"]) for s in samples]),
        "slide_id": [s["slide_id"] for s in samples],
        "case_id": [s["case_id"] for s in samples],
    }
