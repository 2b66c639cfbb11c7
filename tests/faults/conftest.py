"""Fixtures of the fault tests: a small cohort and an uninterrupted reference run to compare against."""

from __future__ import annotations

import pytest

from faults.fault_helpers import N_SLIDES, tile_config
from needlework.slides.synthetic import make_synthetic_cohort


@pytest.fixture(scope="session")
def small_cohort(tmp_path_factory):
    """3 slides of 1536 × 1024 at 0.25 µm/px (one patient each)."""
    return make_synthetic_cohort(
        tmp_path_factory.mktemp("fault_cohort"),
        n_slides=N_SLIDES,
        width=1536,
        height=1024,
        seed=5,
        positive_fraction=0.5,
        slides_per_patient=1,
        n_lesions=1,
        lesion_radius=(24, 40),
        no_mpp_slides=0,
    )


@pytest.fixture(scope="session")
def reference(small_cohort, tmp_path_factory):
    """The cohort tiled and embedded without any fault, by the CLI in a child process like the runs it is
    compared with (features depend on the thread count in the last bits)."""
    from faults.fault_helpers import embed_args, run_cli, tile_args

    job_dir = tmp_path_factory.mktemp("fault_reference")
    for args in (
        tile_args(small_cohort["slides_dir"], job_dir),
        embed_args(small_cohort["slides_dir"], job_dir),
    ):
        out = run_cli(args)
        assert out.returncode == 0, out.stdout + out.stderr
    return tile_config(job_dir).tiling_dir
