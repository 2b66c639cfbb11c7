"""Jobs over a folder of slides (tiling here, embedding in :mod:`~needlework.slides.embed_job`): resumable,
per-slide status, skip-errors, Ray sharding.

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

import contextlib
import json
import re
import time
import traceback
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np

from needlework.errors import ConfigError, InputNotFoundError
from needlework.io.h5 import (
    read_coords,
    validate_patches_h5,
    write_patches_h5,
)
from needlework.slides.locks import SlideLock, describe_owner
from needlework.slides.mpp import load_mpp_overrides, override_for, unknown_overrides
from needlework.slides.provenance import config_hash
from needlework.slides.reader import open_slide, slide_id_of
from needlework.slides.scan import scan_slides
from needlework.slides.status import (
    format_summary,
    save_png_atomic,
    summarise,
    summary_markdown,
    write_json_atomic,
    write_text_atomic,
)
from needlework.slides.tiling import SEGMENTER, TilingConfig, tile_geometry, tile_slide, tiling_run_config
from needlework.slides.tissue import TissueParams, mask_to_geojson, qc_image


class SlideJobError(RuntimeError):
    """A slide failed and ``skip_errors`` was off."""


@dataclass
class SlideTask:
    """One slide to process (picklable; sent to Ray workers)."""

    slide_path: str
    slide_id: str
    mpp_override: float | None = None


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


def features_dir_name(encoder: str) -> str:
    """``features_<encoder>`` with characters unsafe in file names replaced by ``-``."""
    return "features_" + re.sub(r"[^A-Za-z0-9._-]+", "-", encoder).strip("-")


def patches_path(tiling_dir: Path, slide_id: str) -> Path:
    return tiling_dir / "patches" / f"{slide_id}_patches.h5"


def make_tasks(
    slides: str | Path | Sequence[str | Path], mpp_csv: str | Path | None = None
) -> tuple[list[SlideTask], list[str]]:
    """Tasks for a slide folder (or list of files) and the MPP-override entries that match no slide."""
    skipped: list[dict[str, str]] = []
    if isinstance(slides, (str, Path)):
        paths, skipped = scan_slides(slides)
    else:
        paths = [Path(p) for p in slides]
    for f in skipped:
        warnings.warn(f"not read: {f['path']}: {f['reason']}", stacklevel=2)
    if not paths:
        listed = "".join(f"\n  {f['path']}: {f['reason']}" for f in skipped)
        raise InputNotFoundError(f"no slides found in {slides}{listed}")
    ids = [slide_id_of(p) for p in paths]
    dup = sorted({i for i in ids if ids.count(i) > 1})
    if dup:
        raise ConfigError(
            f"several slides share the id(s) {dup}; slide ids (file names without extension) must be unique"
        )
    overrides = load_mpp_overrides(mpp_csv) if mpp_csv else {}
    unknown = unknown_overrides(overrides, [p.name for p in paths], ids)
    if unknown:
        warnings.warn(f"MPP override CSV lists slides that are not in the folder: {unknown}", stacklevel=2)
    tasks = [SlideTask(str(p), i, override_for(overrides, p.name, i)) for p, i in zip(paths, ids)]
    return tasks, unknown


def _status(task: SlideTask, stage: str, status: str, **kw: Any) -> dict[str, Any]:
    return {"slide_id": task.slide_id, "slide_path": task.slide_path, "stage": stage, "status": status, **kw}


def _busy(task: SlideTask, stage: str, lock: SlideLock) -> dict[str, Any]:
    return _status(task, stage, "busy", error=f"locked by {lock.owner()} ({lock.path})", lock=str(lock.path))


def _take_over_note(lock: SlideLock) -> list[str]:
    """A status warning when the slide's lock was left by a dead run (its partial work is redone)."""
    if lock.taken_over is None:
        return []
    return [f"took over the lock left by {describe_owner(lock.taken_over)}, which is no longer running"]


def _failed(task: SlideTask, stage: str, exc: BaseException, t0: float) -> dict[str, Any]:
    tail = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__)[-3:])
    return _status(
        task,
        stage,
        "failed",
        error=f"{type(exc).__name__}: {exc}",
        traceback=tail[-2000:],
        seconds=round(time.time() - t0, 3),
    )


