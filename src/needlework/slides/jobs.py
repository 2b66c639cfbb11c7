"""The tiling job over a folder of slides (embedding: :mod:`~needlework.slides.embed_job`; the per-slide
status, skip-errors, busy-slide retries and Ray sharding both share: :mod:`~needlework.slides.stage_runner`).

Layout (TRIDENT-compatible, CONVENTIONS.md §3.1)::

    <job_dir>/<mag>x_<ps>px_<ov>px_overlap/
        patches/<slide_id>_patches.h5          coords (N, 2) int64 level-0 + attributes
        features_<encoder>/<slide_id>.h5       features (N, D) float32, coords (N, 2)
        thumbnails/, tissue_masks/, visualization/, contours_geojson/<slide_id>.geojson
        wsi_states/<stage>/<slide_id>.json     per-slide status; summary.json, summary.md

A slide whose final artefact exists and validates is skipped; artefacts are written under temporary
names and renamed, so an interrupted run never leaves a file that looks finished.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np

from needlework.io.h5 import (
    read_coords,
    validate_patches_h5,
    write_patches_h5,
)
from needlework.slides.locks import SlideLock
from needlework.slides.provenance import config_hash
from needlework.slides.reader import open_slide
from needlework.slides.stage_runner import (
    SlideTask,
    busy_record,
    failed_record,
    jsonable,
    make_tasks,
    patches_path,
    recorded_warnings,
    run_stage,
    skipped_files,
    status_record,
    take_over_note,
)
from needlework.slides.status import (
    save_png_atomic,
    write_json_atomic,
)
from needlework.slides.tiling import SEGMENTER, TilingConfig, tile_geometry, tile_slide, tiling_run_config
from needlework.slides.tissue import TissueParams, mask_to_geojson, qc_image


@dataclass
class TileJobConfig:
    """Tiling job over a folder of slides (``needlework slides tile``).

    Attributes:
        job_dir: output folder of the job (one ``<mag>x_<ps>px_<ov>px_overlap/`` folder per tiling).
        tiling: target resolution, tile size, overlap and minimum tissue fraction.
        tissue: tissue segmentation parameters.
        reader: slide reader (``auto``: OpenSlide, then tiffslide).
        tissue_geojson_dir: folder of ``<slide_id>.geojson`` tissue polygons that replace the
            segmentation (e.g. the ``contours_geojson`` of an earlier run, edited in QuPath).
        overwrite: redo slides that are already finished.
        progress: show progress bars.
        qc_max_side: longest side of the QC picture ``visualization/<slide_id>.png``.
    """

    job_dir: str
    tiling: TilingConfig = field(default_factory=TilingConfig)
    tissue: TissueParams = field(default_factory=TissueParams)
    reader: Literal["auto", "openslide", "tiffslide"] = "auto"
    tissue_geojson_dir: str | None = None
    overwrite: bool = False
    progress: bool = True
    qc_max_side: int = 1024

    @property
    def tiling_dir(self) -> Path:
        return Path(self.job_dir) / self.tiling.dir_name()


def _tile_hash(cfg: TileJobConfig) -> str:
    segmenter = "geojson" if cfg.tissue_geojson_dir else SEGMENTER
    return config_hash(tiling_run_config(cfg.tiling, cfg.tissue, segmenter))


def _resize_mask(mask: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    rows = (np.arange(shape[0]) * mask.shape[0] // shape[0]).clip(0, mask.shape[0] - 1)
    cols = (np.arange(shape[1]) * mask.shape[1] // shape[1]).clip(0, mask.shape[1] - 1)
    return mask[rows][:, cols]


def _tiled(cfg: TileJobConfig, out: Path, notes: list[str]) -> int | None:
    """Tile count when ``out`` is a complete patch file made with the current settings."""
    if cfg.overwrite or not validate_patches_h5(out):
        return None
    coords, attrs = read_coords(out)
    if attrs.get("config_hash") == _tile_hash(cfg):
        return len(coords)
    notes.append("redone: the existing patch file was made with other settings")
    return None


def _too_small(slide: Any, tiling: TilingConfig) -> str:
    """Why no tile fits in the slide (``""`` when one does): its level-0 size against the tile's."""
    ps0, _ = tile_geometry(slide.mpp, tiling)
    width, height = slide.dimensions
    if width >= ps0 and height >= ps0:
        return ""
    return (
        f"slide too small for one tile: {width} x {height} px at level 0, a tile is {ps0} x {ps0} px "
        f"at level 0 ({tiling.patch_size} px at {tiling.magnification:g}x); lower --tiling.patch_size "
        "or --tiling.target_magnification"
    )


