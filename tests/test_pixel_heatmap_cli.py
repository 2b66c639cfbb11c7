"""``needlework slides heatmap --checkpoint`` of a model trained on slide pixels (issue #14 item 7): the
attention over ``x_low`` as PNG, h5 and QuPath GeoJSON, its cells mapped onto level 0 exactly."""

import json

import numpy as np
import pytest
import torch

pytest.importorskip("tifffile")

from needlework.cli import main as cli_main
from needlework.data.splits import create_splits
from needlework.slides.patch_reader import grid_to_level0, level0_to_grid
from needlework.slides.pixel_data import SlideImageDataset, collate_slide_pixels
from needlework.slides.reader import open_slide
from needlework.slides.synthetic import make_synthetic_cohort

# the test slides are 192 µm wide: no morphology or minimum area (sized for millimetre-scale tissue)
TISSUE = {"min_area_um2": 0, "close_um": 0, "open_um": 0, "median_um": 0}
CELL = 4  # configs/slides/ats_pixels.yaml: one attention cell = 4 px of x_low (pool 2 × cell_pool 2)


@pytest.fixture(scope="module")
def fitted(tmp_path_factory):
    """A 6-slide cohort and the checkpoint of one real training step of ``slides/ats_pixels``."""
    root = tmp_path_factory.mktemp("pixel_heatmap")
    info = make_synthetic_cohort(
        root / "cohort", n_slides=6, width=768, height=512, slides_per_patient=1, lesion_radius=(16, 32)
    )
    create_splits(info["labels_csv"], root / "splits", k=3)
    d = "--data.init_args.dataset_kwargs."
    args = ["fit", "--config", "slides/ats_pixels", "--runs_dir", str(root / "runs"),
            f"{d}slides_dir", str(info["slides_dir"]), f"{d}labels_csv", str(info["labels_csv"]),
            f"{d}splits_dir", str(root / "splits"), f"{d}mpp_csv", str(info["mpp_csv"]),
            f"{d}tissue", json.dumps(TISSUE), "--data.init_args.num_workers", "0",
            "--data.init_args.batch_size", "2", "--trainer.max_epochs", "1",
            "--trainer.limit_train_batches", "1", "--trainer.limit_val_batches", "1",
            "--test_after_fit", "false", "--trainer.enable_progress_bar", "false",
            "--trainer.enable_model_summary", "false"]  # fmt: skip
    assert cli_main(args) == 0
    (ckpt,) = (root / "runs").glob("slides_ats_pixels/*/checkpoints/last.ckpt")
    info["checkpoint"] = ckpt
    info["root"] = root
    return info


def _heatmap(fitted, out, *extra):
    return cli_main(
        ["slides", "heatmap", "--slides", str(fitted["slides_dir"]), "--out_dir", str(out),
         "--checkpoint", str(fitted["checkpoint"]), "--formats", "[png, h5, geojson]",
         "--max_side", "256", *extra]
    )  # fmt: skip


def test_pixel_checkpoint_heatmaps_map_onto_the_x_low_cells(fitted, tmp_path):
    import h5py
    from PIL import Image

    import needlework
    from needlework.models.base import route_batch

    assert _heatmap(fitted, tmp_path) == 0
    slides = sorted(fitted["slides_dir"].glob("*.tif"))
    assert len(slides) == 6
    for path in slides:
        sid = path.stem
        assert {p.name for p in tmp_path.glob(f"{sid}_*")} == {
            f"{sid}_heatmap.png",
            f"{sid}_scores.h5",
            f"{sid}_heatmap.geojson",
        }
    assert not list(tmp_path.glob("*.tmp*"))  # atomic writes leave nothing behind

    sid = slides[1].stem
    slide = open_slide(slides[1], mpp_override=0.25)
    w0, h0 = slide.dimensions
    with h5py.File(tmp_path / f"{sid}_scores.h5") as f:
        coords, scores = f["coords"][:], f["scores"][:]
        attrs = dict(f["scores"].attrs)
    low_ds = np.asarray(attrs["low_downsample"])
    assert attrs["mpp_level0"] == pytest.approx(0.25)
    assert attrs["low_mpp"] == pytest.approx(4.0) and attrs["high_mpp"] == pytest.approx(0.5)
    side = int(attrs["patch_size_level0"])
    assert side == pytest.approx(CELL * low_ds.mean())

    # every GeoJSON square is one x_low cell of CELL px: its corners are grid_to_level0 of the cell's
    features = json.loads((tmp_path / f"{sid}_heatmap.geojson").read_text())["features"]
    rings = np.array([f["geometry"]["coordinates"][0][:4] for f in features], dtype=np.float64)
    corner_low = level0_to_grid(rings[:, 0], low_ds)
    cells = np.round(corner_low / CELL).astype(np.int64)
    np.testing.assert_array_equal(corner_low, cells * CELL)  # on the x_low cell grid
    np.testing.assert_array_equal(rings[:, 0], grid_to_level0(cells * CELL, low_ds))
    np.testing.assert_array_equal(rings[:, 2], grid_to_level0((cells + 1) * CELL, low_ds))
    # ... and they tile the whole slide, each cell once (cells of the padding left out)
    nx, ny = int(np.ceil(w0 / side)), int(np.ceil(h0 / side))
    assert sorted(map(tuple, cells.tolist())) == [(c, r) for c in range(nx) for r in range(ny)]
    np.testing.assert_array_equal(coords, rings[:, 0])

    # the scores are the model's attention map over the x_low the dataset gives it in training
    net = needlework.load_model(fitted["checkpoint"]).eval()
    ds = SlideImageDataset(
        "all",
        slides_dir=str(fitted["slides_dir"]),
        labels_csv=str(fitted["labels_csv"]),
        mpp_csv=str(fitted["mpp_csv"]),
        low_mpp=4.0,
        high_mpp=0.5,
        patch_size=64,
        tissue=TISSUE,
    )
    i = [it["slide_id"] for it in ds.items].index(sid)
    batch = collate_slide_pixels([ds[i]])
    torch.manual_seed(0)
    with torch.no_grad():
        amap = net(**route_batch(net.forward, batch))["attention_map"][0].numpy()
    np.testing.assert_allclose(scores, amap[cells[:, 1], cells[:, 0]], rtol=1e-5, atol=1e-7)
    assert Image.open(tmp_path / f"{sid}_heatmap.png").size[0] >= 192


