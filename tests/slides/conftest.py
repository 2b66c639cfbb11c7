"""Session fixtures for the slide tests: one small synthetic cohort, tiled and embedded once."""

from __future__ import annotations

import pytest
from slide_helpers import N_SLIDES, TILING, embed_config, tile_config

from needlework.slides.embed_job import run_embedding
from needlework.slides.jobs import run_tiling
from needlework.slides.synthetic import make_synthetic_cohort


@pytest.fixture(scope="session")
def cohort(tmp_path_factory):
    """4 slides (2 with lesions), one patient each; slide_003 has no resolution tags."""
    out = tmp_path_factory.mktemp("cohort")
    return make_synthetic_cohort(
        out,
        n_slides=N_SLIDES,
        width=2048,
        height=1536,
        seed=3,
        positive_fraction=0.5,
        slides_per_patient=1,
        n_lesions=2,
        lesion_radius=(24, 48),
        no_mpp_slides=1,
    )


@pytest.fixture(scope="session")
def job(cohort, tmp_path_factory):
    """The cohort tiled and embedded (color_stats) in one job folder, single process."""
    job_dir = tmp_path_factory.mktemp("job")
    tile_summary = run_tiling(cohort["slides_dir"], tile_config(job_dir), mpp_csv=cohort["mpp_csv"])
    embed_summary = run_embedding(cohort["slides_dir"], embed_config(job_dir))
    return {
        "dir": job_dir,
        "tiling_dir": job_dir / TILING.dir_name(),
        "tile": tile_summary,
        "embed": embed_summary,
    }