def tile_one(task: SlideTask, cfg: TileJobConfig) -> dict[str, Any]:
    """Segment and tile one slide; returns its status dict (never raises for a bad slide)."""
    t0 = time.time()
    tdir = cfg.tiling_dir
    out = patches_path(tdir, task.slide_id)
    state_dir = tdir / "wsi_states" / "tile"
    notes: list[str] = []
    n_done = _tiled(cfg, out, notes)
    if n_done is not None:
        return status_record(task, "tile", "skipped", n_tiles=n_done)
    lock = SlideLock(state_dir / f"{task.slide_id}.lock")
    if not lock.acquire():
        return busy_record(task, "tile", lock)
    n_done = _tiled(cfg, out, [])  # another run may have finished it while we looked
    if n_done is not None:
        lock.release()
        return status_record(task, "tile", "skipped", n_tiles=n_done)
    notes += take_over_note(lock)
    try:
        try:
            with (
                recorded_warnings(notes),
                open_slide(task.slide_path, cfg.reader, task.mpp_override) as slide,
            ):
                geo = (
                    Path(cfg.tissue_geojson_dir) / f"{task.slide_id}.geojson"
                    if cfg.tissue_geojson_dir
                    else None
                )
                if geo is not None and not geo.is_file():
                    raise FileNotFoundError(f"tissue GeoJSON not found: {geo}")
                too_small = _too_small(slide, cfg.tiling)
                with warnings.catch_warnings():
                    if too_small:  # no tile fits: the segmentation's warnings would only mislead
                        warnings.simplefilter("ignore")
                    res = tile_slide(slide, cfg.tiling, cfg.tissue, tissue_mask=geo)
                # The QC picture is drawn on a larger thumbnail than the segmentation one.
                vis, vis_ds = slide.thumbnail_at_downsample(max(slide.dimensions) / cfg.qc_max_side)
            ps0 = res.patch_size_level0
            boxes = np.concatenate([res.coords, res.coords + ps0], axis=1)
            save_png_atomic(tdir / "thumbnails" / f"{task.slide_id}.png", res.thumb)
            save_png_atomic(tdir / "tissue_masks" / f"{task.slide_id}.png", res.mask.astype(np.uint8) * 255)
            save_png_atomic(
                tdir / "visualization" / f"{task.slide_id}.png",
                qc_image(vis, _resize_mask(res.mask, vis.shape[:2]), boxes, vis_ds),
            )
            from needlework.io.geojson import write_geojson

            write_geojson(
                tdir / "contours_geojson" / f"{task.slide_id}.geojson",
                mask_to_geojson(res.mask, res.downsample),
            )
            write_patches_h5(out, res.coords, res.attrs, {"tissue_fraction": res.tissue_fraction})
            n = len(res.coords)
            if too_small:
                warnings.warn(f"{task.slide_id}: {too_small}", stacklevel=1)
                notes.append(too_small)
            elif n == 0:
                warnings.warn(
                    f"{task.slide_id}: no tissue found (0 tiles); check "
                    f"{tdir / 'visualization' / (task.slide_id + '.png')} and the --tissue.* options",
                    stacklevel=1,
                )
                notes.append("no tissue found")
            status = status_record(
                task,
                "tile",
                "done" if n else "too_small" if too_small else "no_tissue",
                n_tiles=n,
                reader=res.attrs["reader"],
                mpp_level0=res.attrs["mpp_level0"],
                mpp_source=res.attrs["mpp_source"],
                patch_size_level0=ps0,
                tissue_area_mm2=res.attrs["tissue_area_mm2"],
                warnings=notes,
                seconds=round(time.time() - t0, 3),
            )
        except Exception as exc:  # reported per slide; the runner decides whether to stop
            status = failed_record(task, "tile", exc, t0)
        write_json_atomic(state_dir / f"{task.slide_id}.json", status)
        return status
    finally:
        lock.release()


def run_tiling(
    slides: str | Path | Sequence[str | Path],
    cfg: TileJobConfig,
    mpp_csv: str | Path | None = None,
    skip_errors: bool = False,
    ray_address: str | None = None,
    wait_busy_s: float = 0.0,
) -> dict[str, Any]:
    """Tile every slide of a folder (or list) into ``cfg.job_dir``; returns the run summary.

    Args:
        slides: folder of slides, or a list of slide files.
        cfg: the job (output folder, tiling, tissue segmentation).
        mpp_csv: per-slide MPP override CSV (columns ``wsi,mpp`` or ``slide_id,mpp``).
        skip_errors: continue past failing slides and list them at the end (default: stop at the first).
        ray_address: shard the slides over Ray (``local`` or a cluster address).
        wait_busy_s: wait up to this many seconds for slides that another run is processing (they are
            then skipped when that run finished them, or done here when it died).
    """
    tasks, unknown = make_tasks(slides, mpp_csv)
    state_dir = cfg.tiling_dir / "wsi_states" / "tile"
    write_json_atomic(cfg.tiling_dir / "config_tile.json", jsonable(cfg))
    return run_stage(
        "tile",
        tasks,
        tile_one,
        cfg,
        state_dir,
        skip_errors,
        ray_address,
        {"unknown_mpp_overrides": unknown, "skipped_files": skipped_files(slides)},
        wait_busy_s,
    )


__all__ = ["TileJobConfig", "run_tiling", "tile_one"]