def test_pixel_heatmap_geojson_top_k_and_view_override(fitted, tmp_path):
    import h5py

    # a coarser x_low than in training (--pixel_kwargs), the best 3 cells only in the GeoJSON
    args = ["--geojson_top_k", "3", "--pixel_kwargs", '{"low_mpp": 8.0}', "--formats", "[h5, geojson]"]
    assert _heatmap(fitted, tmp_path, *args) == 0
    sid = "slide_000"
    assert not (tmp_path / f"{sid}_heatmap.png").exists()
    with h5py.File(tmp_path / f"{sid}_scores.h5") as f:
        coords, scores = f["coords"][:], f["scores"][:]
        attrs = dict(f["scores"].attrs)
    assert attrs["low_mpp"] == pytest.approx(8.0)
    assert attrs["patch_size_level0"] == CELL * 32  # 8 µm/px over 0.25 µm/px level 0
    features = json.loads((tmp_path / f"{sid}_heatmap.geojson").read_text())["features"]
    corners = [tuple(f["geometry"]["coordinates"][0][0]) for f in features]
    best = np.argsort(-scores, kind="stable")[:3]
    assert corners == [tuple(c) for c in coords[best].tolist()]


def test_pixel_heatmap_errors_are_clear(fitted, tmp_path, capsys):
    import needlework

    def run(*args):
        rc = cli_main(["slides", "heatmap", "--slides", str(fitted["slides_dir"]), "--out_dir",
                       str(tmp_path / "out"), *args])  # fmt: skip
        return rc, capsys.readouterr().err

    rc, err = run("--checkpoint", str(tmp_path / "nope.ckpt"))
    assert rc == 2 and "error: --checkpoint" in err and "nope.ckpt: no such file" in err
    junk = tmp_path / "junk.ckpt"
    junk.write_bytes(b"not a checkpoint")
    rc, err = run("--checkpoint", str(junk))
    assert rc == 2 and "error:" in err and "not a PyTorch checkpoint" in err
    # a feature model, saved as `needlework fit` saves one (model + datamodule hyper-parameters)
    abmil = needlework.create_model("abmil", in_dim=8, num_classes=2)
    feat = tmp_path / "abmil.ckpt"
    torch.save(
        {
            "state_dict": {f"model.{k}": v for k, v in abmil.state_dict().items()},
            "hyper_parameters": {"model": "abmil", "model_kwargs": {"in_dim": 8}, "num_classes": 2},
            "datamodule_hyper_parameters": {"dataset": "slide_bags", "dataset_kwargs": {}},
        },
        feat,
    )
    rc, err = run("--checkpoint", str(feat))
    assert rc == 2 and "error:" in err and "'slide_bags'" in err and "--features" in err
    rc, err = run("--checkpoint", str(fitted["checkpoint"]), "--features", str(tmp_path))
    assert rc == 2 and "error:" in err and "drop --features" in err
    assert not (tmp_path / "out").exists() or not list((tmp_path / "out").iterdir())
