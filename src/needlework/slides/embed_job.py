"""The embed job: tiles of every slide → ``features_<encoder>/<slide_id>.h5`` (resumable, Ray-shardable).

Runs after :func:`needlework.slides.jobs.run_tiling` on the same job folder; a slide whose features file
exists, has one row per tile and was made from the current patch file with the same encoder settings is
skipped.
"""

from __future__ import annotations

import contextlib
import json
import time
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from needlework.errors import ConfigError, InputNotFoundError
from needlework.io.h5 import (
    check_finite,
    read_coords,
    validate_features_h5,
    validate_patches_h5,
    write_features_h5,
)
from needlework.slides.locks import SlideLock
from needlework.slides.provenance import config_hash
from needlework.slides.reader import open_slide
from needlework.slides.stage_runner import (
    SlideTask,
    busy_record,
    failed_record,
    features_dir_name,
    find_tiling_dir,
    make_tasks,
    patches_path,
    recorded_warnings,
    run_stage,
    skipped_files,
    status_record,
    take_over_note,
)
from needlework.slides.status import write_json_atomic


@dataclass
class EmbedJobConfig:
    """Embedding job over the tiles of a tiling run (``needlework slides embed``).

    Attributes:
        job_dir: job folder of the tiling run.
        tiling_dir_name: tiling folder under ``job_dir`` (like ``20x_256px_0px_overlap``); ``None`` = the
            only one there.
        encoder: registered name (``needlework list encoders``) or ``timm:NAME`` / ``torchvision:NAME`` /
            ``hf:REPO``.
        weights: local state-dict file for the encoder.
        random_weights: embed with random weights an encoder whose name means a trained model
            (``resnet50_trunc``, ``timm:...``) when no ``weights`` are given; without it such a run is
            refused. Recorded as a warning in every slide's status and the summary.
        encoder_kwargs: encoder arguments, e.g. ``{"pretrained": false}``.
        batch_size: tiles per forward pass.
        num_workers: DataLoader worker processes reading tiles (0 = in this process).
        precision: compute precision of the encoder.
        device: ``auto``, ``cpu``, ``cuda``, ``cuda:1`` ...
        tile_size: resize tiles to this side for the encoder (default: the tiling patch size, or the
            encoder's fixed input size).
        reader: slide reader (``auto``: OpenSlide, then tiffslide).
        num_threads: torch threads per process (default: torch's).
        overwrite: redo slides that are already finished.
        progress: show progress bars.
    """

    job_dir: str
    tiling_dir_name: str | None = None
    encoder: str = "resnet50_trunc"
    weights: str | None = None
    random_weights: bool = False
    encoder_kwargs: dict[str, Any] = field(default_factory=dict)
    batch_size: int = 64
    num_workers: int = 2
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    device: str = "auto"
    tile_size: int | None = None
    reader: Literal["auto", "openslide", "tiffslide"] = "auto"
    num_threads: int | None = None
    overwrite: bool = False
    progress: bool = True

    def __post_init__(self) -> None:
        if self.tiling_dir_name is None:
            self.tiling_dir_name = find_tiling_dir(self.job_dir)

    @property
    def tiling_dir(self) -> Path:
        return Path(self.job_dir) / self.tiling_dir_name

    @property
    def features_dir(self) -> Path:
        return self.tiling_dir / features_dir_name(self.encoder)


def _embed_hash(cfg: EmbedJobConfig) -> str:
    keys = ("encoder", "weights", "encoder_kwargs", "tile_size", "precision")
    return config_hash({k: getattr(cfg, k) for k in keys})


_ENCODERS: dict[str, Any] = {}


def _random_weights(cfg: EmbedJobConfig) -> bool:
    from needlework.models.encoder_loading import random_weights_of

    kw = cfg.encoder_kwargs
    return random_weights_of(cfg.encoder, cfg.weights, bool(kw.get("pretrained")), kw.get("local_ckpts"))


RANDOM_WEIGHTS_NOTE = "random weights: encoder {!r} was given no --weights; its features are not pretrained"


