"""NaN/Inf features: refused before writing when embedding, and named when a bag is loaded; empty or
unreadable bags are reported when the dataset is built, not after the training epochs."""

from __future__ import annotations

import json

import h5py
import numpy as np
import pytest
import torch

from faults.fault_helpers import N_SLIDES, TILING, embed_config, tile_config
from needlework.data.bags import SlideBagDataset
from needlework.io.h5 import NonFiniteFeaturesError, check_finite
from needlework.slides import embed_job
from needlework.slides.embed_job import run_embedding
from needlework.slides.jobs import run_tiling


def test_an_encoder_that_emits_nan_fails_the_slide_and_writes_nothing(small_cohort, tmp_path, monkeypatch):
    slides = small_cohort["slides_dir"]
    run_tiling(slides, tile_config(tmp_path))
    real = embed_job._encoder

    class OneNaN(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, x):
            out = self.inner(x)
            out[0, 3] = float("nan")  # one value of one tile of every batch
            return out

    monkeypatch.setattr(embed_job, "_encoder", lambda cfg: OneNaN(real(cfg)))
    summary = run_embedding(slides, embed_config(tmp_path), skip_errors=True)
    assert summary["counts"]["failed"] == N_SLIDES
    error = summary["failures"][0]["error"]
    assert "slide_000" in error and "color_stats" in error and "NaN" in error
    fdir = tmp_path / TILING.dir_name() / "features_color_stats"
    assert not list(fdir.glob("*.h5")) and not list(fdir.glob("*.tmp*"))
    monkeypatch.setattr(embed_job, "_encoder", real)  # the encoder is fixed: the rerun completes
    assert run_embedding(slides, embed_config(tmp_path))["counts"]["done"] == N_SLIDES


def test_check_finite_counts_nan_and_inf_rows():
    feats = np.ones((10, 4), np.float32)
    check_finite(feats, "ok")  # no error
    feats[2, 1], feats[7, 0], feats[7, 3] = np.nan, np.inf, -np.inf
    with pytest.raises(
        NonFiniteFeaturesError, match=r"bag\.h5: features hold 1 NaN and 2 Inf .* 2 of 10 rows"
    ):
        check_finite(feats, "bag.h5")


def _bags(tmp_path, n=4, dim=6):
    feats_dir = tmp_path / "features"
    feats_dir.mkdir()
    rng = np.random.default_rng(0)
    rows = ["case_id,slide_id,label"]
    for i in range(n):
        with h5py.File(feats_dir / f"s{i}.h5", "w") as f:
            f["features"] = rng.normal(size=(5 + i, dim)).astype(np.float32)
            f["coords"] = np.arange(2 * (5 + i)).reshape(-1, 2)
        rows.append(f"p{i},s{i},{i % 2}")
    (tmp_path / "labels.csv").write_text("\n".join(rows) + "\n")
    return {"features_dir": str(feats_dir), "labels_csv": str(tmp_path / "labels.csv"), "split": "all"}


def test_a_nan_in_a_bag_is_an_error_naming_the_file(tmp_path):
    kw = _bags(tmp_path)
    with h5py.File(tmp_path / "features" / "s2.h5", "r+") as f:
        f["features"][3, 1] = np.nan
    ds = SlideBagDataset(**kw)
    assert torch.isfinite(ds[0]["bag"]).all()
    with pytest.raises(NonFiniteFeaturesError, match=r"s2\.h5: features hold 1 NaN"):
        ds[2]


def test_empty_and_unreadable_bags_fail_when_the_dataset_is_built(tmp_path):
    kw = _bags(tmp_path)
    with h5py.File(tmp_path / "features" / "s1.h5", "w") as f:
        f["features"] = np.zeros((0, 6), np.float32)
        f["coords"] = np.zeros((0, 2), np.int64)
    data = (tmp_path / "features" / "s3.h5").read_bytes()
    (tmp_path / "features" / "s3.h5").write_bytes(data[: len(data) // 2])  # truncated
    with pytest.raises(ValueError, match=r"2 bag\(s\).*s1\.h5: empty bag.*s3\.h5: unreadable") as err:
        SlideBagDataset(**kw)
    assert "remove them from the split" in str(err.value)


def test_the_status_file_says_why(small_cohort, tmp_path, monkeypatch):
    """The failed slide's status JSON holds the error, so `summary.md` and reruns show it."""
    slides = small_cohort["slides_dir"]
    run_tiling(slides, tile_config(tmp_path))
    real = embed_job._encoder

    class Overflow(torch.nn.Module):
        def forward(self, x):
            return x * np.inf

    monkeypatch.setattr(embed_job, "_encoder", lambda cfg: torch.nn.Sequential(real(cfg), Overflow()))
    run_embedding(slides, embed_config(tmp_path), skip_errors=True)
    state_dir = tmp_path / TILING.dir_name() / "wsi_states" / "embed_color_stats"
    state = json.loads((state_dir / "slide_001.json").read_text())
    assert state["status"] == "failed" and "Inf" in state["error"]
    assert "slide_001" in (state_dir / "summary.md").read_text()
