"""ZoomMIL's higher magnifications read through SlidePatchReader and embedded on the fly
(``slide_bags_multimag_pixels``): the same features as the precomputed ones, the same model output."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import needlework
from needlework.data.level_collate import pad_bag_levels
from needlework.slides.zoom_tiles import pad_bag_levels_tiles

pytest.importorskip("tifffile")

MAGS = (10, 20, 40)


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    """synth → tile at 10×/20×/40× → embed every level with color_stats."""
    from needlework.slides.embed_job import EmbedJobConfig, run_embedding
    from needlework.slides.jobs import TileJobConfig, run_tiling
    from needlework.slides.synthetic import make_synthetic_cohort
    from needlework.slides.tiling import TilingConfig
    from needlework.slides.tissue import TissueParams

    root = tmp_path_factory.mktemp("zoom_tiles")
    info = make_synthetic_cohort(root / "cohort", n_slides=2, width=256, height=192, seed=1,
                                 slides_per_patient=1, n_lesions=1, lesion_radius=(10, 20),
                                 no_mpp_slides=0)  # fmt: skip
    tissue = TissueParams(seg_mpp=0.5, median_um=2, close_um=2, open_um=1, min_area_um2=10)
    dirs = []
    for mag in MAGS:
        tiling = TilingConfig(target_magnification=mag, patch_size=16)
        job = TileJobConfig(str(root / "job"), tiling, tissue, progress=False, qc_max_side=64)
        run_tiling(info["slides_dir"], job)
        run_embedding(info["slides_dir"], EmbedJobConfig(str(root / "job"), tiling.dir_name(),
                                                         encoder="color_stats", device="cpu",
                                                         num_workers=0, progress=False))  # fmt: skip
        dirs.append(str(root / "job" / tiling.dir_name() / "features_color_stats"))
    info["dirs"] = dirs
    return info


def _datasets(cohort, patches: bool = False):
    """The precomputed dataset and the on-the-fly one (higher levels: features files, or with
    ``patches`` only the tiling's coordinates, never embedded)."""
    kw = {"split": "all", "features_dirs": cohort["dirs"], "labels_csv": str(cohort["labels_csv"])}
    feats = needlework.create_dataset("slide_bags_multimag", **kw)
    if patches:
        kw["features_dirs"] = [
            cohort["dirs"][0],
            *(str(Path(d).parent / "patches") for d in cohort["dirs"][1:]),
        ]
    pixels = needlework.create_dataset(
        "slide_bags_multimag_pixels", slides_dir=str(cohort["slides_dir"]), **kw
    )
    return feats, pixels


@pytest.mark.parametrize("patches", [False, True], ids=["features", "patches"])
def test_on_the_fly_features_equal_the_precomputed_ones(cohort, patches):
    encoder = needlework.create_encoder("color_stats")
    feats, pixels = _datasets(cohort, patches)
    assert len(feats) == len(pixels) == 2
    for i in range(len(feats)):
        a, b = feats[i], pixels[i]
        torch.testing.assert_close(a["bag"], b["bag"])  # the lowest magnification stays precomputed
        for level in (1, 2):
            assert f"bag_{level}" not in b
            tiles, mask = b[f"tiles_{level}"], b[f"mask_{level}"]
            torch.testing.assert_close(mask, a[f"mask_{level}"])
            assert len(tiles) == len(a[f"bag_{level}"]) and mask.any() and not mask.all()
            idx = torch.arange(len(tiles))
            pix = tiles.gather(torch.zeros_like(idx), idx)
            assert pix.shape == (len(idx), 3, 16, 16)
            assert (pix[~mask] == 0).all()  # slots without a tile are never read
            with torch.no_grad():
                on_the_fly = encoder(pix[mask])
            torch.testing.assert_close(on_the_fly, a[f"bag_{level}"][mask], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("patches", [False, True], ids=["features", "patches"])
def test_zoommil_gives_the_same_output_on_tiles_read_from_the_slide(cohort, patches):
    feats, pixels = _datasets(cohort, patches)
    dim = feats[0]["bag"].shape[1]
    torch.manual_seed(0)
    kw = {"num_levels": 3, "k": 2, "hidden_dim": 8, "attention_dim": 4, "dropout": 0.0}
    model = needlework.create_model("zoommil", in_dim=dim, child_encoder="color_stats", **kw).eval()
    a = pad_bag_levels([feats[0], feats[1]])
    b = pad_bag_levels_tiles([pixels[0], pixels[1]])
    assert b["tiles_2"].coords.shape[:2] == a["bag_2"].shape[:2]
    torch.testing.assert_close(b["mask_2"], a["mask_2"])
    keys = ("bag", "coords", "mask", "mask_1", "mask_2")
    with torch.no_grad():
        out_a = model(**{k: a[k] for k in (*keys, "bag_1", "bag_2")})
        out_b = model(**{k: b[k] for k in (*keys, "tiles_1", "tiles_2")})
    torch.testing.assert_close(out_b["logits"], out_a["logits"], rtol=1e-4, atol=1e-5)
    for att_a, att_b in zip(out_a["attention_levels"], out_b["attention_levels"]):
        torch.testing.assert_close(att_b, att_a, rtol=1e-4, atol=1e-6)
    # only the zoomed-into children were read and embedded: k = 2 parents → 2·4 children → 2·4·4 grandchildren
    assert out_a["embedded_children"] == [0, 0]
    assert 0 < out_b["embedded_children"][0] <= 2 * 2 * 4
    assert 0 < out_b["embedded_children"][1] <= 2 * 2 * 4 * 4


def test_missing_slides_dir_is_a_clear_error(cohort, tmp_path):
    kw = {"split": "all", "features_dirs": cohort["dirs"], "labels_csv": str(cohort["labels_csv"])}
    with pytest.raises(ValueError, match="slides_dir="):
        needlework.create_dataset("slide_bags_multimag_pixels", **kw)
    with pytest.raises(FileNotFoundError, match="no file in"):
        needlework.create_dataset("slide_bags_multimag_pixels", slides_dir=str(tmp_path), **kw)


def test_one_training_step_through_the_datamodule(cohort, tmp_path, monkeypatch):
    import lightning as L

    from needlework.training import ClassificationTask, DatasetDataModule

    monkeypatch.chdir(tmp_path)
    dim = _datasets(cohort)[0][0]["bag"].shape[1]
    split = tmp_path / "splits_0.csv"  # both slides in train and val
    split.write_text("train,val,test\nslide_000,slide_000,\nslide_001,slide_001,\n")
    kwargs = {"features_dirs": cohort["dirs"], "labels_csv": str(cohort["labels_csv"]),
              "slides_dir": str(cohort["slides_dir"]), "split_file": str(split)}  # fmt: skip
    data = DatasetDataModule(
        "slide_bags_multimag_pixels", kwargs, batch_size=2, collate="pad_bag_levels_tiles"
    )
    model_kwargs = {"in_dim": dim, "num_levels": 3, "k": 2, "hidden_dim": 8, "attention_dim": 4}
    task = ClassificationTask("zoommil", {**model_kwargs, "child_encoder": "color_stats"}, lr=1e-3)
    trainer = L.Trainer(
        fast_dev_run=True, logger=False, enable_progress_bar=False, enable_model_summary=False
    )
    trainer.fit(task, data)
    assert trainer.callback_metrics["train/loss"].isfinite()