def check_encoder(cfg: EmbedJobConfig) -> None:
    """Configuration errors of the encoder, raised once before any slide is processed: a name that
    means a trained model without weights (unless ``random_weights``), an unknown or unbuildable encoder,
    a weights file that does not load."""
    if _random_weights(cfg) and not cfg.random_weights:
        raise ConfigError(
            f"encoder {cfg.encoder!r} has no weights: it would embed with random weights, not the pretrained "
            "features its name means. Pass --weights FILE (a local state dict; or list it in "
            "$NEEDLEWORK_LOCAL_CKPTS), or --random_weights true to embed with random weights anyway"
        )
    if cfg.weights and not Path(cfg.weights).is_file():
        raise InputNotFoundError(f"weights file not found: {cfg.weights} (--weights)")
    try:
        _encoder(cfg)
    except Exception as exc:  # the same for every slide: a configuration error, not a slide's
        message = exc.args[0] if isinstance(exc, KeyError) and exc.args else str(exc)
        raise ConfigError(f"encoder {cfg.encoder!r} cannot be built: {message}") from exc


def _encoder(cfg: EmbedJobConfig) -> Any:  # a torch.nn.Module (torch is imported when embedding)
    """Build the encoder once per process (Ray workers and repeated slides reuse it)."""
    key = json.dumps([cfg.encoder, cfg.weights, cfg.encoder_kwargs], sort_keys=True)
    if key not in _ENCODERS:
        from needlework.models.encoder_loading import build_tile_encoder

        _ENCODERS[key] = build_tile_encoder(cfg.encoder, cfg.weights, **cfg.encoder_kwargs)
    return _ENCODERS[key]


@contextlib.contextmanager
def _threads(n: int | None) -> Iterator[None]:
    if n is None:
        yield
        return
    import torch

    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def _finished(cfg: EmbedJobConfig, patches: Path, out: Path) -> int | None:
    """Tile count when ``out`` is a complete features file of the current patches and settings."""
    if cfg.overwrite or not validate_patches_h5(patches):
        return None
    pcoords, pattrs = read_coords(patches)
    n = len(pcoords)
    if n and validate_features_h5(out, n):
        fattrs = read_coords(out)[1]  # features files carry the patch attributes on their coords
        same = fattrs.get("config_hash") == pattrs.get("config_hash")
        if same and fattrs.get("embed_config_hash") == _embed_hash(cfg):
            return n
    return None


def _no_tiles(attrs: dict[str, Any]) -> tuple[str, str]:
    """Status and note of a slide without tiles: ``too_small`` when no tile fits in it (the tile stage
    said so too), else ``no_tissue``."""
    ps0 = int(attrs.get("patch_size_level0", 0))
    width, height = int(attrs.get("level0_width", ps0)), int(attrs.get("level0_height", ps0))
    if width < ps0 or height < ps0:
        return "too_small", f"slide too small for one tile: {width} x {height} px, a tile {ps0} px (level 0)"
    return "no_tissue", ""