@contextlib.contextmanager
def _recorded_warnings(sink: list[str]) -> Iterator[None]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        yield
    for w in caught:
        sink.append(str(w.message))
        warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)


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
        return _status(task, "tile", "skipped", n_tiles=n_done)
    lock = SlideLock(state_dir / f"{task.slide_id}.lock")
    if not lock.acquire():
        return _busy(task, "tile", lock)
    n_done = _tiled(cfg, out, [])  # another run may have finished it while we looked
    if n_done is not None:
        lock.release()
        return _status(task, "tile", "skipped", n_tiles=n_done)
    notes += _take_over_note(lock)
    try:
        try:
            with (
                _recorded_warnings(notes),
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
            status = _status(
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
            status = _failed(task, "tile", exc, t0)
        write_json_atomic(state_dir / f"{task.slide_id}.json", status)
        return status
    finally:
        lock.release()


def run_stage(
    stage: str,
    tasks: list[SlideTask],
    fn: Callable[[SlideTask, Any], dict[str, Any]],
    cfg: Any,
    state_dir: Path,
    skip_errors: bool = False,
    ray_address: str | None = None,
    extra: dict[str, Any] | None = None,
    wait_busy_s: float = 0.0,
) -> dict[str, Any]:
    """Run ``fn`` over ``tasks`` locally or on Ray; write and return the run summary.

    Without ``skip_errors`` the first failing slide stops the run with :class:`SlideJobError`
    (on Ray: after the slides in flight finish); finished slides are skipped on the next run.
    Slides locked by another live worker ("busy") are tried again at the end of the pass, for up to
    ``wait_busy_s`` seconds; those still busy are listed in the summary (the CLI then exits non-zero).
    """
    statuses: list[dict[str, Any]] = []
    failure: dict[str, Any] | None = None
    if ray_address:
        from needlework.slides.ray_runner import run_on_ray

        want_gpu = stage == "embed" and getattr(cfg, "device", "cpu") != "cpu"
        statuses = run_on_ray(tasks, fn, cfg, ray_address, want_gpu, skip_errors, cfg.progress)
        failure = next((s for s in statuses if s["status"] == "failed"), None)
    else:
        from tqdm.auto import tqdm

        with tqdm(total=len(tasks), desc=stage, unit="slide", disable=None if cfg.progress else True) as bar:
            for task in tasks:
                status = fn(task, cfg)
                statuses.append(status)
                bar.update(1)
                bar.set_postfix_str(f"{task.slide_id}: {status['status']}")
                if status["status"] == "failed" and not skip_errors:
                    failure = status
                    break
        if failure is None:
            statuses = _retry_busy(tasks, statuses, fn, cfg, wait_busy_s)
            failure = next((s for s in statuses if s["status"] == "failed" and not skip_errors), None)
    summary = summarise(statuses, stage, {"config": _jsonable(cfg), **(extra or {})})
    write_json_atomic(state_dir / "summary.json", summary)
    write_text_atomic(state_dir / "summary.md", summary_markdown(summary))
    if failure is not None and not skip_errors:
        raise SlideJobError(
            f"{stage} failed on slide {failure['slide_id']} ({failure['slide_path']}): {failure['error']}\n"
            "Fix or remove that slide, or rerun with --skip_errors true to continue past failing slides "
            "(finished slides are skipped on the next run)."
        )
    return summary


def _skipped_files(slides: str | Path | Sequence[str | Path]) -> list[dict[str, str]]:
    """Files of a slide folder that are not read, with the reason (listed in the summary)."""
    return scan_slides(slides)[1] if isinstance(slides, (str, Path)) else []


def _retry_busy(
    tasks: list[SlideTask],
    statuses: list[dict[str, Any]],
    fn: Callable[[SlideTask, Any], dict[str, Any]],
    cfg: Any,
    wait_s: float,
) -> list[dict[str, Any]]:
    """Try busy slides again (their owner may have finished, or died) until none is busy or ``wait_s``
    seconds have passed; at least once."""
    by_id = {t.slide_id: t for t in tasks}
    deadline = time.time() + max(0.0, wait_s)
    while True:
        busy = [i for i, s in enumerate(statuses) if s["status"] == "busy"]
        if not busy:
            return statuses
        for i in busy:
            statuses[i] = fn(by_id[statuses[i]["slide_id"]], cfg)
        if time.time() >= deadline or not any(s["status"] == "busy" for s in statuses):
            return statuses
        time.sleep(min(1.0, max(0.0, deadline - time.time())))


def _jsonable(cfg: Any) -> Any:
    return json.loads(json.dumps(asdict(cfg), default=str))


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
    write_json_atomic(cfg.tiling_dir / "config_tile.json", _jsonable(cfg))
    return run_stage(
        "tile",
        tasks,
        tile_one,
        cfg,
        state_dir,
        skip_errors,
        ray_address,
        {"unknown_mpp_overrides": unknown, "skipped_files": _skipped_files(slides)},
        wait_busy_s,
    )


def find_tiling_dir(job_dir: str | Path) -> str:
    """The single tiling folder of ``job_dir`` (error listing them when there are several or none)."""
    found = sorted(p.name for p in Path(job_dir).glob("*x_*px_*px_overlap") if (p / "patches").is_dir())
    if len(found) != 1:
        raise InputNotFoundError(
            f"{job_dir}: expected one tiling folder (like 20x_256px_0px_overlap/patches), "
            f"found {found or 'none'}; "
            "run `needlework slides tile` first or pass --tiling_dir_name NAME"
        )
    return found[0]


__all__ = [
    "SlideJobError",
    "SlideTask",
    "TileJobConfig",
    "features_dir_name",
    "find_tiling_dir",
    "format_summary",
    "make_tasks",
    "run_stage",
    "run_tiling",
    "tile_one",
]
