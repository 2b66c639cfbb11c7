"""The ``needlework slides`` and ``needlework doctor`` commands, end to end on tiny slides."""

from __future__ import annotations

import json

import h5py
import numpy as np
import pytest

from needlework.cli import main


@pytest.mark.filterwarnings("ignore:The least populated class:UserWarning")
def test_slide_workflow_from_the_command_line(tmp_path, capsys):
    cohort, job = tmp_path / "cohort", tmp_path / "job"
    assert (
        main(
            [
                "slides",
                "synth",
                str(cohort),
                "--n-slides",
                "3",
                "--width",
                "1024",
                "--height",
                "768",
                "--slides-per-patient",
                "1",
                "--lesion-radius",
                "16",
                "24",
            ]
        )
        == 0
    )
    slides = str(cohort / "slides")
    # Without the override CSV the slide without MPP stops the run with the fix in the message.
    with pytest.warns(UserWarning, match="no tissue found"):  # default minimum area > these tiny pieces
        assert (
            main(["slides", "tile", slides, "--job-dir", str(job), "--patch-size", "64", "--no-progress"])
            == 1
        )
    assert "--mpp-csv" in capsys.readouterr().err
    # Different segmentation settings: finished slides are redone, not skipped.
    assert (
        main(
            [
                "slides",
                "tile",
                slides,
                "--job-dir",
                str(job),
                "--patch-size",
                "64",
                "--no-progress",
                "--mpp-csv",
                str(cohort / "mpp_overrides.csv"),
                "--seg-mpp",
                "2",
                "--seg-min-area-um2",
                "1000",
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert "3 slides" in out and "20x_64px_0px_overlap" in out
    assert (
        main(
            [
                "slides",
                "embed",
                slides,
                "--job-dir",
                str(job),
                "--encoder",
                "color_stats",
                "--num-workers",
                "0",
                "--batch-size",
                "8",
                "--no-progress",
            ]
        )
        == 0
    )
    feats = job / "20x_64px_0px_overlap" / "features_color_stats"
    assert sorted(p.name for p in feats.glob("*.h5")) == ["slide_000.h5", "slide_001.h5", "slide_002.h5"]
    assert (
        main(
            [
                "slides",
                "splits",
                str(cohort / "labels.csv"),
                "--out",
                str(tmp_path / "splits"),
                "--k",
                "2",
                "--no-val",
            ]
        )
        == 0
    )
    assert (tmp_path / "splits" / "splits_1.csv").is_file()
    # Heatmap from a scores file (here: the first colour feature as a score).
    with h5py.File(feats / "slide_000.h5") as f:
        coords, score = f["coords"][...], f["features"][:, 0]
        ps0 = f["coords"].attrs["patch_size_level0"]
    with h5py.File(tmp_path / "slide_000_scores.h5", "w") as f:
        f.create_dataset("coords", data=coords)
        d = f.create_dataset("scores", data=score)
        d.attrs["patch_size_level0"] = ps0
    assert (
        main(
            [
                "slides",
                "heatmap",
                "--slide",
                slides,
                "--scores",
                str(tmp_path / "slide_000_scores.h5"),
                "--out",
                str(tmp_path / "heat"),
                "--formats",
                "png,geojson",
                "--max-side",
                "256",
            ]
        )
        == 0
    )
    assert (tmp_path / "heat" / "slide_000_heatmap.png").is_file()
    assert (tmp_path / "heat" / "slide_000_heatmap.geojson").is_file()


def test_heatmap_from_a_checkpoint(tmp_path, capsys):
    import torch

    from needlework.models.base import NeedleworkModel
    from needlework.registry import MODELS, register_model
    from needlework.slides.synthetic import SyntheticSlideSpec, make_synthetic_slide

    if "test_slides_cli_att" not in MODELS:

        @register_model("test_slides_cli_att")
        class Att(NeedleworkModel):
            def __init__(self, in_dim: int = 4, num_classes: int = 2):
                super().__init__()
                self.score = torch.nn.Linear(in_dim, 1)
                self.head = torch.nn.Linear(in_dim, num_classes)

            def forward(self, bag, mask=None):
                a = self.score(bag).squeeze(-1).softmax(-1)
                return {"logits": self.head((a.unsqueeze(-1) * bag).sum(1)), "attention": a}

    make_synthetic_slide(tmp_path / "s.tif", SyntheticSlideSpec(width=512, height=512, n_lesions=0))
    with h5py.File(tmp_path / "s.h5", "w") as f:
        f.create_dataset("features", data=np.random.default_rng(0).random((4, 4), dtype=np.float32))
        c = f.create_dataset("coords", data=np.array([[0, 0], [128, 0], [0, 128], [128, 128]]))
        c.attrs["patch_size_level0"] = 128
    net = MODELS.create("test_slides_cli_att", in_dim=4)
    ckpt = {
        "state_dict": {f"model.{k}": v for k, v in net.state_dict().items()},
        "hyper_parameters": {"model": "test_slides_cli_att", "model_kwargs": {"in_dim": 4}, "num_classes": 2},
    }
    torch.save(ckpt, tmp_path / "last.ckpt")
    assert (
        main(
            [
                "slides",
                "heatmap",
                "--slide",
                str(tmp_path / "s.tif"),
                "--features",
                str(tmp_path / "s.h5"),
                "--checkpoint",
                str(tmp_path / "last.ckpt"),
                "--out",
                str(tmp_path / "out"),
                "--formats",
                "h5",
                "--max-side",
                "128",
            ]
        )
        == 0
    )
    with h5py.File(tmp_path / "out" / "s_scores.h5") as f:
        scores = f["scores"][...]
        assert f["scores"].attrs["score_name"] == "attention"
    assert scores.shape == (4,) and scores.sum() == pytest.approx(1.0, abs=1e-5)


def test_doctor_reports_and_fails_on_missing_mpp(tmp_path, capsys):
    from needlework.slides.synthetic import SyntheticSlideSpec, make_synthetic_slide

    slides = tmp_path / "slides"
    make_synthetic_slide(slides / "a.tif", SyntheticSlideSpec(width=512, height=512, n_lesions=0))
    make_synthetic_slide(slides / "b.tif", SyntheticSlideSpec(width=512, height=512, n_lesions=0, mpp=None))
    code = main(["doctor", str(slides), "--out", str(tmp_path), "--json", "--min-free-gb", "0"])
    report = json.loads(capsys.readouterr().out)
    checks = {c["name"]: c for c in report["checks"]}
    assert code == 1 and not report["ok"]
    assert checks["slide:a"]["status"] == "ok" and "0.25 µm/px" in checks["slide:a"]["detail"]
    assert checks["slide:b"]["status"] == "fail" and "mpp" in checks["slide:b"]["detail"].lower()
    assert checks["slide readers"]["status"] == "ok" and checks["output writable"]["status"] == "ok"
    (tmp_path / "mpp.csv").write_text("wsi,mpp\nb.tif,0.5\n")
    assert (
        main(
            [
                "slides",
                "doctor",
                str(slides),
                "--out",
                str(tmp_path),
                "--mpp-csv",
                str(tmp_path / "mpp.csv"),
                "--min-free-gb",
                "0",
            ]
        )
        == 0
    )
    assert "all hard checks passed" in capsys.readouterr().out
