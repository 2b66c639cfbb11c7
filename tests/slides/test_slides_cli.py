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
                "--out_dir",
                str(cohort),
                "--n_slides",
                "3",
                "--width",
                "1024",
                "--height",
                "768",
                "--slides_per_patient",
                "1",
                "--lesion_radius",
                "[16, 24]",
            ]
        )
        == 0
    )
    slides = str(cohort / "slides")
    # Without the override CSV the slide without MPP stops the run with the fix in the message.
    with pytest.warns(UserWarning, match="no tissue found"):  # default minimum area > these tiny pieces
        assert (
            main(
                [
                    "slides", "tile", "--slides", slides, "--job_dir", str(job),
                    "--tiling.patch_size", "64", "--progress", "false",
                ]
            )
            == 1
        )
    err = capsys.readouterr().err
    assert "error: tile failed on slide" in err and "--mpp_csv" in err and "Traceback" not in err
    # Different segmentation settings: finished slides are redone, not skipped.
    assert (
        main(
            [
                "slides",
                "tile",
                "--slides",
                slides,
                "--job_dir",
                str(job),
                "--tiling.patch_size",
                "64",
                "--progress",
                "false",
                "--mpp_csv",
                str(cohort / "mpp_overrides.csv"),
                "--tissue.seg_mpp",
                "2",
                "--tissue.min_area_um2",
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
                "--slides",
                slides,
                "--job_dir",
                str(job),
                "--encoder",
                "color_stats",
                "--num_workers",
                "0",
                "--batch_size",
                "8",
                "--progress",
                "false",
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
                "--labels_csv",
                str(cohort / "labels.csv"),
                "--out_dir",
                str(tmp_path / "splits"),
                "--k",
                "2",
                "--val",
                "false",
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
                "--slides",
                slides,
                "--scores",
                str(tmp_path / "slide_000_scores.h5"),
                "--out_dir",
                str(tmp_path / "heat"),
                "--formats",
                "[png, geojson]",
                "--max_side",
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
                "--slides",
                str(tmp_path / "s.tif"),
                "--features",
                str(tmp_path / "s.h5"),
                "--checkpoint",
                str(tmp_path / "last.ckpt"),
                "--out_dir",
                str(tmp_path / "out"),
                "--formats",
                "[h5]",
                "--max_side",
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
    code = main(
        ["doctor", "--slides", str(slides), "--out_dir", str(tmp_path), "--json", "--min_free_gb", "0"]
    )
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
                "--slides",
                str(slides),
                "--out_dir",
                str(tmp_path),
                "--mpp_csv",
                str(tmp_path / "mpp.csv"),
                "--min_free_gb",
                "0",
            ]
        )
        == 0
    )
    assert "all hard checks passed" in capsys.readouterr().out


def _one_slide(folder, **kw):
    from needlework.slides.synthetic import SyntheticSlideSpec, make_synthetic_slide

    make_synthetic_slide(folder / "a.tif", SyntheticSlideSpec(width=1024, height=768, n_lesions=0, **kw))
    return folder


def test_tile_from_a_config_file_resumes_and_flags_override_it(tmp_path, capsys):
    slides, job = _one_slide(tmp_path / "slides"), tmp_path / "job"
    base = ["slides", "tile", "--slides", str(slides), "--job_dir", str(job), "--tiling.patch_size", "64"]
    with pytest.raises(SystemExit) as exit_:
        main([*base, "--tissue.min_area_um2", "1000", "--progress", "false", "--print_config"])
    assert exit_.value.code == 0
    printed = capsys.readouterr().out
    assert "patch_size: 64" in printed and "min_area_um2: 1000" in printed and "seg_mpp: 4.0" in printed
    config = tmp_path / "tile.yaml"
    config.write_text(printed)
    assert main(["slides", "tile", "--config", str(config)]) == 0
    assert "1 done" in capsys.readouterr().out
    state = job / "20x_64px_0px_overlap" / "wsi_states" / "tile"
    assert json.loads((state / "a.json").read_text())["status"] == "done"
    assert "done" in (state / "summary.md").read_text()
    # the same settings again: resumed (skipped); a flag after --config overrides the file
    assert main(["slides", "tile", "--config", str(config)]) == 0
    assert "1 skipped" in capsys.readouterr().out
    assert main(["slides", "tile", "--config", str(config), "--tiling.patch_size", "32"]) == 0
    assert (job / "20x_32px_0px_overlap" / "patches" / "a_patches.h5").is_file()


def test_bad_input_is_one_error_line_without_traceback(tmp_path, capsys):
    slides = _one_slide(tmp_path / "slides", mpp=None)  # no MPP: fails unless overridden
    # a missing folder, an embed job without tiles (bad input: status 2), a failing slide (status 1):
    # one "error:" line
    assert main(["slides", "tile", "--slides", str(tmp_path / "nope"), "--job_dir", str(tmp_path / "j")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: slide folder not found") and "Traceback" not in err
    tile = ["slides", "tile", "--slides", str(slides), "--job_dir", str(tmp_path / "j")]
    tile += ["--progress", "false"]
    assert main(tile) == 1
    err = capsys.readouterr().err
    assert "error: tile failed on slide a" in err and "--skip_errors" in err and "Traceback" not in err
    # --skip_errors (a bare boolean is true): the run goes on and lists the failure; status 1
    assert main([*tile, "--skip_errors"]) == 1
    out = capsys.readouterr().out
    assert "1 failed" in out and "a:" in out
    embed = ["slides", "embed", "--slides", str(slides), "--job_dir", str(tmp_path / "empty")]
    assert main(embed) == 2
    err = capsys.readouterr().err
    assert "error:" in err and "expected one tiling folder" in err and "Traceback" not in err
    # invalid values and unknown options are usage errors: status 2, "error: ..." naming the problem
    for argv, message in [
        ([*tile, "--tiling.overlap", "64", "--tiling.patch_size", "64"], "overlap < patch_size"),
        ([*tile, "--tiling.patch_size", "big"], "tiling.patch_size"),
        ([*tile, "--reader", "pillow"], "reader"),
        ([*tile, "--seg-mpp", "2"], "unrecognized arguments: --seg-mpp"),
    ]:
        with pytest.raises(SystemExit) as exit_:
            main(argv)
        err = capsys.readouterr().err
        assert exit_.value.code == 2 and "error:" in err and message in err and "Traceback" not in err, err
    assert main(["slides", "frobnicate"]) == 2
    assert main(["slides", "--help"]) == 0 and "tile" in capsys.readouterr().out


def test_tiling_a_slide_loads_no_torch_scipy_or_plotting(tmp_path):
    """A real ``slides tile`` run, in a fresh interpreter, imports none of the heavy packages."""
    import subprocess
    import sys

    slides = _one_slide(tmp_path / "slides")
    heavy = ("torch", "lightning", "matplotlib", "scipy", "skimage")
    argv = ["slides", "tile", "--slides", str(slides), "--job_dir", str(tmp_path / "job")]
    argv += ["--progress", "false"]
    code = (
        "import sys; from needlework.cli import main; rc = main(" + repr(argv) + "); "
        f"print([m for m in {heavy!r} if m in sys.modules]); sys.exit(rc)"
    )
    import os
    from pathlib import Path

    src = str(Path(__file__).resolve().parents[2] / "src")  # this checkout, not an installed copy
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([src, os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().splitlines()[-1] == "[]", proc.stdout
    assert (tmp_path / "job" / "20x_256px_0px_overlap" / "patches" / "a_patches.h5").is_file()
