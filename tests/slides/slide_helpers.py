"""Shared settings of the slide tests (imported by conftest.py and the test modules)."""

from __future__ import annotations

from needlework.slides.embed_job import EmbedJobConfig
from needlework.slides.jobs import TileJobConfig
from needlework.slides.tiling import TilingConfig
from needlework.slides.tissue import TissueParams

# 2048 × 1536 at 0.25 µm/px (40×); tiles of 128 px at 20× = 256 level-0 px.
N_SLIDES = 4
TILING = TilingConfig(target_magnification=20, patch_size=128, overlap=0, min_tissue_fraction=0.25)


def tile_config(job_dir, **kw) -> TileJobConfig:
    return TileJobConfig(str(job_dir), TILING, TissueParams(), progress=False, qc_max_side=256, **kw)


def embed_config(job_dir, **kw) -> EmbedJobConfig:
    kw.setdefault("encoder", "color_stats")
    kw.setdefault("num_workers", 0)
    return EmbedJobConfig(str(job_dir), TILING.dir_name(), batch_size=16, device="cpu", progress=False, **kw)


def artefacts(tiling_dir) -> dict[str, bytes]:
    """Every output file of a job (not status/summary/config files, which hold timings and paths)."""
    return {
        str(p.relative_to(tiling_dir)): p.read_bytes()
        for p in sorted(tiling_dir.rglob("*"))
        if p.is_file() and "wsi_states" not in p.parts and not p.name.startswith("config_")
    }