def embed_one(task: SlideTask, cfg: EmbedJobConfig) -> dict[str, Any]:
    """Embed the tiles of one slide into ``features_<encoder>/<slide_id>.h5``; returns its status."""
    from needlework.slides.embed import embed_tiles

    t0 = time.time()
    patches = patches_path(cfg.tiling_dir, task.slide_id)
    out = cfg.features_dir / f"{task.slide_id}.h5"
    state_dir = cfg.tiling_dir / "wsi_states" / f"embed_{features_dir_name(cfg.encoder)[9:]}"
    n_done = _finished(cfg, patches, out)
    if n_done is not None:
        return status_record(task, "embed", "skipped", n_tiles=n_done)
    lock = SlideLock(state_dir / f"{task.slide_id}.lock")
    if not lock.acquire():
        return busy_record(task, "embed", lock)
    n_done = _finished(cfg, patches, out)  # another run may have finished it while we looked
    if n_done is not None:
        lock.release()
        return status_record(task, "embed", "skipped", n_tiles=n_done)
    notes = take_over_note(lock)
    try:
        try:
            if not patches.is_file():
                raise FileNotFoundError(f"no patch file {patches}; run `needlework slides tile` first")
            coords, attrs = read_coords(patches)
            if len(coords) == 0:
                kind, why = _no_tiles(attrs)
                notes += [why] if why else []
                status = status_record(
                    task, "embed", kind, n_tiles=0, warnings=notes, seconds=round(time.time() - t0, 3)
                )
            else:
                with recorded_warnings(notes), open_slide(task.slide_path, cfg.reader) as slide:
                    # Opened here (workers open their own) so that reader fallbacks reach the status.
                    backend = slide.backend
                if attrs.get("reader") and backend != attrs["reader"]:
                    notes.append(f"tiles were cut with {attrs['reader']} but are read with {backend}")
                encoder = _encoder(cfg)
                if cfg.random_weights and _random_weights(cfg):
                    notes.append(RANDOM_WEIGHTS_NOTE.format(cfg.encoder))
                fixed = getattr(encoder, "input_size", None) if task_fixed_input(encoder) else None
                tile_size = int(cfg.tile_size or fixed or attrs["patch_size"])
                from tqdm.auto import tqdm

                bar = tqdm(
                    total=len(coords),
                    desc=task.slide_id,
                    unit="tile",
                    leave=False,
                    disable=None if cfg.progress else True,
                )
                with _threads(cfg.num_threads), bar:
                    feats = embed_tiles(
                        task.slide_path,
                        coords,
                        int(attrs["patch_size_level0"]),
                        tile_size,
                        encoder,
                        cfg.batch_size,
                        cfg.num_workers,
                        cfg.precision,
                        cfg.device,
                        cfg.reader,
                        progress=bar,
                    )
                check_finite(feats, f"{task.slide_id}: encoder {cfg.encoder!r}")
                meta = {k: v for k, v in attrs.items() if k not in ("layout",)}
                meta.update(
                    encoder=cfg.encoder,
                    encoder_version=getattr(encoder, "version", ""),
                    embed_dim=int(feats.shape[1]),
                    tile_size=tile_size,
                    precision=cfg.precision,
                    embed_config_hash=_embed_hash(cfg),
                )
                write_features_h5(out, feats, coords, meta)
                status = status_record(
                    task,
                    "embed",
                    "done",
                    n_tiles=len(coords),
                    embed_dim=int(feats.shape[1]),
                    encoder=cfg.encoder,
                    reader=backend,
                    warnings=notes,
                    seconds=round(time.time() - t0, 3),
                )
        except Exception as exc:
            status = failed_record(task, "embed", exc, t0)
        write_json_atomic(state_dir / f"{task.slide_id}.json", status)
        return status
    finally:
        lock.release()


def task_fixed_input(encoder: Any) -> bool:
    """Encoders from timm / Hugging Face expect their training input size (ViTs); CNNs take any size."""
    return str(getattr(encoder, "name", "")).startswith(("timm:", "hf:"))


def run_embedding(
    slides: str | Path | Sequence[str | Path],
    cfg: EmbedJobConfig,
    skip_errors: bool = False,
    ray_address: str | None = None,
    wait_busy_s: float = 0.0,
) -> dict[str, Any]:
    """Embed the tiles of every slide (after :func:`run_tiling`); returns the run summary.

    Args:
        slides: folder of slides, or a list of slide files.
        cfg: the job (tiling folder, encoder, batching, device).
        skip_errors: continue past failing slides and list them at the end (default: stop at the first).
        ray_address: shard the slides over Ray (``local`` or a cluster address); GPU workers unless
            ``device`` is ``cpu``.
        wait_busy_s: wait up to this many seconds for slides that another run is processing.
    """
    tasks, _ = make_tasks(slides)
    check_encoder(cfg)  # before any slide: an encoder error is the run's, not each slide's
    if cfg.random_weights and _random_weights(cfg):
        warnings.warn(RANDOM_WEIGHTS_NOTE.format(cfg.encoder), stacklevel=2)
    state_dir = cfg.tiling_dir / "wsi_states" / f"embed_{features_dir_name(cfg.encoder)[9:]}"
    extra = {"skipped_files": skipped_files(slides)}
    return run_stage("embed", tasks, embed_one, cfg, state_dir, skip_errors, ray_address, extra, wait_busy_s)
